"""The ``transmigrate`` command: parse, call orchestrate, render. Nothing else.

Progress goes to stderr; results go to stdout, as a table or, with ``--json``,
as JSON. Every error a user can cause ends in one line and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from transmigrate.config import Config, Service, load_config
from transmigrate.detect.events import READERS, Event, Sample
from transmigrate.errors import TransmigrateError
from transmigrate.interfaces.remote import Remote
from transmigrate.orchestrate import demo as demo_job
from transmigrate.orchestrate import faults, lifecycle, services
from transmigrate.orchestrate import guard as guard_job
from transmigrate.orchestrate import recover as recover_job
from transmigrate.orchestrate import update as update_job
from transmigrate.orchestrate.history import History
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.monitor import (
    DETECTORS,
    Monitor,
    MonitorConfig,
    MonitorStats,
    parse_interval,
    readings,
    with_settings,
)

app = typer.Typer(
    name="transmigrate",
    help="Keep Linux services running while their kernel is replaced or fails.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True, highlight=False)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
ConfigOption = Annotated[Path | None, typer.Option("--config", help="transmigrate.toml to use.")]
PackageOption = Annotated[list[str] | None, typer.Option(
    "--package", "-p", help="Extra Debian package for the guest image (repeatable).")]
PanickingOption = Annotated[bool, typer.Option(
    "--include-panicking", help="Also the task that panicked the kernel (refused by default: "
    "the call it was in is made again, and may crash the new kernel too).")]
FilesOption = Annotated[Path | None, typer.Option(
    "--files", help="Directory copied over the guest image's root.")]


class _Progress:
    """Renders progress lines on stderr with the time since the command began."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        err.print(f"[dim]{time.monotonic() - self.start:6.1f}s[/dim] {message}")


_settings: list[str] = []
"""``-c KEY=VALUE`` given before the command: over every configuration it reads."""


@app.callback()
def _options(setting: Annotated[list[str] | None, typer.Option(
        "-c", "--set", metavar="KEY=VALUE",
        help="A configuration value over transmigrate.toml's, as git -c: a TOML key and "
             "value, e.g. -c vm.cpus=2 -c guard.web.standby_kernel='\"6.12\"' "
             "(repeatable; before the command).")] = None) -> None:
    _settings[:] = setting or []


def _config(path: Path | None) -> Config:
    """The configuration at ``path`` (or where it is looked for), the -c settings over it."""
    return load_config(path, _settings)


def _emit_json_line(data: Any) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def kernels(json_: JsonOption = False,
            refresh: Annotated[bool, typer.Option(help="Re-read the archive's lists.")] = False,
            ) -> None:
    """List the Debian cloud kernels the archive offers and which are cached."""
    host = Host.from_environment()
    if refresh:
        host.archive.update(force=True)
    entries = host.catalog.available()
    if json_:
        _emit_json([asdict(e) for e in entries])
        return
    table = Table("release", "version", "cached", "debug info")
    for e in entries:
        table.add_row(e.release, e.version, "yes" if e.cached else "",
                      "yes" if e.debug_cached else "")
    out.print(table)


@app.command()
def fetch(kernel: Annotated[str, typer.Argument(help="Kernel release, e.g. 6.1.0-57.")],
          debug: Annotated[bool, typer.Option(help="Also fetch the DWARF vmlinux.")] = False,
          headers: Annotated[bool, typer.Option(help="Also fetch the headers.")] = False,
          json_: JsonOption = False) -> None:
    """Bring a kernel into the cache."""
    host = Host.from_environment()
    fetched = host.catalog.fetch(kernel, debug=debug, headers=headers, progress=_Progress())
    info = {"release": fetched.release, "version": fetched.version,
            "directory": str(fetched.directory),
            "debug": str(fetched.vmlinux_debug) if fetched.vmlinux_debug.exists() else None}
    if json_:
        _emit_json(info)
    else:
        out.print(f"{fetched.release} ({fetched.version}) in {fetched.directory}")


