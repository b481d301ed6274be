"""Launch, supervise and drive one QEMU guest over QMP.

The guest's RAM lives in a shared memory-backend-file so the daemons can read
(primary) or fill (backup) it directly; migration with `x-ignore-shared` then
carries only CPU and device state, which is what a checkpoint needs.

QEMU runs with umask 077: what it creates (the primary's RAM file, the serial
log) is owner-only, as is its run directory (0700). The serial log is kept
under a size cap (common/console_log.py).
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from qemu.qmp import ConnectError, QMPClient

from remus.common import console_log, log
from remus.common.config import Config
from remus.common.durable import open_private, private_dir

_log = log.get("remus.qemu")

PR_SET_PDEATHSIG = 1
STATE_FD_NAME = "remus-state"


class GuestError(RuntimeError):
    """QEMU did not do what was asked; the message says what and why."""


def detect_accel(requested: str) -> tuple[str, str]:
    """Return (accel, reason). KVM only where the host really offers it.

    /dev/kvm alone is not enough: nested setups such as PVM expose a device
    that stock guests cannot run on, and those hosts lack vmx/svm.
    """
    if requested != "auto":
        return requested, "configured"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm not usable"
    if os.path.exists("/sys/module/kvm_pvm"):
        return "tcg", "/dev/kvm is a PVM device that stock guests cannot use"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if " vmx" not in flags and " svm" not in flags:
        return "tcg", "CPU has no vmx/svm"
    return "kvm", "/dev/kvm usable"


@dataclass(frozen=True)
class GuestPaths:
    """Where one QEMU instance keeps its sockets and logs."""
    run_dir: Path
    ram_file: Path

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"


def tap_fd_args(fd: int, mac: str) -> list[str]:
    """Guest NIC on a TAP the daemon opened and hands to QEMU."""
    return ["-netdev", f"tap,id=n0,fd={fd}",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile="]


def _opt(value: str) -> str:
    """A value inside a QEMU option string: commas are doubled."""
    return value.replace(",", ",,")


def disk_node(index: int) -> str:
    """The block node of the guest's disk `index`: what a mirror job copies from."""
    return f"disk{index}"


def disk_args(disks, replicas: list[str] | None = None, boot: bool = False) -> list[str]:
    """Each disk as a file node and a format node `disk<i>`, and its device. `replicas`:
    the backup's raw replica files of the mirrored (writable) disks, in order, used
    in their place; read-only media are used where the config says on both hosts.
    A pflash disk (UEFI variables) gets no device: the machine's pflash1 takes it.
    `boot`: the firmware boots from the first disk."""
    args: list[str] = []
    mirrored = iter(replicas) if replicas is not None else None
    if any(d.bus == "virtio-scsi" for d in disks):
        args += ["-device", "virtio-scsi-pci,id=scsi0"]
    for i, d in enumerate(disks):
        path, fmt = d.path, d.format
        if mirrored is not None and not d.readonly:
            path, fmt = next(mirrored), "raw"
        ro = ",read-only=on" if d.readonly else ""
        node = disk_node(i)
        args += ["-blockdev", f"driver=file,filename={_opt(path)},node-name={node}file{ro}",
                 "-blockdev", f"driver={fmt},file={node}file,node-name={node}{ro}"]
        if d.bus == "pflash":
            continue
        serial = f",serial={d.serial}" if d.serial else ""
        if boot:
            serial += ",bootindex=0"
            boot = False
        if d.bus == "virtio-scsi":
            kind = "scsi-cd" if d.readonly else "scsi-hd"
            args += ["-device", f"{kind},drive={node},bus=scsi0.0,id={node}dev{serial}"]
        else:
            args += ["-device", f"virtio-blk-pci,drive={node},id={node}dev{serial}"]
    return args


def uefi_machine_props(cfg: Config) -> str:
    """The machine's flash: OVMF's code, and the VM's variable store (a mirrored disk)."""
    if cfg.guest.firmware != "uefi":
        return ""
    vars_node = disk_node(next(i for i, d in enumerate(cfg.disks) if d.bus == "pflash"))
    return f",pflash0=uefi-code,pflash1={vars_node}"


