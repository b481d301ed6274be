"""One TOML file per protected VM, the same on both hosts.

Every key is declared in SCHEMA with its type, default and check; anything
else in the file is rejected with the key named, so a typo never silently
falls back to a default.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from remus.common.disks import DiskConfigError, DiskSpec, parse_disks
from remus.common.errors import ConfigError
from remus.common.fencing.plan import parse as parse_fencing
from remus.common.nics import NicConfigError, default_tap, parse_nics

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


def host_port(value: str, *, port_required: bool) -> tuple[str, int]:
    """(host, port) of an address "HOST:PORT", or of a bare "HOST" (port 0) when
    the port is optional; ValueError saying what is wrong. An IPv6 host is
    bracketed, "[fd00::1]" or "[fd00::1]:PORT": bare, its last group would pass
    for a port."""
    if value.startswith("[") and value.endswith("]"):
        if port_required:
            raise ValueError("expected HOST:PORT")
        value += ":0"
    elif value.count(":") > 1 and not value.startswith("["):
        raise ValueError(f"an IPv6 address needs brackets: [{value}] or [{value}]:PORT")
    host, sep, port = value.rpartition(":")
    if not sep:
        if port_required:
            raise ValueError("expected HOST:PORT")
        return value, 0
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT with a port from 0 to 65535")
    if port_required and int(port) == 0:
        raise ValueError("port 0 is not a listening port")
    return host, int(port)


@dataclass(frozen=True)
class Key:
    type: type
    default: Any = None  # None: required
    check: Callable[[Any], Any] | None = None  # raises ValueError or returns a normalised value
    help: str = ""


def _range(lo: float, hi: float) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return v
    return check


def _choice(*options: str) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v
    return check


def _name(v: str) -> str:
    if not _NAME_RE.fullmatch(v):
        raise ValueError("letters, digits, '.', '_' and '-' only, at most 63")
    return v


def _mac(v: str) -> str:
    v = v.lower()
    if not _MAC_RE.fullmatch(v):
        raise ValueError("expected a MAC address like 52:54:00:12:34:56")
    if int(v[:2], 16) & 1:
        raise ValueError("a multicast MAC cannot be a NIC address")
    return v


def _cpu_model(v: str) -> str:
    if v and not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", v):
        raise ValueError("a QEMU CPU model name such as x86-64-v2, Skylake-Server or host")
    return v


def _ifname(v: str) -> str:
    if v and (len(v) > 15 or not re.fullmatch(r"[A-Za-z0-9_.-]+", v)):
        raise ValueError("an interface name: at most 15 letters, digits, '_', '.', '-'")
    return v


def _links(v: list) -> list:
    links = []
    for item in v:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise ValueError('each link is ["PRIMARY_HOST:PORT", "BACKUP_HOST:PORT"]')
        for addr in item:
            host_port(addr, port_required=True)
        links.append(list(item))
    return links


def _metrics_address(v: str) -> str:
    """HOST:PORT of a metrics endpoint; ":PORT" or a bare "PORT" is 127.0.0.1:PORT,
    this host only (name a host, or 0.0.0.0, to be scraped from elsewhere)."""
    if not v:
        return v
    if v.isdigit():
        v = ":" + v
    if v.startswith(":"):
        v = "127.0.0.1" + v
    host_port(v, port_required=True)
    return v


def _str_list(v: list) -> list:
    if not all(isinstance(x, str) for x in v):
        raise ValueError("must be a list of strings")
    return list(v)


SCHEMA: dict[str, dict[str, Key]] = {
    "guest": {
        "name": Key(str, None, _name, "name of the protected VM"),
        "memory_mib": Key(int, 128, _range(16, 1 << 20), "guest RAM in MiB"),
        "cpus": Key(int, 1, _range(1, 64), "virtual CPUs"),
        "kernel": Key(str, "", None, "kernel image booted with -kernel; empty: the guest boots "
                                     "from its first disk through its firmware"),
        "initrd": Key(str, "", None, "initramfs passed with -initrd (optional, with kernel)"),
        "append": Key(str, "console=ttyS0", None, "kernel command line (with kernel)"),
        "firmware": Key(str, "bios", _choice("bios", "uefi"),
                        "bios: SeaBIOS; uefi: OVMF, whose variable store (uefi_vars) is "
                        "guest state and is replicated like a disk"),
        "uefi_code": Key(str, "/usr/share/OVMF/OVMF_CODE_4M.fd", None,
                         "uefi: the OVMF code image (read-only; the same on both hosts)"),
        "uefi_vars": Key(str, "", None,
                         "uefi: this VM's variable store, a copy of OVMF_VARS_4M.fd (its boot "
                         "entries); mirrored to the backup"),
        "machine": Key(str, "q35", _choice("q35", "pc"), "QEMU machine type"),
        "cpu_model": Key(str, "", _cpu_model,
                         "CPU model, e.g. x86-64-v2 (what both hosts can run); empty: 'host' "
                         "under KVM (both hosts' CPUs must match), QEMU's default under TCG"),
        "accel": Key(str, "auto", _choice("auto", "kvm", "tcg"), "KVM where usable (auto), or forced"),
        "qemu_binary": Key(str, "qemu-system-x86_64", None, "QEMU executable"),
        "ram_dir": Key(str, "/dev/shm", None, "where the primary keeps the guest RAM file (tmpfs)"),
        "disk": Key(str, "", None, "raw disk image of the guest on the primary (optional); "
                                   "replicated to the backup's state directory. For several "
                                   "disks, qcow2 or read-only media use [[disk]] tables instead"),
        "extra_args": Key(list, [], _str_list, "extra QEMU arguments, appended verbatim"),
    },
    "network": {
        "mode": Key(str, "none", _choice("none", "user", "bridged"),
                    "none: no NIC; user: QEMU user-mode NIC with host forwards (unbuffered, "
                    "demo only); bridged: NIC on a TAP in [network] bridge, output held "
                    "until the backup has the checkpoint"),
        "mac": Key(str, "52:54:00:12:34:56", _mac, "guest NIC MAC address"),
        "host_forward": Key(list, [], _str_list, "user mode: hostfwd rules, e.g. tcp:127.0.0.1:8080-:80"),
        "bridge": Key(str, "", None, "bridged mode: the bridge on each host the guest's TAP joins"),
        "tap": Key(str, "", _ifname, "bridged mode: TAP device name (default rm-<guest name>)"),
        "buffer": Key(str, "userspace", _choice("userspace", "plug", "auto"),
                      "output buffer: userspace (any kernel), plug (kernel sch_plug), "
                      "auto (plug where the kernel has it)"),
        "buffer_cap_mib": Key(int, 64, _range(1, 4096),
                              "most guest output held at once; beyond it new frames are dropped"),
    },
    "replication": {
        "interval_ms": Key(int, 200, _range(5, 60_000), "checkpoint every MS milliseconds"),
        "trigger": Key(str, "output", _choice("interval", "output"),
                       "output: a checkpoint every interval_ms, and also as soon as the "
                       "guest's output waits in the buffer (and min_interval_ms has passed "
                       "since the last pause), so a reply waits for one checkpoint, not for "
                       "the end of its interval; costs more pauses and CPU while the guest "
                       "talks (userspace buffer only). interval: every interval_ms only"),
        "min_interval_ms": Key(int, 20, _range(1, 60_000),
                               "trigger = output: the shortest time between two pauses, which "
                               "bounds the checkpoint rate at 1000 / min_interval_ms per second"),
        "max_rate": Key(int, 0, _range(0, 1000),
                        "trigger = output: at most this many pauses in any one second, however "
                        "often output waits (0: min_interval_ms alone bounds the rate); lets a "
                        "short min_interval_ms serve occasional replies while a guest that talks "
                        "all the time pauses no more than this. Pauses on the interval count "
                        "towards it but still come"),
        "pipeline": Key(int, 1, _range(1, 8),
                        "checkpoints in flight at once: 1 waits for each checkpoint's ack "
                        "before the next pause (stop-and-wait); more let the next pause come "
                        "while earlier checkpoints are still unacknowledged (they commit, and "
                        "their output leaves, in order)"),
        "compression": Key(str, "zstd", _choice("zstd", "none"), "page compression on the wire"),
        "zstd_level": Key(int, 1, _range(-5, 19), "zstd level (1 is fast and good for pages)"),
        "capture": Key(str, "auto", _choice("auto", "compare", "softdirty"),
                       "dirty-page capture: softdirty where the kernel has it, else compare"),
        "stream_timeout_ms": Key(int, 2000, _range(50, 600_000),
                                 "backup: activate after this long without checkpoint traffic"),
        "ack_timeout_ms": Key(int, 5000, _range(50, 600_000),
                              "primary: give up on a backup that does not acknowledge in time"),
        "compare_threads": Key(int, 2, _range(1, 64),
                               "threads for the compare scan inside the pause"),
        "reprotect": Key(str, "manual", _choice("manual", "auto"),
                         "after a failover, protect the guest again: manual (remusctl "
                         "reprotect) or auto (as soon as the other host stands by as the "
                         "backup; needs [heartbeat])"),
        "disk_epoch_cap_mib": Key(int, 32, _range(1, 65536),
                                  "most disk data the primary holds for one checkpoint (or "
                                  "pre-copy round); past it the guest's writes wait and a "
                                  "checkpoint is taken early, as a full disk queue would"),
        "precopy_rounds": Key(int, 5, _range(0, 1000),
                              "at a session's start, copy RAM (and disk) while the guest runs, "
                              "in at most this many rounds before the first checkpoint, so its "
                              "pause and output hold stay short; 0: the first checkpoint copies "
                              "all RAM inside its pause"),
    },
    "heartbeat": {
        "links": Key(list, [], _links,
                     "heartbeat links, each [primary HOST:PORT, backup HOST:PORT]; none = no "
                     "heartbeat (the backup then activates on stream loss alone: unsafe)"),
        "interval_ms": Key(int, 100, _range(10, 10_000), "beat interval"),
        "miss": Key(int, 5, _range(2, 1000), "beats missed on a link before the peer is lost on it"),
        "keys_dir": Key(str, "/etc/remus/keys", None,
                        "CURVE keys: primary.key, backup.key and this node's *.key_secret "
                        "(remusctl keys generate)"),
    },
    "tls": {
        "dir": Key(str, "", None,
                   "TLS material for the checkpoint stream: ca.crt, and per node NODE.crt and "
                   "NODE.tls.key (remusctl keys generate); may be the heartbeat keys_dir"),
        "insecure": Key(bool, False, None,
                        "plain TCP for the checkpoint stream: unauthenticated and unencrypted; "
                        "anyone who reaches the backup's port can feed the replica, or forge a "
                        "session and a handover that makes the backup take the guest over "
                        "without fencing"),
    },
    "metrics": {
        "primary": Key(str, "", _metrics_address,
                       "[HOST]:PORT of the primary's Prometheus endpoint (empty: off; "
                       "without a host: 127.0.0.1)"),
        "backup": Key(str, "", _metrics_address,
                      "[HOST]:PORT of the backup's Prometheus endpoint (empty: off; "
                      "without a host: 127.0.0.1)"),
    },
    "primary": {
        "address": Key(str, None, lambda v: (host_port(v, port_required=False), v)[1],
                       "HOST[:PORT] the primary sends the checkpoint stream from"),
        "state_dir": Key(str, "/var/lib/remus/primary", None, "primary state directory"),
        "drill_target": Key(bool, False, None, "allow `remusctl drill` on this pair without --yes"),
        "on_stop": Key(str, "handover", _choice("handover", "shutdown"),
                       "what stopping the daemon (systemctl stop/restart) does to a protected "
                       "guest: handover: a last checkpoint, then the backup runs the guest on "
                       "without fencing (nothing is lost; this host then stands by as its "
                       "backup when started again); shutdown: the guest is stopped and the "
                       "backup told not to take over"),
        "on_backup_loss": Key(str, "continue", _choice("continue", "pause"),
                              "continue: hold the output for the takeover window (the backup "
                              "may be about to take over), then release it and run "
                              "unprotected; "
                              "pause: keep the guest stopped until the backup returns or an "
                              "operator resumes it (SIGUSR1)"),
    },
    "backup": {
        "address": Key(str, None, lambda v: (host_port(v, port_required=True), v)[1],
                       "HOST:PORT the backup listens on for the checkpoint stream"),
        "state_dir": Key(str, "/var/lib/remus/backup", None, "backup state directory (holds the replica)"),
        "standby_guest": Key(bool, True, None,
                             "launch the guest's QEMU on the replica ahead of a failover, waiting "
                             "for device state: takes QEMU's start-up off the failover path and "
                             "reports a launch that would fail while there is time to fix it; "
                             "costs one idle QEMU process"),
    },
    "cluster": {
        "manager": Key(str, "remus", _choice("remus", "pacemaker"),
                       "who decides a failover: remus: the daemons, by their own heartbeat "
                       "and fencing; pacemaker: Pacemaker owns membership and fencing "
                       "(resource agent ocf:remus:remus), the backup never fences or takes "
                       "over on its own and resumes the guest only when promoted"),
        "fence_timeout_s": Key(int, 60, _range(1, 3600),
                               "pacemaker: the longest Pacemaker takes to fence a lost node "
                               "(its stonith-timeout); part of the takeover window, so a "
                               "replica promoted later than that is refused as stale"),
    },
}


@dataclass(frozen=True)
class Section:
    values: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(key) from None


@dataclass(frozen=True)
class Config:
    path: Path
    guest: Section
    network: Section
    replication: Section
    primary: Section
    backup: Section
    heartbeat: Section
    metrics: Section
    tls: Section
    cluster: Section
    raw: dict = field(repr=False)
    fencing: Any = None  # remus.common.fencing.FencingPlan
    reversed_roles: bool = False  # see reversed()
    disks: tuple = ()  # remus.common.disks.DiskSpec, in the guest's order
    nics: tuple = ()   # remus.common.nics.NicSpec, in the guest's order (bridged mode)

    @property
    def mirrored_disks(self) -> tuple:
        """The writable disks: each is mirrored to the backup, all in one checkpoint."""
        return tuple(d for d in self.disks if not d.readonly)

    @property
    def fence_plan(self):
        """How to fence the host that runs the VM while this config's backup watches it."""
        return self.fencing.for_target("backup" if self.reversed_roles else "primary")

    def reversed(self) -> "Config":
        """The pair with its hosts' roles exchanged: after a failover the [backup] host
        runs the VM, and re-protection makes the [primary] host its backup. The
        checkpoint stream then goes to the [primary] host's address on the same port;
        each host keeps its own state directory and metrics endpoint."""
        p_host, _ = self.primary_endpoint
        b_host, port = self.backup_endpoint
        primary = Section({**self.primary.values, "address": f"[{b_host}]:0" if ":" in b_host else b_host,
                           "state_dir": self.backup.state_dir})
        backup = Section({**self.backup.values,
                          "address": f"[{p_host}]:{port}" if ":" in p_host else f"{p_host}:{port}",
                          "state_dir": self.primary.state_dir})
        metrics = Section({"primary": self.metrics.backup, "backup": self.metrics.primary})
        return dataclasses.replace(self, primary=primary, backup=backup, metrics=metrics,
                                   reversed_roles=not self.reversed_roles)

    @property
    def pacemaker(self) -> bool:
        """Pacemaker decides failovers; the daemons replicate, report and obey."""
        return self.cluster.manager == "pacemaker"

    @property
    def memory_bytes(self) -> int:
        return self.guest.memory_mib << 20

    @property
    def backup_endpoint(self) -> tuple[str, int]:
        return host_port(self.backup.address, port_required=True)

    @property
    def primary_endpoint(self) -> tuple[str, int]:
        return host_port(self.primary.address, port_required=False)

    def fingerprint(self) -> str:
        """What both ends must agree on for a replica to be resumable.

        Only what shapes the machine and its RAM layout counts; addresses,
        timings and paths may differ between the two hosts' copies.
        """
        shape = {
            "guest": {**{k: self.guest.values[k] for k in ("name", "memory_mib", "cpus", "extra_args",
                                                           "firmware", "machine", "cpu_model")},
                      "kernel": bool(self.guest.values["kernel"]),
                      "disks": [d.shape() for d in self.disks]},
            "network": {"mode": self.network.mode, "macs": [n.mac for n in self.nics]
                        if self.nics else [self.network.mac]},
        }
        blob = json.dumps(shape, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def with_overrides(self, **replication: Any) -> "Config":
        values = dict(self.replication.values)
        for key, value in replication.items():
            if value is None:
                continue
            values[key] = _check_value("replication", key, SCHEMA["replication"][key], value)
        return dataclasses.replace(self, replication=Section(values))


def _check_value(section: str, key: str, spec: Key, value: Any) -> Any:
    where = f"[{section}] {key}"
    if isinstance(value, bool) and spec.type is not bool:
        raise ConfigError(f"{where}: expected {spec.type.__name__}, got a boolean")
    if not isinstance(value, spec.type):
        raise ConfigError(f"{where}: expected {spec.type.__name__}, got {type(value).__name__} {value!r}")
    if spec.check is not None:
        try:
            value = spec.check(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc} (got {value!r})") from None
    return value


def parse(data: dict, path: Path) -> Config:
    for section in data:
        if section not in SCHEMA and section not in ("fencing", "disk", "nic"):
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(SCHEMA)}, "
                              f"fencing, [[disk]], [[nic]])")
    sections: dict[str, Section] = {}
    for section, keys in SCHEMA.items():
        given = data.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key in given:
            if key not in keys:
                raise ConfigError(f"[{section}] {key}: unknown key (known: {', '.join(keys)})")
        values = {}
        for key, spec in keys.items():
            if key in given:
                values[key] = _check_value(section, key, spec, given[key])
            elif spec.default is None:
                raise ConfigError(f"[{section}] {key}: required ({spec.help})")
            else:
                values[key] = spec.default
        sections[section] = Section(values)
    base = path.parent
    keys_dir = sections["heartbeat"].values["keys_dir"]
    if not os.path.isabs(keys_dir):
        sections["heartbeat"].values["keys_dir"] = str((base / keys_dir).resolve())
    tls = sections["tls"]
    if tls.dir and not os.path.isabs(tls.dir):
        tls.values["dir"] = str((base / tls.dir).resolve())
    if tls.dir and tls.insecure:
        raise ConfigError("[tls] insecure: true together with [tls] dir; say which one "
                          "(remove insecure to use TLS)")
    if not tls.dir and not tls.insecure:
        raise ConfigError("[tls]: the checkpoint stream needs TLS material: add [tls] dir = "
                          "\"/etc/remus/keys\" holding ca.crt, primary.crt, primary.tls.key, "
                          "backup.crt, backup.tls.key (made by `remusctl keys generate --dir "
                          "/etc/remus/keys --node primary --node backup`), or [tls] insecure = "
                          "true for plain TCP (unauthenticated, unencrypted)")
    for key in ("kernel", "initrd", "disk", "uefi_code", "uefi_vars"):
        value = sections["guest"].values[key]
        if value and not os.path.isabs(value):
            sections["guest"].values[key] = str((base / value).resolve())
    net = sections["network"]
    _check_network(net, sections["guest"].name, with_nics="nic" in data)
    plan = parse_fencing(data.get("fencing"), base)  # raises ConfigError itself
    if sections["cluster"].manager == "pacemaker" and plan.configured:
        raise ConfigError("[fencing]: with [cluster] manager = \"pacemaker\", Pacemaker fences "
                          "(its stonith devices); remove [fencing], and give Pacemaker's "
                          "fencing time as [cluster] fence_timeout_s")
    try:
        disks = parse_disks(data.get("disk"), sections["guest"].disk, base)
    except DiskConfigError as exc:
        raise ConfigError(str(exc)) from None
    disks += _boot_checks(sections["guest"], disks)
    try:
        nics = parse_nics(data.get("nic"), net, sections["guest"].name)
    except NicConfigError as exc:
        raise ConfigError(str(exc)) from None
    return Config(path=path, raw=data, fencing=plan, disks=disks, nics=nics, **sections)


