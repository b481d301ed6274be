"""`make test-kernel`: run the kernel-dependent tests inside a VM whose kernel has what they need.

The machines CI runs on have neither soft-dirty page tracking
(CONFIG_MEM_SOFT_DIRTY) nor the plug qdisc (CONFIG_NET_SCH_PLUG), so the tests
of those code paths skip there. The lab boots Debian's stock cloud kernel,
which has both, under QEMU and runs those tests inside it.

Two disks:
- the root filesystem (cached): `debootstrap --variant=minbase bookworm` with
  the cloud kernel (its modules, depmod and initramfs come from Debian's own
  package scripts), python3 and a venv holding the project's dependencies,
  installed from a wheelhouse made on the host, so the lab needs no network.
  Made into ext4 with `mkfs.ext4 -d` (no loop mount). Keyed by everything it
  is built from; booted with snapshot=on, so a run never changes it;
- the run disk (fresh each run): a tar of the working tree and the script to
  run, read by the lab's init straight from /dev/vdb. Code changes need no
  rebuild.

The lab's PID 1 (/sbin/remus-lab-init) mounts the usual file systems, unpacks
the run disk, runs its script and powers off. Everything the host needs comes
back on the serial console between markers: the kernel version, pytest's
output and exit status, the negative controls' exit statuses.

Exit status: 0 every test passed and every negative control failed; 1 a test
failed, skipped, or a negative control passed (the lab caught nothing);
3 the lab itself failed (build, boot, timeout): no test result at all.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from remus.common.guest_image import KERNEL_META, default_cache_dir, resolve_packages
from remus.common.guest_types import BuildError
from remus.common.qemu import detect_accel

# Bump whenever the build logic changes what ends up in the root filesystem.
FORMAT_VERSION = 1

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"  # its python3 is 3.11: the wheelhouse is made for cp311
MIRROR = "http://deb.debian.org/debian"
ROOTFS_PACKAGES = ("python3", "python3-venv", "iproute2", "kmod", "procps", "initramfs-tools")
LAB_VENV = "/opt/remus-lab"
LAB_INIT = "/sbin/remus-lab-init"
ROOTFS_SIZE = 3 << 30  # sparse file: only what mkfs.ext4 -d writes takes space
BUILD_STEP_TIMEOUT = 1200  # s; a stalled mirror fails the build instead of hanging CI

# Loaded by the run script; modprobe pulls in their dependencies.
MODULES = ("sch_plug", "sch_ingress", "cls_u32", "act_mirred", "ifb", "tun", "bridge", "veth")
# Tests that skip on kernels without soft-dirty or sch_plug, and the probes'
# own tests. The live test that needs a kernel WITHOUT sch_plug is left out:
# the lab requires that nothing it runs skips.
TESTS = ("tests/test_kernel_probes.py", "tests/test_capture.py", "tests/test_netbuf_plug.py")
SELECT = "(softdirty or live or probe) and not without_sch_plug"
# Each must make the soft-dirty tests FAIL (see tests/test_capture.py).
NEGATIVE_CONTROLS = ("keep-bits", "drop-page")
NEGATIVE_SELECT = "softdirty"
# Optional (--output-commit): the output-commit guarantee with buffer = "plug", the
# demo guest running under QEMU inside the lab (nested emulation: slow, so few kills).
OUTPUT_COMMIT_PACKAGES = ("qemu-system-x86", "curl")  # curl: the client host's requests (localpair)
OUTPUT_COMMIT_TEST = "tests/test_output_commit.py::test_no_reply_is_taken_back_with_the_kernel_plug_buffer"
OUTPUT_COMMIT_FAILOVERS = 2  # not passing yet: see README, "The kernel lab"

EXIT_PASSED, EXIT_FAILED, EXIT_LAB_ERROR = 0, 1, 3
MARK = "REMUS-LAB"

INIT_SCRIPT = f"""\
#!/bin/sh
# PID 1 of the Remus kernel lab: file systems, the run disk, its script, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# Debian's initramfs hands over /proc, /sys and /dev already mounted.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /src && mount -t tmpfs tmpfs /src
if tar -xf /dev/vdb -C /src; then sh /src/run.sh; else echo "{MARK}-ERROR cannot unpack the run disk /dev/vdb"; fi
echo "{MARK}-POWEROFF"
sync
echo o > /proc/sysrq-trigger
sleep 60
"""


class LabError(RuntimeError):
    """The lab could not produce a test result (build, boot, timeout)."""


@dataclass(frozen=True)
class Plan:
    """What one boot runs besides the kernel tests."""
    negative: bool = True                # the negative controls
    output_commit_guest: Path | None = None  # a built demo guest: run the plug output-commit test


@dataclass(frozen=True)
class LabImage:
    root: Path  # <cache>/lab/<key>

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs.img"

    @property
    def kernel(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.root / "initrd.img"


# -- building the root filesystem (cached) -----------------------------------

def requirements() -> list[str]:
    """The project's runtime and test dependencies, from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["test"]]


