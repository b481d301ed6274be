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
    assert cfg.replication.max_rate == 0  # min_interval_ms alone bounds the rate
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
    ("[replication]\nmax_rate = -1\n", "[replication] max_rate: must be between 0 and 1000"),
    ("[replication]\nmax_rate = 1001\n", "[replication] max_rate: must be between 0 and 1000"),
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


# ---- disks, firmware, machine and CPU

DISKS = BASE.replace('kernel = "vmlinuz"\n', "") + """
[[disk]]
path = "system.qcow2"
format = "qcow2"
serial = "system"
[[disk]]
path = "/srv/data.raw"
bus = "virtio-scsi"
[[disk]]
path = "seed.iso"
readonly = true
"""


def command(cfg, tmp_path, **kw) -> str:
    from remus.common.qemu import GuestPaths, build_command
    return " ".join(build_command(cfg, GuestPaths(run_dir=tmp_path, ram_file=tmp_path / "r,am"),
                                  "tcg", **kw))


def test_disks_boot_from_the_first_and_replicas_replace_only_the_mirrored(tmp_path):
    cfg = load(write(tmp_path, DISKS))
    assert [d.path for d in cfg.mirrored_disks] == [str(tmp_path / "system.qcow2"), "/srv/data.raw"]
    cmd = command(cfg, tmp_path)
    assert "-kernel" not in cmd and "mem-path=" + str(tmp_path / "r,,am") in cmd
    assert (f"driver=file,filename={tmp_path / 'system.qcow2'},node-name=disk0file "
            "-blockdev driver=qcow2,file=disk0file,node-name=disk0 -device "
            "virtio-blk-pci,drive=disk0,id=disk0dev,serial=system,bootindex=0") in cmd
    assert "-device virtio-scsi-pci,id=scsi0" in cmd and "scsi-hd,drive=disk1,bus=scsi0.0" in cmd
    assert f"filename={tmp_path / 'seed.iso'},node-name=disk2file,read-only=on" in cmd
    on_backup = command(cfg, tmp_path, replicas=["/b/replica.disk", "/b/replica.disk1"])
    assert "filename=/b/replica.disk,node-name=disk0file -blockdev driver=raw," in on_backup
    assert "filename=/b/replica.disk1,node-name=disk1file" in on_backup
    assert f"filename={tmp_path / 'seed.iso'}" in on_backup  # read-only media stay as they are


def test_uefi_mirrors_its_variable_store_on_pflash1(tmp_path):
    cfg = load(write(tmp_path, DISKS.replace('name = "demo"', 'name = "demo"\nfirmware = "uefi"\n'
                                                                'uefi_vars = "vars.fd"')))
    assert cfg.mirrored_disks[-1].path == str(tmp_path / "vars.fd")
    assert cfg.mirrored_disks[-1].bus == "pflash"
    cmd = command(cfg, tmp_path)
    assert "-machine q35,memory-backend=mem,pflash0=uefi-code,pflash1=disk3" in cmd
    assert "OVMF_CODE_4M.fd,node-name=uefi-codefile,read-only=on" in cmd
    assert "drive=disk3" not in cmd  # no device of its own


def test_machine_cpu_model_and_firmware_shape_the_fingerprint(tmp_path):
    base = load(write(tmp_path, DISKS)).fingerprint()
    for change in ('machine = "pc"', 'cpu_model = "x86-64-v2"', 'cpus = 2'):
        cfg = load(write(tmp_path, DISKS.replace('name = "demo"', f'name = "demo"\n{change}')))
        assert cfg.fingerprint() != base, change
    cfg = load(write(tmp_path, DISKS.replace('name = "demo"', 'name = "demo"\ncpu_model = "x86-64-v2"')))
    assert "-cpu x86-64-v2" in command(cfg, tmp_path)
    moved = load(write(tmp_path, DISKS.replace("/srv/data.raw", "/elsewhere/data.raw")))
    assert moved.fingerprint() == base  # paths may differ between the hosts