@app.command()
def image(config: ConfigOption = None, package: PackageOption = None, files: FilesOption = None,
          rebuild: Annotated[bool, typer.Option(help="Build even if cached.")] = False,
          json_: JsonOption = False) -> None:
    """Build (or find cached) the guest image."""
    host = Host.from_environment()
    spec = services.declared_image(_config(config), package or (), files)
    guest_image = host.image(spec)
    if rebuild or not guest_image.exists():
        guest_image.build(_Progress())
    if json_:
        _emit_json({"path": str(guest_image.path), "packages": spec.all_packages()})
    else:
        out.print(str(guest_image.path))


@app.command()
def up(name: Annotated[str, typer.Argument(help="Name of the new VM.")],
       kernel: Annotated[str | None, typer.Option(
           "--kernel", "-k", help="Kernel release to boot (default: vms.NAME.kernel of the "
                                  "configuration).")] = None,
       memory: Annotated[int | None, typer.Option(help="Guest RAM in MiB.")] = None,
       cpus: Annotated[int | None, typer.Option(help="Virtual CPUs.")] = None,
       config: ConfigOption = None, package: PackageOption = None, files: FilesOption = None,
       json_: JsonOption = False) -> None:
    """Boot a VM on a kernel; returns when its guest agent answers. What is not given
    comes from the configuration's table vms.NAME, then its table vm."""
    host = Host.from_environment()
    loaded = _config(config)
    with contextlib.closing(History.at(host.state)) as history, \
            history.recorded("up", name, {"kernel": kernel or loaded.vm(name).kernel}) as kept:
        booted = services.up_declared(
            host, loaded, name, kernel=kernel, memory_mib=memory, cpus=cpus,
            image=services.declared_image(loaded, package or (), files), progress=_Progress())
        kept.report = booted.as_dict()
    if json_:
        _emit_json(booted.as_dict())
    else:
        record = booted.boot.machine.record
        out.print(f"{record.name} up on {record.kernel} at {record.ip} "
                  f"in {booted.boot.boot_seconds:.1f} s ({record.accel})")
        for service_name, root in booted.services_started.items():
            out.print(f"{service_name} started (pid {root})")


@app.command("ls")
def list_machines(json_: JsonOption = False) -> None:
    """List VMs and their state."""
    host = Host.from_environment()
    rows = [{**asdict(m.record), "status": m.status(), "pid": m.pid}
            for m in host.machines.all()]
    if json_:
        _emit_json(rows)
        return
    table = Table("name", "status", "kernel", "address", "memory", "accel", "pid")
    for row in rows:
        table.add_row(row["name"], row["status"], row["kernel"],
                      row["service_address"].split("/")[0],
                      f"{row['memory_mib']} MiB", row["accel"], str(row["pid"] or ""))
    out.print(table)


@app.command()
def history(vm: Annotated[str | None, typer.Option(help="Only this VM's operations.")] = None,
            limit: Annotated[int, typer.Option(help="How many, the newest first.")] = 20,
            json_: JsonOption = False) -> None:
    """The operations kept in the history (VMs brought up, updates, recoveries,
    failovers, injected faults), whether the controller or a command ran them; --json
    with their reports."""
    operations = History.at(Host.from_environment().state).recent(vm=vm, limit=limit)
    if json_:
        _emit_json([asdict(op) for op in operations])
        return
    table = Table("#", "what", "vm", "started", "took", "downtime", "outcome")
    for op in operations:
        what = op.kind + (f" {op.request['fault']}" if "fault" in op.request else "") + (
            f" to {op.request['kernel']}" if op.request.get("kernel") else "")
        took = f"{op.finished_at - op.started_at:.1f} s" if op.finished_at else ""
        downtime = "" if op.downtime_seconds is None else f"{op.downtime_seconds:.3f} s"
        table.add_row(str(op.id), what, op.vm,
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(op.started_at)),
                      took, downtime, op.outcome + (f": {op.error}" if op.error else ""))
    out.print(table)