def build_command(cfg: Config, paths: GuestPaths, accel: str, incoming: bool = False,
                  net_args: list[str] | None = None, replicas: list[str] | None = None,
                  host_forward: bool = True) -> list[str]:
    """`net_args` gives the NIC for bridged mode; the device (and so the
    migrated state) is the same on both hosts, only the backend differs.
    `host_forward=False` leaves user networking's forwarded host ports unbound
    (see QemuGuest.add_host_forwards)."""
    g = cfg.guest
    mem = f"{g.memory_mib}M"
    cmd = [
        g.qemu_binary, "-name", g.name, "-nodefaults", "-no-user-config",
        "-display", "none", "-accel", accel,
        "-machine", f"{g.machine},memory-backend=mem{uefi_machine_props(cfg)}",
        "-object", f"memory-backend-file,id=mem,size={mem},mem-path={_opt(str(paths.ram_file))},"
                   "share=on",
        "-m", mem, "-smp", str(g.cpus),
        *console_log.qemu_args(paths.serial_log),
        "-qmp", f"unix:{paths.qmp_socket},server=on,wait=off",
    ]
    if g.kernel:
        cmd += ["-kernel", g.kernel, "-append", g.append]
        if g.initrd:
            cmd += ["-initrd", g.initrd]
    if g.cpu_model or accel == "kvm":
        cmd += ["-cpu", g.cpu_model or "host"]
    if g.firmware == "uefi":
        cmd += ["-blockdev", f"driver=file,filename={_opt(g.uefi_code)},node-name=uefi-codefile,"
                             "read-only=on",
                "-blockdev", "driver=raw,file=uefi-codefile,node-name=uefi-code,read-only=on"]
    net = cfg.network
    if net.mode == "user":
        fwd = "".join(f",hostfwd={rule}" for rule in net.host_forward) if host_forward else ""
        cmd += ["-netdev", f"user,id=n0{fwd}",
                "-device", f"virtio-net-pci,netdev=n0,mac={net.mac},romfile="]
    elif net.mode == "bridged":
        if not net_args:
            raise GuestError("bridged network mode needs a NIC backend from the daemon")
        cmd += net_args
    cmd += disk_args(cfg.disks, replicas, boot=not g.kernel)
    cmd += list(g.extra_args)
    if incoming:
        cmd += ["-incoming", "defer"]
    return cmd


def prepare_run_dir(paths: GuestPaths) -> int:
    """The run directory (0700) ready for a launch: no stale QMP socket, the serial log
    there and 0600 before QEMU appends to it. Returns a descriptor of qemu.stderr (0600,
    appended to) for QEMU's output."""
    private_dir(paths.run_dir)
    paths.qmp_socket.unlink(missing_ok=True)
    os.close(open_private(paths.serial_log, os.O_WRONLY | os.O_APPEND))
    return open_private(paths.run_dir / "qemu.stderr", os.O_WRONLY | os.O_APPEND)


def _die_with_parent() -> None:
    # What QEMU creates (guest RAM, the console log) is for the owner only.
    os.umask(0o077)
    # If the daemon dies, its guest must not run on unsupervised: the
    # backup is about to resume the same machine.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgid(0, 0)