@pytest.mark.parametrize("change, named", [
    ('[[disk]]\npath = "x"\nformat = "vmdk"\n', "[[disk]] #4 format: must be one of raw, qcow2"),
    ('[[disk]]\npath = "x"\nbus = "ide"\n', "[[disk]] #4 bus: must be one of virtio-blk"),
    ('[[disk]]\nformat = "raw"\n', "[[disk]] #4 path: required"),
    ('[[disk]]\npath = "x"\nsize = 3\n', "[[disk]] #4 size: unknown key"),
    ('[[disk]]\npath = "x"\nserial = "system"\n', "two disks have the same serial"),
    ('[[disk]]\npath = "x"\nserial = "has space"\n', "[[disk]] #4 serial"),
    ('[[disk]]\npath = "x"\nreadonly = "yes"\n', "[[disk]] #4 readonly: expected true or false"),
])
def test_bad_disks_name_the_entry_and_key(tmp_path, change, named):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, DISKS + change))
    assert named in str(err.value)


@pytest.mark.parametrize("text, named", [
    (BASE.replace('kernel = "vmlinuz"', ""),
     "[guest] kernel: required unless the guest boots from a disk ([[disk]] or [guest] disk)"),
    (BASE.replace('kernel = "vmlinuz"', 'initrd = "i"') + '[[disk]]\npath = "d"\n',
     "[guest] initrd: only with [guest] kernel (a guest booting from its disk has its initramfs there)"),
    (BASE.replace('name = "demo"', 'name = "demo"\nfirmware = "uefi"'),
     "[guest] uefi_vars: required with firmware = \"uefi\": this VM's copy of "
     "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    (BASE.replace('name = "demo"', 'name = "demo"\nuefi_vars = "v"'),
     '[guest] uefi_vars: only with firmware = "uefi"'),
    (BASE.replace('name = "demo"', 'name = "demo"\nfirmware = "uefi"\nmachine = "pc"\n'
                                   'uefi_vars = "v"'), '[guest] firmware = "uefi": needs machine = "q35"'),
    (BASE.replace('name = "demo"', 'name = "demo"\ncpu_model = "x y"'),
     "[guest] cpu_model: a QEMU CPU model name such as x86-64-v2, Skylake-Server or host (got 'x y')"),
    (BASE.replace('name = "demo"', 'name = "demo"\nmachine = "virt"'),
     "[guest] machine: must be one of q35, pc (got 'virt')"),
    (BASE.replace('name = "demo"', 'name = "demo"\ndisk = "d"') + '[[disk]]\npath = "e"\n',
     "[guest] disk and [[disk]] both given: list every disk as [[disk]]"),
    (BASE + "[disk]\npath = 'x'\n", "[[disk]] must be an array of tables, one per disk"),
])
def test_boot_and_firmware_errors_name_the_key(tmp_path, text, named):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    assert str(err.value) == named


def test_read_only_media_are_digested_and_a_missing_one_is_named(tmp_path):
    from remus.common.config import read_only_media
    (tmp_path / "seed.iso").write_bytes(b"seed")
    cfg = load(write(tmp_path, DISKS))
    assert read_only_media(cfg) == [(str(tmp_path / "seed.iso"), "4:" + __import__(
        "hashlib").sha256(b"seed").hexdigest())]
    (tmp_path / "seed.iso").unlink()
    with pytest.raises(ConfigError, match=r"seed.iso: cannot read this read-only medium"):
        read_only_media(cfg)


@pytest.mark.parametrize("key, value", [("name", "demo\\n"), ("cpu_model", "x86-64-v2\\n")])
def test_a_trailing_newline_is_not_part_of_a_valid_name(tmp_path, key, value):
    text = BASE.replace('name = "demo"', f'name = "demo"\n{key} = "{value}"') if key != "name" \
        else BASE.replace('name = "demo"', f'name = "{value}"')
    with pytest.raises(ConfigError, match=rf"\[guest\] {key}"):
        load(write(tmp_path, text))


# ---- NICs