@app.command("exec")
def exec_(name: Annotated[str, typer.Argument(help="VM to run in.")],
          command: Annotated[list[str], typer.Argument(help="Command and its arguments.")],
          timeout: Annotated[float, typer.Option(help="Seconds before it is killed.")] = 600.0,
          ) -> None:
    """Run a command in a VM; its input (unless a terminal), output and exit code pass
    through."""
    given = None if sys.stdin.isatty() else sys.stdin.buffer.read()
    result = lifecycle.exec_in(Host.from_environment(), name, command, timeout=timeout,
                               input=given)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    raise typer.Exit(result.exit_code)


@app.command()
def down(name: Annotated[str, typer.Argument(help="VM to stop.")],
         json_: JsonOption = False) -> None:
    """Stop a VM and remove everything it used; refused while another process (the
    controller, an update, a guard) runs an operation on it or guards it."""
    host = Host.from_environment()
    _refuse_beside_a_guard(host, name, "down")
    with contextlib.closing(History.at(host.state)) as history:
        history.refuse_if_busy(name)
    lifecycle.down(host, name)
    if json_:
        _emit_json({"stopped": name})
    else:
        out.print(f"{name} stopped")


@app.command()
def client(command: Annotated[list[str], typer.Argument(help="Command and its arguments.")],
           ) -> None:
    """Run a command inside the private network, next to the guests."""
    done = Host.from_environment().network.run(command)
    raise typer.Exit(done.returncode)


@app.command()
def clean(json_: JsonOption = False) -> None:
    """Stop every VM and remove the private network."""
    names = lifecycle.clean(Host.from_environment())
    if json_:
        _emit_json({"stopped": names})
    else:
        out.print(f"stopped: {', '.join(names) or 'nothing'}; network removed")


@app.command()
def update(name: Annotated[str, typer.Argument(help="VM whose kernel to replace.")],
           kernel: Annotated[str, typer.Option("--kernel", "-k", help="The new kernel.")],
           pid: Annotated[list[int] | None, typer.Option(
               help="Move this process tree (repeatable).")] = None,
           process: Annotated[list[str] | None, typer.Option(
               help="Move the oldest process of this name, with its tree (repeatable).")
           ] = None,
           cgroup: Annotated[list[str] | None, typer.Option(
               help="Move every process tree in this cgroup, a path under /sys/fs/cgroup "
                    "(repeatable).")] = None,
           copy: Annotated[str, typer.Option(
               help="How memory goes: auto (pre-copy, then post-copy if it does not "
                    "converge), pre, post, or stop (stop-and-copy).")] = "auto",
           strict: Annotated[bool, typer.Option(
               help="Refuse, rather than warn, when files of the old VM's root file system "
                    "changed since it booted and are not on the data volume.")] = False,
           config: ConfigOption = None, json_: JsonOption = False) -> None:
    """Move running services onto a new VM with another kernel; retire the old VM.

    Without --pid, --process or --cgroup: the services declared for NAME. When a
    controller runs (transmigrate serve), it does the update (with the services its
    configuration declares) and this command follows it."""
    host = Host.from_environment()
    remote = Remote.find(host.state)
    if remote is not None:
        report = _update_in_controller(remote, name, {
            "kernel": kernel, "copy": copy, "pids": pid or [], "processes": process or [],
            "cgroups": cgroup or [], "strict": strict})
    else:
        declared = _config(config).services_of(name)
        roots = update_job.find_services(host, name, pids=pid or (), processes=process or (),
                                         cgroups=cgroup or (), declared=declared)
        try:
            with History.at(host.state).recorded("update", name, {
                    "kernel": kernel, "copy": copy, "pids": roots}) as kept:
                done = update_job.update(host, name, kernel, pids=roots, copy=copy,
                                         strict=strict, progress=_Progress())
                kept.report, kept.downtime_seconds = done.as_dict(), done.frozen_seconds
        except update_job.PrecheckFailed as exc:
            if not json_:
                raise
            _emit_json({"error": str(exc), "refusals": exc.as_dicts()})
            raise typer.Exit(1) from exc
        report = done.as_dict()
    if json_:
        _emit_json(report)
        return
    out.print(f"{name}: pids {', '.join(map(str, report['pids']))} moved from "
              f"{report['kernel_before']} to {report['kernel_after']} ({report['copy']})")
    out.print(_steps_table(report["steps"], {"frozen": report["frozen_seconds"],
                                             "total": report["total_seconds"]}))
    if report["carried"]:
        out.print(f"copied inside the freeze: {', '.join(report['carried'])}")
    for warning in report["warnings"]:
        err.print(f"warning: {warning}", markup=False)


