"""One root exception, with specific subclasses that carry their context.

Every error a user can cause or meet is a :class:`TransmigrateError`; the CLI
prints ``str(error)`` as one line and exits non-zero. Anything else is a bug.
"""

from __future__ import annotations


class TransmigrateError(Exception):
    """Root of every error transmigrate reports to its user."""


class CommandError(TransmigrateError):
    """A host command we ran failed; keeps the command, exit code and output."""

    def __init__(self, argv: list[str], returncode: int, output: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.output = output
        last = output.strip().splitlines()[-1] if output.strip() else "no output"
        super().__init__(f"{argv[0]} failed (exit {returncode}): {last}")


class KernelNotFound(TransmigrateError):
    """The requested kernel is not in the archive."""


class ImageError(TransmigrateError):
    """The guest image could not be built."""


class MachineError(TransmigrateError):
    """A VM could not be started, reached or stopped."""


class MachineNotFound(MachineError):
    """No VM of that name is known."""


class MachineExists(MachineError):
    """A VM of that name already exists."""


class MachineDead(MachineError):
    """The VM's QEMU process is gone."""


class BootPanic(MachineError):
    """The guest kernel panicked while booting, before anything ran on it."""


class AgentError(TransmigrateError):
    """The guest agent did not answer, or answered out of protocol."""


class GuestCommandFailed(TransmigrateError):
    """A command in a guest exited non-zero; keeps what it was for, exit code and output."""

    def __init__(self, what: str, where: str, exit_code: int, output: str) -> None:
        self.exit_code = exit_code
        self.output = output
        last = output.strip().splitlines()[-1] if output.strip() else f"exit {exit_code}"
        super().__init__(f"{what} failed in {where} (exit {exit_code}): {last}")


class NetworkError(TransmigrateError):
    """The private network could not be set up or torn down."""


class IntrospectionError(TransmigrateError):
    """The guest's memory does not hold what we looked for."""


class Unrecoverable(IntrospectionError):
    """Kernel state that cannot be trusted or rebuilt; the message says why in a few words."""


class FaultError(TransmigrateError):
    """A fault could not be built, injected or cleared."""
