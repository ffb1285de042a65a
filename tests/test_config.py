"""transmigrate.toml: service declarations, the short form, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from transmigrate.config import Service, VmSpec, load_config
from transmigrate.errors import TransmigrateError


def _load(tmp_path: Path, text: str) -> tuple[Service, ...]:
    path = tmp_path / "transmigrate.toml"
    path.write_text(text)
    return load_config(path).services


def test_a_declared_service_and_the_short_form(tmp_path: Path) -> None:
    db, cache = _load(tmp_path, """
        [services.db]
        vm = "web"
        start = ["pg_ctlcluster", "15", "main", "start"]
        process = "postgres"
        state = ["/etc/postgresql", "/var/lib/postgresql/", "/run/postgresql"]

        [services]
        cache = ["memcached"]
    """)
    assert db == Service("db", "web", "postgres", ("pg_ctlcluster", "15", "main", "start"),
                         ("/etc/postgresql", "/var/lib/postgresql", "/run/postgresql"),
                         ("ipc",), False)
    assert cache == Service("memcached", "cache", "memcached", namespaces=())


def test_the_process_defaults_to_the_start_program(tmp_path: Path) -> None:
    [web] = _load(tmp_path, '[services.web]\nvm = "w"\nstart = ["/usr/sbin/nginx"]\nboot = true')
    assert web.process == "nginx" and web.boot


@pytest.mark.parametrize(("body", "message"), [
    ('vm = "w"\nstart = ["x"]\ncolour = "red"', "unknown key services.s.colour"),
    ('start = ["x"]', "services.s.vm must name the VM"),
    ('vm = "w"', "services.s.process must name the process"),
    ('vm = "w"\nstart = "redis-server"', "services.s.start must be a list"),
    ('vm = "w"\nstart = ["x"]\nstate = ["etc/x"]', "'etc/x' cannot be state"),
    ('vm = "w"\nstart = ["x"]\nstate = ["/proc/1"]', "'/proc/1' cannot be state"),
    ('vm = "w"\nstart = ["x"]\nstate = ["/data/x"]', "'/data/x' cannot be state"),
    ('vm = "w"\nstart = ["x"]\nstate = ["/etc"]', "'/etc' cannot be state"),
    ('vm = "w"\nstart = ["x"]\nstate = ["/var/../etc"]', "cannot be state"),
    ('vm = "w"\nstart = ["x"]\nnamespaces = ["net"]', "services.s.namespaces: unknown net"),
    ('vm = "w"\nstart = ["x"]\nboot = "yes"', "services.s.boot must be true or false"),
])
def test_bad_declarations_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(TransmigrateError, match=message):
        _load(tmp_path, f"[services.s]\n{body}\n")


def test_a_service_declared_twice(tmp_path: Path) -> None:
    with pytest.raises(TransmigrateError, match="service redis-server is declared twice"):
        _load(tmp_path, '[services]\na = ["redis-server"]\nb = ["redis-server"]\n')


@pytest.mark.parametrize(("body", "message"), [
    ("[vmz]\nweb = 1", "unknown key vmz; known: guard, image, services, vm, vms"),
    ("[vm]\nmemory = 512", "unknown key vm.memory; known: cpus, memory_mib"),
    ("[vm]\ncpus = 0", "vm.cpus must be a positive whole number"),
    ("[image]\npackage = []", "unknown key image.package"),
    ("guard = 1", "guard must be a table"),
    ("[guard]\nweb = 1", "guard.web must be a table"),
    ("[vms.web]\nkernal = '6.1'", "unknown key vms.web.kernal; known: cpus, data_mib, kernel"),
    ("[vms.web]\nkernel = 6.1", "vms.web.kernel must be a kernel release in quotes"),
    ("[vms.web]\ndata_mib = -1", "vms.web.data_mib must be a positive whole number"),
    ("[vms]\nweb = 1", "vms.web must be a table"),
])
def test_bad_tables_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "transmigrate.toml"
    path.write_text(body + "\n")
    with pytest.raises(TransmigrateError, match=message):
        load_config(path)


def test_a_guard_table_is_kept_for_the_controller(tmp_path: Path) -> None:
    path = tmp_path / "transmigrate.toml"
    path.write_text('[guard.web]\nstandby_kernel = "6.12"\n[guard.web.actions]\nlockup = "move"\n')
    assert load_config(path).guards == {"web": {"standby_kernel": "6.12",
                                                "actions": {"lockup": "move"}}}


def test_settings_go_over_the_file_each_a_toml_key_and_value(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.delenv("TRANSMIGRATE_CONFIG", raising=False)
    path = tmp_path / "transmigrate.toml"
    path.write_text('[vm]\ncpus = 1\nmemory_mib = 512\n[guard.web]\nstandby_kernel = "6.1"\n'
                    '[guard.web.actions]\nlockup = "move"\n')
    config = load_config(path, ["vm.cpus=2", 'guard.web.standby_kernel="6.12"',
                                "guard.web.actions.panic=recover",
                                'services.db = ["postgres"]'])
    assert (config.cpus, config.memory_mib) == (2, 512)
    assert config.guards == {"web": {"standby_kernel": "6.12",
                                      "actions": {"lockup": "move", "panic": "recover"}}}
    assert config.services_of("db")[0].process == "postgres"
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_config(None, ["vm.memory_mib=2048"]).memory_mib == 2048, "without a file"
    with pytest.raises(TransmigrateError, match="cannot read config"):
        load_config(tmp_path / "missing.toml", ["vm.memory_mib=2048"])


@pytest.mark.parametrize(("setting", "message"), [
    ("vm.cpus", "--set takes KEY=VALUE"),
    ("=2", "--set takes KEY=VALUE"),
    ("vm.cpus=0", "vm.cpus must be a positive whole number"),
    ("vm.cpu=2", "unknown key vm.cpu"),
    ("vm cpus=2", "'vm cpus' is not a configuration key"),
])
def test_bad_settings_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   setting: str, message: str) -> None:
    monkeypatch.delenv("TRANSMIGRATE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransmigrateError, match=message):
        load_config(None, [setting])


def test_a_declared_vm_over_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "transmigrate.toml"
    path.write_text('[vm]\ncpus = 2\n[vms.web]\nkernel = "6.12.117"\ndata_mib = 8192\n')
    config = load_config(path)
    assert config.vm("web") == VmSpec("web", "6.12.117", memory_mib=1024, cpus=2,
                                      data_mib=8192)
    assert config.vm("other") == VmSpec("other", None, memory_mib=1024, cpus=2)
