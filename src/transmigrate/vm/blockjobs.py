"""QEMU block jobs over QMP: merging a disk's top overlay into its base, live.

Kept apart from the machine so that the job's protocol (start, wait until
ready, complete, wait until gone, check the result) reads in one place.
"""

from __future__ import annotations

from typing import Any, Protocol

from transmigrate.errors import MachineError
from transmigrate.polling import wait_for

__all__ = ["Qmp", "commit_active", "is_merged"]


class Qmp(Protocol):
    """Runs one QMP command on a VM (``Machine.qmp``)."""

    def __call__(self, command: str, arguments: dict[str, object] | None = None,
                 timeout: float = 10.0) -> object: ...


def _dicts(answer: object) -> list[dict[str, Any]]:
    return [a for a in answer if isinstance(a, dict)] if isinstance(answer, list) else []


def _inserted_image(qmp: Qmp, device: str) -> dict[str, Any]:
    """The image chain QEMU has in ``device`` (``query-block``), or {} if none."""
    return next((d["inserted"]["image"] for d in _dicts(qmp("query-block"))
                 if d.get("device") == device and "inserted" in d), {})


def _wait_job(qmp: Qmp, job: str, *, ready: bool, timeout: float, owner: str) -> None:
    """Wait until ``job`` is ready (``ready``) or else gone; a job in I/O error fails."""
    def check() -> bool:
        jobs = [j for j in _dicts(qmp("query-block-jobs")) if j.get("device") == job]
        if jobs and jobs[0].get("io-status", "ok") != "ok":
            raise MachineError(f"{owner}: block job {job} failed: {jobs[0]}")
        return bool(jobs and jobs[0].get("ready")) if ready else not jobs

    state = "ready" if ready else "done"
    wait_for(check, timeout=timeout, what=f"{owner}: block job {job} was not {state}",
             error=MachineError)


def is_merged(qmp: Qmp, device: str, base: str) -> bool:
    """Whether ``device`` runs on ``base`` itself, with no overlay above it."""
    image = _inserted_image(qmp, device)
    return image.get("filename") == base and "backing-image" not in image


def commit_active(qmp: Qmp, device: str, base: str, *, timeout: float, owner: str) -> None:
    """Merge ``device``'s top overlay into its backing image ``base`` while the guest
    runs, and switch the guest's disk over to ``base``. Nothing to do if it is there
    already (an earlier merge that completed after its caller gave up on it).

    QEMU's active commit copies the overlay's clusters down until the two agree
    (the job is then ready), and keeps them in step until it is completed.
    ``owner`` names the VM in errors.
    """
    if is_merged(qmp, device, base):
        return
    job = f"commit-{device}"
    qmp("block-commit", {"device": device, "job-id": job})
    _wait_job(qmp, job, ready=True, timeout=timeout, owner=owner)
    qmp("block-job-complete", {"device": job})
    _wait_job(qmp, job, ready=False, timeout=timeout, owner=owner)
    # The graph can lag the job's end by a moment.
    wait_for(lambda: is_merged(qmp, device, base), timeout=10, error=MachineError,
             what=f"{owner}: merging into {base} did not complete: the disk is "
                  f"{_inserted_image(qmp, device)}")
