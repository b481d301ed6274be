#!/usr/bin/env python3
"""Spike 17: QEMU's COLO checkpoint loop driven by a receiver of our own.

QEMU (the primary) migrates with the x-colo capability to a unix socket we
listen on. We play the COLO secondary: parse the initial full migration into a
replica RAM file, answer CHECKPOINT_READY, then per checkpoint (triggered on
demand by re-setting x-checkpoint-delay) answer CHECKPOINT_REPLY, read the
dirty RAM (RAM section records) and the sized device-state blob, answer
VMSTATE_RECEIVED and VMSTATE_LOADED. Pause = QMP STOP..RESUME timestamps.

Optionally (--verify-backup) a second QEMU started with -incoming defer on a
copy of the replica RAM loads the last checkpoint's device blob and resumes.

Usage: colo_spike.py --mem-mib 256 --fill-mib 128 --checkpoints 20
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import migstream as ms  # noqa: E402

GUEST = Path("/tmp/ci-cache/guest/43b60e7e35325b65")
SHM = Path("/dev/shm")


class QMP:
    def __init__(self, path: Path, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())
        self.replies: queue.Queue = queue.Queue()
        self.events: list[tuple[str, float, dict]] = []
        self.cv = threading.Condition()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self.cmd("qmp_capabilities")

    def _read(self):
        for line in self.f:
            msg = json.loads(line)
            if "event" in msg:
                ts = msg["timestamp"]
                with self.cv:
                    self.events.append((msg["event"], ts["seconds"] + ts["microseconds"] / 1e6,
                                        msg.get("data", {})))
                    self.cv.notify_all()
            else:
                self.replies.put(msg)
        self.replies.put({"error": {"desc": "QMP closed"}})

    def cmd(self, name: str, args: dict | None = None, timeout: float = 60.0):
        with self.lock:
            req = {"execute": name}
            if args is not None:
                req["arguments"] = args
            self.f.write(json.dumps(req).encode() + b"\n")
            self.f.flush()
            rep = self.replies.get(timeout=timeout)
        if "error" in rep:
            raise RuntimeError(f"{name}: {rep['error']}")
        return rep["return"]

    def wait_event(self, name: str, after: int, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for i in range(after, len(self.events)):
                    if self.events[i][0] == name:
                        return i, self.events[i]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(name)
                self.cv.wait(left)


def qemu_cmd(name: str, run: Path, ram: Path, mem_mib: int, incoming: bool, port: int):
    cmd = ["qemu-system-x86_64", "-name", f"colo-spike-{name},debug-threads=on", "-nodefaults", "-no-user-config",
           "-display", "none", "-accel", "tcg",
           "-machine", "q35,memory-backend=mem",
           "-object", f"memory-backend-file,id=mem,size={mem_mib}M,mem-path={ram},share=on",
           "-m", f"{mem_mib}M", "-smp", "1",
           "-chardev", f"file,id=serial0,path={run}/serial.log,append=on", "-serial", "chardev:serial0",
           "-qmp", f"unix:{run}/qmp.sock,server=on,wait=off",
           "-kernel", str(GUEST / "vmlinuz"), "-initrd", str(GUEST / "initrd.img"),
           "-append", "console=ttyS0 quiet panic=-1 remus.ip=10.0.2.15/24 remus.gw=10.0.2.2",
           "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80",
           "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile="]
    if incoming:
        cmd += ["-incoming", "defer"]
    return cmd


def launch(name, run: Path, ram: Path, mem_mib, incoming, port):
    run.mkdir(parents=True, exist_ok=True)
    (run / "qmp.sock").unlink(missing_ok=True)
    err = open(run / "qemu.stderr", "ab")
    proc = subprocess.Popen(qemu_cmd(name, run, ram, mem_mib, incoming, port),
                            stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    return proc, QMP(run / "qmp.sock")


def wait_serial(run: Path, text: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in (run / "serial.log").read_text(errors="replace"):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{text} not on serial console")


def http(port: int, path: str, timeout=10.0) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout).read().decode()


def prefill(path: Path, size: int, fill: int):
    """Make `fill` bytes of the RAM file resident with non-zero data before boot."""
    with open(path, "wb") as f:
        f.truncate(size)
        block = (bytes(range(1, 256)) * 4200)[: 1 << 20]
        for _ in range(fill >> 20):
            f.write(block)


class Receiver:
    """Our COLO 'secondary': keeps a replica RAM file up to date."""

    def __init__(self, conn: socket.socket, replica: Path, size: int):
        self.conn = conn
        self.r = ms.Reader(conn)
        fd = os.open(replica, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED)
        os.close(fd)
        self.zero = bytes(ms.PAGE)
        self.sink = ms.RamSink("mem", self._write)
        self.all_indices: list[int] = []
        self.blob = b""
        self.info: dict = {}

    def _write(self, idx: int, data):
        off = idx * ms.PAGE
        self.map[off:off + ms.PAGE] = data if data is not None else self.zero

    def initial(self):
        t = time.monotonic()
        self.info = ms.read_initial(self.r, self.sink)
        self.info["initial_s"] = time.monotonic() - t
        self.all_indices = list(self.sink.indices)
        self.info["initial_bytes"] = self.r.total
        dev, vmdesc = ms.split_vmdesc(self.info["device_tail"])
        self.info["initial_device_bytes"] = len(dev)
        self.info["vmdesc"] = vmdesc is not None
        self.blob = dev
        ms.send_msg(self.conn, ms.CHECKPOINT_READY)

    def checkpoint(self, hold_s: float = 0.0) -> dict:
        """One COLO transaction; `hold_s`: keep the guest stopped that long (hooks)."""
        r = self.r
        ms.expect_msg(r, ms.CHECKPOINT_REQUEST)
        t_req = time.monotonic()
        start = r.total
        ms.send_msg(self.conn, ms.CHECKPOINT_REPLY)
        ms.expect_msg(r, ms.VMSTATE_SEND)          # the guest is stopped now
        t_stopped = time.monotonic()
        self.sink.reset()
        ms.read_live_state(r, self.sink, self.info["sections"])
        t_ram = time.monotonic()
        ms.expect_msg(r, ms.VMSTATE_SIZE)
        size = r.be64()
        self.blob = r.read(size)
        t_dev = time.monotonic()
        ms.send_msg(self.conn, ms.VMSTATE_RECEIVED)
        if hold_s:
            time.sleep(hold_s)
        ms.send_msg(self.conn, ms.VMSTATE_LOADED)  # QEMU resumes the guest on this
        t_done = time.monotonic()
        self.all_indices += self.sink.indices
        return {"wire_bytes": r.total - start, "pages": self.sink.pages,
                "zero_pages": self.sink.zero_pages, "other_pages": self.sink.other_pages,
                "device_bytes": size, "ram_ms": (t_ram - t_stopped) * 1e3,
                "recv_ms": (t_done - t_req) * 1e3, "indices": list(self.sink.indices)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mem-mib", type=int, default=256)
    ap.add_argument("--fill-mib", type=int, default=0, help="non-zero RAM written before boot")
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--dirty-pages", type=int, default=0, help="guest dirty loop (cgi-bin/dirty)")
    ap.add_argument("--timer-mode", action="store_true",
                    help="let QEMU's x-checkpoint-delay timer drive checkpoints")
    ap.add_argument("--compare", action="store_true", help="also time Remus compare capture")
    ap.add_argument("--verify-backup", action="store_true")
    ap.add_argument("--port", type=int, default=18617)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plain", action="store_true",
                    help="control: plain live migration (no x-colo) to our receiver, then compare")
    a = ap.parse_args()

    work = Path(os.environ.get("TMPDIR", "/tmp")) / "colo-spike" / f"m{a.mem_mib}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    ram = SHM / f"colo-spike-{os.getpid()}-primary.ram"
    replica = SHM / f"colo-spike-{os.getpid()}-replica.ram"
    size = a.mem_mib << 20
    prefill(ram, size, a.fill_mib << 20)
    procs = []
    result: dict = {"args": vars(a) | {"json": str(a.json)}}
    try:
        t0 = time.monotonic()
        proc, qmp = launch("primary", work / "primary", ram, a.mem_mib, False, a.port)
        procs.append(proc)
        wait_serial(work / "primary", "REMUS-GUEST-READY", 120)
        result["boot_s"] = time.monotonic() - t0
        if a.dirty_pages:
            print(http(a.port, f"/cgi-bin/dirty?pages={a.dirty_pages}").strip())
        caps = {c["capability"]: c["state"] for c in qmp.cmd("query-migrate-capabilities")}
        result["x-colo-listed"] = "x-colo" in caps
        qmp.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-colo", "state": not a.plain},
            {"capability": "x-ignore-shared", "state": False}]})
        delay = int(a.interval * 1000) if a.timer_mode else 3_600_000
        qmp.cmd("migrate-set-parameters", {"x-checkpoint-delay": delay,
                                           "max-bandwidth": 1 << 40})
        sock_path = work / "colo.sock"
        sock_path.unlink(missing_ok=True)
        lsock = socket.socket(socket.AF_UNIX)
        lsock.bind(str(sock_path))
        lsock.listen(1)
        t_mig = time.monotonic()
        qmp.cmd("migrate", {"uri": f"unix:{sock_path}"})
        conn, _ = lsock.accept()
        rx = Receiver(conn, replica, size)
        if a.plain:
            rx.info = ms.read_initial(rx.r, rx.sink)
            time.sleep(0.5)
            st = qmp.cmd("query-status")["status"]
            src = open(ram, "rb").read()
            dst = open(replica, "rb").read()
            diffs = [i // ms.PAGE for i in range(0, size, ms.PAGE) if src[i:i + ms.PAGE] != dst[i:i + ms.PAGE]]
            result["plain"] = {"status": st, "migrate": qmp.cmd("query-migrate").get("status"),
                               "pages_differing": len(diffs), "first": diffs[:20]}
            print(json.dumps(result["plain"]))
            return
        rx.initial()
        result["initial"] = {k: rx.info[k] for k in ("initial_s", "initial_bytes",
                                                     "initial_device_bytes", "vmdesc",
                                                     "configuration", "commands",
                                                     "first_device_section", "tail_wait_s")}
        result["initial"]["commands"] = [(c, d.hex()) for c, d in rx.info["commands"]]
        result["initial"]["pages"] = rx.sink.pages
        result["initial"]["zero_pages"] = rx.sink.zero_pages
        result["initial"]["blocks"] = rx.sink.blocks
        result["initial"]["sections"] = rx.info["sections"]
        time.sleep(0.5)
        result["status_after_initial"] = qmp.cmd("query-status")
        result["migrate_after_initial"] = qmp.cmd("query-migrate").get("status")
        result["colo_status"] = qmp.cmd("query-colo-status")
        print(json.dumps(result, indent=1, default=str))

        if os.environ.get("SPIKE_GDB"):
            subprocess.Popen(["gdb", "-p", str(proc.pid), "-batch", "-x", str(Path(__file__).with_name("gdbtrace.py"))],
                             stdout=open(work / "gdb.log", "w"), stderr=subprocess.STDOUT)
            time.sleep(8)
        cps = []
        for n in range(a.checkpoints):
            if not a.timer_mode:
                time.sleep(a.interval)
            nev = len(qmp.events)
            t_trig = time.monotonic()
            if not a.timer_mode:
                qmp.cmd("migrate-set-parameters", {"x-checkpoint-delay": delay})
            cp = rx.checkpoint()
            _, stop = qmp.wait_event("STOP", nev)
            try:
                _, resume = qmp.wait_event("RESUME", nev, timeout=3)
            except TimeoutError:
                # QEMU 7.2 COLO + TCG deadlock (see REPORT.md): the guest stays stopped
                result["hung_at_checkpoint"] = n
                result["hung_recv"] = {k: v for k, v in cp.items() if k != "indices"}
                print(f"cp {n}: QEMU did not resume the guest (deadlock), pid {proc.pid}", flush=True)
                break
            cp["pause_ms"] = (resume[1] - stop[1]) * 1e3
            cp["trigger_to_done_ms"] = (time.monotonic() - t_trig) * 1e3
            cps.append(cp)
            print(f"cp {n}: pause {cp['pause_ms']:.2f} ms, pages {cp['pages']} "
                  f"(+{cp['zero_pages']} zero, {cp['other_pages']} other blocks), "
                  f"device {cp['device_bytes']} B, wire {cp['wire_bytes']} B, "
                  f"ram {cp['ram_ms']:.2f} ms, trigger->done {cp['trigger_to_done_ms']:.1f} ms",
                  flush=True)

        def p(vals, q):
            vals = sorted(vals)
            return vals[min(len(vals) - 1, int(q * len(vals)))]
        body = cps[1:] if len(cps) > 2 else cps
        if body:
          result["checkpoints"] = {
            "n": len(cps),
            "pause_ms_p50": p([c["pause_ms"] for c in body], 0.5),
            "pause_ms_p90": p([c["pause_ms"] for c in body], 0.9),
            "pause_ms_max": max(c["pause_ms"] for c in body),
            "pages_p50": p([c["pages"] + c["zero_pages"] for c in body], 0.5),
            "wire_bytes_p50": p([c["wire_bytes"] for c in body], 0.5),
            "device_bytes_p50": p([c["device_bytes"] for c in body], 0.5),
            "pauses_ms": [round(c["pause_ms"], 2) for c in cps],
            "pages": [c["pages"] + c["zero_pages"] for c in cps],
          }

        # The replica must equal the primary's RAM at the last checkpoint: stop the guest
        # via one more checkpoint held open, and compare while it is stopped.
        hung = "hung_at_checkpoint" in result
        holder = {}
        th = threading.Thread(target=lambda: holder.update(rx.checkpoint(hold_s=3.0)))
        if not hung:
            if not a.timer_mode:
                qmp.cmd("migrate-set-parameters", {"x-checkpoint-delay": delay})
            th.start()
            time.sleep(1.0)  # guest stopped inside the held checkpoint
        src = open(ram, "rb").read()
        dst = open(replica, "rb").read()
        diffs = [i // ms.PAGE for i in range(0, size, ms.PAGE) if src[i:i + ms.PAGE] != dst[i:i + ms.PAGE]]
        result["replica_pages_differing_while_stopped"] = len(diffs)
        sent = set(rx.all_indices)
        result["diff_in_last_checkpoint"] = sum(1 for d in diffs if d in set(rx.sink.indices))
        result["last_checkpoint_pages"] = len(rx.sink.indices)
        result["diff_detail"] = [(d, d in sent, sum(1 for x, y in zip(src[d * ms.PAGE:(d + 1) * ms.PAGE],
                                                                  dst[d * ms.PAGE:(d + 1) * ms.PAGE]) if x != y),
                                  dst[d * ms.PAGE:(d + 1) * ms.PAGE] == bytes(ms.PAGE)) for d in diffs[:40]]
        if a.compare:
            sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
            from remus.common.capture import RamView, CompareCapture
            view = RamView(ram, size)
            cap = CompareCapture(view)
            cap.full()
            ts = []
            for _ in range(5):
                t = time.monotonic()
                cap.capture()
                ts.append((time.monotonic() - t) * 1e3)
            result["compare_capture_ms"] = sorted(ts)
            cap.close()
            view.close()
        if not hung:
            th.join()
        del src, dst
        result["held_checkpoint_pause_ms"] = None
        rss = 0
        for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) >> 10
        result["ram_file_resident_mib"] = int(subprocess.run(
            ["du", "-m", str(ram)], capture_output=True, text=True).stdout.split()[0])

        if a.verify_backup:
            state = work / "device.state"
            state.write_bytes(ms.device_state_file(rx.info["configuration_record"], rx.blob))
            bram = SHM / f"colo-spike-{os.getpid()}-backup.ram"
            shutil.copyfile(replica, bram)
            # stop the primary for good first (as after a failover) so the ports are free
            primary_serial = (work / "primary" / "serial.log").read_text(errors="replace")
            counter = http(a.port, "/cgi-bin/inc").strip() if False else None
            bproc, bqmp = launch("backup", work / "backup", bram, a.mem_mib, True, a.port + 1)
            procs.append(bproc)
            # no x-ignore-shared here: the configuration section the primary sent says
            # it was off, and the COLO device blob has no RAM section anyway
            t = time.monotonic()
            bqmp.cmd("migrate-incoming", {"uri": f"exec:cat {state}"})
            st = None
            while time.monotonic() - t < 20:
                st = bqmp.cmd("query-migrate").get("status")
                if st in ("completed", "failed"):
                    break
                time.sleep(0.005)
            result["backup_load"] = {"status": st, "ms": (time.monotonic() - t) * 1e3,
                                     "runstate": bqmp.cmd("query-status"),
                                     "error": bqmp.cmd("query-migrate").get("error-desc")}
            if bqmp.cmd("query-status")["status"] != "running":
                bqmp.cmd("cont")
            time.sleep(1.0)
            try:
                result["backup_http"] = http(a.port + 1, "/cgi-bin/inc", timeout=15).strip()
            except Exception as exc:  # noqa: BLE001
                result["backup_http"] = f"failed: {exc}"
            result["backup_stderr"] = (work / "backup" / "qemu.stderr").read_text()[-2000:]
        # the primary keeps running unprotected after a lost-heartbeat
        try:
            if hung:
                raise RuntimeError("primary QEMU deadlocked, QMP unusable")
            qmp.cmd("x-colo-lost-heartbeat")
            time.sleep(0.5)
            result["primary_after_lost_heartbeat"] = {
                "status": qmp.cmd("query-status")["status"],
                "migrate": qmp.cmd("query-migrate").get("status"),
                "colo": qmp.cmd("query-colo-status"),
                "events": [e[0] for e in qmp.events[-4:]]}
        except Exception as exc:  # noqa: BLE001
            result["primary_after_lost_heartbeat"] = f"failed: {exc}"
        result["primary_stderr"] = (work / "primary" / "qemu.stderr").read_text()[-2000:]
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait()
        for f in SHM.glob(f"colo-spike-{os.getpid()}-*"):
            f.unlink()
    out = {k: v for k, v in result.items()}
    print(json.dumps(out, indent=1, default=str))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
