"""The demo guest builder: cache key, initramfs format, module order, config.

No QEMU here. Tests of a real image use the build in $REMUS_CACHE (or
~/.cache/remus), building it on first use; they skip when that is impossible
(no apt, no network).
"""
from __future__ import annotations

import argparse
import gzip
import lzma
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from remus.common import config, ctl, guest_image as gi

PACKAGES = {"linux-image-6.1.0-56-cloud-amd64": "6.1.192-2", "busybox-static": "1:1.35.0-4+deb12u1+b1"}
BUSYBOX = shutil.which("busybox")


# -- cache key -----------------------------------------------------------------

def test_cache_key_is_stable_and_order_independent():
    files = gi._guest_files()
    key = gi.cache_key(PACKAGES, files)
    assert key == gi.cache_key(dict(reversed(list(PACKAGES.items()))), list(files))
    assert len(key) == 16 and int(key, 16) >= 0


@pytest.mark.parametrize("change", ["package", "file", "new file", "format"])
def test_cache_key_changes_with_every_input(change, monkeypatch):
    files = gi._guest_files()
    before = gi.cache_key(PACKAGES, files)
    packages = dict(PACKAGES)
    if change == "package":
        packages["busybox-static"] += "+b2"
    elif change == "file":
        files = [(n, d + b"\n" if n == "init" else d) for n, d in files]
    elif change == "new file":
        files = files + [("www/extra.html", b"")]
    else:
        monkeypatch.setattr(gi, "FORMAT_VERSION", gi.FORMAT_VERSION + 1)
    assert gi.cache_key(packages, files) != before


def test_guest_files_cover_the_service():
    names = dict(gi._guest_files())
    for name in ("init", "www/cgi-bin/inc", "www/cgi-bin/get", "www/cgi-bin/dirty",
                 "www/cgi-bin/record", "www/cgi-bin/disklast", "bin/remus-dirty", "bin/remus-line",
                 "lib/remus/cgi.sh"):
        assert name in names
    assert b"REMUS-GUEST-READY" in names["init"]


@pytest.mark.skipif(not BUSYBOX, reason="no busybox on the host to check shell syntax")
@pytest.mark.parametrize("name", ["init", "www/cgi-bin/inc", "www/cgi-bin/get", "www/cgi-bin/dirty",
                                  "www/cgi-bin/record", "www/cgi-bin/disklast",
                                  "www/cgi-bin/tcp", "bin/remus-dirty", "bin/remus-line",
                                  "lib/remus/cgi.sh"])