def kernel_package() -> tuple[str, str]:
    """(package, version) of the cloud kernel the demo guest uses too, from apt's
    local lists: it is often newer (bookworm-security) than what debootstrap sees."""
    kernel = [(p, v) for p, v in resolve_packages().items() if p.startswith("linux-image-")]
    if len(kernel) != 1:
        raise LabError(f"cannot resolve {KERNEL_META}")
    return kernel[0]


def lab_key(kernel: tuple[str, str], reqs: list[str], packages: tuple[str, ...]) -> str:
    inputs = [FORMAT_VERSION, SUITE, MIRROR, packages, LAB_VENV, list(kernel), reqs, INIT_SCRIPT]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]


def build(cache_dir: Path, force: bool = False, log=print, extra_packages: tuple[str, ...] = ()) -> LabImage:
    """The lab's root filesystem, kernel and initramfs: cached, else built (minutes)."""
    kernel, reqs, packages = kernel_package(), requirements(), ROOTFS_PACKAGES + extra_packages
    out = Path(cache_dir).expanduser().resolve() / "lab" / lab_key(kernel, reqs, packages)
    if (out / "manifest.json").exists() and not force:
        log(f"kernel lab: cached image {out}")
        return LabImage(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        root = tmp / "root"
        log(f"kernel lab: debootstrap {SUITE} (a few minutes), then {kernel[0]} {kernel[1]}")
        _run("debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
             SUITE, str(root), MIRROR)
        _install_kernel(root, tmp, kernel)
        log("kernel lab: the project's dependencies into the lab's venv")
        _install_wheels(root, tmp / "wheels", reqs)
        version = _finish_root(root)
        _assemble(root, tmp / "image", version, kernel, reqs)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp / "image", out)  # by rename: a half-built folder is never a cache hit
    finally:
        _remove_build_dir(tmp)
    log(f"kernel lab: built {out} in {time.monotonic() - started:.0f} s")
    return LabImage(out)


def _run(*cmd: str, cwd: Path | None = None) -> None:
    """A build step; on failure the error names it and ends with its last output
    (debootstrap, for one, says what went wrong on stdout)."""
    try:
        done = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace",
                              timeout=BUILD_STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise LabError(f"building the lab: {cmd[0]} still running after {BUILD_STEP_TIMEOUT} s") from None
    except FileNotFoundError:
        raise LabError(f"{cmd[0]} not found (scripts/install-deps installs what the lab needs)") from None
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        raise LabError(f"building the lab: {shlex.join(cmd)[:300]} failed ({done.returncode}):\n{tail}")