NICS = BASE + """
[network]
mode = "bridged"
[[nic]]
mac = "52:54:00:00:00:01"
bridge = "br0"
[[nic]]
mac = "52:54:00:00:00:02"
bridge = "br1"
tap = "guest-b"
"""


def test_nics_each_with_its_tap_on_its_bridge(tmp_path):
    cfg = load(write(tmp_path, NICS))
    assert [(n.mac, n.bridge, n.tap) for n in cfg.nics] == [
        ("52:54:00:00:00:01", "br0", "rm-demo"), ("52:54:00:00:00:02", "br1", "guest-b")]
    one = load(write(tmp_path, BASE + '[network]\nmode = "bridged"\nbridge = "br9"\n'))
    assert [(n.bridge, n.tap) for n in one.nics] == [("br9", "rm-demo")]
    assert load(write(tmp_path, BASE)).nics == ()
    changed = load(write(tmp_path, NICS.replace("00:00:02", "00:00:03")))
    assert changed.fingerprint() != cfg.fingerprint()


@pytest.mark.parametrize("change, named", [
    ('[[nic]]\nbridge = "br2"\n', "[[nic]] #3 mac: required"),
    ('[[nic]]\nmac = "01:00:00:00:00:01"\nbridge = "br2"\n', "[[nic]] #3 mac"),
    ('[[nic]]\nmac = "52:54:00:00:00:09"\n', "[[nic]] #3 bridge: required"),
    ('[[nic]]\nmac = "52:54:00:00:00:09"\nbridge = "br2"\nmodel = "e1000"\n', "[[nic]] #3 model"),
    ('[[nic]]\nmac = "52:54:00:00:00:09"\nbridge = "br2"\nspeed = 1\n', "[[nic]] #3 speed: unknown"),
    ('[[nic]]\nmac = "52:54:00:00:00:01"\nbridge = "br2"\n', "two NICs have the same mac"),
    ('[[nic]]\nmac = "52:54:00:00:00:09"\nbridge = "br2"\ntap = "guest-b"\n', "same tap"),
])
def test_bad_nics_name_the_entry_and_key(tmp_path, change, named):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, NICS + change))
    assert named in str(err.value)


def test_nics_need_bridged_mode(tmp_path):
    with pytest.raises(ConfigError, match=r'\[\[nic\]\]: several NICs need \[network\] mode = "bridged"'):
        load(write(tmp_path, BASE + '[[nic]]\nmac = "52:54:00:00:00:01"\nbridge = "br0"\n'))


def test_the_nic_group_gives_each_nic_its_netdev_and_routes_by_index(tmp_path):
    from remus.common.nicgroup import make_netbuf
    cfg = load(write(tmp_path, NICS.replace("[tls]", '[tls]').replace(
        '[network]\nmode = "bridged"', '[network]\nmode = "bridged"\nbuffer = "userspace"')))
    group = make_netbuf(cfg, tmp_path, True)
    args = " ".join(group.qemu_netdev_args())
    assert f"stream,id=n0,server=off,addr.type=unix,addr.path={tmp_path / 'net.sock'}" in args
    assert f"id=n1,server=off,addr.type=unix,addr.path={tmp_path / 'net1.sock'}" in args
    assert "netdev=n1,mac=52:54:00:00:00:02" in args
    seen = []
    group.set_inbound_listener(lambda nic, frames: seen.append((nic, frames)))
    group.buffers[1].inbound_listener([b"f"])
    assert seen == [(1, [b"f"])]
    got = {0: [], 1: []}
    for i, b in enumerate(group.buffers):
        b.to_guest = lambda frames, i=i: got[i].extend(frames) or len(frames)
    assert group.to_guest([(1, b"a"), (0, b"b"), (1, b"c"), (7, b"lost")]) == 3
    assert got == {0: [b"b"], 1: [b"a", b"c"]}
    assert group.stats["held_frames"] == 0 and group.userspace


def test_a_bad_bridge_name_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[network\] bridge: an interface name"):
        load(write(tmp_path, BASE + '[network]\nmode = "bridged"\nbridge = "a bridge name too long"\n'))


