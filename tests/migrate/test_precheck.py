"""Refusals read as a person would want them: one short line per cause, with the fix."""

from __future__ import annotations

from transmigrate.migrate.precheck import PrecheckFailed, Refusal, describe


def test_many_processes_with_one_cause_make_one_line() -> None:
    postgres = [Refusal("sysv-shm", pid, "postgres") for pid in range(10098, 10133, 4)]
    lines = describe(postgres)
    assert lines == [
        "postgres ×9 (pids 10098…10130): map SysV shared memory in the VM's own IPC "
        "namespace, which CRIU moves only with the namespace; fix: start the service in "
        "its own (unshare --ipc)"]


def test_causes_and_details_are_grouped_apart() -> None:
    refusals = [
        *(Refusal("sysv-shm", pid, "postgres") for pid in (11, 12)),
        Refusal("anon", 11, "postgres", "io_uring"),
        Refusal("anon", 13, "worker", "perf_event"),
        *(Refusal("file", None, f"/var/log/pg/{n}.log", "web") for n in range(4)),
        Refusal("file", None, "/etc/app.conf", "web"),
    ]
    lines = describe(refusals)
    assert lines[0].startswith("postgres ×2 (pids 11, 12): map SysV shared memory")
    assert lines[1] == ("postgres (pid 11): hold io_uring, which CRIU cannot move; "
                        "fix: close it, or leave them behind")
    assert lines[2].startswith("worker (pid 13): hold perf_event")
    assert lines[3].startswith("5 files (/etc/app.conf, /var/log/pg/0.log, "
                               "/var/log/pg/1.log, …): exist only in web; fix: put them on "
                               "the data volume (/data)")
    assert len(lines) == 4


def test_one_file_and_subjectless_causes_read_well() -> None:
    assert describe([Refusal("file", None, "/etc/app.conf", "web")]) == [
        "/etc/app.conf: exists only in web; fix: put it on the data volume (/data)"]
    assert describe([Refusal("lazy", detail="web-next")])[0].startswith(
        "web-next cannot restore lazily")


def test_the_error_is_one_line_for_one_cause_and_keeps_the_full_list() -> None:
    one = PrecheckFailed("web", [Refusal("session", 7, "redis-server", "1")])
    assert "\n" not in str(one)
    assert str(one).startswith("cannot move from web: redis-server (pid 7): their session")
    many = PrecheckFailed("web", [Refusal("session", 7, "a", "1"),
                                  Refusal("device", 8, "b", "/dev/vda")])
    assert str(many).splitlines()[0] == "cannot move from web: 2 reasons"
    assert many.as_dicts()[1] == {"cause": "device", "pid": 8, "comm": "b",
                                  "detail": "/dev/vda"}
