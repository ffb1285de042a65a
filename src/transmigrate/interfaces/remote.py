"""Finding a running controller and talking to it, for the CLI.

``transmigrate serve`` announces itself in the state directory
(``controller.json``: its pid, its URL and where its token is). While it runs it
owns the VMs it guards and the operations it started, so a one-shot command
that would change a VM hands the work to it over the HTTP API instead of
doing it beside it. A file a dead controller left is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transmigrate.errors import TransmigrateError

__all__ = ["ANNOUNCEMENT", "NotFound", "Remote", "announced"]

ANNOUNCEMENT = "controller.json"
"""In the state directory, while a controller runs."""


class NotFound(TransmigrateError):
    """The controller has no such VM or operation."""


@contextlib.contextmanager
def announced(state: Path, url: str, token_file: Path | None) -> Iterator[None]:
    """The controller of ``state`` at ``url`` made known for as long as the block runs
    (readable by root only: it names the token's file)."""
    path = state / ANNOUNCEMENT
    state.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"pid": os.getpid(), "url": url,
                       "token_file": str(token_file.resolve()) if token_file else None})
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.chmod(0o600)
    temporary.replace(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text())["pid"] == os.getpid():
                path.unlink()


class Remote:
    """The running controller's API."""

    def __init__(self, url: str, pid: int, token: str | None = None) -> None:
        self.url, self.pid, self.token = url.rstrip("/"), pid, token

    @classmethod
    def find(cls, state: Path) -> Remote | None:
        """The controller that runs for ``state``, or None."""
        try:
            found = json.loads((state / ANNOUNCEMENT).read_text())
            pid, url, token_file = int(found["pid"]), str(found["url"]), found["token_file"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:  # gone, or its pid taken by another program since
            if b"serve" not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return None
        except OSError:
            return None
        token = None
        if token_file:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as exc:
                raise TransmigrateError(f"the controller (pid {pid}) runs, but its token file "
                                        f"{token_file} cannot be read: {exc.strerror}") from exc
        return cls(url, pid, token)

    def guards(self, name: str) -> bool:
        """Whether the controller guards VM ``name``."""
        try:
            return self.get(f"/api/vms/{name}").get("guard") is not None
        except NotFound:
            return False

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json",
                     **({"Authorization": f"Bearer {self.token}"} if self.token else {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read())["detail"]
            except (ValueError, KeyError, TypeError):
                detail = exc.reason
            error = NotFound if exc.code == 404 else TransmigrateError
            raise error(f"the controller refused: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransmigrateError(f"the controller (pid {self.pid}) at {self.url} does not "
                                    f"answer: {reason}") from exc