def _refuse_beside_a_guard(host: Host, name: str, command: str) -> None:
    """A command that would act on a VM the running controller guards is refused: the
    guard keeps its own standby and recovers the VM itself."""
    remote = Remote.find(host.state)
    if remote is not None and remote.guards(name):
        raise TransmigrateError(f"the controller (pid {remote.pid}) guards {name}: it keeps "
                                f"its standby and recovers it; `{command}` would act beside "
                                "it (remove its [guard] table and restart it first)")


def _update_in_controller(remote: Remote, name: str, request: dict[str, Any]
                          ) -> dict[str, Any]:
    """Hand the update to the running controller, follow its progress; its report."""
    progress = _Progress()
    operation = remote.post(f"/api/vms/{name}/update", request)["operation"]
    progress(f"the controller (pid {remote.pid}) runs the update as operation {operation}")
    seen = 0
    try:
        while True:
            followed = remote.get(f"/api/operations/{operation}/progress?after={seen}")
            for line in followed["lines"]:
                progress(line)
            seen += len(followed["lines"])
            if followed["outcome"] != "running":
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        err.print(f"the update goes on in the controller: operation {operation} "
                  "(transmigrate history)")
        raise
    done = remote.get(f"/api/operations/{operation}")
    if done["outcome"] != "done":
        raise TransmigrateError(f"the controller's update of {name} (operation {operation}) "
                                f"{done['outcome']}: {done['error']}")
    return dict(done["report"])


def _declared(config: Path | None, vm: str, service: str | None) -> tuple[Service, ...]:
    """The services declared for ``vm``, or the one named ``service``."""
    declared = _config(config).services_of(vm)
    if service is None:
        if not declared:
            raise TransmigrateError(f"no service is declared for {vm} in transmigrate.toml")
        return declared
    chosen = tuple(s for s in declared if s.name == service)
    if not chosen:
        raise TransmigrateError(f"no service {service!r} is declared for {vm}; declared: "
                                f"{', '.join(s.name for s in declared) or 'none'}")
    return chosen


ServiceArgument = Annotated[str | None, typer.Argument(
    help="A declared service (default: every one declared for the VM).")]


@app.command()
def start(name: Annotated[str, typer.Argument(help="VM to start services in.")],
          service: ServiceArgument = None, config: ConfigOption = None,
          json_: JsonOption = False) -> None:
    """Start declared services so that they can move: state on the data volume, their
    own session and IPC namespace."""
    host = Host.from_environment()
    started = {s.name: services.start_service(host, s) for s in _declared(config, name, service)}
    if json_:
        _emit_json(started)
        return
    for service_name, root in started.items():
        out.print(f"{service_name} runs in {name} (pid {root})")


@app.command()
def stop(name: Annotated[str, typer.Argument(help="VM to stop services in.")],
         service: ServiceArgument = None, config: ConfigOption = None,
         json_: JsonOption = False) -> None:
    """Stop declared services (SIGTERM, then SIGKILL after a minute)."""
    host = Host.from_environment()
    stopped = {s.name: services.stop_service(host, s) for s in _declared(config, name, service)}
    if json_:
        _emit_json(stopped)
        return
    for service_name, was_running in stopped.items():
        out.print(f"{service_name} {'stopped' if was_running else 'was not running'}")