def test_guest_scripts_parse(name):
    done = subprocess.run([BUSYBOX, "sh", "-n", str(gi.GUEST_FILES / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not BUSYBOX, reason="no busybox on the host to run the line service")
def test_line_service_answers_each_line_on_one_connection(tmp_path):
    (tmp_path / "counter").write_bytes(b"xx")  # the CGI's counter: two increments so far
    script = gi.GUEST_FILES.joinpath("bin/remus-line").read_text().replace(
        "STATE=/run/remus", f"STATE={tmp_path}")
    done = subprocess.run([BUSYBOX, "sh", "-c", script], input="inc\ninc\nget\nping\nhello\n",
                          capture_output=True, text=True, timeout=30)
    assert done.stdout.splitlines() == ["3", "4", "4", "pong", "error: unknown command"]
    assert (tmp_path / "counter").read_bytes() == b"xxxx"


# -- the counter CGI, run on the host with busybox sh ----------------------------

def _cgi(tmp_path: Path, name: str, query: str = "", disk: str = "/dev/vda") -> subprocess.Popen:
    """Start a CGI script with its state in tmp_path instead of /run/remus
    (and the guest disk at `disk` instead of /dev/vda)."""
    lib = tmp_path / "cgi.sh"
    if not lib.exists():
        lib.write_text(gi.GUEST_FILES.joinpath("lib/remus/cgi.sh").read_text()
                       .replace("STATE=/run/remus", f"STATE={tmp_path}"))
        (tmp_path / "counter").write_bytes(b"")
    script = (gi.GUEST_FILES.joinpath("www/cgi-bin", name).read_text()
              .replace("/lib/remus/cgi.sh", str(lib)).replace("/dev/vda", disk))
    return subprocess.Popen([BUSYBOX, "sh", "-c", script], stdout=subprocess.PIPE,
                            env={"QUERY_STRING": query, "PATH": os.environ["PATH"]})


def _body(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=30)[0].decode()
    head, _, body = out.partition("\r\n\r\n")
    assert "Content-Type: text/plain" in head
    return body


@pytest.mark.skipif(not BUSYBOX, reason="no busybox on the host to run the CGI scripts")
def test_concurrent_increments_are_never_lost(tmp_path):
    assert _body(_cgi(tmp_path, "get")) == "0\n"
    procs = [_cgi(tmp_path, "inc") for _ in range(60)]
    values = sorted(int(_body(p)) for p in procs)
    assert values == list(range(1, 61))
    assert _body(_cgi(tmp_path, "get")) == "60\n"


@pytest.mark.skipif(not BUSYBOX, reason="no busybox on the host to run the CGI scripts")
def test_tcp_reports_each_setting_and_unknown_for_what_the_kernel_lacks(tmp_path):
    (tmp_path / "ipv4").mkdir()
    (tmp_path / "ipv4/tcp_wmem").write_text("4096\t16384\t4194304\n")
    (tmp_path / "ipv4/tcp_congestion_control").write_text("cubic\n")
    script = gi.GUEST_FILES.joinpath("www/cgi-bin/tcp").read_text()
    assert "/proc/sys/net/ipv4" in script and "/sys/module/tcp_cubic" in script
    script = (script.replace("/proc/sys/net/ipv4", str(tmp_path / "ipv4"))
              .replace("/sys/module/tcp_cubic", str(tmp_path / "absent")))
    (tmp_path / "cgi.sh").write_text(gi.GUEST_FILES.joinpath("lib/remus/cgi.sh").read_text())
    script = script.replace("/lib/remus/cgi.sh", str(tmp_path / "cgi.sh"))
    out = subprocess.run([BUSYBOX, "sh", "-c", script], capture_output=True, timeout=30)
    assert out.stdout.decode().partition("\r\n\r\n")[2].splitlines() == [
        "tcp_wmem 4096\t16384\t4194304", "congestion_control cubic", "hystart unknown"]


@pytest.mark.skipif(not BUSYBOX, reason="no busybox on the host to run the CGI scripts")
@pytest.mark.parametrize("query", ["", "pages=", "pages=-1", "pages=1x", "pages=99999999"])
def test_dirty_rejects_bad_page_counts(tmp_path, query):
    out = _cgi(tmp_path, "dirty", query).communicate(timeout=30)[0].decode()
    assert out.startswith("Status: 400")


@pytest.fixture
def loop_disk(tmp_path):
    """A 64-sector block device (loop) over a zeroed file: (device, backing file)."""
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(64 * 512))
    done = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"no loop device for a block-device disk: {done.stderr.strip()}")
    dev = done.stdout.strip()
    yield dev, backing
    subprocess.run(["losetup", "-d", dev], check=True)


@pytest.mark.skipif(not BUSYBOX, reason="no busybox on the host to run the CGI scripts")
def test_record_writes_numbered_synced_records_that_disklast_reports(tmp_path, loop_disk):
    """What test_disk relies on: record N lands in sector N in the format
    records_on_disk reads, concurrent records get distinct consecutive numbers,
    and disklast reports the last one written."""
    from remus.common.localpair import records_on_disk
    dev, backing = loop_disk
    assert _body(_cgi(tmp_path, "disklast", disk=dev)) == "0\n"
    assert _body(_cgi(tmp_path, "record", disk=dev)) == "1\n"
    procs = [_cgi(tmp_path, "record", disk=dev) for _ in range(20)]
    assert sorted(int(_body(p)) for p in procs) == list(range(2, 22))
    assert _body(_cgi(tmp_path, "disklast", disk=dev)) == "21\n"
    assert not (tmp_path / "lock").exists()  # every record and disklast unlocked
    assert records_on_disk(backing) == 21  # synced through the block device
    data = backing.read_bytes()
    assert data[:512] == bytes(512)  # sector 0 is never a record
    assert data[21 * 512:21 * 512 + 512] == b"REC00000021\n" + bytes(500)  # padded to a sector
    assert data[22 * 512:] == bytes(len(data) - 22 * 512)


@pytest.mark.skipif(not BUSYBOX, reason="no busybox on the host to run the CGI scripts")
def test_record_without_a_disk_refuses(tmp_path):
    out = _cgi(tmp_path, "record", disk=str(tmp_path / "no-such-disk")).communicate(timeout=30)[0].decode()
    assert out.startswith("Status: 503")
    assert _body(_cgi(tmp_path, "disklast")) == "0\n"  # nothing was counted


