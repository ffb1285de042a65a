"""The controller's HTTP API (``transmigrate serve``): JSON under ``/api``, described
by OpenAPI at ``/openapi.json``, Prometheus metrics at ``/metrics``, and the
dashboard at ``/`` (``dashboard/``: plain JavaScript over this API, uPlot for charts).

Bound to loopback by default. Anywhere else every request must carry the token
(``Authorization: Bearer TOKEN``), and the server refuses to start without one:
the API moves services between kernels.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from transmigrate.config import Config
from transmigrate.errors import MachineNotFound, TransmigrateError
from transmigrate.interfaces.remote import announced
from transmigrate.orchestrate.controller import (
    LIVE_INTERVAL_S,
    Controller,
    LabOnly,
    Selection,
    VmView,
)
from transmigrate.orchestrate.faults import FAULTS
from transmigrate.orchestrate.history import Busy, Operation
from transmigrate.orchestrate.host import Host

__all__ = ["DEFAULT_LISTEN", "create_app", "parse_listen", "serve"]

DEFAULT_LISTEN = "127.0.0.1:8742"
DASHBOARD = Path(__file__).parent / "dashboard"
UPLOT = Path(sys.prefix) / "share" / "transmigrate" / "uplot"
"""The charting library, fetched from the npm registry by scripts/setup."""


@dataclass
class UpdateRequest:
    kernel: str
    """The kernel to move the VM's declared services to (a release or a prefix)."""
    copy: Literal["auto", "pre", "post", "stop"] = "auto"
    pids: list[int] = field(default_factory=list)
    """With processes and cgroups: what to move instead of the declared services."""
    processes: list[str] = field(default_factory=list)
    """The oldest process of each name, with its tree."""
    cgroups: list[str] = field(default_factory=list)
    """Every tree in each of these cgroups (a path under /sys/fs/cgroup)."""
    strict: bool = False
    """Refuse, rather than warn, when the old VM's root file system changed."""


@dataclass
class Started:
    operation: int


@dataclass
class OperationProgress:
    lines: list[str]
    outcome: str
    """'running' until the operation ends."""


@dataclass
class FaultRequest:
    fault: str
    """A fault's name, as ``transmigrate inject`` takes it (``GET /api/faults``)."""
    cpu: int | None = None
    """deadlock: the CPU to wedge."""
    all_cpus: bool | None = None
    """deadlock: wedge every CPU."""
    readers: int | None = None
    """hung-driver: how many readers to block."""


@dataclass
class Faults:
    lab: bool
    """Whether this controller injects faults (``serve --lab``)."""
    faults: list[str]