@app.command()
def status(name: Annotated[str, typer.Argument(help="VM whose services to show.")],
           service: ServiceArgument = None, config: ConfigOption = None,
           json_: JsonOption = False) -> None:
    """Declared services: running or not, what `update` moves, where their state is."""
    found = services.service_status(Host.from_environment(), _declared(config, name, service))
    if json_:
        _emit_json([s.as_dict() for s in found])
        return
    table = Table("service", "running", "pid", "processes", "namespaces", "state on volume")
    for s in found:
        own = [name for name, mine in (("ipc", s.own_ipc), ("mount", s.own_mounts)) if mine]
        table.add_row(s.name, "yes" if s.running else "no", str(s.root or ""), str(s.pids),
                      ", ".join(own) or "-",
                      ", ".join(f"{p}{'' if ok else ' (not bound)'}"
                                for p, ok in s.state.items()) or "-")
    out.print(table)


def _steps_table(steps: dict[str, float], totals: dict[str, float]) -> Table:
    """Seconds per step, then the totals under a line."""
    table = Table("step", "seconds", show_footer=False)
    table.columns[1].justify = "right"
    for step, seconds in steps.items():
        table.add_row(step, f"{seconds:.3f}")
    table.add_section()
    for what, seconds in totals.items():
        table.add_row(f"[bold]{what}[/bold]", f"[bold]{seconds:.3f}[/bold]")
    return table


@app.command()
def monitor(name: Annotated[str, typer.Argument(help="VM to watch.")],
            interval: Annotated[str, typer.Option(help="Sampling interval, 1ms .. 10s.")] = "10ms",
            duration: Annotated[float | None, typer.Option(
                help="Stop after this many seconds (default: until Ctrl-C).")] = None,
            detector: Annotated[list[str] | None, typer.Option(
                help="Run only this detector (repeatable).")] = None,
            set_: Annotated[list[str] | None, typer.Option(
                "--set", help="DETECTOR=INTERVAL (e.g. hung-driver=100ms) or THRESHOLD=VALUE "
                              "(e.g. lockup_min_ms=50; see MonitorConfig) (repeatable).")
            ] = None,
            lock: Annotated[list[str] | None, typer.Option(
                help="Show this kernel lock and report it with events if held: a vmlinux "
                     "global, or NAME:spinlock|mutex|rwlock for a module's (repeatable).")
            ] = None,
            json_: JsonOption = False) -> None:
    """Watch a VM's kernel from outside: tasks, memory, CPUs, locks, and fault events."""
    config = with_settings(MonitorConfig(interval_s=parse_interval(interval),
                                         detectors=tuple(detector) if detector else DETECTORS,
                                         locks=tuple(lock or ())), set_ or [])
    watcher = Monitor.attach(Host.from_environment(), name, config)
    try:
        if json_:
            stats = watcher.run(_print_event_json, duration_s=duration)
        else:
            stats = _live_view(watcher, duration)
    except KeyboardInterrupt:
        return
    finally:
        watcher.close()
    err.print(f"{stats.samples} samples ({stats.torn_samples} torn) in {stats.wall_seconds:.1f} s, "
              f"monitor CPU {stats.cpu_fraction:.1%}, {len(stats.events)} events")


def _print_event_json(event: Event) -> None:
    _emit_json_line({"kind": event.kind, "monotonic_ns": event.monotonic_ns,
                     "summary": event.summary, "evidence": event.evidence})


