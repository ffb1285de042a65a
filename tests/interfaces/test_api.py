"""The controller's HTTP API, metrics and dashboard, served for real on loopback: first
over a host with no VM (bad input, the token, the schema), then moving redis in a
real guest from the dashboard in a real browser (Debian's chromium, by Playwright)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Playwright, expect, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL, load_config
from transmigrate.interfaces.api import create_app
from transmigrate.interfaces.remote import ANNOUNCEMENT
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.controller import LIVE_LOCKS, Controller
from transmigrate.orchestrate.faults import FAULTS
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.services import redis_answers, redis_cli
from transmigrate.polling import wait_for

from ..conftest import CLI, REDIS_SERVICE, ROOT, left_running_by_a_dead_process

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
"""Kept after the run: the dashboard's screenshot."""
DECLARED = f"""
[vms.{{vm}}]
kernel = "{ACTIVE_KERNEL}"
memory_mib = 512
cpus = 2
"""
"""VM {vm} declared, for the controller to boot: as the guard tests' VMs."""
GUARDED = f"""
[guard.{{vm}}]
standby_kernel = "{STANDBY_KERNEL}"
"""
"""The controller guards VM {vm}: its standby on the kernel the update goes to."""


@contextlib.contextmanager
def _serving(controller: Controller, token: str | None = None) -> Iterator[httpx.Client]:
    """The API on a free loopback port, and a client of it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(controller, token=token),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="api")
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=20, interval=0.05, what="the API did not start")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def empty_host(host: Host, tmp_path: Path) -> Host:
    """A host of its own with no VM (the kernels' cache shared)."""
    return Host(host.cache, tmp_path / "state", tmp_path / "shm", tmp_path / "data",
                "tm-api-test")


def _metrics(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def test_unknown_vms_and_operations_and_malformed_requests(empty_host: Host) -> None:
    controller = Controller(empty_host, load_config(None))
    with _serving(controller) as api:
        assert api.get("/api/vms").json() == []
        missing = api.get("/api/vms/nope")
        assert missing.status_code == 404 and missing.json() == {"detail": "no VM named 'nope'"}
        assert api.post("/api/vms/nope/update", json={"kernel": STANDBY_KERNEL}
                        ).status_code == 404
        malformed = api.post("/api/vms/nope/update", json={"kernel": "6.12", "copy": "fast"})
        assert malformed.status_code == 422 and "copy" in malformed.text
        assert api.get("/api/vms/nope/live").status_code == 404
        assert api.get("/api/vms/nope/live/stream").status_code == 404
        assert api.get("/api/operations").json() == []
        assert api.get("/api/operations/7").status_code == 404
        assert api.get("/api/faults").json()["lab"] is False
        lab_only = api.post("/api/vms/nope/faults", json={"fault": "panic"})
        assert lab_only.status_code == 403 and "--lab" in lab_only.text
        paths = api.get("/openapi.json").json()["paths"]
        assert {"/api/vms", "/api/vms/{name}", "/api/vms/{name}/update", "/api/operations",
                "/api/operations/{operation}"} <= set(paths)
        assert _metrics(api) == {}, "no VM, no operation"
        text = api.get("/metrics").text
        for family in ("transmigrate_operations_total", "transmigrate_update_step_seconds",
                       "transmigrate_downtime_seconds", "transmigrate_vms",
                       "transmigrate_detection_latency_seconds",
                       "transmigrate_monitor_sample_seconds",
                       "transmigrate_history_operations", "transmigrate_last_downtime_seconds"):
            assert f"# TYPE {family} " in text, family


def test_a_labs_controller_names_its_faults_and_refuses_unknown_ones(empty_host: Host) -> None:
    with _serving(Controller(empty_host, load_config(None), lab=True)) as api:
        assert api.get("/api/faults").json() == {"lab": True, "faults": list(FAULTS)}
        assert api.post("/api/vms/nope/faults", json={"fault": "panic"}).status_code == 404
        unknown = api.post("/api/vms/nope/faults", json={"fault": "meteor"})
        assert unknown.status_code == 400 and "unknown fault 'meteor'" in unknown.text
        wrong = api.post("/api/vms/nope/faults", json={"fault": "panic", "cpu": 1})
        assert wrong.status_code == 400 and "panic takes no cpu" in wrong.text
        assert api.get("/api/operations").json() == [], "nothing injected, nothing on record"


def test_operations_a_dead_controller_left_are_shown_interrupted(empty_host: Host) -> None:
    left = left_running_by_a_dead_process(empty_host.state / "history.sqlite")
    with _serving(Controller(empty_host, load_config(None))) as api:
        shown = api.get(f"/api/operations/{left}").json()
        assert (shown["vm"], shown["outcome"]) == ("web", "interrupted"), shown
        assert _metrics(api) == {("transmigrate_history_operations",
                                  (("kind", "update"), ("outcome", "interrupted"))): 1}


def test_with_a_token_every_request_must_carry_it(empty_host: Host) -> None:
    with _serving(Controller(empty_host, load_config(None)), token="s3cret") as api:
        for path in ("/api/vms", "/metrics", "/openapi.json"):
            assert api.get(path).status_code == 401, path
            assert api.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert api.get(path, headers={"Authorization": "Bearer s3cret"}
                           ).status_code == 200, path


def test_serve_refuses_to_listen_off_loopback_without_a_token(tmp_path: Path) -> None:
    def serve(*args: str, settings: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CLI), *settings, "serve", *args], capture_output=True,
                              text=True, timeout=60, check=False,
                              env={**os.environ, "TRANSMIGRATE_STATE": str(tmp_path / "s")})

    refused = serve("--listen", "0.0.0.0:8742")
    assert refused.returncode == 1
    assert "refusing to listen on 0.0.0.0 without a token" in refused.stderr
    (tmp_path / "token").write_text("\n")
    empty = serve("--listen", "0.0.0.0:8742", "--token-file", str(tmp_path / "token"))
    assert empty.returncode == 1 and "is empty" in empty.stderr
    malformed = serve("--listen", "8742")
    assert malformed.returncode == 1 and "HOST:PORT" in malformed.stderr
    config = tmp_path / "transmigrate.toml"
    config.write_text('[guard.web]\nactions = { panic = "pray" }\n')
    policy = serve("--config", str(config))
    assert policy.returncode == 1
    assert f"config {config}: guard.web: actions.panic = 'pray'" in policy.stderr
    config.write_text('[guard.web]\nlive_deadline = 9\n')
    assert "guard.web: unknown key 'live_deadline'" in serve("--config", str(config)).stderr
    config.write_text('[guard.web]\nlive_deadline_seconds = 9\n')
    overridden = serve("--config", str(config), settings=("-c", 'guard.web.actions.panic="pray"'))
    assert "guard.web: actions.panic = 'pray'" in overridden.stderr, "a setting over the file"
    assert "--set takes KEY=VALUE" in serve(settings=("-c", "vm.cpus")).stderr