# -- initramfs and modules -------------------------------------------------------

def test_cpio_round_trip(tmp_path):
    entries = [("bin/busybox", 0o100755, b"\x7fELF..."), ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
               ("a/b/c.txt", 0o100644, b"xyz")]
    archive = gi._cpio(entries)
    assert len(archive) % 4 == 0
    (tmp_path / "initrd.img").write_bytes(gzip.compress(archive))
    members = gi.read_initramfs(tmp_path / "initrd.img")
    assert members["bin/busybox"] == (0o100755, b"\x7fELF...")
    assert members["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    assert stat.S_ISCHR(members["dev/console"][0])
    names = list(members)
    for dirname in ("a", "a/b", "bin", "dev"):  # parents are created, and come first
        assert stat.S_ISDIR(members[dirname][0])
    assert names.index("a") < names.index("a/b") < names.index("a/b/c.txt")


def _fake_module(name: str, depends: str) -> bytes:
    """A minimal ELF64 file with a .modinfo section, as modules carry."""
    modinfo = f"license=GPL\0depends={depends}\0name={name}\0".encode()
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    data_off = 64
    shoff = data_off + len(modinfo) + len(shstrtab)
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 1)
    sections = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, data_off + len(modinfo), len(shstrtab), 0, 0, 1, 0),
                struct.pack("<IIQQQQIIQQ", 11, 1, 2, 0, data_off, len(modinfo), 0, 0, 1, 0)]
    return header + modinfo + shstrtab + b"".join(sections)


def test_modinfo_parses_depends():
    assert gi._modinfo(_fake_module("virtio_net", "virtio_ring,virtio"))["depends"] == "virtio_ring,virtio"


def test_module_order_puts_dependencies_first_and_decompresses(tmp_path):
    kernel = tmp_path / "kernel"
    (kernel / "drivers").mkdir(parents=True)
    (kernel / "drivers/virtio_ring.ko").write_bytes(_fake_module("virtio_ring", ""))
    (kernel / "drivers/virtio.ko.xz").write_bytes(lzma.compress(_fake_module("virtio", "virtio_ring"),
                                                                format=lzma.FORMAT_XZ))
    (kernel / "drivers/net-thing.ko").write_bytes(_fake_module("net_thing", "virtio,virtio_ring"))
    order = gi._module_order(tmp_path, ("net_thing",))
    assert [m for m, _ in order] == ["virtio_ring", "virtio", "net_thing"]
    assert gi._read_module(order[1][1]).startswith(b"\x7fELF")
    with pytest.raises(gi.BuildError, match="missing_mod"):
        gi._module_order(tmp_path, ("missing_mod",))


# -- a real build (cached after the first run) ----------------------------------

@pytest.fixture(scope="module")
def image() -> gi.GuestImage:
    try:
        return gi.build(gi.default_cache_dir(), log=lambda msg: None)
    except (gi.BuildError, OSError) as exc:
        pytest.skip(f"cannot build the demo guest here: {exc}")