def create_app(controller: Controller, *, token: str | None = None) -> FastAPI:
    """The API over ``controller``; with ``token``, every request must carry it."""

    app = FastAPI(title="transmigrate", summary="Keep services running while their kernel "
                  "is replaced or fails", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def authorized(request: Request,
                         call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Every path but the page itself (which holds no data and asks for the token),
        the schema and the metrics included, when there is a token."""
        if token is not None and not _page(request.url.path):
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "a valid token is required "
                                     "(Authorization: Bearer TOKEN)"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(TransmigrateError)
    def refused(_: Request, exc: TransmigrateError) -> JSONResponse:
        status = 404 if isinstance(exc, MachineNotFound) else \
            409 if isinstance(exc, Busy) else 403 if isinstance(exc, LabOnly) else 400
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.get("/api/vms")
    def vms() -> list[VmView]:
        """Every VM (standbys shown on the VM they stand by for)."""
        return controller.vms()

    @app.get("/api/vms/{name}")
    def vm(name: str) -> VmView:
        return controller.vm(name)

    @app.post("/api/vms/{name}/update", status_code=202)
    def update(name: str, request: UpdateRequest) -> Started:
        """Move the VM's declared services live to another kernel, in the background;
        follow it at ``/api/operations/{operation}``. 409 while the VM has an
        operation running."""
        selection = Selection(tuple(request.pids), tuple(request.processes),
                              tuple(request.cgroups))
        return Started(operation=controller.start_update(
            name, request.kernel, copy=request.copy, selection=selection,
            strict=request.strict))

    @app.get("/api/faults")
    def faults() -> Faults:
        """The faults a lab's controller injects, and whether this one is a lab's."""
        return Faults(lab=controller.lab, faults=list(FAULTS))

    @app.post("/api/vms/{name}/faults")
    def inject(name: str, request: FaultRequest) -> Operation:
        """Inject a fault into the VM (a lab's controller only: 403 otherwise); the
        injection, on record as an operation, once the fault is triggered."""
        return controller.inject(name, request.fault, cpu=request.cpu,
                                 all_cpus=request.all_cpus, readers=request.readers)

    @app.get("/api/vms/{name}/live")
    async def live(name: str) -> dict[str, Any]:
        """What the monitor reads in the VM now (tasks by state, memory, forks, CPUs)
        and the faults it saw; the first call attaches the monitor."""
        return await asyncio.to_thread(controller.live, name)

    @app.get("/api/vms/{name}/live/stream", response_class=StreamingResponse)
    async def live_stream(name: str) -> StreamingResponse:
        """The same as server-sent events, LIVE_INTERVAL_S apart, until the client goes."""
        first = await asyncio.to_thread(controller.live, name)  # errors as JSON, here

        async def events() -> AsyncIterator[str]:
            reading = first
            while True:
                yield f"data: {json.dumps(reading)}\n\n"
                await asyncio.sleep(LIVE_INTERVAL_S)
                try:
                    reading = await asyncio.to_thread(controller.live, name)
                except TransmigrateError as exc:
                    yield f"event: error\ndata: {json.dumps({'detail': str(exc)})}\n\n"
                    return

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/api/operations")
    def operations(vm: str | None = None) -> list[Operation]:
        """The newest operations first (updates; with their reports once done)."""
        return controller.operations(vm)

    @app.get("/api/operations/{operation}")
    def operation(operation: int) -> Operation:
        found = controller.operation(operation)
        if found is None:
            raise HTTPException(404, f"no operation {operation}")
        return found

    @app.get("/api/operations/{operation}/progress")
    def progress(operation: int, after: int = 0) -> OperationProgress:
        """The progress lines of an operation this controller started, from the
        ``after``-th on, and its outcome so far: a client follows it by asking again."""
        found = controller.operation(operation)
        if found is None:
            raise HTTPException(404, f"no operation {operation}")
        return OperationProgress(controller.progress(operation, after), found.outcome)

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD / "index.html")

    @app.get("/static/dashboard.js", include_in_schema=False)
    def dashboard_script() -> FileResponse:
        return FileResponse(DASHBOARD / "dashboard.js", media_type="text/javascript")

    @app.get("/static/uplot/{name}", include_in_schema=False)
    def uplot(name: str) -> FileResponse:
        if name not in ("uPlot.iife.min.js", "uPlot.min.css") or not (UPLOT / name).exists():
            raise HTTPException(404, f"no {name} (scripts/setup fetches uPlot into {UPLOT})")
        return FileResponse(UPLOT / name)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(controller.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _page(path: str) -> bool:
    return path == "/" or path.startswith("/static/")


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TransmigrateError(f"--listen takes HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log(line: str) -> None:
    print(f"time={time.time():.3f} {line}", file=sys.stderr, flush=True)


def serve(host: Host, config: Config, listen: str = DEFAULT_LISTEN, *,
          token_file: Path | None = None, lab: bool = False) -> None:
    """Run the controller until SIGINT or SIGTERM, made known to the CLI in the state
    directory (:func:`remote.announced`); ``token_file`` holds the token every request
    must carry; ``lab``: it injects faults too."""
    address, port = parse_listen(listen)
    token = _read_token(token_file) if token_file is not None else None
    if not _loopback(address) and not token:
        raise TransmigrateError(f"refusing to listen on {address} without a token: give "
                                "--token-file (loopback needs none)")
    controller = Controller(host, config, log=_log, lab=lab)
    local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
    url = f"http://{f'[{local}]' if ':' in local else local}:{port}"
    try:
        _log(f"listen={address}:{port} vms={len(controller.vms())} lab={lab}")
        # uvicorn stops on SIGTERM, then raises it again: end as on SIGINT, not killed
        # by it, so that the operations under way finish and the guards stop (below).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with announced(host.state, url, token_file):
            uvicorn.run(create_app(controller, token=token), host=address, port=port,
                        log_level="warning")
    finally:
        controller.wait()
        controller.close()


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise TransmigrateError(f"cannot read the token file {path}: {exc.strerror}") from exc
    if not token:
        raise TransmigrateError(f"the token file {path} is empty")
    return token