def _live_view(watcher: Monitor, duration: float | None) -> MonitorStats:
    events: list[Event] = []
    latest: dict[str, Any] = {}
    """The newest of each reading: with per-detector intervals a sample has only some."""
    shown = [0.0]

    def render() -> Table:
        table = Table(title=watcher.readers.label, expand=True)
        table.add_column("what")
        table.add_column("now")
        shown = readings(latest)
        if "tasks" in shown:
            table.add_row("tasks by state", "  ".join(f"{k}:{v}" for k, v in
                                                      shown["tasks"].items()))
        if "memory_free_mib" in shown:
            table.add_row("memory", f"{shown['memory_free_mib']} MiB free of "
                                    f"{shown['memory_total_mib']} MiB")
        if "processes" in shown:
            table.add_row("processes / threads / forks",
                          f"{shown['processes']} / {shown['threads']} / {shown['forks']}")
        for cpu in shown.get("cpus", ()):
            table.add_row(f"cpu {cpu['cpu']}", f"{cpu['running']} switches {cpu['switches']} "
                                               f"preempt {cpu['preempt']}")
        for lock in watcher.lock_states():
            holder = f" by {lock.holder_pid} {lock.holder_comm}" if lock.holder_pid else ""
            table.add_row(f"lock {lock.name}", ("held" + holder if lock.held else "free")
                          + (", waiters" if lock.waiters else ""))
        for event in events[-5:]:
            table.add_row(f"[bold red]{event.kind}[/]", event.summary)
        return table

    with Live(render(), console=err, refresh_per_second=4) as live:
        def on_sample(sample: Sample) -> None:
            latest.update({name: getattr(sample, name) for name in READERS
                           if getattr(sample, name) is not None})
            if time.monotonic() - shown[0] > 0.25:
                shown[0] = time.monotonic()
                live.update(render())

        stats = watcher.run(events.append, duration_s=duration, on_sample=on_sample)
        live.update(render())
    return stats


@app.command("inject")
def inject_fault(
        name: Annotated[str, typer.Argument(help="VM to break.")],
        fault: Annotated[str, typer.Argument(help=f"One of: {', '.join(faults.FAULTS)}.")],
        cpu: Annotated[int | None, typer.Option(help="deadlock: the CPU to wedge.")] = None,
        all_cpus: Annotated[bool, typer.Option(
            "--all-cpus", help="deadlock: wedge every CPU (the guest stops).")] = False,
        readers: Annotated[int, typer.Option(help="hung-driver: readers to block.")] = 16,
        json_: JsonOption = False) -> None:
    """Inject a real fault: a spinlock deadlock, a hung driver, a fork bomb, a memory
    bomb, a kernel oops or a kernel panic. A lab's running controller (serve --lab)
    injects it, so that it is on record and its detection is timed."""
    host = Host.from_environment()
    options = {"cpu": cpu, "all_cpus": all_cpus or None,
               "readers": readers if fault == "hung-driver" else None}
    remote = Remote.find(host.state)
    if remote is not None and remote.get("/api/faults")["lab"]:
        _Progress()(f"the controller (pid {remote.pid}) injects it")
        report = remote.post(f"/api/vms/{name}/faults", {"fault": fault, **options})["report"]
    else:
        report = asdict(faults.inject_by_name(host, name, fault, progress=_Progress(),
                                              **options))
    if json_:
        _emit_json(report)
    else:
        out.print(f"{fault} injected into {name} ({report['kernel']})"
                  + (f" on CPU {report['cpu']}" if report["cpu"] is not None else ""))


@app.command("dump")
def dump_(name: Annotated[str, typer.Argument(help="VM to read the processes from.")],
          pid: Annotated[list[int], typer.Option(help="Process to dump (repeatable).")],
          images: Annotated[Path, typer.Option("--out", help="Directory for the images "
                                                "(one directory per process).")],
          panicking: PanickingOption = False, json_: JsonOption = False) -> None:
    """Checkpoint processes from outside: stop the VM, read them out of its memory as
    CRIU images on the host (`crit decode` reads them), and let it run on if it ran."""
    report = recover_job.dump(Host.from_environment(), name, pid, images,
                              panicking=panicking, progress=_Progress())
    if json_:
        _emit_json(report.as_dict())
    else:
        for verdict in report.processes:
            if verdict.verdict == "refused":
                err.print(f"{verdict.pid}: refused: {verdict.reason}", markup=False)
            else:
                out.print(f"{verdict.pid} ({verdict.comm}): {verdict.pages} pages in "
                          f"{verdict.images}", markup=False)
    if any(v.verdict == "refused" for v in report.processes):
        raise typer.Exit(1)