# ---- values: each accepted one as stored, each rejected one with the exact message

def minimal(**sections) -> dict:
    """The smallest valid config as parsed TOML, with `sections` merged in."""
    data = {"guest": {"name": "demo", "kernel": "/k"}, "primary": {"address": "10.0.0.1"},
            "backup": {"address": "10.0.0.2:7788"}, "tls": {"insecure": True}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return data


@pytest.mark.parametrize("value, port_required, expected", [
    ("10.0.0.2:7788", True, ("10.0.0.2", 7788)),
    ("[fd00::2]:7788", True, ("fd00::2", 7788)),
    ("NAS-BOX:65535", True, ("NAS-BOX", 65535)),
    ("10.0.0.1", False, ("10.0.0.1", 0)),
    ("10.0.0.1:0", False, ("10.0.0.1", 0)),
    ("[fd00::1]:0", False, ("fd00::1", 0)),
    ("[fd00::1]", False, ("fd00::1", 0)),
])
def test_host_port_splits_the_last_colon_and_unbrackets_ipv6(value, port_required, expected):
    from remus.common.config import host_port
    assert host_port(value, port_required=port_required) == expected


@pytest.mark.parametrize("value, port_required, message", [
    ("10.0.0.2", True, "expected HOST:PORT"),
    ("10.0.0.2:http", True, "expected HOST:PORT with a port from 0 to 65535"),
    ("10.0.0.2:65536", False, "expected HOST:PORT with a port from 0 to 65535"),
    (":7788", True, "expected HOST:PORT with a port from 0 to 65535"),
    ("[]:7788", False, "expected HOST:PORT with a port from 0 to 65535"),
    ("10.0.0.2:0", True, "port 0 is not a listening port"),
    ("fd00::1", False, "an IPv6 address needs brackets: [fd00::1] or [fd00::1]:PORT"),
    ("fd00::1:7788", True, "an IPv6 address needs brackets: [fd00::1:7788] or "
                           "[fd00::1:7788]:PORT"),
    ("[fd00::1]", True, "expected HOST:PORT"),
])
def test_host_port_says_what_is_wrong(value, port_required, message):
    from remus.common.config import host_port
    with pytest.raises(ValueError) as err:
        host_port(value, port_required=port_required)
    assert str(err.value) == message


def test_range_checks_include_both_bounds_and_choices_list_the_options():
    from remus.common.config import _choice, _range
    cpus = _range(1, 64)
    assert (cpus(1), cpus(64)) == (1, 64)
    for outside in (0, 65):
        with pytest.raises(ValueError) as err:
            cpus(outside)
        assert str(err.value) == "must be between 1 and 64"
    firmware = _choice("bios", "uefi")
    assert firmware("uefi") == "uefi"
    with pytest.raises(ValueError) as err:
        firmware("efi")
    assert str(err.value) == "must be one of bios, uefi"


@pytest.mark.parametrize("section, key, value, stored", [
    ("guest", "cpus", 64, 64),
    ("guest", "cpu_model", "Skylake-Server", "Skylake-Server"),
    ("network", "mac", "52:54:00:AB:CD:EF", "52:54:00:ab:cd:ef"),
    ("network", "mac", "5a:54:00:00:00:01", "5a:54:00:00:00:01"),
    ("network", "tap", "Tap0-fifteen-ch", "Tap0-fifteen-ch"),
    ("heartbeat", "links", [["10.0.0.1:7000", "10.0.0.2:7000"], ["[fd00::1]:7000", "[fd00::2]:7000"]],
     [["10.0.0.1:7000", "10.0.0.2:7000"], ["[fd00::1]:7000", "[fd00::2]:7000"]]),
    ("heartbeat", "keys_dir", "/etc/remus/keys", "/etc/remus/keys"),
    ("metrics", "primary", "", ""),
    ("metrics", "primary", "9100", "127.0.0.1:9100"),
    ("metrics", "backup", ":9100", "127.0.0.1:9100"),
    ("metrics", "backup", "0.0.0.0:9100", "0.0.0.0:9100"),
    ("metrics", "backup", "[::1]:9100", "[::1]:9100"),
])
def test_accepted_values_are_stored_normalised(tmp_path, section, key, value, stored):
    from remus.common.config import parse
    cfg = parse(minimal(**{section: {key: value}}), tmp_path / "g.toml")
    assert getattr(getattr(cfg, section), key) == stored


def test_relative_key_directories_are_relative_to_the_config_file(tmp_path):
    cfg = load(write(tmp_path, BASE + '[heartbeat]\nkeys_dir = "curve"\n'))
    assert cfg.heartbeat.keys_dir == str(tmp_path / "curve")
    assert cfg.tls.dir == str(tmp_path / "keys")


LINK = 'each link is ["PRIMARY_HOST:PORT", "BACKUP_HOST:PORT"]'
TLS_NEEDED = ('[tls]: the checkpoint stream needs TLS material: add [tls] dir = "/etc/remus/keys" '
              "holding ca.crt, primary.crt, primary.tls.key, backup.crt, backup.tls.key (made by "
              "`remusctl keys generate --dir /etc/remus/keys --node primary --node backup`), or "
              "[tls] insecure = true for plain TCP (unauthenticated, unencrypted)")


@pytest.mark.parametrize("sections, message", [
    ({"guest": {"name": "a b"}},
     "[guest] name: letters, digits, '.', '_' and '-' only, at most 63 (got 'a b')"),
    ({"guest": {"memory_mib": True}}, "[guest] memory_mib: expected int, got a boolean"),
    ({"replication": {"interval_ms": "200"}}, "[replication] interval_ms: expected int, got str '200'"),
    ({"guest": {"extra_args": ["-smp", 2]}},
     "[guest] extra_args: must be a list of strings (got ['-smp', 2])"),
    ({"network": {"mac": "52:54:00:12:34"}},
     "[network] mac: expected a MAC address like 52:54:00:12:34:56 (got '52:54:00:12:34')"),
    ({"network": {"mac": "03:00:00:00:00:01"}},
     "[network] mac: a multicast MAC cannot be a NIC address (got '03:00:00:00:00:01')"),
    ({"network": {"tap": "tap-sixteen-char"}},
     "[network] tap: an interface name: at most 15 letters, digits, '_', '.', '-' (got 'tap-sixteen-char')"),
    ({"network": {"tap": "tap 0"}},
     "[network] tap: an interface name: at most 15 letters, digits, '_', '.', '-' (got 'tap 0')"),
    ({"heartbeat": {"links": [["10.0.0.1:7000"]]}}, f"[heartbeat] links: {LINK} (got [['10.0.0.1:7000']])"),
    ({"heartbeat": {"links": [["h:1", "h:2", "h:3"]]}},
     f"[heartbeat] links: {LINK} (got [['h:1', 'h:2', 'h:3']])"),
    ({"heartbeat": {"links": [["h:1", 2]]}}, f"[heartbeat] links: {LINK} (got [['h:1', 2]])"),
    ({"heartbeat": {"links": [["h", "h:2"]]}}, "[heartbeat] links: expected HOST:PORT (got [['h', 'h:2']])"),
    ({"heartbeat": {"links": [["h:1", "h:0"]]}},
     "[heartbeat] links: port 0 is not a listening port (got [['h:1', 'h:0']])"),
    ({"metrics": {"primary": "localhost"}}, "[metrics] primary: expected HOST:PORT (got 'localhost')"),
    ({"metrics": {"backup": "0"}}, "[metrics] backup: port 0 is not a listening port (got '0')"),
    ({"network": 5}, "[network] must be a table"),
    ({"replicaton": {}}, "unknown section [replicaton] (known: guest, network, replication, heartbeat, "
                         "tls, metrics, primary, backup, cluster, fencing, [[disk]], [[nic]])"),
    ({"metrics": {"prometheus": ":9100"}}, "[metrics] prometheus: unknown key (known: primary, backup)"),
    ({"network": {"host_forward": ["tcp::8080-:80"]}},
     '[network] host_forward: only meaningful with mode = "user"'),
    ({"network": {"mode": "bridged"}}, '[network] bridge: required with mode = "bridged" (or [[nic]])'),
    ({"tls": {"dir": "/etc/remus/keys"}},
     "[tls] insecure: true together with [tls] dir; say which one (remove insecure to use TLS)"),
    ({"tls": {"insecure": False}}, TLS_NEEDED),
])
def test_each_rejected_value_is_explained_exactly(tmp_path, sections, message):
    from remus.common.config import parse
    with pytest.raises(ConfigError) as err:
        parse(minimal(**sections), tmp_path / "g.toml")
    assert str(err.value) == message


def test_an_unreadable_config_file_is_named_with_the_reason(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "absent.toml")
    assert str(err.value) == f"cannot read config {tmp_path / 'absent.toml'}: No such file or directory"


def test_the_parsed_config_keeps_its_path_its_table_and_its_fencing_plan(tmp_path):
    from remus.common.config import parse
    data = minimal(fencing={"level": [{"device": [{"kind": "command", "command": ["/bin/true"]}]}]})
    cfg = parse(data, tmp_path / "g.toml")
    assert cfg.path == tmp_path / "g.toml" and cfg.raw is data
    assert [[d.command for d in level] for level in cfg.fence_plan.levels] == [[("/bin/true",)]]
    with pytest.raises(AttributeError, match="^no_such_key$"):
        cfg.guest.no_such_key


def test_one_bridged_nic_uses_the_tap_given_or_one_named_after_the_guest(tmp_path):
    from remus.common.config import parse
    named = parse(minimal(network={"mode": "bridged", "bridge": "br0", "tap": "tap-demo"}), tmp_path / "g")
    assert named.network.tap == "tap-demo" and [n.tap for n in named.nics] == ["tap-demo"]
    default = parse(minimal(network={"mode": "bridged", "bridge": "br0"}), tmp_path / "g")
    assert default.network.tap == "rm-demo" and [n.tap for n in default.nics] == ["rm-demo"]


def test_overrides_left_unset_keep_the_file_value_and_a_bad_one_is_explained(tmp_path):
    cfg = load(write(tmp_path, BASE))
    changed = cfg.with_overrides(interval_ms=None, zstd_level=3)
    assert (changed.replication.interval_ms, changed.replication.zstd_level) == (200, 3)
    with pytest.raises(ConfigError) as err:
        cfg.with_overrides(interval_ms=1)
    assert str(err.value) == "[replication] interval_ms: must be between 5 and 60000 (got 1)"


def test_reversed_roles_bracket_ipv6_hosts_and_leave_others_bare(tmp_path):
    from remus.common.config import parse
    v4 = parse(minimal(), tmp_path / "g.toml").reversed()
    assert (v4.primary.address, v4.backup.address) == ("10.0.0.2", "10.0.0.1:7788")
    v6 = parse(minimal(primary={"address": "[fd00::1]:0"}, backup={"address": "[fd00::2]:7788"}),
               tmp_path / "g.toml").reversed()
    assert (v6.primary.address, v6.backup.address) == ("[fd00::2]:0", "[fd00::1]:7788")
    assert (v6.primary_endpoint, v6.backup_endpoint) == (("fd00::2", 0), ("fd00::1", 7788))


def test_the_fingerprint_of_a_shape_is_the_same_in_every_version(tmp_path):
    """A host upgraded before its peer must still resume the peer's replica: the
    fingerprint of a given machine shape is pinned, not just self-consistent."""
    from remus.common.config import parse
    shape = minimal(guest={"memory_mib": 256, "cpus": 2, "extra_args": ["-smp", "2"]})
    cfg = parse(shape, tmp_path / "g.toml")
    assert cfg.fingerprint() == "3b6b568768f1d0c6edde3d7d14b419fb"
    other_mac = parse(minimal(network={"mac": "52:54:00:00:00:99"}), tmp_path / "g.toml")
    assert other_mac.fingerprint() != parse(minimal(), tmp_path / "g.toml").fingerprint()