def _chroot(root: Path, *cmd: str) -> None:
    # A clean environment: the host's PIP_* and PATH settings mean nothing inside.
    _run("chroot", str(root), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root", "LANG=C.UTF-8", *cmd)


def _install_kernel(root: Path, tmp: Path, kernel: tuple[str, str]) -> None:
    """The pinned kernel package, fetched and unpacked as for the demo guest, then
    depmod and Debian's own mkinitramfs (which loads virtio_blk for the root disk).
    Unpacked aside and copied in: `dpkg -x` straight into the rootfs would replace
    its /lib -> usr/lib symlink with a directory."""
    debs, unpacked = tmp / "debs", tmp / "kernel"
    debs.mkdir()
    _run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{kernel[0]}={kernel[1]}", cwd=debs)
    for deb in debs.glob("*.deb"):
        _run("dpkg", "-x", str(deb), str(unpacked))
    trees = [p for p in (unpacked / "lib/modules", unpacked / "usr/lib/modules") if p.is_dir()]
    if len(trees) != 1 or len(list(trees[0].iterdir())) != 1:
        raise LabError(f"expected one module tree in {kernel[0]}")
    version = next(trees[0].iterdir()).name
    shutil.copytree(trees[0] / version, root / "usr/lib/modules" / version, symlinks=True)
    for name in (f"vmlinuz-{version}", f"config-{version}", f"System.map-{version}"):
        shutil.copyfile(unpacked / "boot" / name, root / "boot" / name)
    _chroot(root, "depmod", version)  # modprobe reads modules.dep
    _chroot(root, "mkinitramfs", "-o", f"/boot/initrd.img-{version}", version)


def _install_wheels(root: Path, wheels: Path, reqs: list[str]) -> None:
    """Wheels made on the host (same python 3.11, same glibc), installed by the
    rootfs's own pip in a chroot with --no-index: nothing fetched inside."""
    if sys.version_info[:2] != (3, 11):  # compiled wheels must match bookworm's python3
        raise LabError(f"the wheelhouse is made with this Python {sys.version.split()[0]}; "
                       f"{SUITE}'s python3 is 3.11: run the lab from a Python 3.11 venv")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), *reqs)
    inside = root / "tmp" / "wheels"
    shutil.copytree(wheels, inside)
    _chroot(root, "python3", "-m", "venv", LAB_VENV)
    _chroot(root, f"{LAB_VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/wheels", *reqs)
    shutil.rmtree(inside)


def _finish_root(root: Path) -> str:
    """Init script, no package cache; returns the kernel version."""
    versions = [p.name for p in (root / "usr/lib/modules").iterdir()]
    if len(versions) != 1:
        raise LabError(f"expected one kernel in the rootfs, found {versions}")
    init = root / LAB_INIT.lstrip("/")
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    return versions[0]


