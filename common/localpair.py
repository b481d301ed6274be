"""A protected pair on one machine: real daemons as separate processes, bounded waits,
certain cleanup. Used by the tests, the demo and the benchmarks."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from remus.common.netns import Lan
from remus.common.waiting import wait_until  # noqa: F401 - re-exported for tests

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v) -> str:
    """`v` as a TOML value: a string (escaped), bool, int, float, list or inline table."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return '"' + "".join(_toml_char(c) for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for {type(v).__name__}: {v!r}")


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
                 "\r": "\\r"}


def _toml_char(c: str) -> str:
    if c in _TOML_ESCAPES:
        return _TOML_ESCAPES[c]
    return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c


def toml_key(key: str) -> str:
    return key if key and re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)


def merge_tables(data: dict, overrides: dict[str, dict]) -> None:
    """Merge {table: {key: value}} into the parsed config `data`, in place."""
    for table, values in overrides.items():
        if not isinstance(data.setdefault(table, {}), dict):
            raise ValueError(f"[{table}] is an array of tables in this config; cannot override it")
        data[table].update(values)


def toml_document(data: dict) -> str:
    """A TOML document for a parsed one (nested tables, arrays of tables, values)."""
    return "\n".join(_toml_table([], data, None)) + "\n"


def _is_table_array(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _toml_table(path: list[str], table: dict, header: str | None) -> list[str]:
    lines = [header] if header else []
    subtables = []
    for key, v in table.items():
        if isinstance(v, dict) or _is_table_array(v):
            subtables.append((key, v))
        else:
            lines.append(f"{toml_key(key)} = {toml_value(v)}")
    for key, v in subtables:
        name = ".".join(toml_key(k) for k in (*path, key))
        if isinstance(v, dict):
            lines += _toml_table([*path, key], v, f"[{name}]")
        else:
            for item in v:
                lines += _toml_table([*path, key], item, f"[[{name}]]")
    return lines


class Daemon:
    """One remus daemon; its stderr goes to a log file the test can search."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """Wait for `pattern` in the log after character offset `start`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log(), start)
            if m:
                return m
            if self.proc.poll() is not None:
                m = rx.search(self.log(), start)
                if m:
                    return m
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before "
                                     f"logging {pattern!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {pattern!r} within {timeout}s:\n"
                                     f"{self.tail()}")
            time.sleep(0.01)

    def family(self) -> list[psutil.Process]:
        try:
            me = psutil.Process(self.proc.pid)
            return [me] + me.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill9(self) -> None:
        """Host loss: the daemon and its QEMU die at once."""
        for p in reversed(self.family()):
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        family = self.family()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class Pair:
    """A protected guest: config, backup and primary daemons, and an HTTP client for it."""

    def __init__(self, image, workdir: Path, lan: Lan | None = None, disk_mib: int = 0,
                 extra_config: str = "", insecure: bool = False, memory_mib: int = 128,
                 guest_config: str = "", kernel_boot: bool = True, append_extra: str = "",
                 config_overrides: dict[str, dict] | None = None, **replication):
        """Without `lan`: both daemons on this host, guest NIC in QEMU user mode with a
        host forward. With `lan`: daemons on the namespace hosts, guest bridged and
        its output buffered. `kernel_boot=False`: no -kernel, the guest boots from its
        first disk (see boot_append); `guest_config`: more [guest] lines. The stream
        runs over TLS with material in workdir/keys (the heartbeat's keys too, see
        ha_config), or plain TCP with `insecure`. `replication`: [replication] keys;
        `extra_config`: more TOML text; `config_overrides`: {table: {key: value}}
        merged into all of that last (see write_config)."""
        self.workdir = workdir
        self.insecure = insecure
        self.keys = make_keys(workdir)
        self.lan = lan
        self.http_port = free_port()
        self.stream_port = free_port()
        self.ram_dir = Path("/dev/shm") / f"remus-test-{os.getpid()}-{self.stream_port}"
        self.ram_dir.mkdir()
        if disk_mib:
            self.disk = workdir / "guest.disk"
            with open(self.disk, "wb") as f:
                f.truncate(disk_mib << 20)
        ip, gw = self._guest_address()
        self.boot_append = f"console=ttyS0 quiet panic=-1 remus.ip={ip} remus.gw={gw} {append_extra}"
        kernel = (f'kernel = "{image.kernel}"\ninitrd = "{image.initrd}"\n'
                  f'append = "{self.boot_append}"') if kernel_boot else ""
        disk = f'disk = "{self.disk}"' if disk_mib else ""
        self.config = workdir / "guest.toml"
        self.base_config = (self._guest_table(memory_mib, kernel, disk, guest_config)
                            + self._daemon_tables(replication) + extra_config + "\n")
        self.config_overrides = config_overrides or {}
        self.write_config()
        self.daemons: list[Daemon] = []
        self.daemon_wrapper: list[str] = []  # e.g. prlimit: what the daemons run under
        self.primary: Daemon | None = None
        self.backup: Daemon | None = None

    def _guest_address(self) -> tuple[str, str]:
        """The guest's address (with its prefix length) and gateway."""
        if self.lan is None:
            return "10.0.2.15/24", "10.0.2.2"
        return self.lan.addr["guest"] + "/24", self.lan.addr["client"]

    def _guest_table(self, memory_mib: int, kernel: str, disk: str, guest_config: str) -> str:
        if self.lan is None:
            network = f'mode = "user"\nhost_forward = ["tcp:127.0.0.1:{self.http_port}-:80"]'
        else:
            network = f'mode = "bridged"\nbridge = "{self.lan.bridge}"'
        return f"""
[guest]
name = "demo"
memory_mib = {memory_mib}
{kernel}
ram_dir = "{self.ram_dir}"
{disk}
{guest_config}
[network]
{network}
"""

    def _daemon_tables(self, replication: dict) -> str:
        """[replication], [primary], [backup] and [tls]."""
        rep = {"interval_ms": 200, "stream_timeout_ms": 2000, **replication}
        rep_lines = "\n".join(f"{key} = {toml_value(v)}" for key, v in rep.items())
        if self.lan is None:
            primary = backup = "127.0.0.1"
        else:
            primary, backup = self.lan.addr["primary"], self.lan.addr["backup"]
        tls = "insecure = true" if self.insecure else f'dir = "{self.keys}"'
        return f"""[replication]
{rep_lines}
[primary]
address = "{primary}"
state_dir = "{self.workdir / 'primary'}"
[backup]
address = "{backup}:{self.stream_port}"
state_dir = "{self.workdir / 'backup'}"
[tls]
{tls}
"""

    def write_config(self, overrides: dict[str, dict] | None = None) -> None:
        """(Re)write the config file: the pair's own TOML with `config_overrides`, then
        `overrides`, merged in ({table: {key: value}}: a key given replaces or adds that
        key of the table; a table the config lacks is added). With no overrides at all
        the text is written as built, unparsed. A test can hand one daemon a different
        config by rewriting it between starts."""
        layers = [layer for layer in (self.config_overrides, overrides) if layer]
        if not layers:
            self.config.write_text(self.base_config)
            return
        data = tomllib.loads(self.base_config)
        for layer in layers:
            merge_tables(data, layer)
        self.config.write_text(toml_document(data))

    def _on(self, role: str) -> list[str]:
        return self.lan.exec(role) if self.lan else []

    def start_backup(self, *extra: str) -> Daemon:
        self.backup = self._start("backup", [*self._on("backup"), *self.daemon_wrapper,
                                             str(BIN / "remus-backup"),
                                             "--config", str(self.config), *extra])
        self.backup.wait_for(r"backup-start", 15)
        return self.backup

    def start_primary(self, *extra: str) -> Daemon:
        self.primary = self._start("primary", [*self._on("primary"), *self.daemon_wrapper,
                                               str(BIN / "remus-primary"),
                                               "--config", str(self.config), *extra])
        return self.primary

    def _start(self, name: str, argv: list[str]) -> Daemon:
        d = Daemon(name, argv, self.workdir / f"{name}-{len(self.daemons)}.log")
        self.daemons.append(d)
        return d

    def load_config(self):
        """The pair's config as the daemons read it."""
        from remus.common.config import load
        return load(self.config)

    def protect(self, boot_timeout: float = 120) -> None:
        """Backup and primary up, initial sync committed, guest service answering."""
        self.start_backup()
        self.start_primary()
        self.primary.wait_for(r"protecting epoch=\d+", 60)
        wait_until(lambda: self.try_get("get"), boot_timeout, "the guest's counter service")

    def committed_after(self, t: float, timeout: float = 30) -> dict:
        """The replica record once a checkpoint taken after unix time `t` is committed."""
        return wait_until(lambda: (r := self.replica_record()).get("state") == "committed"
                          and r["taken_at"] > t and r, timeout,
                          f"a checkpoint taken after {t} to commit")

    def replica_record(self) -> dict:
        try:
            return json.loads((self.workdir / "backup" / "replica.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def url(self, what: str, nic: int = 0) -> str:
        """The guest's service, on its first NIC or (nic=1) its second (Lan guest_lan2)."""
        if self.lan:
            return f"http://{(self.lan.addr3 if nic else self.lan.addr)['guest']}/cgi-bin/{what}"
        return f"http://127.0.0.1:{self.http_port}/cgi-bin/{what}"

    def get(self, what: str, timeout: float = 10, nic: int = 0) -> str:
        if self.lan:  # the guest is reachable from the client host only
            r = subprocess.run([*self.lan.exec("client"), "curl", "-sf", "-m", str(timeout),
                                self.url(what, nic)], capture_output=True, text=True,
                               timeout=timeout + 5)
            if r.returncode != 0:
                raise OSError(f"curl exit {r.returncode}")
            return r.stdout.strip()
        with urllib.request.urlopen(self.url(what), timeout=timeout) as r:
            return r.read().decode().strip()

    def try_get(self, what: str, timeout: float = 2, nic: int = 0) -> str | None:
        try:
            return self.get(what, timeout, nic)
        except (OSError, urllib.error.URLError, subprocess.TimeoutExpired):
            return None

    def start_probe(self, what: str = "inc", nic: int = 0) -> Daemon:
        """The client probe on the client host, one JSON line per reply (common/probe.py)."""
        return self._start("probe", [*self._on("client"), sys.executable, "-m", "remus.common.probe",
                                     self.url(what, nic)])

    def cleanup(self) -> None:
        for d in self.daemons:
            d.stop()
        shutil.rmtree(self.ram_dir, ignore_errors=True)


def records_on_disk(path, sector: int = 512) -> int:
    """The highest N such that the guest's records 1..N (cgi-bin/record, record2: record
    N in sector N) are all on the disk image at `path`."""
    n = 0
    with open(path, "rb") as f:
        while True:
            f.seek((n + 1) * sector)
            if f.read(12) != b"REC%08d\n" % (n + 1):
                return n
            n += 1


def assert_nothing_taken_back(probe: "Daemon", killed_at: float, what: str) -> None:
    """After a failover: three replies from the resumed guest, then no reply the client
    saw may have been taken back."""
    from remus.common.probe import read_replies, taken_back
    wait_until(lambda: sum(t > killed_at for t, _ in read_replies(probe.log())) >= 3, 60,
               f"replies from the activated guest ({what})")
    probe.stop()
    back = taken_back([v for _, v in read_replies(probe.log())])
    assert not back, f"{what}: replies taken back by the failover: {back}"


def rss_anon(pid: int) -> int:
    """Anonymous resident memory of a process, in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class MemoryWatch(threading.Thread):
    """Samples the anonymous memory of daemons' processes (QEMU aside) until stopped;
    `peaks` holds the highest seen per daemon name and process."""

    def __init__(self, daemons: dict[str, "Daemon"], every: float = 0.1):
        super().__init__(daemon=True)
        self.daemons = daemons
        self.every = every
        self.peaks: dict[str, int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            for name, daemon in self.daemons.items():
                for proc in daemon.family():
                    try:
                        if "qemu" in proc.name():
                            continue
                        key = f"{name}:{proc.pid}:{proc.name()}"
                    except psutil.NoSuchProcess:
                        continue
                    self.peaks[key] = max(self.peaks.get(key, 0), rss_anon(proc.pid))

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join(5)
        return self.peaks


def wait_for_replies(probe: Daemon, n: int, what: str, timeout: float = 60) -> None:
    """Wait until the client probe has logged `n` more replies than it has now."""
    from remus.common.probe import read_replies
    start = len(read_replies(probe.log()))
    wait_until(lambda: len(read_replies(probe.log())) >= start + n, timeout, what)


HB_PORT = 7790


def make_keys(workdir: Path) -> Path:
    """workdir/keys with the heartbeat's CURVE keys and the stream's CA and node
    certificates for primary and backup; made once, shared by Pair and ha_config."""
    import zmq.auth
    from remus.common import tls
    keys = workdir / "keys"
    keys.mkdir(exist_ok=True)
    for node in ("primary", "backup"):
        if not (keys / f"{node}.key_secret").exists():
            zmq.auth.create_certificates(str(keys), node)
    tls.ensure(keys)
    return keys


def ha_config(lan: Lan, workdir: Path, fence_type: str = "file", device: str | None = None) -> tuple[str, Path]:
    """[heartbeat] on both wires and [fencing] with fence_dummy, plus the keys and the
    dummy's status file ("on"). Returns (config text, status file of the primary host).
    The backup host has its own device and status file, workdir/"power-backup", for
    failovers after re-protection."""
    keys = make_keys(workdir)
    status = workdir / "power"
    status.write_text("on")
    backup_status = workdir / "power-backup"
    backup_status.write_text("on")
    device = device or (f'kind = "agent"\nagent = "fence_dummy"\n'
                        f'options = {{ type = "{fence_type}", status_file = "{status}", power_timeout = "1" }}')
    text = f"""
[heartbeat]
links = [["{lan.addr['primary']}:{HB_PORT}", "{lan.addr['backup']}:{HB_PORT}"],
         ["{lan.addr2['primary']}:{HB_PORT}", "{lan.addr2['backup']}:{HB_PORT}"]]
keys_dir = "{keys}"
[fencing]
timeout_s = 10
retry_min_s = 0.5
retry_max_s = 2
[[fencing.level]]
[[fencing.level.device]]
{device}
[[fencing.level.device]]
kind = "agent"
agent = "fence_dummy"
target = "backup"
options = {{ type = "file", status_file = "{backup_status}", power_timeout = "1" }}
"""
    return text, status


class PowerSwitch(threading.Thread):
    """A test power switch: cuts a host (kills its daemon and QEMU; `host` is "primary"
    or "backup", the daemon of that Pair attribute) once fence_dummy's status file says
    off."""

    def __init__(self, status_file: Path, pair: Pair, host: str = "primary"):
        super().__init__(daemon=True)
        self.status_file, self.pair, self.host = status_file, pair, host
        self.done = threading.Event()
        self.cut_at: float | None = None

    def run(self) -> None:
        while not self.done.is_set():
            if self.status_file.read_text() == "off":
                self.cut_at = time.time()
                getattr(self.pair, self.host).kill9()
                return
            time.sleep(0.005)
