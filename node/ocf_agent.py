"""ocf:remus:remus, the OCF resource agent of one protected VM (a promotable clone).

Pacemaker runs the agent (ocf/remus, installed under the OCF root) on each node
with the action as its argument and the parameters as OCF_RESKEY_* variables;
the agent answers meta-data itself (in plain sh, for any user) and hands every
other action to this module. The exit code is the OCF result.

- start: the node's daemon stands by as the backup (on the config's primary
  host, `remus-primary --standby`; on its backup host, `remus-backup`).
- promote: a standby holding a resumable replica resumes the guest from it
  (`promote` on its control socket; Pacemaker has fenced the lost node); a
  node with no replica to resume boots the guest fresh, only on the config's
  primary host and only if the guest it last ran was seen to end.
- demote: the daemon running the guest stops (a protected guest is handed
  over to the backup first, [primary] on_stop), and the node stands by again.
- monitor: the daemon's status; it also sets the node's promotion score, so
  Pacemaker promotes only a node that can resume the guest without loss.
- stop, notify, meta-data, validate-all as usual.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from remus.common.config import ConfigError, load
from remus.common.control import SOCKET_NAME, query, request
from remus.primary.record import was_running

OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_ARGS, OCF_ERR_UNIMPLEMENTED = 0, 1, 2, 3
OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED, OCF_NOT_RUNNING, OCF_RUNNING_PROMOTED = 5, 6, 7, 8

SCORE_RUNS_THE_GUEST = 1000   # stay where the guest runs
SCORE_RESUMABLE = 100         # a committed checkpoint of the live session
SCORE_FRESH_BOOT = 5          # no replica anywhere better: boot from the primary's disk
PID_FILE = "ocf-daemon.pid"
PROMOTED_ROLES = ("primary", "active")


class AgentError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Agent:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.config_path = env.get("OCF_RESKEY_config", "")
        self.side = env.get("OCF_RESKEY_side", "") or "auto"
        self.log_path = Path(env.get("OCF_RESKEY_log", "/var/log/remus/remus.log"))
        timeout_ms = int(env.get("OCF_RESKEY_CRM_meta_timeout", "60000") or 60000)
        self.deadline = time.monotonic() + max(5.0, timeout_ms / 1000 - 2)
        self.cfg = None
        self.child: subprocess.Popen | None = None  # a daemon this process started
        self.exit_status: str | None = None  # how that one ended

    # -- helpers --------------------------------------------------------------

    def validate(self) -> None:
        if self.side not in ("primary", "backup", "auto"):
            raise AgentError(OCF_ERR_CONFIGURED, f"side={self.side!r}: must be primary, backup "
                             "or auto")
        try:
            self.cfg = load(self.config_path)
        except ConfigError as exc:
            raise AgentError(OCF_ERR_CONFIGURED, f"config {self.config_path}: {exc}") from None
        if self.side == "auto":
            self.side = local_side(self.cfg)
        if not self.cfg.pacemaker:
            raise AgentError(OCF_ERR_CONFIGURED, f"{self.config_path}: needs [cluster] manager "
                             "= \"pacemaker\" (else the daemons fail over on their own)")
        for name in ("remus-primary", "remus-backup"):
            if not self._binary(name).exists():
                raise AgentError(OCF_ERR_INSTALLED, f"{self._binary(name)} is missing")

    def _binary(self, name: str) -> Path:
        return Path(sys.executable).with_name(name)

    @property
    def state_dir(self) -> Path:
        return Path(getattr(self.cfg, self.side).state_dir)

    def _pid(self) -> int | None:
        """The pid of the node's daemon while it runs, else None."""
        try:
            pid = int((self.state_dir / PID_FILE).read_text())
        except (OSError, ValueError):
            return None
        if self.child is not None and self.child.pid == pid:
            # Started by this very process: the kernel shows its command line only a
            # moment after exec, so ask the child itself.
            if self.child.poll() is None:
                return pid
            self.exit_status = f"exit status {self.child.returncode}"
            return None
        try:  # the pid may have been reused since: it must be our daemon
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return pid if self.config_path in proc.cmdline() else None
        except psutil.Error:
            return None

    def _status(self) -> dict | None:
        if not (self.state_dir / SOCKET_NAME).exists():
            return None
        try:
            return query(self.state_dir)
        except (OSError, ValueError, RuntimeError):
            return None

    def _wait_status(self, ok, what: str) -> dict:
        """Poll the daemon's status until ok(status); AgentError past the deadline."""
        last = None
        while time.monotonic() < self.deadline:
            if self._pid() is None:
                raise AgentError(OCF_ERR_GENERIC, f"the daemon exited while {what} "
                                 f"({self.exit_status or 'status unknown'}; see {self.log_path})")
            last = self._status()
            if last is not None and ok(last):
                return last
            time.sleep(0.2)
        shown = f"{last.get('role')} {last.get('state')}" if last else "no answer"
        raise AgentError(OCF_ERR_GENERIC, f"timed out {what} (last status: {shown})")

    def _spawn(self, standby: bool) -> None:
        """The node's daemon, detached, its pid in the state directory."""
        if self.side == "backup":
            cmd = [str(self._binary("remus-backup")), "-c", self.config_path]
        else:
            cmd = [str(self._binary("remus-primary")), "-c", self.config_path]
            cmd += ["--standby"] if standby else []
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self.log_path.open("ab") as log:
            self.child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=log, start_new_session=True, close_fds=True)
        (self.state_dir / PID_FILE).write_text(f"{self.child.pid}\n")

    def _terminate(self) -> None:
        """SIGTERM the daemon and wait for it (it may hand a guest over first)."""
        pid = self._pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            while self._pid() is not None:
                if time.monotonic() > self.deadline:
                    os.kill(pid, signal.SIGKILL)
                    raise AgentError(OCF_ERR_GENERIC, f"daemon {pid} ignored SIGTERM; killed")
                time.sleep(0.1)
        (self.state_dir / PID_FILE).unlink(missing_ok=True)

    def _set_score(self, score: int) -> None:
        """The node's promotion score (crm_attribute --promotion); outside a cluster
        there is no CIB to write to, which is no error of the resource."""
        args = ["-v", str(score)] if score > 0 else ["-D"]
        try:
            subprocess.run(["crm_attribute", "--promotion", "-q", *args], env=self.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def score(self, status: dict) -> int:
        if status.get("role") in PROMOTED_ROLES:
            return SCORE_RUNS_THE_GUEST
        if status.get("role") == "backup" and status.get("state") == "standby":
            return SCORE_RESUMABLE
        if self._may_boot_fresh(status):
            return SCORE_FRESH_BOOT
        return 0

    def _may_boot_fresh(self, status: dict) -> bool:
        """Only the config's primary host boots the guest from its own disks, and only
        if the guest it last ran was seen to end and no replica here is resumable."""
        return (self.side == "primary" and status.get("state") == "waiting"
                and not was_running(Path(self.cfg.primary.state_dir)))

    # -- actions --------------------------------------------------------------

    def monitor(self) -> int:
        if self._pid() is None:
            if (self.state_dir / PID_FILE).exists():
                (self.state_dir / PID_FILE).unlink(missing_ok=True)
                raise AgentError(OCF_ERR_GENERIC, f"the daemon died (see {self.log_path})")
            return OCF_NOT_RUNNING
        status = self._wait_status(lambda s: True, "asking the daemon for its status")
        self._set_score(self.score(status))
        return OCF_RUNNING_PROMOTED if status.get("role") in PROMOTED_ROLES else OCF_SUCCESS

    def start(self) -> int:
        if self._pid() is None:
            self._spawn(standby=True)
        self._wait_status(lambda s: s.get("role") is not None, "starting the daemon")
        self.monitor()
        return OCF_SUCCESS

    def stop(self) -> int:
        self._terminate()
        self._set_score(0)
        return OCF_SUCCESS

    def promote(self) -> int:
        status = self._wait_status(lambda s: True, "reading the status before promoting")
        if status.get("role") in PROMOTED_ROLES:
            return OCF_SUCCESS
        if status.get("state") == "standby":
            return self._resume_replica()
        if self._may_boot_fresh(status):
            return self._boot_fresh()
        raise AgentError(OCF_ERR_GENERIC, f"not promotable: {status.get('role')} "
                         f"{status.get('state')} ({status.get('stale_reason') or 'no resumable replica'})")

    def _resume_replica(self) -> int:
        reply = request(self.state_dir, "promote")
        if not reply.get("ok"):
            raise AgentError(OCF_ERR_GENERIC, f"promote refused: {reply.get('error')}")
        self._wait_status(lambda s: s.get("role") in PROMOTED_ROLES, "resuming the guest")
        self._set_score(SCORE_RUNS_THE_GUEST)
        return OCF_SUCCESS

    def _boot_fresh(self) -> int:
        self._terminate()
        self._spawn(standby=False)
        self._wait_status(lambda s: s.get("role") == "primary" and s.get("qemu_pid"),
                          "booting the guest")
        self._set_score(SCORE_RUNS_THE_GUEST)
        return OCF_SUCCESS

    def demote(self) -> int:
        status = self._status()
        if status is not None and status.get("role") not in PROMOTED_ROLES:
            return OCF_SUCCESS
        self._terminate()
        self._spawn(standby=True)
        self._wait_status(lambda s: s.get("role") == "backup", "standing by after the demote")
        return OCF_SUCCESS


def local_side(cfg) -> str:
    """Which host of the config this node is, by whose address is one of its own."""
    mine = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    sides = [side for side, (host, _) in (("primary", cfg.primary_endpoint),
                                          ("backup", cfg.backup_endpoint)) if host in mine]
    if len(sides) != 1:
        found = "both" if sides else "neither"
        raise AgentError(OCF_ERR_CONFIGURED, f"side=auto: {found} of the config's [primary] "
                         f"address ({cfg.primary_endpoint[0]}) and [backup] address "
                         f"({cfg.backup_endpoint[0]}) is on this node; set side=primary or "
                         "side=backup")
    return sides[0]


ACTIONS = ("start", "stop", "monitor", "promote", "demote")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    action = argv[0] if argv else ""
    if action == "notify":
        return OCF_SUCCESS
    if action not in (*ACTIONS, "validate-all"):
        print(f"usage: remus-ocf {{{'|'.join((*ACTIONS, 'notify', 'meta-data', 'validate-all'))}}}",
              file=sys.stderr)
        return OCF_ERR_UNIMPLEMENTED
    agent = Agent(dict(os.environ))
    try:
        agent.validate()
    except AgentError as exc:
        print(f"remus-ocf {action}: {exc}", file=sys.stderr)
        return _unconfigured(action, agent.env, exc.code)
    try:
        return OCF_SUCCESS if action == "validate-all" else getattr(agent, action)()
    except AgentError as exc:
        print(f"remus-ocf {action}: {exc}", file=sys.stderr)
        return exc.code


def _unconfigured(action: str, env: dict, code: int) -> int:
    """Where the config or the programs are missing, nothing of ours can run: a probe
    (monitor at interval 0) says not running and a stop succeeds, as Pacemaker expects
    of a node the resource was never set up on."""
    if action == "stop":
        return OCF_SUCCESS
    if action == "monitor" and env.get("OCF_RESKEY_CRM_meta_interval", "0") == "0":
        return OCF_NOT_RUNNING
    return code


if __name__ == "__main__":
    sys.exit(main())