def _check_network(net: Section, guest: str, with_nics: bool) -> None:
    if net.mode != "user" and net.host_forward:
        raise ConfigError("[network] host_forward: only meaningful with mode = \"user\"")
    if net.mode == "bridged" and not with_nics:
        if not net.bridge:
            raise ConfigError("[network] bridge: required with mode = \"bridged\" (or [[nic]])")
        try:
            _ifname(net.bridge)
        except ValueError as exc:
            raise ConfigError(f"[network] bridge: {exc} (got {net.bridge!r})") from None
        if not net.tap:
            net.values["tap"] = default_tap(guest, 0)


def _boot_checks(guest: Section, disks: tuple) -> tuple:
    """What the guest boots from; with UEFI its variable store, as one more mirrored
    (pflash) disk."""
    if not guest.kernel:
        if guest.initrd:
            raise ConfigError("[guest] initrd: only with [guest] kernel (a guest booting from "
                              "its disk has its initramfs there)")
        if not disks:
            raise ConfigError("[guest] kernel: required unless the guest boots from a disk "
                              "([[disk]] or [guest] disk)")
    if guest.firmware != "uefi":
        if guest.uefi_vars:
            raise ConfigError("[guest] uefi_vars: only with firmware = \"uefi\"")
        return ()
    if guest.machine != "q35":
        raise ConfigError("[guest] firmware = \"uefi\": needs machine = \"q35\"")
    if not guest.uefi_vars:
        raise ConfigError("[guest] uefi_vars: required with firmware = \"uefi\": this VM's copy "
                          "of /usr/share/OVMF/OVMF_VARS_4M.fd")
    return (DiskSpec(guest.uefi_vars, bus="pflash"),)


def read_only_media(cfg: Config) -> list[tuple[str, str]]:
    """(file, "SIZE:SHA256") of each read-only medium; ConfigError if one is unreadable."""
    from remus.common.disks import read_only_media as digests
    try:
        return digests(cfg.disks)
    except DiskConfigError as exc:
        raise ConfigError(str(exc)) from None


def load(path: str | os.PathLike) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse(data, p)
