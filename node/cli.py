"""remus-primary and remus-backup: parse the command line, choose the first role,
run the host's role machine, and turn errors into exit codes."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from remus.backup.replica import Replica, ReplicaError
from remus.backup.standing_by import Standby
from remus.common import log, tls
from remus.common.config import ConfigError, load
from remus.common.exitcodes import EXIT_FAILED, EXIT_GUEST_FAILED, EXIT_USAGE
from remus.common.node import Node
from remus.common.qemu import GuestError
from remus.node.factory import HostRoles
from remus.primary.record import read_generation
from remus.primary.starting import Starting

# What the daemons create is their owner's only (the systemd units say UMask=0077
# too); the files that matter are created with explicit modes all the same.
PRIVATE_UMASK = 0o077


INSECURE_NOTE = (
    "[tls] insecure = true (plain TCP for the checkpoint stream) is unsafe: the stream is "
    "unencrypted and neither host is authenticated on it. Anyone who reaches the backup's "
    "port can feed its replica, or forge a session and a handover, which makes the backup "
    "take the guest over at once WITHOUT fencing while the primary still runs it. A "
    "primary over plain TCP never stands down on the backup's word, only on the "
    "heartbeat's.")


def _parser(prog: str, other: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=INSECURE_NOTE)
    p.add_argument("--config", "-c", required=True, metavar="FILE",
                   help=f"the guest's TOML config (the same file as on {other})")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def primary_parser() -> argparse.ArgumentParser:
    p = _parser(
        "remus-primary", "the backup",
        "Run the protected VM under QEMU and send a checkpoint of it to the "
        "backup host every interval. If the backup is unreachable the VM keeps "
        "running unprotected and the daemon keeps reconnecting; every new session "
        "starts with a full sync (pre-copy). If the other host already runs the "
        "guest (after a failover or a handover), this daemon does not boot it but "
        "stands by as that host's backup. Stopping it hands a protected guest "
        "over to the backup ([primary] on_stop).")
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
    p.add_argument("--standby", action="store_true",
                   help="do not boot the guest: stand by as the other host's backup until "
                        "promoted (how Pacemaker's ocf:remus:remus starts this host; needs "
                        "[cluster] manager = \"pacemaker\")")
    return p


def backup_parser() -> argparse.ArgumentParser:
    p = _parser(
        "remus-backup", "the primary",
        "Receive checkpoints of the protected VM into a replica, and resume the "
        "VM from the last committed checkpoint when the primary is lost: the "
        "checkpoint stream AND every heartbeat link silent, and the primary "
        "fenced (without [heartbeat], the stream alone decides: reset, EOF, or "
        "silence longer than [replication] stream_timeout_ms). A primary that "
        "says goodbye is not taken over; one that hands the guest over is, at "
        "once and without fencing. The taken-over guest runs here until "
        "`remusctl reprotect` makes this host its primary.")
    p.add_argument("--stream-timeout", type=int, metavar="MS",
                   help="override [replication] stream_timeout_ms")
    p.add_argument("--activate-now", action="store_true",
                   help="operator takeover: resume the VM from the replica at once, without "
                        "waiting for a session. Only after making sure the primary is off. "
                        "A torn, stale or already activated replica is refused.")
    return p


async def run_primary(args: argparse.Namespace) -> int:
    cfg = load(args.config).with_overrides(interval_ms=args.interval, capture=args.capture)
    # Both directions' contexts now: a TlsError before anything starts.
    tls.context_for(cfg, "primary", server=False)
    tls.context_for(cfg, "primary", server=True)
    generation = read_generation(Path(cfg.primary.state_dir))
    node = Node(cfg, "primary", HostRoles(), generation)
    if args.standby:
        if not cfg.pacemaker:
            raise ConfigError("--standby: only with [cluster] manager = \"pacemaker\" (without "
                              "it, remus-primary stands by on its own when the other host "
                              "runs the guest)")
        return await node.run(Standby(cfg.reversed()))
    return await node.run(Starting(cfg, force=args.force_start, no_net=args.no_net,
                                   stats=args.stats))


async def run_backup(args: argparse.Namespace) -> int:
    cfg = load(args.config).with_overrides(stream_timeout_ms=args.stream_timeout)
    # Both directions' contexts now (this host sends after a re-protection): a TlsError
    # at start, never with a taken-over guest running.
    tls.context_for(cfg, "backup", server=False)
    replica = Replica(Path(cfg.backup.state_dir))
    generation = replica.state.generation
    replica.close()
    node = Node(cfg, "backup", HostRoles(), generation)
    return await node.run(Standby(cfg, activate_now=args.activate_now))


def primary_main(argv: list[str] | None = None) -> int:
    args = primary_parser().parse_args(argv)
    log.setup("primary", args.log_level)
    os.umask(PRIVATE_UMASK)
    return _run("remus-primary", run_primary(args), GuestError, EXIT_GUEST_FAILED, "guest-error")


def backup_main(argv: list[str] | None = None) -> int:
    args = backup_parser().parse_args(argv)
    log.setup("backup", args.log_level)
    os.umask(PRIVATE_UMASK)
    return _run("remus-backup", run_backup(args), (GuestError, ReplicaError), EXIT_FAILED,
                "backup-failed")


def _run(prog: str, daemon, failures, failure_code: int, failure_event: str) -> int:
    _log = log.get(prog.replace("-", "."))
    try:
        return asyncio.run(daemon)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except tls.TlsError as exc:
        _log.error("tls-error", error=str(exc))
        print(f"{prog}: TLS error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except failures as exc:
        _log.error(failure_event, error=str(exc))
        return failure_code