class QemuGuest:
    def __init__(self, cfg: Config, paths: GuestPaths):
        self.cfg = cfg
        self.paths = paths
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QMPClient | None = None
        self.accel, self.accel_reason = detect_accel(cfg.guest.accel)
        self.shutdown_reason: str | None = None
        self.process: psutil.Process | None = None
        self._shutdown_watch: asyncio.Task | None = None
        self._console_watch: asyncio.Task | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def launch(self, incoming: bool = False, net_args: list[str] | None = None,
                     pass_fds: tuple[int, ...] = (), replicas: list[str] | None = None,
                     host_forward: bool = True) -> None:
        """`replicas`: on a host running the guest from its replica, the replica files of
        the mirrored disks, in order (None: the disks the config names)."""
        stderr_log = prepare_run_dir(self.paths)
        cmd = build_command(self.cfg, self.paths, self.accel, incoming, net_args, replicas,
                            host_forward)
        _log.info("qemu-launch", accel=self.accel, why=self.accel_reason, incoming=incoming,
                  cmd=shlex.join(cmd))
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=stderr_log, stderr=stderr_log,
                preexec_fn=_die_with_parent, pass_fds=pass_fds)
        finally:
            os.close(stderr_log)
        proc = self.proc
        self._console_watch = asyncio.get_running_loop().create_task(console_log.keep_capped(
            self.paths.serial_log, lambda: proc.returncode is None))
        self.process = psutil.Process(self.proc.pid)
        self.process.cpu_percent()  # start the CPU usage window
        await self._connect_qmp()

    async def node_sizes(self) -> dict[str, int]:
        """Each block node's size as the guest sees it (a qcow2 image's virtual size)."""
        nodes = await self.execute("query-named-block-nodes", {"flat": True})
        return {n["node-name"]: int(n["image"]["virtual-size"]) for n in nodes
                if "image" in n and "node-name" in n}

    async def _connect_qmp(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.returncode is not None:
                raise GuestError(f"QEMU exited with status {self.proc.returncode} at start; "
                                 f"see {self.paths.run_dir / 'qemu.stderr'}")
            if self.paths.qmp_socket.exists():
                client = QMPClient(self.cfg.guest.name)
                try:
                    await client.connect(str(self.paths.qmp_socket))
                    self.qmp = client
                    break
                except (OSError, ConnectionError, ConnectError):
                    # The socket file exists before QEMU listens on it: under load a
                    # connect can come in between (qemu.qmp wraps the refusal).
                    pass
            if time.monotonic() > deadline:
                raise GuestError(f"QMP socket {self.paths.qmp_socket} did not answer within {timeout}s")
            await asyncio.sleep(0.02)
        await self.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        # Device state is a few hundred KB; never let the default rate limit stretch the pause.
        await self.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        self._shutdown_watch = asyncio.get_running_loop().create_task(self._watch_shutdown())

    async def _watch_shutdown(self) -> None:
        assert self.qmp is not None
        with self.qmp.listener(("SHUTDOWN",)) as listener:
            async for event in listener:
                data = event.get("data", {})
                self.shutdown_reason = data.get("reason", "unknown")
                _log.info("qemu-shutdown-event", reason=self.shutdown_reason, guest=data.get("guest"))
                return

    def usage(self) -> dict:
        """QEMU's resident memory and CPU use since the last call, for the summaries."""
        try:
            assert self.process is not None
            with self.process.oneshot():
                return {"qemu_rss_mib": self.process.memory_info().rss >> 20,
                        "qemu_cpu_pct": self.process.cpu_percent()}
        except (psutil.Error, AssertionError):
            return {}

    async def execute(self, cmd: str, args: dict | None = None):
        if self.qmp is None:
            raise GuestError(f"QMP not connected for {cmd}")
        try:
            return await self.qmp.execute(cmd, args)
        except Exception as exc:
            raise GuestError(f"QMP {cmd} failed: {exc}") from exc

    async def stop(self) -> None:
        await self.execute("stop")

    async def cont(self) -> None:
        await self.execute("cont")

    async def status(self) -> str:
        return (await self.execute("query-status"))["status"]

    async def save_device_state(self) -> bytes:
        """CPU and device state of a stopped guest, RAM excluded (x-ignore-shared)."""
        loop = asyncio.get_running_loop()
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        chunks: list[bytes] = []
        eof = loop.create_future()

        def readable() -> None:
            try:
                while True:
                    data = os.read(rfd, 1 << 20)
                    if not data:
                        if not eof.done():
                            eof.set_result(None)
                        loop.remove_reader(rfd)
                        return
                    chunks.append(data)
            except BlockingIOError:
                return

        try:
            assert self.qmp is not None
            self.qmp.send_fd_scm(wfd)
            await self.execute("getfd", {"fdname": STATE_FD_NAME})
            os.close(wfd)
            wfd = -1
            loop.add_reader(rfd, readable)
            await self.execute("migrate", {"uri": f"fd:{STATE_FD_NAME}"})
            await asyncio.wait_for(eof, timeout=30)
            await self._migration_done("device state save", timeout=30, poll=0.001)
        finally:
            loop.remove_reader(rfd)
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
        state = b"".join(chunks)
        if not state:
            raise GuestError("device state save produced no data")
        return state

    async def load_device_state(self, state_file: Path, timeout: float = 30.0) -> None:
        """Backup side: QEMU started with -incoming defer reads the committed state."""
        await self.execute("migrate-incoming", {"uri": "exec:cat " + shlex.quote(str(state_file))})
        await self._migration_done("loading device state", timeout, poll=0.002)

    async def _migration_done(self, what: str, timeout: float, poll: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise GuestError(f"{what} {status}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise GuestError(f"{what} took more than {timeout}s (status {status})")
            await asyncio.sleep(poll)

    async def add_host_forwards(self, timeout: float = 2.0) -> None:
        """Bind user networking's forwarded host ports now, for a QEMU launched with
        `host_forward=False` ahead of time. On a test pair sharing one host the lost
        primary's QEMU holds those ports until it has exited, which a kill leaves to
        the kernel: a busy port is tried again until `timeout`."""
        if self.cfg.network.mode != "user":
            return
        deadline = time.monotonic() + timeout
        for rule in self.cfg.network.host_forward:
            while True:
                out = (await self.execute("human-monitor-command",
                                          {"command-line": f"hostfwd_add n0 {rule}"})).strip()
                if not out:  # HMP reports failure as text
                    break
                if time.monotonic() > deadline:
                    raise GuestError(f"host forward {rule}: {out}")
                await asyncio.sleep(0.02)

    async def announce(self) -> None:
        await self.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def quit(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(self.execute("quit"), timeout)
        except (GuestError, asyncio.TimeoutError):
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await self.close_qmp()

    async def close_qmp(self) -> None:
        self._stop_console_watch()
        if self._shutdown_watch is not None:
            self._shutdown_watch.cancel()  # its listener never ends once QMP is gone
            self._shutdown_watch = None
        if self.qmp is not None:
            try:
                await self.qmp.disconnect()
            except Exception:
                pass
            self.qmp = None

    def kill(self) -> None:
        self._stop_console_watch()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    def _stop_console_watch(self) -> None:
        if self._console_watch is not None:
            self._console_watch.cancel()
            self._console_watch = None