def _assemble(root: Path, out: Path, version: str, kernel: tuple[str, str], reqs: list[str]) -> None:
    out.mkdir()
    shutil.copyfile(root / f"boot/vmlinuz-{version}", out / "vmlinuz")
    shutil.copyfile(root / f"boot/initrd.img-{version}", out / "initrd.img")
    shutil.copyfile(root / f"boot/config-{version}", out / "kernel.config")
    image = out / "rootfs.img"
    with open(image, "wb") as f:
        f.truncate(ROOTFS_SIZE)
    _run("mkfs.ext4", "-q", "-F", "-L", "remus-lab", "-d", str(root), str(image))
    manifest = {"format": FORMAT_VERSION, "suite": SUITE, "kernel_package": list(kernel),
                "kernel_version": version, "requirements": reqs}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _remove_build_dir(tmp: Path) -> None:
    """A failed debootstrap can leave /proc or /sys mounted in the target: unmount
    everything under the build folder before deleting it, never delete through a mount."""
    with open("/proc/mounts") as f:
        mounts = [line.split()[1] for line in f]
    for point in sorted((m for m in mounts if m.startswith(str(tmp) + "/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


# -- one run ------------------------------------------------------------------

def run_script(plan: Plan) -> str:
    """What the lab's init runs from the run disk: modules, tests, markers."""
    env = "REMUS_LAB=1 PYTHONPATH=/src/pkg"
    pytest = f"{LAB_VENV}/bin/python -m pytest -v -ra --color=no -p no:cacheprovider"
    lines = [
        f'echo "{MARK}-KERNEL $(uname -r)"',
        *(f'modprobe {m} || echo "{MARK}-ERROR modprobe {m} failed"' for m in MODULES),
        "ip link set lo up",
        "cd /src/repo",
        f'start=$(date +%s); {env} {pytest} {" ".join(TESTS)} -k {shlex.quote(SELECT)}',
        f'echo "{MARK}-EXIT $? $(( $(date +%s) - start ))"',
    ]
    for mode in NEGATIVE_CONTROLS if plan.negative else ():
        lines += [f"{env} REMUS_TEST_SOFTDIRTY_BREAK={mode} {pytest} tests/test_capture.py "
                  f"-k {NEGATIVE_SELECT}",
                  f'echo "{MARK}-NEGATIVE {mode} $?"']
    if plan.output_commit_guest:
        lines += [*_entry_point_lines(), f"start=$(date +%s); {env} REMUS_TEST_GUEST_DIR=/src/guest REMUS_CACHE=/tmp/cache "
                  f"REMUS_TEST_PLUG_FAILOVERS={OUTPUT_COMMIT_FAILOVERS} {pytest} {OUTPUT_COMMIT_TEST}",
                  f'rc=$?; echo "{MARK}-OUTPUT-COMMIT $rc $(( $(date +%s) - start ))"',
                  # On failure the daemons' logs: the lab is gone afterwards.
                  '[ $rc -eq 0 ] || tail -n 40 /tmp/pytest-of-root/pytest-*/test_no_reply*/run*/*.log']
    return "\n".join(lines) + f'\necho "{MARK}-END"\n'


def _entry_point_lines() -> list[str]:
    """Shell lines writing the project's commands (remus-primary, ...) into the lab's
    venv, as `pip install` would: the daemons the tests start are found there. The
    venv holds only the dependencies; the code comes from the run disk."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    lines = []
    for name, target in scripts.items():
        module, func = target.split(":")
        body = f"#!{LAB_VENV}/bin/python\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n"
        lines += [f"printf %s {shlex.quote(body)} > {LAB_VENV}/bin/{name}", f"chmod +x {LAB_VENV}/bin/{name}"]
    return lines


def _source_files() -> list[Path]:
    """Tracked and untracked (not ignored) files of the working tree: what is being tested."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, check=True).stdout
    return [p for p in (Path(n.decode()) for n in out.split(b"\0") if n) if (REPO / p).is_file()]


def write_run_disk(path: Path, plan: Plan) -> None:
    """A tar as a raw disk: the working tree as /src/repo, the remus.* package
    names as symlinks in /src/pkg (as the source layout has no remus/ folder),
    the demo guest as /src/guest if the plan runs it."""
    with tarfile.open(path, "w") as tar:
        for rel in _source_files():
            tar.add(REPO / rel, arcname=f"repo/{rel}", recursive=False)
        for name in ("common", "primary", "backup", "node"):
            link = tarfile.TarInfo(f"pkg/remus/{name}")
            link.type, link.linkname = tarfile.SYMTYPE, f"../../repo/{name}"
            tar.addfile(link)
        if plan.output_commit_guest:
            tar.add(plan.output_commit_guest, arcname="guest")
        script = run_script(plan).encode()
        info = tarfile.TarInfo("run.sh")
        info.size = len(script)
        tar.addfile(info, io.BytesIO(script))
    with open(path, "ab") as f:  # a whole number of sectors
        f.truncate(-(-path.stat().st_size // 512) * 512 + 512 * 64)


def qemu_command(image: LabImage, run_disk: Path, serial_log: Path, memory_mib: int = 1024) -> list[str]:
    accel, _why = detect_accel("auto")
    append = (f"console=ttyS0 root=/dev/vda rw init={LAB_INIT} net.ifnames=0 panic=-1 "
              "quiet fsck.mode=skip")
    return ["qemu-system-x86_64", "-machine", "q35", "-accel", accel,
            "-cpu", "host" if accel == "kvm" else "max", "-smp", "2", "-m", str(memory_mib),
            "-nodefaults", "-display", "none", "-no-reboot", "-serial", f"file:{serial_log}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
            "-drive", f"file={image.rootfs},format=raw,if=virtio,snapshot=on",
            "-drive", f"file={run_disk},format=raw,if=virtio,readonly=on"]


def boot(image: LabImage, plan: Plan, timeout: float, echo=sys.stdout) -> str:
    """Boot the lab, echo its console as it comes, return it. Raises LabError on
    timeout or if QEMU fails; QEMU and the temp folder are gone either way."""
    with tempfile.TemporaryDirectory(prefix="remus-lab-") as tmp:
        tmp = Path(tmp)
        write_run_disk(tmp / "run.tar", plan)
        serial = tmp / "serial.log"
        serial.touch()
        with open(tmp / "qemu.err", "w+") as err:
            # A nested guest pair: two 128 MiB guests' RAM files in the lab's /dev/shm.
            memory = 2048 if plan.output_commit_guest else 1024
            qemu = subprocess.Popen(qemu_command(image, tmp / "run.tar", serial, memory),
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    start_new_session=True)
            try:
                return _follow(qemu, serial, timeout, echo, err)
            finally:
                _stop(qemu)


def _follow(qemu: subprocess.Popen, serial: Path, timeout: float, echo, err) -> str:
    deadline, seen = time.monotonic() + timeout, 0
    with open(serial, errors="replace") as console:
        while True:
            chunk = console.read()
            seen += len(chunk)
            echo.write(chunk)
            echo.flush()
            if qemu.poll() is not None:
                chunk = console.read()
                echo.write(chunk)
                console.seek(0)
                text = console.read()
                if qemu.returncode != 0 and f"{MARK}-END" not in text:
                    err.seek(0)
                    raise LabError(f"QEMU exited with {qemu.returncode}: {err.read().strip()[-2000:]}")
                return text
            if time.monotonic() > deadline:
                raise LabError(f"no power-off within {timeout:.0f} s (hard timeout)")
            time.sleep(0.5)


def _stop(qemu: subprocess.Popen) -> None:
    if qemu.poll() is None:
        os.killpg(qemu.pid, signal.SIGKILL)  # its own session: only QEMU and its children
    qemu.wait()


# -- the verdict --------------------------------------------------------------

@dataclass
class Verdict:
    code: int
    lines: list[str] = field(default_factory=list)


def judge(console: str, plan: Plan) -> Verdict:
    """From the console: lab error, test failure, or pass (see the module docstring)."""
    kernel = re.search(rf"^{MARK}-KERNEL (\S+)", console, re.M)
    result = re.search(rf"^{MARK}-EXIT (\d+) (\d+)", console, re.M)
    errors = re.findall(rf"^{MARK}-ERROR (.*)$", console, re.M)
    if not kernel or not result or f"{MARK}-END" not in console or errors:
        why = "; ".join(errors) or "the lab did not report a test result (boot failed?)"
        return Verdict(EXIT_LAB_ERROR, [f"kernel lab error (not a test result): {why}"])
    code, seconds = int(result.group(1)), int(result.group(2))
    v = Verdict(EXIT_PASSED, [f"kernel lab: kernel {kernel.group(1)}, tests took {seconds} s inside"])
    summary = _pytest_summary(console)
    if code != 0:
        v.code = EXIT_FAILED
        v.lines.append(f"kernel lab: TESTS FAILED (pytest exit {code}): {summary}")
    elif re.search(r"\d+ skipped", summary):
        v.code = EXIT_FAILED
        v.lines.append(f"kernel lab: tests SKIPPED inside the lab, where none may: {summary}")
    else:
        v.lines.append(f"kernel lab: tests passed: {summary}")
    for mode in NEGATIVE_CONTROLS if plan.negative else ():
        _judge_negative(console, mode, v, tests_passed=code == 0)
    if plan.output_commit_guest:
        _judge_output_commit(console, v)
    return v


def _pytest_summary(console: str, which: int = 0) -> str:
    """pytest's final line: of the first run (the kernel tests) or the last one."""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error|deselected).*?)\s*=*$", console, re.M)
    return found[which] if found else "no pytest summary line"


def _judge_negative(console: str, mode: str, v: Verdict, tests_passed: bool) -> None:
    """The same soft-dirty tests with the capture broken on purpose must fail. That
    proves something only if they passed unbroken in the same boot: the switch
    is then the one difference."""
    m = re.search(rf"^{MARK}-NEGATIVE {re.escape(mode)} (\d+)", console, re.M)
    if not m:
        v.code = max(v.code, EXIT_LAB_ERROR)
        v.lines.append(f"kernel lab error (not a test result): negative control {mode} did not report")
    elif not tests_passed:
        v.lines.append(f"kernel lab: negative control {mode} inconclusive: the tests failed unbroken too")
    elif int(m.group(1)) == 1:  # pytest: 1 = tests ran and some failed (2-5: usage, none collected)
        v.lines.append(f"kernel lab: negative control failed as expected ({mode})")
    else:
        v.code = max(v.code, EXIT_FAILED)
        v.lines.append(f"kernel lab: NEGATIVE CONTROL {mode} DID NOT FAIL (pytest exit "
                       f"{m.group(1)}): the soft-dirty tests cannot catch a broken capture")


def _judge_output_commit(console: str, v: Verdict) -> None:
    m = re.search(rf"^{MARK}-OUTPUT-COMMIT (\d+) (\d+)", console, re.M)
    if not m:
        v.code = max(v.code, EXIT_LAB_ERROR)
        v.lines.append("kernel lab error (not a test result): the output-commit test did not report")
    elif m.group(1) == "0" and not re.search(r"\d+ skipped", _pytest_summary(console, -1)):
        v.lines.append(f"kernel lab: output commit with buffer = plug passed "
                       f"({OUTPUT_COMMIT_FAILOVERS} failovers, {m.group(2)} s, nested QEMU)")
    else:
        v.code = max(v.code, EXIT_FAILED)
        v.lines.append(f"kernel lab: OUTPUT COMMIT WITH buffer = plug FAILED or skipped (pytest exit "
                       f"{m.group(1)}): {_pytest_summary(console, -1)}")


# -- command line -------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m remus.common.kernel_lab", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default: $REMUS_CACHE or ~/.cache/remus)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the lab's root filesystem even if cached")
    p.add_argument("--timeout", type=float, default=600, help="hard limit for one boot, seconds (default 600)")
    p.add_argument("--no-negative", action="store_true", help="skip the negative controls")
    p.add_argument("--output-commit", action="store_true",
                   help=f"also the output-commit test with buffer = plug, {OUTPUT_COMMIT_FAILOVERS} failovers "
                        "of the demo guest under nested QEMU (slow: raise --timeout)")
    args = p.parse_args(argv)
    cache = (args.cache or default_cache_dir()).expanduser()
    started = time.monotonic()
    try:
        plan = Plan(not args.no_negative, _demo_guest(cache) if args.output_commit else None)
        extra = OUTPUT_COMMIT_PACKAGES if args.output_commit else ()
        image = build(cache, force=args.rebuild, extra_packages=extra)
        booted = time.monotonic()
        console = boot(image, plan, args.timeout)
    except (LabError, BuildError, OSError, subprocess.SubprocessError) as exc:
        print(f"\nkernel lab error (not a test result): {exc}", file=sys.stderr)
        return EXIT_LAB_ERROR
    verdict = judge(console, plan)
    print()
    for line in verdict.lines:
        print(line)
    print(f"kernel lab: {time.monotonic() - started:.0f} s in all, "
          f"{time.monotonic() - booted:.0f} s booted (image {image.root.name})")
    return verdict.code


def _demo_guest(cache: Path) -> Path:
    """The demo guest's folder, built on the host (the lab has no network)."""
    from remus.common.guest_image import build as build_guest
    return Path(build_guest(cache).kernel).parent


if __name__ == "__main__":
    sys.exit(main())
