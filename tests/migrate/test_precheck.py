"""Refusals read as a person would want them: one short line per cause, with the fix."""

from __future__ import annotations

from typing import Any

from transmigrate.migrate.precheck import (
    CARRY_FILE_LIMIT,
    CARRY_TOTAL_LIMIT,
    FileSeen,
    PrecheckFailed,
    Refusal,
    carry_or_refuse,
    describe,
    held_dumps_fit,
)


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
        *(Refusal("large-file", None, f"/var/log/pg/{n}.log", "web") for n in range(4)),
        Refusal("large-file", None, "/etc/app.conf", "web"),
    ]
    lines = describe(refusals)
    assert lines[0].startswith("postgres ×2 (pids 11, 12): map SysV shared memory")
    assert lines[1] == ("postgres (pid 11): hold io_uring, which CRIU cannot move; "
                        "fix: close it, or leave them behind")
    assert lines[2].startswith("worker (pid 13): hold perf_event")
    assert lines[3] == ("5 paths (/etc/app.conf, /var/log/pg/0.log, /var/log/pg/1.log, …): "
                        "not the same in web, too large to copy while frozen; fix: declare "
                        "them as state, or put them on the data volume (/data)")
    assert len(lines) == 4


def test_one_file_and_subjectless_causes_read_well() -> None:
    assert describe([Refusal("socket-dir", None, "/run/postgresql", "web-next")]) == [
        "/run/postgresql: missing in web-next, where the processes' bound UNIX sockets must "
        "be; fix: declare it as state"]
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


def test_sysv_objects_and_session_members_left_behind() -> None:
    lines = describe([Refusal("sysv-sem", 20, "app", "3, 4"),
                      Refusal("session-member", 31, "sleep", "20"),
                      Refusal("session-member", 32, "sleep", "20")])
    assert lines[0] == ("app (pid 20): run in the VM's own IPC namespace, which holds SysV "
                        "semaphore sets (3, 4) that would not move; fix: start the service "
                        "in its own (unshare --ipc, or declare it: namespaces = [\"ipc\"])")
    assert lines[1].startswith("sleep ×2 (pids 31, 32): are in the session of a moved "
                               "process (20) but in no moved tree")


def test_mounts_a_mount_namespace_cannot_take_along() -> None:
    lines = describe([Refusal("mount", 40, "app", "/mnt/disk (ext4)"),
                      Refusal("mount-ns", 41, "helper"),
                      Refusal("mount-missing", None, "/sys/kernel/debug", "web-next"),
                      Refusal("large-tmpfs", None, "/dev/shm", "40 MiB")])
    assert lines == [
        "app (pid 40): have a mount of their own, /mnt/disk (ext4), that CRIU cannot move; "
        "fix: mount it in the VM instead, or leave them behind",
        "helper (pid 41): are in a mount namespace other than their tree's root's; fix: "
        "move them as a tree of their own (--pid)",
        "/sys/kernel/debug: not mounted in web-next, and a moved mount namespace shares it "
        "with the VM; fix: mount it there too (at boot)",
        "/dev/shm: holds 40 MiB, too much to copy while frozen; fix: keep large files on "
        "the data volume (/data)"]


def _seen(size: int, sha: str | None = "a", writing: bool = False,
          pristine: bool = False) -> FileSeen:
    return FileSeen(size, sha, writing, pristine)


def _there(size: int, sha: str | None = "a", pristine: bool = False) -> dict[str, Any]:
    return {"size": size, "sha256": sha, "pristine": pristine}


def test_small_files_that_differ_or_are_written_are_carried_large_ones_refused() -> None:
    files = {"/etc/same.conf": _seen(10), "/etc/edited.conf": _seen(10),
             "/var/log/app.log": _seen(500, writing=True), "/etc/new.conf": _seen(3),
             "/usr/lib/big.so": _seen(CARRY_FILE_LIMIT + 1, None),
             "/usr/lib/same-big.so": _seen(CARRY_FILE_LIMIT + 1, None)}
    there = {"/etc/same.conf": _there(10), "/etc/edited.conf": _there(10, "b"),
             "/var/log/app.log": _there(500), "/etc/new.conf": None,
             "/usr/lib/big.so": _there(1, None),
             "/usr/lib/same-big.so": _there(CARRY_FILE_LIMIT + 1, None)}
    carried, refused = carry_or_refuse(files, there, "web-next")
    assert carried == ["/etc/edited.conf", "/etc/new.conf", "/var/log/app.log"]
    assert refused == [Refusal("large-file", None, "/usr/lib/big.so", "web-next")]


def test_a_file_pristine_on_both_sides_is_the_same_unread() -> None:
    """Both VMs boot from one image: unchanged since boot on both means the same."""
    files = {"/usr/lib/libc.so": _seen(10, None, pristine=True),
             "/usr/lib/huge.so": _seen(CARRY_FILE_LIMIT + 1, None, pristine=True),
             "/etc/edited-there.conf": _seen(10, None, pristine=True),
             "/etc/edited-here.conf": _seen(10, "a")}
    there = {"/usr/lib/libc.so": _there(10, None, pristine=True),
             "/usr/lib/huge.so": _there(CARRY_FILE_LIMIT + 1, None, pristine=True),
             "/etc/edited-there.conf": _there(10, "a"),
             "/etc/edited-here.conf": _there(10, None, pristine=True)}
    carried, refused = carry_or_refuse(files, there, "web-next")
    assert carried == ["/etc/edited-here.conf", "/etc/edited-there.conf"] and not refused


def test_carrying_stops_at_the_total_limit() -> None:
    fit = CARRY_TOTAL_LIMIT // CARRY_FILE_LIMIT
    files = {f"/var/log/{n}.log": _seen(CARRY_FILE_LIMIT, None, writing=True)
             for n in range(fit + 1)}
    carried, refused = carry_or_refuse(files, {}, "web-next")
    assert len(carried) == fit and [r.comm for r in refused] == [f"/var/log/{fit}.log"]


def test_a_move_whose_held_dumps_would_exhaust_memory_is_refused() -> None:
    """50 trees in a 768 MiB guest (~600 MiB available) froze it: the held dumps took
    what was left, and nothing, the guest agent included, made progress."""
    assert held_dumps_fit(10, 600.0, "web") == []
    assert held_dumps_fit(3, None, "web") == [], "a guest that does not say is not refused"
    refused = held_dumps_fit(50, 600.0, "web")
    assert describe(refused) == [
        "web has 600 MiB available; the 50 trees' final dumps, held until the commit, need "
        "about 664 MiB; fix: give the VM more memory, or move fewer trees at once"]