@app.command("recover")
def recover_(name: Annotated[str, typer.Argument(help="VM whose processes to recover.")],
             kernel: Annotated[str | None, typer.Option(
                 "--kernel", "-k", help="Kernel of the new VM (default: the same).")] = None,
             pid: Annotated[list[int] | None, typer.Option(
                 help="Recover this process (repeatable).")] = None,
             process: Annotated[list[str] | None, typer.Option(
                 help="Recover the oldest process of this name (repeatable).")] = None,
             panicking: PanickingOption = False, config: ConfigOption = None,
             json_: JsonOption = False) -> None:
    """Rebuild processes of a dead, hung or running VM on a new VM from its memory.

    Without --pid or --process: the services declared for NAME. NAME is stopped and
    never resumed once a process is restored; it stays paused as NAME-dead, with its
    console log and a compressed memory dump, until `down`. Exits 1 if a process was
    refused or failed to restore (the others are restored)."""
    declared = () if pid or process else _config(config).services_of(name)
    host = Host.from_environment()
    _refuse_beside_a_guard(host, name, "recover")
    with History.at(host.state).recorded("recover", name, {
            "kernel": kernel, "pids": pid or [], "processes": process or [],
            "services": [s.name for s in declared]}) as kept:
        report = recover_job.recover(host, name, kernel, pids=pid or (),
                                     processes=process or (), services=declared,
                                     panicking=panicking, progress=_Progress())
        kept.report, kept.downtime_seconds = report.as_dict(), report.stop_to_serving_seconds
    incomplete = any(v.verdict in ("refused", "failed") for v in report.processes)
    if json_:
        _emit_json(report.as_dict())
        if incomplete:
            raise typer.Exit(1)
        return
    for verdict in report.processes:
        line = f"{verdict.pid} ({verdict.comm or '?'}): {verdict.verdict}"
        out.print(line + (f": {verdict.reason}" if verdict.reason else ""), markup=False)
        for loss in verdict.losses:
            out.print(f"  lost: {loss}", markup=False)
    accepting = report.stop_to_accepting_seconds
    out.print(f"{name} runs {report.kernel_after}; running again "
              f"{report.stop_to_serving_seconds:.1f} s after the stop"
              + (f", accepting connections after {accepting:.1f} s" if accepting else "")
              + f"; the old VM is {report.dead_vm} (paused)")
    steps = {step: seconds for step, seconds in report.steps.items() if step != "total"}
    out.print(_steps_table(steps, {"stop to running": report.stop_to_serving_seconds,
                                   **({"stop to accepting": accepting} if accepting else {}),
                                   "total": report.steps["total"]}))
    if incomplete:
        raise typer.Exit(1)


@app.command()
def standby(name: Annotated[str, typer.Argument(help="VM to keep a warm standby for.")],
            kernel: Annotated[str | None, typer.Option(
                "--kernel", "-k", help="Kernel of the standby (default: the same).")] = None,
            json_: JsonOption = False) -> None:
    """Boot NAME-standby: NAME's identity and data volume, off the network, ready for
    `recover` to restore onto without waiting for a boot."""
    host = Host.from_environment()
    _refuse_beside_a_guard(host, name, "standby")
    machine = recover_job.prepare_standby(host, name, kernel, progress=_Progress())
    if json_:
        _emit_json({"name": machine.name, "kernel": machine.record.kernel,
                    "standby_for": name})
        return
    out.print(f"{machine.name} is ready on {machine.record.kernel}: `recover {name}` "
              "restores onto it", markup=False)