def test_built_initramfs_holds_the_guest(image):
    assert image.kernel.stat().st_size > 1 << 20
    members = gi.read_initramfs(image.initrd)
    mode, init = members["init"]
    assert init.startswith(b"#!/bin/busybox sh") and mode & 0o111
    assert members["bin/busybox"][1].startswith(b"\x7fELF") and members["bin/busybox"][0] & 0o111
    assert members["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    for cgi in ("inc", "get", "dirty", "record", "disklast"):  # record, disklast: test_disk
        assert members[f"www/cgi-bin/{cgi}"][0] & 0o111
    assert stat.S_ISCHR(members["dev/console"][0])
    order = members["etc/remus/modules"][1].decode().split()
    assert order == list(gi.MODULES)  # the field notes' order is already dependency-first
    for mod in order:
        assert members[f"lib/modules/{mod}.ko"][1].startswith(b"\x7fELF")  # stored uncompressed
        for dep in filter(None, gi._modinfo(members[f"lib/modules/{mod}.ko"][1])["depends"].split(",")):
            assert order.index(dep) < order.index(mod)


def test_second_build_is_cached(image):
    messages = []
    again = gi.build(gi.default_cache_dir(), log=messages.append)
    assert again == image
    assert len(messages) == 1 and "cached" in messages[0]


# -- demo config and command line -------------------------------------------------

def test_demo_config_loads(tmp_path):
    image = gi.GuestImage(tmp_path / "vmlinuz", tmp_path / "initrd.img", "6.1.0-56-cloud-amd64")
    path = gi.write_demo_config(image, tmp_path / "out" / "demo.toml", tmp_path / "cache", port_base=9090)
    cfg = config.load(path)
    assert cfg.guest.kernel == str(tmp_path / "vmlinuz")
    assert cfg.guest.initrd == str(tmp_path / "initrd.img")
    assert "remus.ip=10.0.2.15/24" in cfg.guest.append and "console=ttyS0" in cfg.guest.append
    assert cfg.network.mode == "user"
    assert cfg.network.host_forward == ["tcp:127.0.0.1:9090-:80"]
    assert cfg.replication.interval_ms == 200
    assert cfg.backup_endpoint == ("127.0.0.1", 7788)
    assert cfg.primary.state_dir == str(tmp_path / "cache/state/primary")
    assert cfg.backup.state_dir == str(tmp_path / "cache/state/backup")


def test_run_build_prints_paths(tmp_path, monkeypatch, capsys):
    image = gi.GuestImage(tmp_path / "vmlinuz", tmp_path / "initrd.img", "6.1.0-56-cloud-amd64")
    calls = []
    monkeypatch.setattr(gi, "build", lambda cache, force=False: calls.append((cache, force)) or image)
    monkeypatch.setenv("REMUS_CACHE", str(tmp_path / "cache"))
    args = ctl.build_parser().parse_args(["guest", "build", "--force", "--port-base", "8181"])
    assert args.func(args) == 0
    assert calls == [(tmp_path / "cache", True)]
    out = capsys.readouterr().out
    assert f"kernel: {image.kernel}" in out and f"initrd: {image.initrd}" in out
    cfg = config.load(tmp_path / "cache" / "demo.toml")
    assert cfg.network.host_forward == ["tcp:127.0.0.1:8181-:80"]


def test_port_base_is_checked():
    with pytest.raises(SystemExit):
        ctl.build_parser().parse_args(["guest", "build", "--port-base", "70000"])


def test_build_error_is_reported(tmp_path, monkeypatch, capsys):
    def fail(cache, force=False):
        raise gi.BuildError("apt-cache not found")
    monkeypatch.setattr(gi, "build", fail)
    args = argparse.Namespace(cache=tmp_path, force=False, config_out=None, port_base=8080)
    assert gi.run_build(args) == 1
    assert "apt-cache not found" in capsys.readouterr().err


def test_boot_disk_has_an_active_partition_syslinux_and_the_command_line(tmp_path):
    from remus.common import boot_disk
    if any(shutil.which(t) is None for t in boot_disk.TOOLS):
        pytest.skip("syslinux, mtools, dosfstools or fdisk missing (scripts/install-deps)")
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"K" * 5000)
    initrd.write_bytes(b"I" * 3000)
    image = gi.GuestImage(kernel, initrd, "test")
    raw = boot_disk.make_boot_disk(image, tmp_path / "d.raw", "console=ttyS0 remus.ip=1.2.3.4/24")
    data = raw.read_bytes()
    assert len(data) == 64 << 20 and data[510:512] == b"\x55\xaa"
    assert data[:440] == boot_disk.MBR_CODE.read_bytes()[:440]
    status, ptype, start = data[446], data[450], struct.unpack_from("<I", data, 454)[0]
    assert (status, ptype, start) == (0x80, 0xEF, boot_disk.START_SECTOR)
    fs = f"{raw}@@{boot_disk.START_SECTOR * 512}"
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
    listing = subprocess.run(["mdir", "-a", "-b", "-i", fs, "::/"], capture_output=True,
                             text=True, env=env).stdout
    for name in ("VMLINUZ", "INITRD.IMG", "SYSLINUX.CFG", "LDLINUX.SYS", "LDLINUX.C32"):
        assert name.lower() in listing.lower(), listing
    cfg = subprocess.run(["mtype", "-i", fs, "::/EFI/BOOT/syslinux.cfg"], capture_output=True,
                         text=True, env=env).stdout
    assert "APPEND initrd=/initrd.img console=ttyS0 remus.ip=1.2.3.4/24" in cfg
    copied = subprocess.run(["mtype", "-i", fs, "::/vmlinuz"], capture_output=True, env=env).stdout
    assert copied == kernel.read_bytes()
    qcow = boot_disk.make_boot_disk(image, tmp_path / "d.qcow2", "x", fmt="qcow2")
    assert qcow.read_bytes()[:4] == b"QFI\xfb"
