"""remus-primary: run a protected VM and checkpoint it to the backup."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from remus.common import log, sdnotify, tls
from remus.common.capture import RamView, make_capture
from remus.common.config import ConfigError, load, read_only_media
from remus.common.heartbeat import HeartbeatError, LinkDown, PeerLost
from remus.common.node import Node
from remus.common.peering import PEER, grace_s, heartbeat_status
from remus.common.qemu import GuestError, GuestPaths, QemuGuest
from remus.common.stats import EpochLog
from remus.common.waiting import cancel_and_wait
from remus.primary.diskrep import MirroredDisks
from remus.primary.hooks import Hooks
from remus.primary.netbuf import UserspaceNetBuffer
from remus.primary.nicgroup import NicGroup
from remus.primary.replicator import DRILL_POINTS, Replicator, Superseded

_log = log.get("remus.primary")

EXIT_GUEST_FAILED = 3
EXIT_STOOD_DOWN = 5
EXIT_UNDECIDED = 6
JITTER_REPORT_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remus-primary",
        description="Run the protected VM under QEMU and send a checkpoint of it to the "
                    "backup host every interval. If the backup is unreachable the VM keeps "
                    "running unprotected and the daemon keeps reconnecting; every new session "
                    "starts with a full sync (pre-copy). If the other host already runs the "
                    "guest (after a failover or a handover), this daemon does not boot it but "
                    "stands by as that host's backup. Stopping it hands a protected guest "
                    "over to the backup ([primary] on_stop).")
    p.add_argument("--config", "-c", required=True, metavar="FILE",
                   help="the guest's TOML config (the same file as on the backup)")
    p.add_argument("-i", "--interval", type=int, metavar="MS",
                   help="checkpoint every MS milliseconds (overrides [replication] interval_ms)")
    p.add_argument("--capture", choices=("auto", "compare", "softdirty"),
                   help="dirty-page capture mode (overrides [replication] capture)")
    p.add_argument("--no-net", action="store_true",
                   help="do not hold back the guest's network output (UNSAFE: clients can see "
                        "replies that a failover takes back; for benchmarks and drills)")
    p.add_argument("--stats", type=Path, metavar="FILE",
                   help="append one JSON line of figures per checkpoint to FILE")
    p.add_argument("--force-start", action="store_true",
                   help="start the guest even though the backup host is silent and the guest "
                        "this host last ran was never seen to end (only once you know the "
                        "backup host does not run it)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def make_netbuf(cfg, run_dir: Path, buffering: bool) -> NicGroup | None:
    """The output buffers of the guest's NICs in bridged mode: plug where asked and
    possible, else userspace; one per NIC, each capped at buffer_cap_mib."""
    net = cfg.network
    if net.mode != "bridged":
        return None
    cap = net.buffer_cap_mib << 20
    plug = False
    if net.buffer in ("plug", "auto") and buffering:
        from remus.primary.netbuf_plug import PlugNetBuffer, plug_supported
        plug, why = plug_supported()
        if not plug and net.buffer == "plug":
            raise GuestError(f"[network] buffer = \"plug\" but {why}; use \"userspace\" or \"auto\"")
        if not plug:
            _log.info("netbuf-mode", mode="userspace", reason=why)
    buffers = []
    for i, nic in enumerate(cfg.nics):
        if plug:
            buffers.append(PlugNetBuffer(nic.tap, "ifb-" + nic.tap[-11:], cap, netdev_id=f"n{i}"))
        else:
            sock = run_dir / ("net.sock" if i == 0 else f"net{i}.sock")
            buffers.append(UserspaceNetBuffer(nic.tap, sock, cap, buffering, netdev_id=f"n{i}"))
    return NicGroup(buffers, cfg.nics)


async def run(args: argparse.Namespace) -> int:
    cfg = load(args.config).with_overrides(interval_ms=args.interval, capture=args.capture)
    # Both directions' contexts now: a TlsError before anything starts.
    tls.context_for(cfg, "primary", server=False)
    tls.context_for(cfg, "primary", server=True)
    state_dir = Path(cfg.primary.state_dir)
    generation = read_generation(state_dir)
    node = Node(cfg, "primary")
    await node.start("primary", generation)
    try:
        holder = await holder_of_the_guest(node, state_dir, force=args.force_start)
        if isinstance(holder, int):
            return holder
        if holder is not None:
            # Restart safety: the peer runs the VM (a failover happened while this host
            # was down). Booting here would make a second copy; serve as its backup.
            from remus.backup.daemon import serve_as_backup
            _log.warning("peer-holds-the-guest", peer_role=holder.get("role"),
                         peer_generation=holder.get("generation"),
                         action="not starting the guest here; standing by as the backup "
                                "of the host that runs it (remusctl reprotect there)")
            return await serve_as_backup(node, cfg.reversed())
        return await boot_and_protect(node, cfg, generation, args)
    finally:
        await node.close()


async def holder_of_the_guest(node: Node, state_dir: Path, force: bool) -> dict | int | None:
    """Who runs the VM now, as far as this host can tell at start: the peer's beat if it
    holds (or is taking over) the guest, None if this host should boot it, or an exit
    code if that cannot be decided safely."""
    beat = await node.peer_beat(grace_s(node.cfg) * 2) if node.hb is not None else None
    if beat is not None and beat.get("role") in ("active", "fencing", "primary"):
        return beat
    if beat is None and was_running(state_dir) and not force:
        _log.error("peer-unknown",
                   detail=("no [heartbeat] to ask the peer" if node.hb is None else
                           "the peer is silent on every heartbeat link")
                          + ", and the guest this host last ran was never seen to end (a "
                            "crash, a handover or a failover): it may run on the other host. "
                            "Not starting a second copy.",
                   hint="check the backup host; if it does not run the guest, start with "
                        "--force-start")
        return EXIT_UNDECIDED
    return None


async def boot_and_protect(node: Node, cfg, generation: int, args) -> int:
    state_dir = Path(cfg.primary.state_dir)
    ram_file = Path(cfg.guest.ram_dir) / f"remus-{cfg.guest.name}-primary.ram"
    ram_file.unlink(missing_ok=True)  # never start from an old RAM image
    guest = QemuGuest(cfg, GuestPaths(run_dir=state_dir / "run", ram_file=ram_file))
    (state_dir / "run").mkdir(parents=True, exist_ok=True)
    netbuf = make_netbuf(cfg, state_dir / "run", buffering=not args.no_net)
    net_args = None
    try:
        if netbuf is not None:
            await netbuf.start()
            await netbuf.attach()
            net_args = netbuf.qemu_netdev_args()
        if args.no_net:
            _log.warning("output-buffering-disabled", detail="--no-net: guest output leaves at "
                         "once; a failover can take back replies that clients saw (unsafe)")
        await guest.launch(net_args=net_args)
        return await protect(node, cfg, guest, netbuf, ram_file,
                             [d.path for d in cfg.mirrored_disks], generation, stats=args.stats)
    finally:
        guest.kill()
        if netbuf is not None:
            await netbuf.close()
        ram_file.unlink(missing_ok=True)


async def protect(node: Node, cfg, guest: QemuGuest, netbuf, ram_file: Path,
                  disk_paths: list[str], generation: int, stats: Path | None = None) -> int:
    """Checkpoint the running `guest` to `cfg`'s backup until the guest ends, the
    operator stops us, or a newer generation holds the guest. Returns the exit code.

    Used by a freshly started primary and by a host that re-protects the guest it
    took over. The caller owns `guest` and `netbuf`."""
    hb = node.hb
    loop = asyncio.get_running_loop()
    tls_context = tls.context_for(cfg, node.host, server=False)
    if tls_context is None:
        _log.warning("insecure-stream", detail="[tls] insecure = true: the checkpoint stream is "
                     "plain TCP, unauthenticated and unencrypted; guest memory crosses the "
                     "network in clear and the backup is not authenticated (unsafe)")
    state_dir = Path(cfg.primary.state_dir)
    run_dir = state_dir / "run"
    # Until the guest is seen to end, it may run on (here, or on the peer after a
    # handover or failover): a later start must not boot it blindly.
    write_running(state_dir, generation, True)
    epochs = EpochLog(stats)
    stop = node.stop
    resume_requested = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, resume_requested.set)
    disk = None
    if disk_paths:
        disk = await MirroredDisks.create(guest, cfg, disk_paths, run_dir,
                                          cfg.replication.disk_epoch_cap_mib << 20)
    media = await asyncio.to_thread(read_only_media, cfg)
    ram = RamView(ram_file, cfg.memory_bytes)
    capture = make_capture(cfg.replication.capture, ram, guest.pid, cfg.replication.compare_threads)
    _log.info("primary-start", guest=cfg.guest.name, memory_mib=cfg.guest.memory_mib,
              interval_ms=cfg.replication.interval_ms, capture=capture.name,
              backup=cfg.backup.address, stream="insecure" if tls_context is None else "tls",
              qemu_pid=guest.pid, generation=generation)
    hooks = Hooks([netbuf] if netbuf else [])
    replicator = Replicator(cfg, guest, capture, hooks, epochs, disk, generation, tls_context,
                            PEER[node.host], media)
    if netbuf is not None:
        netbuf.set_inbound_listener(replicator.forward_input)
    rep = asyncio.create_task(replicator.run(), name="replicator")
    exited = asyncio.create_task(guest.wait(), name="qemu")
    stopped = asyncio.create_task(stop.wait(), name="signal")
    superseded = asyncio.create_task(watch_for_newer_holder(hb, replicator, generation),
                                     name="heartbeat")

    async def resume_on_request() -> None:
        while True:
            await resume_requested.wait()
            resume_requested.clear()
            await replicator.operator_resume()
    resumer = asyncio.create_task(resume_on_request(), name="resume")
    systemd = asyncio.create_task(report_to_systemd(replicator), name="systemd")
    node.healthy = lambda: guest.proc is not None and guest.proc.returncode is None

    def status() -> dict:
        s = epochs.summary()
        return {"role": "primary", "host": node.host, "guest": cfg.guest.name,
                "state": replicator.state, "pid": os.getpid(), "qemu_pid": guest.pid,
                "generation": generation, "session": replicator.session,
                "last_committed_epoch": replicator.committed_epoch,
                "interval_ms": cfg.replication.interval_ms, "capture": capture.name,
                "checkpoints_per_s": s["checkpoints_per_s"], "pause_p50_ms": s["pause_p50_ms"],
                "pause_p99_ms": s["pause_p99_ms"], "bytes_per_s": s["bytes_per_s"],
                "ack_p50_ms": s["ack_p50_ms"],
                "held_output": getattr(netbuf, "stats", None),
                "input_copied": {"forwarded": replicator.input_forwarded,
                                 "skipped": replicator.input_skipped},
                "sync": replicator.sync.describe(time.monotonic()),
                "disk_throttled_s": round(disk.throttled_s, 3) if disk is not None else None,
                "heartbeat": heartbeat_status(hb), **guest.usage()}
    def drill(phase: str) -> dict:
        point = DRILL_POINTS.get(phase, phase)
        if point not in DRILL_POINTS.values():
            return {"ok": False, "error": f"unknown drill phase {phase!r} "
                                          f"(one of {', '.join(DRILL_POINTS.values())})"}
        replicator.die_at = point
        _log.warning("drill-armed", point=point, detail="this primary dies there at the next checkpoint")
        return {"ok": True, "armed": point}
    def partition(_arg: str) -> dict:
        if hb is None:
            return {"ok": False, "error": "a partition drill needs [heartbeat] links"}
        for index in range(len(cfg.heartbeat.links)):
            hb.mute_link(index)
        asyncio.get_running_loop().create_task(replicator.partition())
        _log.warning("drill-partition", detail="heartbeat muted and checkpoint stream cut")
        return {"ok": True}
    node.status = status
    node.commands = {"drill": drill, "partition": partition}
    if node.metrics is not None:
        epochs.listeners.append(node.metrics.observe_epoch)
    try:
        done, _ = await asyncio.wait({rep, exited, stopped, superseded},
                                     return_when=asyncio.FIRST_COMPLETED)
        holder = None
        if rep in done:
            exc = rep.exception()
            if not isinstance(exc, Superseded):
                rep.result()  # re-raise: the loop only ends on a bug or a stale generation
            holder = {"node": "backup (said in the handshake)", "generation": exc.generation,
                      "reason": str(exc)}
        if superseded in done:
            holder = superseded.result()
        if holder is not None:
            # Split-brain guard: never let this copy's output out again.
            hooks.silence()
            guest.kill()
            _log.error("stood-down", my_generation=generation, holder=holder.get("node"),
                       holder_generation=holder.get("generation"),
                       detail="another host holds the guest at a higher generation; this copy "
                              "was stopped and its held output dropped")
            return EXIT_STOOD_DOWN
        if stopped in done:
            if cfg.primary.on_stop == "handover" and replicator.state == "protecting":
                _log.warning("primary-stop", reason="signal",
                             action="handing the guest over to the backup (on_stop = handover)")
                if await replicator.handover("primary stopped by operator"):
                    await cancel_and_wait(rep)
                    return 0
                _log.error("handover-failed", detail="the session failed during the handover",
                           action="bye to backup, quit guest")
            else:
                _log.info("primary-stop", reason="signal", action="bye to backup, quit guest")
            await cancel_and_wait(rep)
            await replicator.say_bye("primary stopped by operator")
            await guest.quit()
            write_running(state_dir, generation, False)
            return 0
        status = exited.result()
        await cancel_and_wait(rep)
        if guest.shutdown_reason in ("guest-shutdown", "host-qmp-quit"):
            _log.info("guest-exit", reason=guest.shutdown_reason, action="bye to backup")
            await replicator.say_bye(f"guest ended: {guest.shutdown_reason}")
            write_running(state_dir, generation, False)
            return 0
        # QEMU died under us: say nothing, so the backup takes over.
        _log.error("guest-died", status=status, reason=guest.shutdown_reason or "killed or crashed",
                   action="leaving the backup to activate")
        return EXIT_GUEST_FAILED
    finally:
        guest.kill()
        loop.remove_signal_handler(signal.SIGUSR1)
        for task in (rep, exited, stopped, superseded, resumer, systemd):
            await cancel_and_wait(task)
        # Worker threads read guest RAM through raw pointers: let them finish
        # before the mapping goes away.
        replicator.close()
        await loop.shutdown_default_executor()  # protect() is always the last phase
        capture.close()
        ram.close()
        epochs.close()
        if disk is not None:
            await disk.close()


async def report_to_systemd(replicator: Replicator) -> None:
    """READY=1 once the guest runs protected or degraded; STATUS= on every change.
    (The node feeds the watchdog while the loop turns and QEMU lives.)"""
    shown, ready = "", False
    while True:
        state = replicator.state
        if not ready and state in ("protecting", "degraded", "paused"):
            sdnotify.notify("READY=1")
            ready = True
        text = f"{state}, epoch {replicator.committed_epoch}" if state == "protecting" else state
        if text != shown:
            sdnotify.notify(f"STATUS={text}")
            shown = text
        await asyncio.sleep(1.0)


def read_generation(state_dir: Path) -> int:
    """The generation this host holds the guest at: 1 until a failover to this host (as
    the backup of a re-protected guest, its replica is in the same directory) raised it."""
    generation = int(_read_record(state_dir).get("generation", 1))
    try:
        replica = json.loads((state_dir / "replica.json").read_text())
        generation = max(generation, int(replica.get("generation", 1)))
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return generation


def was_running(state_dir: Path) -> bool:
    """Whether the guest this host last ran may still run: its daemon did not see it end
    (a crash, a handover, a failover, standing down)."""
    return bool(_read_record(state_dir).get("running", False))


def write_running(state_dir: Path, generation: int, running: bool) -> None:
    path = state_dir / "primary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"generation": generation, "running": running}))
    os.replace(tmp, path)


def _read_record(state_dir: Path) -> dict:
    path = state_dir / "primary.json"
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise GuestError(f"{path} unreadable: {exc}") from None


async def watch_for_newer_holder(hb, replicator: Replicator | None, generation: int,
                                 role: str = "primary") -> dict:
    """Keep our beats current; return the beat of a peer holding a newer generation."""
    if hb is None:
        await asyncio.Event().wait()  # no heartbeat: nothing to learn from

    async def publish() -> None:
        last_report = time.monotonic()
        while True:
            if replicator is not None:
                hb.update(role, replicator.session, generation, replicator.committed_epoch)
            if time.monotonic() - last_report >= JITTER_REPORT_S:
                last_report = time.monotonic()
                j = hb.jitter()
                _log.info("heartbeat-jitter", beats=j.get("count"), p50_ms=j.get("p50_ms"),
                          p99_ms=j.get("p99_ms"), max_ms=j.get("max_ms"))
                hb.reset_jitter()
            await asyncio.sleep(0.1)

    publisher = asyncio.create_task(publish())
    try:
        holder = await _newer_holder(hb, generation)
    except HeartbeatError as exc:
        _log.error("heartbeat-failed", error=str(exc), detail="running on without a heartbeat")
        holder = None
    finally:
        publisher.cancel()
    if holder is None:
        await asyncio.Event().wait()
    return holder


async def _newer_holder(hb, generation: int) -> dict | None:
    async for event in hb.events():
        beat = getattr(event, "beat", None)
        if beat and beat.get("role") == "active" and int(beat.get("generation", 0)) > generation:
            return beat
        if isinstance(event, PeerLost):
            _log.warning("peer-lost", detail="backup silent on every heartbeat link")
        elif isinstance(event, LinkDown):
            _log.warning("link-down", link=event.link)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.setup("primary", args.log_level)
    try:
        return asyncio.run(run(args))
    except ConfigError as exc:
        print(f"remus-primary: config error: {exc}", file=sys.stderr)
        return 2
    except tls.TlsError as exc:
        _log.error("tls-error", error=str(exc))
        print(f"remus-primary: TLS error: {exc}", file=sys.stderr)
        return 2
    except GuestError as exc:
        _log.error("guest-error", error=str(exc))
        return EXIT_GUEST_FAILED


if __name__ == "__main__":
    sys.exit(main())
