"""`remusctl guest build`: a small Linux demo guest built from Debian packages.

The guest is a Debian cloud kernel plus an initramfs holding busybox, the
virtio modules, an /init script and a tiny stateful web service (see
guest_files/). Nothing is installed on the host: the two packages are fetched
with `apt-get download` and unpacked with `dpkg -x` into a scratch folder.

The result lives in <cache>/guest/<key>/, where key hashes every input
(package versions, guest_files, FORMAT_VERSION), so an unchanged build is
reused without any download.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Callable

from remus.common import config
from remus.common.guest_types import BuildError, GuestImage

# Bump whenever the build logic changes what ends up in the image.
FORMAT_VERSION = 1

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
# virtio is modular in the cloud kernel. Wanted modules in load order; their
# dependencies (read from each module's .modinfo) are added in front of them.
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "failover", "net_failover", "virtio_net", "virtio_blk")

GUEST_FILES = Path(__file__).with_name("guest_files")


def default_cache_dir() -> Path:
    return Path(os.environ.get("REMUS_CACHE") or "~/.cache/remus").expanduser()


def _run(*cmd: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} not found: building the guest needs a Debian host (apt, dpkg)") from None
    if done.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done.stdout


def resolve_packages() -> dict[str, str]:
    """{package: version} to download; asks apt's local lists only (one call,
    as each apt-cache run takes over a second here)."""
    out = _run("apt-cache", "show", "--no-all-versions", KERNEL_META, BUSYBOX)
    stanzas = {}
    for stanza in out.strip().split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+): (.*)$", stanza, re.M))
        stanzas[fields.get("Package")] = fields
    # The metapackage pins its kernel exactly: "linux-image-X-cloud-amd64 (= V)".
    m = re.search(r"(linux-image-\S+-cloud-amd64) \(= ([^)]+)\)", stanzas.get(KERNEL_META, {}).get("Depends", ""))
    if not m or "Version" not in stanzas.get(BUSYBOX, {}):
        raise BuildError(f"cannot resolve {KERNEL_META} and {BUSYBOX} with apt-cache (apt-get update?)")
    return {m.group(1): m.group(2), BUSYBOX: stanzas[BUSYBOX]["Version"]}


def _guest_files() -> list[tuple[str, bytes]]:
    """(path inside the guest, content) for everything under guest_files/."""
    files = []
    for path in sorted(GUEST_FILES.rglob("*")):
        rel = path.relative_to(GUEST_FILES)
        if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            files.append((rel.as_posix(), path.read_bytes()))
    return files


def cache_key(packages: dict[str, str], files: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, MODULES, sorted(packages.items())]).encode())
    for name, data in files:
        h.update(b"\0%s\0%d\0" % (name.encode(), len(data)))
        h.update(data)
    return h.hexdigest()[:16]


def build(cache_dir: Path, force: bool = False,
          log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> GuestImage:
    packages = resolve_packages()
    key = cache_key(packages, _guest_files())
    out = Path(cache_dir).expanduser().resolve() / "guest" / key
    if (out / "manifest.json").exists() and not force:
        log(f"guest image cached: {out}")
        return _image(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".build-{key}-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        log("downloading " + ", ".join(f"{p} {v}" for p, v in packages.items()))
        root = tmp / "root"
        _download_and_unpack(packages, tmp / "debs", root)
        image = _assemble(root, tmp / "image", packages, key)
        log(f"built guest: kernel {image['kernel_version']}, modules {' '.join(image['modules'])}")
        # Publish by rename, so a half-built folder is never taken as a cache hit.
        if out.exists():
            shutil.rmtree(out)
        try:
            os.rename(tmp / "image", out)
        except OSError:
            if not (out / "manifest.json").exists():  # else a concurrent build won: same inputs
                raise
    return _image(out)


def _image(out: Path) -> GuestImage:
    manifest = json.loads((out / "manifest.json").read_text())
    return GuestImage(out / "vmlinuz", out / "initrd.img", manifest["kernel_version"])


def _download_and_unpack(packages: dict[str, str], debs: Path, root: Path) -> None:
    debs.mkdir()
    # As root, apt downloads as the _apt user, who cannot write our folder.
    _run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
         *(f"{p}={v}" for p, v in packages.items()), cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run("dpkg", "-x", str(deb), str(root))


def _one(paths: list[Path], what: str) -> Path:
    if len(paths) != 1:
        raise BuildError(f"expected one {what} in the unpacked packages, found {len(paths)}")
    return paths[0]


def _assemble(root: Path, out: Path, packages: dict[str, str], key: str) -> dict:
    """Kernel, initramfs and manifest into `out`; returns the manifest."""
    # Debian 12 ships /lib and /bin; later releases have merged /usr.
    moddir = _one([*root.glob("lib/modules/*"), *root.glob("usr/lib/modules/*")], "module tree")
    version = moddir.name
    vmlinuz = _one(list(root.glob(f"boot/vmlinuz-{version}")), "kernel image")
    busybox = _one([p for p in (root / "bin/busybox", root / "usr/bin/busybox") if p.exists()], "busybox")

    modules = _module_order(moddir, MODULES)
    entries: list[tuple[str, int, bytes]] = [
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),  # for the CGIs' #!/bin/sh
        ("etc/remus/modules", 0o100644, "".join(f"{m}\n" for m, _ in modules).encode()),
        *((f"lib/modules/{m}.ko", 0o100644, _read_module(p)) for m, p in modules),
        *_guest_entries(),
        *((d, stat.S_IFDIR | 0o755, b"") for d in ("proc", "sys", "dev", "run", "sbin", "usr/bin", "usr/sbin")),
    ]
    out.mkdir()
    (out / "initrd.img").write_bytes(gzip.compress(_cpio(entries), mtime=0))
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    if (root / f"boot/config-{version}").exists():  # kept to check CONFIG_* options later
        shutil.copyfile(root / f"boot/config-{version}", out / "kernel.config")
    manifest = {"key": key, "format": FORMAT_VERSION, "kernel_version": version,
                "packages": packages, "modules": [m for m, _ in modules]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _guest_entries() -> list[tuple[str, int, bytes]]:
    # Modes do not survive every way of installing package data, so a file is
    # executable exactly when it starts with "#!".
    return [(name, 0o100755 if data.startswith(b"#!") else 0o100644, data)
            for name, data in _guest_files()]


# -- kernel modules -----------------------------------------------------------

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _module_order(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    """`wanted` plus dependencies, each after what it depends on.

    The .deb ships no modules.dep (depmod runs at install time), so the
    dependencies come from each module's own .modinfo section.
    """
    index = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        for suffix in _MODULE_SUFFIXES:
            if path.name.endswith(suffix):
                index[path.name[: -len(suffix)].replace("-", "_")] = path
    order: list[tuple[str, Path]] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise BuildError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if any(m == name for m, _ in order):
            return
        if name not in index:
            raise BuildError(f"module {name} not found under {moddir}")
        for dep in _modinfo(_read_module(index[name])).get("depends", "").split(","):
            if dep:
                visit(dep, chain + (name,))
        order.append((name, index[name]))

    for name in wanted:
        visit(name, ())
    return order


def _read_module(path: Path) -> bytes:
    """The plain ELF module: busybox insmod cannot load compressed ones."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _modinfo(elf: bytes) -> dict[str, str]:
    """key=value strings of an ELF64 module's .modinfo section."""
    if elf[:5] != b"\x7fELF\x02":
        raise BuildError("not an ELF64 kernel module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    for name_off, _type, _flags, _addr, offset, size in sections:
        end = elf.index(b"\0", names_at + name_off)
        if elf[names_at + name_off:end] == b".modinfo":
            pairs = (item.decode().partition("=") for item in elf[offset:offset + size].split(b"\0") if item)
            return {k: v for k, _, v in pairs}
    return {}


# -- initramfs (cpio "newc") ----------------------------------------------------

def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc archive: parents before children, owner root, mtime 0 (reproducible).

    /dev/console is included so the kernel can give /init a console before
    devtmpfs is mounted.
    """
    files = {name: (mode, data, 0) for name, mode, data in entries}
    files["dev/console"] = (stat.S_IFCHR | 0o600, b"", os.makedev(5, 1))
    for name in list(files):
        parts = name.split("/")
        for i in range(1, len(parts)):
            files.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, b"", 0))
    out = bytearray()
    for ino, name in enumerate(sorted(files, key=lambda n: n.split("/")), start=1):
        mode, data, rdev = files[name]
        out += _cpio_member(ino, name, mode, data, rdev)
    out += _cpio_member(0, "TRAILER!!!", 0, b"", 0)
    return bytes(out)


def _cpio_member(ino: int, name: str, mode: int, data: bytes, rdev: int) -> bytes:
    raw = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev), len(raw), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + raw
    pad = lambda b: b + b"\0" * (-len(b) % 4)
    return pad(head) + pad(data)


def read_initramfs(path: Path) -> dict[str, tuple[int, bytes]]:
    """{name: (mode, data)} of a gzipped newc archive (for tests and inspection)."""
    blob = gzip.decompress(Path(path).read_bytes())
    members, pos = {}, 0
    while True:
        if blob[pos:pos + 6] != b"070701":
            raise ValueError(f"bad cpio header at offset {pos}")
        fields = [int(blob[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = blob[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, blob[pos:pos + size])
        pos += size + (-size % 4)


# -- demo config --------------------------------------------------------------

DEMO_APPEND = "console=ttyS0 quiet panic=-1 remus.ip=10.0.2.15/24 remus.gw=10.0.2.2"

def write_demo_config(image: GuestImage, path: Path, cache_dir: Path, port_base: int = 8080) -> Path:
    """A config for the demo guest on one host (primary and backup on 127.0.0.1), and
    the TLS material for its checkpoint stream in <cache>/keys."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    q = json.dumps  # a JSON string is a valid TOML basic string
    text = f"""\
# Demo guest built by `remusctl guest build`; the web service answers on
# http://127.0.0.1:{port_base}/ (cgi-bin/inc, cgi-bin/get, cgi-bin/dirty?pages=N).
[guest]
name = "demo"
memory_mib = 128
cpus = 1
kernel = {q(str(Path(image.kernel).resolve()))}
initrd = {q(str(Path(image.initrd).resolve()))}
append = {q(DEMO_APPEND)}
accel = "auto"

[network]
mode = "user"
mac = "52:54:00:12:34:56"
host_forward = [{q(f"tcp:127.0.0.1:{port_base}-:80")}]

[replication]
interval_ms = 200

[primary]
address = "127.0.0.1"
state_dir = {q(str(cache_dir / "state" / "primary"))}

[backup]
address = "127.0.0.1:7788"
state_dir = {q(str(cache_dir / "state" / "backup"))}

[tls]
dir = {q(str(cache_dir / "keys"))}
"""
    path = Path(path).expanduser()
    config.parse(tomllib.loads(text), path)  # never write a file the daemons would reject
    from remus.common import tls
    tls.ensure(cache_dir / "keys")  # the stream's CA and node certificates, kept if present
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# -- command line -------------------------------------------------------------

def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError("a TCP port from 1 to 65535")
    return port


def add_build_parser(subparsers) -> None:
    p = subparsers.add_parser("build", help="build the demo guest (kernel + initramfs) and its config",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=None,
                   help="cache folder (default: $REMUS_CACHE or ~/.cache/remus)")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached image matches")
    p.add_argument("--config-out", type=Path, default=None, help="config file to write (default: <cache>/demo.toml)")
    p.add_argument("--port-base", type=_port, default=8080, help="host port forwarded to guest port 80 (default 8080)")
    p.add_argument("--boot-disk", type=Path, default=None, metavar="FILE",
                   help="also write a disk the guest boots from through its firmware (SeaBIOS "
                        "or UEFI): partition table, SYSLINUX, kernel and initramfs")
    p.add_argument("--boot-format", choices=("raw", "qcow2"), default="raw",
                   help="format of --boot-disk (default raw)")
    p.add_argument("--boot-append", default=DEMO_APPEND,
                   help="kernel command line written into --boot-disk (default: the demo "
                        "config's, for QEMU user networking)")
    p.set_defaults(func=run_build)


def run_build(args) -> int:
    cache = (args.cache or default_cache_dir()).expanduser().resolve()
    try:
        image = build(cache, force=args.force)
    except BuildError as exc:
        print(f"remusctl guest build: {exc}", file=sys.stderr)
        return 1
    cfg = write_demo_config(image, args.config_out or cache / "demo.toml", cache, args.port_base)
    print(f"kernel: {image.kernel}")
    print(f"initrd: {image.initrd}")
    print(f"config: {cfg.resolve()}")
    if args.boot_disk is not None:
        from remus.common.boot_disk import make_boot_disk
        try:
            disk = make_boot_disk(image, args.boot_disk.resolve(), args.boot_append,
                                  fmt=args.boot_format)
        except BuildError as exc:
            print(f"remusctl guest build: {exc}", file=sys.stderr)
            return 1
        print(f"boot disk ({args.boot_format}): {disk}")
    return 0
