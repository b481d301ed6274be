import textwrap
from pathlib import Path

import pytest

from remus.common.config import ConfigError, load

BASE = """
[guest]
name = "demo"
kernel = "vmlinuz"
[primary]
address = "127.0.0.1"
[backup]
address = "127.0.0.1:7788"
[tls]
dir = "keys"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "guest.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_and_relative_kernel(tmp_path):
    cfg = load(write(tmp_path, BASE))
    assert cfg.replication.interval_ms == 200  # as xl remus
    assert cfg.guest.memory_mib == 128
    assert cfg.guest.kernel == str(tmp_path / "vmlinuz")
    assert cfg.backup_endpoint == ("127.0.0.1", 7788)
    assert cfg.primary_endpoint == ("127.0.0.1", 0)


@pytest.mark.parametrize("extra, named", [
    ("[guest]\nnmae = 'x'\n", "[guest] nmae: unknown key"),
    ("[replicaton]\ninterval_ms = 5\n", "unknown section [replicaton]"),
    ("[replication]\ninterval_ms = 0\n", "[replication] interval_ms"),
    ("[replication]\ninterval_ms = '200'\n", "[replication] interval_ms: expected int"),
    ("[replication]\ncompression = 'lz4'\n", "[replication] compression"),
    ("[network]\nmac = '01:00:00:00:00:01'\n", "[network] mac"),
    ("[network]\nhost_forward = ['tcp::1-:2']\n", "[network] host_forward"),
])
def test_bad_values_name_the_key(tmp_path, extra, named):
    text = BASE
    section = extra.split("]")[0] + "]"
    if section in text:
        text = text.replace(section, extra.strip())
    else:
        text += extra
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    assert named in str(err.value)


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[backup\] address: required"):
        load(write(tmp_path, BASE.replace('address = "127.0.0.1:7788"', "")))


def test_backup_address_needs_port(tmp_path):
    with pytest.raises(ConfigError, match=r"\[backup\] address"):
        load(write(tmp_path, BASE.replace("127.0.0.1:7788", "127.0.0.1")))


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[guest\n"))


def test_interval_override_is_checked(tmp_path):
    cfg = load(write(tmp_path, BASE))
    assert cfg.with_overrides(interval_ms=50).replication.interval_ms == 50
    with pytest.raises(ConfigError, match="interval_ms"):
        cfg.with_overrides(interval_ms=1)


def test_fingerprint_ignores_addresses_but_not_shape(tmp_path):
    a = load(write(tmp_path, BASE)).fingerprint()
    b = load(write(tmp_path, BASE.replace("127.0.0.1:7788", "10.9.9.9:1"))).fingerprint()
    c = load(write(tmp_path, BASE + "[network]\nmode='user'\n")).fingerprint()
    assert a == b
    assert a != c


def test_reversed_swaps_the_hosts_and_keeps_each_hosts_directory(tmp_path):
    from remus.common.config import parse
    cfg = parse({"guest": {"name": "g", "kernel": "/k"},
                 "primary": {"address": "10.0.0.1", "state_dir": "/a"},
                 "backup": {"address": "10.0.0.2:7788", "state_dir": "/b"},
                 "metrics": {"primary": "10.0.0.1:9100", "backup": "10.0.0.2:9100"},
                 "tls": {"insecure": True}},
                tmp_path / "g.toml")
    r = cfg.reversed()
    assert r.backup_endpoint == ("10.0.0.1", 7788) and r.primary_endpoint == ("10.0.0.2", 0)
    assert (r.primary.state_dir, r.backup.state_dir) == ("/b", "/a")
    assert (r.metrics.primary, r.metrics.backup) == ("10.0.0.2:9100", "10.0.0.1:9100")
    assert r.reversed_roles and not r.reversed().reversed_roles
    assert r.reversed().backup_endpoint == cfg.backup_endpoint
    assert r.fingerprint() == cfg.fingerprint()


def test_standby_guest_is_on_by_default_and_follows_the_backup_role(tmp_path):
    cfg = load(write(tmp_path, BASE))
    assert cfg.backup.standby_guest is True
    off = load(write(tmp_path, BASE.replace('address = "127.0.0.1:7788"',
                                            'address = "127.0.0.1:7788"\nstandby_guest = false')))
    assert off.backup.standby_guest is False and off.reversed().backup.standby_guest is False


def test_a_standby_qemu_binds_user_networking_host_ports_only_when_asked(tmp_path):
    from remus.common.qemu import GuestPaths, build_command
    cfg = load(write(tmp_path, BASE + '[network]\nmode = "user"\n'
                                      'host_forward = ["tcp:127.0.0.1:8080-:80"]\n'))
    paths = GuestPaths(run_dir=tmp_path, ram_file=tmp_path / "ram")
    assert "hostfwd=tcp:127.0.0.1:8080-:80" in " ".join(build_command(cfg, paths, "tcg"))
    standby = " ".join(build_command(cfg, paths, "tcg", incoming=True, host_forward=False))
    assert "hostfwd" not in standby and "-netdev user,id=n0 " in standby