@app.command()
def guard(name: Annotated[str, typer.Argument(help="VM whose services to keep running.")],
          standby_kernel: Annotated[str | None, typer.Option(
              help="Kernel the services go to (default: the policy's, else the VM's own).")
          ] = None,
          interval: Annotated[str | None, typer.Option(
              help="The monitor's sampling interval, 1ms .. 10s (default: 10ms).")] = None,
          policy: Annotated[Path | None, typer.Option(
              help="TOML: an actions table (fault = recover, move or report), "
                   "live_deadline_seconds, lockup_grace_seconds, standby_kernel, and a "
                   "monitor table (as monitor --set takes them).")] = None,
          dry_run: Annotated[bool, typer.Option(
              help="Decide and log, never act.")] = False,
          config: ConfigOption = None, json_: JsonOption = False) -> None:
    """Keep NAME's declared services running through kernel faults, until Ctrl-C or
    SIGTERM (which let a failover under way finish first).

    Keeps a warm standby booted and watches NAME's kernel from outside. A fault the
    kernel survives moves the services live (update); one it does not survive, or a
    live move that fails, rebuilds them from its memory (recover). Then a new standby
    boots. One line per decision (JSON with --json). Exits 1 if the services could
    not be saved."""
    chosen = guard_job.load_policy(policy) if policy else guard_job.Policy()
    if standby_kernel:
        chosen = replace(chosen, standby_kernel=standby_kernel)
    if interval:
        chosen = replace(chosen, monitor=(*chosen.monitor, f"interval={interval}"))

    def log(decision: guard_job.Decision) -> None:
        if json_:
            _emit_json_line(decision.as_dict())
            return
        out.print(f"{time.strftime('%H:%M:%S', time.localtime(decision.detected_at))} "
                  f"{decision.fault} -> {decision.action}: {decision.outcome} in "
                  f"{decision.action_seconds:.1f} s (decided in "
                  f"{decision.decision_seconds:.2f} s)"
                  + (f"; {decision.detail}" if decision.detail else "")
                  + (f"; culprits left behind: {decision.culprits}" if decision.culprits
                     else ""), markup=False)

    stop = threading.Event()  # a failover under way is finished first
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    host = Host.from_environment()
    _refuse_beside_a_guard(host, name, "guard")
    # on record while it runs: another process's operation on NAME is refused meanwhile
    with contextlib.closing(History.at(host.state)) as history, history.recorded(
            "guard", name, {"standby_kernel": chosen.standby_kernel, "dry_run": dry_run}
            ) as kept:
        decisions = guard_job.guard(host, name, _config(config).services_of(name), chosen,
                                    dry_run=dry_run, on_decision=log, history=history,
                                    progress=_Progress(), stop=stop)
        kept.report = {"decisions": [decision.as_dict() for decision in decisions]}
        if decisions and decisions[-1].outcome == "reported":
            raise TransmigrateError(f"{name}: {decisions[-1].summary}; guard stops, the "
                                    "services could not be saved")


@app.command()
def demo(json_: JsonOption = False) -> None:
    """Live-update redis under load from Linux 6.1 to 6.12, and show the proof."""
    report = demo_job.run(Host.from_environment(), progress=_Progress())
    if json_:
        _emit_json(report)
        return
    timing = {"frozen window": report.pop("frozen (s)"),
              "client's longest wait": report.pop("client's longest wait (s)"),
              "update total": report.pop("update total (s)")}
    steps = report.pop("steps (s)")
    proof = Table(show_header=False)
    for key, value in report.items():
        proof.add_row(key, str(value))
    out.print(proof)
    out.print(_steps_table(steps, timing))


@app.command()
def serve(listen: Annotated[str, typer.Option(
              help="HOST:PORT to listen on; off loopback, --token-file is required.")
          ] = "127.0.0.1:8742",
          token_file: Annotated[Path | None, typer.Option(
              help="A file holding the token every request must carry "
                   "(Authorization: Bearer TOKEN).")] = None,
          lab: Annotated[bool, typer.Option(
              help="A lab's controller: the API and the page inject faults too.")] = False,
          config: ConfigOption = None) -> None:
    """Run the controller: an HTTP API over the VMs (described at /openapi.json), their
    operations' history, and Prometheus metrics at /metrics, until SIGINT or SIGTERM.
    It guards the VMs the configuration has a [guard.NAME] table for. Its log is
    key=value lines on stderr."""
    # Here, not at the top: the web stack costs every other command its start-up time.
    from transmigrate.interfaces.api import serve as serve_api

    serve_api(Host.from_environment(), _config(config), listen, token_file=token_file,
              lab=lab)


def main() -> None:
    try:
        app()
    except TransmigrateError as exc:
        err.print(f"transmigrate: error: {exc}", markup=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("transmigrate: interrupted")
        sys.exit(130)