@contextlib.contextmanager
def _serve_in(state: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`transmigrate serve` with state directory ``state`` on a free loopback port, once
    it has announced itself; it and its URL. Stopped (SIGTERM) after."""
    env = {**os.environ, "TRANSMIGRATE_STATE": str(state)}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(CLI), "serve", "--listen", f"127.0.0.1:{port}", *flags],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        wait_for(lambda: (state / ANNOUNCEMENT).exists(), timeout=60,
                 what="serve did not announce")
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_the_cli_hands_updates_to_a_running_controller(tmp_path: Path) -> None:
    """`serve` makes itself known in the state directory; while it runs `update` goes
    through it (its refusal comes back as one line), after it the command runs alone."""
    state = tmp_path / "s"
    env = {**os.environ, "TRANSMIGRATE_STATE": str(state)}

    def update() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CLI), "update", "nope", "--kernel", STANDBY_KERNEL],
                              capture_output=True, text=True, timeout=60, env=env)

    announcement = state / ANNOUNCEMENT
    with _serve_in(state) as (server, url):
        assert json.loads(announcement.read_text())["pid"] == server.pid
        assert announcement.stat().st_mode & 0o777 == 0o600
        handed = update()
        assert handed.returncode == 1
        assert handed.stderr.strip().splitlines() == [
            "transmigrate: error: the controller refused: no VM named 'nope'"]
    assert not announcement.exists(), "gone with the controller"
    alone = update()
    assert alone.returncode == 1 and "controller" not in alone.stderr, alone.stderr
    announcement.write_text(json.dumps({"pid": server.pid, "url": url, "token_file": None}))
    assert "controller" not in update().stderr, "a dead controller's file is ignored"


def test_a_labs_controller_injects_the_clis_faults(tmp_path: Path) -> None:
    """`inject` beside a lab's controller goes through it (on record, its detection
    timed); its refusals come back as one line."""
    state = tmp_path / "s"
    env = {**os.environ, "TRANSMIGRATE_STATE": str(state)}

    def inject(*args: str) -> list[str]:
        done = subprocess.run([str(CLI), "inject", *args], capture_output=True, text=True,
                              timeout=60, env=env)
        assert done.returncode == 1
        return done.stderr.strip().splitlines()

    with _serve_in(state, "--lab") as (server, _):
        said = inject("nope", "panic")
        assert said[0].endswith(f"the controller (pid {server.pid}) injects it"), said
        assert said[1:] == ["transmigrate: error: the controller refused: no VM named 'nope'"]
        assert inject("nope", "panic", "--cpu", "1")[-1] == \
            "transmigrate: error: the controller refused: panic takes no cpu"


def _browser(playwright: Playwright) -> Browser:
    """Debian's chromium, headless, kept off every network but loopback."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"])


def _ended(api: httpx.Client, vm: str, kind: str, after: int = 0) -> dict[str, Any]:
    """The newest operation of ``kind`` on ``vm`` after operation ``after``, once it has
    ended."""
    def ended() -> dict[str, Any] | None:
        found = [op for op in api.get("/api/operations", params={"vm": vm}).json()
                 if op["kind"] == kind and op["id"] > after]
        return found[0] if found and found[0]["outcome"] != "running" else None
    return wait_for(ended, timeout=600, interval=0.5, what=f"no {kind} of {vm} ended")


def test_the_dashboard_runs_an_update_that_the_api_and_metrics_show(prepared: Host,
                                                                     tmp_path: Path) -> None:
    """The controller boots a declared, guarded 6.1 guest and starts redis in it (data
    is put in). In a real browser: the page shows the VM, its guard and standby, and
    its live chart moves; an update to 6.12 started from the page (the guard standing
    aside) completes and shows on the timeline with its downtime. Meanwhile a second
    update of the same VM is refused (409) and an unknown kernel too (400). Then the
    page (a lab's) panics the kernel: the guard, watching again, recovers redis onto
    its new standby, and the failover is on the timeline too. The history and the
    metrics have all three."""
    name = "t-api"
    config_path = tmp_path / "transmigrate.toml"
    config_path.write_text(REDIS_SERVICE.format(vm=name) + "boot = true\n"
                           + DECLARED.format(vm=name) + GUARDED.format(vm=name))
    controller = None
    try:
        controller = Controller(prepared, load_config(config_path), lab=True)
        with _serving(controller) as api, sync_playwright() as playwright:
            booted = _ended(api, name, "up")
            assert booted["outcome"] == "done", booted["error"]
            assert booted["report"]["kernel"].startswith(ACTIVE_KERNEL)
            assert set(booted["report"]["services_started"]) == {"kv"}
            address = prepared.machines.get(name).record.ip
            wait_for(lambda: redis_answers(prepared, address), timeout=60, interval=0.2,
                     what="redis did not answer")
            assert redis_cli(prepared, address, "SET", "kept", "yes") == "OK"
            browser = _browser(playwright)
            page = browser.new_page(viewport={"width": 1300, "height": 1100})
            page.goto(str(api.base_url))
            row = page.locator(f'#vms tr[data-vm="{name}"]')
            expect(row).to_contain_text(ACTIVE_KERNEL, timeout=30_000)
            expect(row).to_contain_text("running")
            expect(row).to_contain_text(f"{name}-standby", timeout=120_000)
            expect(page.locator("#live-title")).to_have_text(f"Live: {name}")
            page.wait_for_function("series.t.length >= 3", timeout=60_000)
            points = page.evaluate("series.t.length")
            page.wait_for_function(f"series.t.length > {points} + 3", timeout=30_000)
            assert page.evaluate("series.free.filter(x => x > 0).length") > 0, "memory read"
            assert page.evaluate("series.forkRate.some(x => x !== null)"), "a fork rate"
            assert page.evaluate("charts.cpus !== null && series.cpus[0].some(x => x > 0)"), \
                "the CPU switches context"
            assert page.evaluate("charts.locks !== null && series.locks.length") == \
                len(LIVE_LOCKS), "the locks charted"
            assert page.evaluate("series.locks.every(p => p.some(x => x !== null))")

            with api.stream("GET", f"/api/vms/{name}/live/stream") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                sent: list[dict[str, Any]] = []
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        sent.append(json.loads(line.removeprefix("data: ")))
                    if len(sent) == 2:
                        break
            assert all(event["readings"]["memory_total_mib"] > 0 for event in sent), sent
            assert [lock["name"] for lock in sent[0]["locks"]] == list(LIVE_LOCKS), sent[0]
            assert sent[1]["at"] > sent[0]["at"], "a new reading each time"

            row.locator("input.kernel").fill(STANDBY_KERNEL)
            row.locator("button.update").click()
            expect(page.locator("#message")).to_contain_text("started: operation #",
                                                             timeout=30_000)
            operation = int(page.locator("#message").inner_text().rsplit("#", 1)[1])
            again = api.post(f"/api/vms/{name}/update", json={"kernel": STANDBY_KERNEL})
            assert again.status_code == 409 and f"operation {operation}" in again.text
            unknown = api.post(f"/api/vms/{name}/update", json={"kernel": "9.9.9"})
            assert unknown.status_code == 400 and "9.9.9" in unknown.text

            done_row = page.locator(f'#operations tr[data-operation="{operation}"]')
            expect(done_row).to_have_attribute("data-outcome", "done", timeout=600_000)
            expect(done_row.locator(".downtime")).to_contain_text(" s")
            expect(row).to_contain_text(STANDBY_KERNEL, timeout=30_000)

            # The guard watches again, with a new standby: a panic is now a failover.
            expect(row.locator("td.guard")).to_have_text("watching", timeout=120_000)
            assert api.get(f"/api/vms/{name}").json()["standby"] == f"{name}-standby"
            row.locator("select.fault").select_option("panic")  # a lab's controller
            row.locator("button.inject").click()
            expect(page.locator("#message")).to_contain_text(f"panic injected into {name}",
                                                             timeout=60_000)
            injected = int(page.locator("#message").inner_text().rsplit("#", 1)[1])

            failed_over = _ended(api, name, "failover", after=injected)
            failover_row = page.locator(f'#operations tr[data-operation="{failed_over["id"]}"]')
            expect(failover_row).to_contain_text("failover: panic -> recover", timeout=30_000)
            expect(failover_row).to_have_attribute("data-outcome", "done")
            expect(failover_row.locator(".downtime")).to_contain_text(" s")
            expect(row.locator("td.guard")).to_have_text("watching", timeout=120_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=ARTIFACTS / "dashboard.png", full_page=True)
            browser.close()

            assert failed_over["report"]["outcome"] == "recovered", failed_over
            assert 0 < failed_over["downtime_seconds"] < 600
            done = api.get(f"/api/operations/{operation}").json()
            assert done["outcome"] == "done", done["error"]
            assert 0 < done["downtime_seconds"] < done["report"]["total_seconds"]
            assert done["report"]["kernel_after"].startswith(STANDBY_KERNEL)
            assert api.get(f"/api/vms/{name}").json()["operation"] is None
            metrics = _metrics(api)
            assert metrics[("transmigrate_operations_total",
                            (("kind", "up"), ("outcome", "done")))] == 1
            assert metrics[("transmigrate_operations_total",
                            (("kind", "update"), ("outcome", "done")))] == 1
            assert metrics[("transmigrate_downtime_seconds_count", (("kind", "update"),))] == 1
            assert metrics[("transmigrate_operations_total",
                            (("kind", "failover"), ("outcome", "done")))] == 1
            assert metrics[("transmigrate_events_total", (("kind", "panic"),))] == 1
            assert metrics[("transmigrate_decision_seconds_count", (("kind", "panic"),))] == 1
            assert metrics[("transmigrate_detection_latency_seconds_count",
                            (("kind", "panic"),))] == 1, "injected from the page"
            assert 0 < metrics[("transmigrate_detection_latency_seconds_sum",
                                (("kind", "panic"),))] < 30
            assert metrics[("transmigrate_monitor_sample_seconds_count", (("vm", name),))] > 100
            assert metrics[("transmigrate_downtime_seconds_sum", (("kind", "update"),))] == \
                pytest.approx(done["downtime_seconds"])
            assert metrics[("transmigrate_last_downtime_seconds",
                            (("kind", "update"), ("vm", name)))] == done["downtime_seconds"]
            assert ("transmigrate_last_downtime_seconds",
                    (("kind", "failover"), ("vm", name))) in metrics
            steps = {labels for sample, labels in metrics
                     if sample == "transmigrate_update_step_seconds_count"}
            assert len(steps) >= 3, steps
        assert redis_cli(prepared, address, "GET", "kept") == "yes"
    finally:
        if controller is not None:
            controller.close()
        for machine in prepared.machines.all():  # the VM, its standby, the one kept dead
            if machine.name.startswith(name):
                lifecycle.down(prepared, machine.name)
