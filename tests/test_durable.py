"""Files and durability: the order of writes, flushes and renames behind a `committed`
record, owner-only files and directories, and a record write that fails.

The journal replaces os.fsync, os.fdatasync, os.replace, os.rename and os.pwrite by
wrappers that note each call (with the path of the descriptor) and then do it."""
import dataclasses
import errno
import json
import os
import stat
import textwrap
from pathlib import Path

import numpy as np
import pytest

from remus.backup.replica import APPLYING, COMMITTED, SYNCING, Replica, ReplicaError
from remus.backup.staging import StagedData
from remus.common import durable
from remus.common.capture import PAGE_SIZE
from remus.common.protocol import DISK_EXTENT
from remus.primary.record import write_running

NPAGES = 16
FP = "f" * 32
DISK = 1 << 20


def pages(fill, n=NPAGES):
    return np.full((n, PAGE_SIZE), fill, dtype=np.uint8)


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class Journal(list):
    """What happened to the files under `root`, in order: (call, path[, record state])."""

    def __init__(self, monkeypatch, root: Path):
        super().__init__()
        self.root = str(root)
        real = {name: getattr(os, name) for name in
                ("fsync", "fdatasync", "replace", "rename", "pwrite")}

        def flush(name):
            def wrapper(fd):
                self._note(name, fd_path(fd))
                return real[name](fd)
            return wrapper

        def move(name):
            def wrapper(src, dst, *a, **k):
                state = None
                if str(dst).endswith(".json"):
                    state = json.loads(Path(src).read_text()).get("state")
                self._note(name, str(dst), state)
                return real[name](src, dst, *a, **k)
            return wrapper

        def pwrite(fd, data, offset):
            path = fd_path(fd)
            if not self or self[-1] != ("pwrite", path):  # one entry for a run of writes
                self._note("pwrite", path)
            return real["pwrite"](fd, data, offset)

        for name in ("fsync", "fdatasync"):
            monkeypatch.setattr(os, name, flush(name))
        for name in ("replace", "rename"):
            monkeypatch.setattr(os, name, move(name))
        monkeypatch.setattr(os, "pwrite", pwrite)

    def _note(self, call, path, state=None):
        if path.startswith(self.root):
            name = os.path.relpath(path, self.root)
            self.append((call, name) if state is None else (call, name, state))

    def last(self, entry) -> int:
        return len(self) - 1 - self[::-1].index(entry)


def committed_replica(path: Path) -> Replica:
    r = Replica(path)
    r.begin_session("s1", FP, NPAGES * PAGE_SIZE, PAGE_SIZE, [DISK, DISK])
    r.apply_pages(np.arange(NPAGES, dtype=np.uint32), pages(1))
    r.write_disk(0, np.array([(0, 4096)], DISK_EXTENT), b"a" * 4096)
    r.commit_streamed(1, True, 1.0, b"dev1", True)
    return r


def assert_flushed_before_committed(journal: Journal, wrote: set[str]) -> None:
    committed = journal.index(("replace", "replica.json", COMMITTED))
    # Each file written in this checkpoint: flushed after its last write, before the
    # record says committed.
    for name in wrote:
        flushed = journal.last(("fdatasync", name))
        assert journal.last(("pwrite", name)) < flushed < committed, (name, journal)
    # The device state: whole (fsync), in place (rename), the rename on disk (dir fsync).
    dev_fsync = journal.last(("fsync", "device.state.tmp"))
    dev_rename = journal.last(("replace", "device.state"))
    assert dev_fsync < dev_rename < journal.index(("fsync", "."), dev_rename) < committed
    # The committed record itself: whole before the rename, the rename then made durable.
    assert journal[committed - 1] == ("fsync", "replica.json.tmp")
    assert ("fsync", ".") in journal[committed + 1:]


def test_a_staged_commit_flushes_ram_disks_and_device_state_before_the_record_says_committed(
        tmp_path, monkeypatch):
    r = committed_replica(tmp_path)
    staged = StagedData(tmp_path)
    staged.add_pages(np.array([3, 7], np.uint32), pages(9, 2))
    staged.add_disk(0, np.array([(8192, 512)], DISK_EXTENT), b"b" * 512)
    staged.add_disk(1, np.array([(0, 3)], DISK_EXTENT), b"xyz")
    journal = Journal(monkeypatch, tmp_path)
    r.commit(2, False, 2.0, np.array([5], np.uint32), pages(8, 1), b"dev2", staged=staged)

    # The record says `applying`, durably, before the RAM file or a disk is touched.
    applying = journal.index(("replace", "replica.json", APPLYING))
    assert journal[applying - 1] == ("fsync", "replica.json.tmp")
    assert journal[applying + 1] == ("fsync", ".")
    first_write = min(journal.index(("pwrite", n)) for n in
                      ("replica.ram", "replica.disk", "replica.disk1"))
    assert applying + 1 < first_write
    assert_flushed_before_committed(journal, {"replica.ram", "replica.disk", "replica.disk1"})
    assert Replica(tmp_path).state.state == COMMITTED and r.state.epoch == 2


def test_the_first_commit_of_a_session_flushes_what_streamed_in_before_committed(
        tmp_path, monkeypatch):
    journal = Journal(monkeypatch, tmp_path)
    committed_replica(tmp_path)
    assert ("replace", "replica.json", SYNCING) in journal
    assert_flushed_before_committed(journal, {"replica.ram", "replica.disk"})
    # A disk the session emptied (truncated) and never wrote: flushed all the same.
    assert ("pwrite", "replica.disk1") not in journal
    assert (journal.index(("fdatasync", "replica.disk1"))
            < journal.index(("replace", "replica.json", COMMITTED)))


def test_primary_json_is_written_flushed_renamed_and_its_directory_flushed(tmp_path,
                                                                             monkeypatch):
    journal = Journal(monkeypatch, tmp_path)
    write_running(tmp_path, 3, True)
    assert journal == [("fsync", "primary.json.tmp"), ("replace", "primary.json"),
                       ("fsync", ".")]
    assert json.loads((tmp_path / "primary.json").read_text()) == {"generation": 3,
                                                                   "running": True}
    assert stat.S_IMODE((tmp_path / "primary.json").stat().st_mode) == 0o600
    assert not (tmp_path / "primary.json.tmp").exists()


# ---- owner-only from the first moment

@pytest.fixture
def no_umask():
    """Umask 0: a file or directory created without an explicit mode is 0666/0777."""
    old = os.umask(0)
    yield
    os.umask(old)


class Creations:
    """Checks the mode of every file and directory the moment it is created."""

    def __init__(self, monkeypatch, root: Path):
        self.bad: list[str] = []
        self.seen: list[str] = []
        real_open, real_mkdir = os.open, os.mkdir

        def checked_open(path, flags, mode=0o777, *a, **k):
            new = bool(flags & os.O_CREAT) and not os.path.exists(path)
            fd = real_open(path, flags, mode, *a, **k)
            if (new or flags & os.O_TMPFILE == os.O_TMPFILE) and str(path).startswith(str(root)):
                self._check(fd_path(fd), os.fstat(fd).st_mode, 0o600)
            return fd

        def checked_mkdir(path, mode=0o777, *a, **k):
            real_mkdir(path, mode, *a, **k)
            if str(path).startswith(str(root)):
                self._check(str(path), os.stat(path).st_mode, 0o700)

        monkeypatch.setattr(os, "open", checked_open)
        monkeypatch.setattr(os, "mkdir", checked_mkdir)

    def _check(self, path: str, mode: int, want: int) -> None:
        self.seen.append(path)
        if stat.S_IMODE(mode) != want:
            self.bad.append(f"{path}: {oct(stat.S_IMODE(mode))}")


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
            for p in [root, *root.rglob("*")]}


def test_the_replica_files_and_directory_are_owner_only_as_soon_as_they_exist(
        tmp_path, monkeypatch, no_umask):
    root = tmp_path / "state" / "backup"
    created = Creations(monkeypatch, root)
    r = committed_replica(root)
    staged = StagedData(root, memory_cap=PAGE_SIZE)  # the second page spills to a file
    staged.add_pages(np.array([1, 2], np.uint32), pages(3, 2))
    staged.add_pages(np.array([4], np.uint32), pages(4, 1))
    staged.add_disk(0, np.array([(0, 512)], DISK_EXTENT), b"c" * 512)
    r.commit(2, False, 2.0, np.empty(0, np.uint32), pages(0, 0), b"dev2", staged=staged)
    staged.discard()
    r.close()
    assert created.bad == []
    assert any("staging" in p or "#" in p for p in created.seen), created.seen  # the staging file
    expect = {".": 0o700, "replica.ram": 0o600, "replica.disk": 0o600, "replica.disk1": 0o600,
              "device.state": 0o600, "replica.json": 0o600}
    assert modes(root) == expect


def test_an_old_replica_of_mode_0644_in_a_0755_directory_is_tightened(tmp_path, no_umask):
    root = tmp_path / "backup"
    committed_replica(root).close()
    for path in root.iterdir():  # as an older version left them
        path.chmod(0o644)
    root.chmod(0o755)
    r = Replica(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    r.begin_session("s2", FP, NPAGES * PAGE_SIZE, PAGE_SIZE, [DISK])
    r.close()
    assert set(modes(root).values()) == {0o600, 0o700}
    assert stat.S_IMODE((root / "replica.ram").stat().st_mode) == 0o600


def test_the_daemons_state_and_run_directories_are_0700(tmp_path, no_umask):
    from remus.common.config import load
    from remus.common.node import Node
    old = tmp_path / "primary"
    (old / "run").mkdir(parents=True, mode=0o755)
    old.chmod(0o755)
    config = tmp_path / "guest.toml"
    config.write_text(textwrap.dedent(f"""
        [guest]
        name = "demo"
        kernel = "vmlinuz"
        [primary]
        address = "127.0.0.1"
        state_dir = "{old}"
        [backup]
        address = "127.0.0.1:7788"
        state_dir = "{tmp_path / 'new' / 'backup'}"
        [tls]
        dir = "keys"
    """))
    cfg = load(config)
    for host, root in (("primary", old), ("backup", tmp_path / "new" / "backup")):
        Node(cfg, host, roles=None)
        assert modes(root) == {".": 0o700, "run": 0o700}, host


def test_qemu_run_directory_serial_log_and_stderr_are_owner_only(tmp_path, no_umask):
    from remus.common.qemu import GuestPaths, prepare_run_dir
    paths = GuestPaths(run_dir=tmp_path / "run", ram_file=tmp_path / "ram")
    fd = prepare_run_dir(paths)
    os.close(fd)
    assert modes(paths.run_dir) == {".": 0o700, "serial.log": 0o600, "qemu.stderr": 0o600}
    paths.serial_log.chmod(0o644)  # from an older version
    paths.run_dir.chmod(0o755)
    os.close(prepare_run_dir(paths))
    assert modes(paths.run_dir) == {".": 0o700, "serial.log": 0o600, "qemu.stderr": 0o600}


def test_qemu_runs_with_umask_077(no_umask):
    import subprocess
    from remus.common.qemu import _die_with_parent
    out = subprocess.run(["sh", "-c", "umask"], preexec_fn=_die_with_parent,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0077"


# ---- a record write that fails changes nothing

def fail_on(monkeypatch, call: str, error: int, path_suffix: str, nth: int = 1):
    """Make the `nth` os.<call> on a path ending in `path_suffix` fail with `error`."""
    real = getattr(os, call)
    count = [0]

    def wrapper(target, *a, **k):
        path = fd_path(target) if isinstance(target, int) else str(target)
        if path.endswith(path_suffix):
            count[0] += 1
            if count[0] == nth:
                raise OSError(error, os.strerror(error), path)
        return real(target, *a, **k)

    monkeypatch.setattr(os, call, wrapper)


@pytest.mark.parametrize("call,error", [("open", errno.EMFILE), ("write", errno.ENOSPC),
                                        ("fsync", errno.EIO), ("replace", errno.EIO)])
def test_a_failed_record_write_leaves_the_state_in_memory_and_on_disk_unchanged(
        tmp_path, monkeypatch, call, error):
    r = committed_replica(tmp_path)
    before = dataclasses.asdict(r.state)
    on_disk = (tmp_path / "replica.json").read_bytes()
    fail_on(monkeypatch, call, error, "replica.json.tmp")
    with pytest.raises(OSError) as exc:
        r.commit(2, False, 2.0, np.array([5], np.uint32), pages(8, 1), b"dev2")
    assert exc.value.errno == error
    assert dataclasses.asdict(r.state) == before
    assert (tmp_path / "replica.json").read_bytes() == on_disk
    assert not (tmp_path / "replica.json.tmp").exists()
    r.check_activatable(FP)  # still the committed epoch 1 it was


def test_a_failed_committed_record_leaves_memory_saying_what_the_file_says(tmp_path,
                                                                           monkeypatch):
    r = committed_replica(tmp_path)
    fail_on(monkeypatch, "write", errno.ENOSPC, "replica.json.tmp", nth=2)  # the second record
    with pytest.raises(OSError):
        r.commit(2, False, 2.0, np.array([5], np.uint32), pages(8, 1), b"dev2")
    assert r.state.state == APPLYING and r.state.epoch == 2
    assert dataclasses.asdict(Replica(tmp_path).state) == dataclasses.asdict(r.state)


def test_write_atomic_leaves_the_old_file_whole_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "f"
    durable.write_atomic(target, b"old")
    fail_on(monkeypatch, "write", errno.ENOSPC, "f.tmp")
    with pytest.raises(OSError):
        durable.write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and not (tmp_path / "f.tmp").exists()


def test_write_atomic_does_not_follow_a_symlink_planted_at_its_temporary_path(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "f.tmp").symlink_to(victim)
    durable.write_atomic(tmp_path / "f", b"data")
    assert victim.read_bytes() == b"keep" and (tmp_path / "f").read_bytes() == b"data"


def test_after_a_failed_flush_nothing_of_the_session_is_committed_again(tmp_path, monkeypatch):
    r = Replica(tmp_path)
    r.begin_session("s1", FP, NPAGES * PAGE_SIZE, PAGE_SIZE, [DISK])
    r.apply_pages(np.arange(NPAGES, dtype=np.uint32), pages(1))
    fail_on(monkeypatch, "fdatasync", errno.EIO, "replica.ram")
    with pytest.raises(OSError):
        r.commit_streamed(1, True, 1.0, b"dev1", True)
    assert r.state.state == SYNCING
    # The kernel reports a writeback error once: this flush would succeed, the lost
    # pages still lost.
    with pytest.raises(ReplicaError, match="flush of the replica failed"):
        r.commit_streamed(2, True, 2.0, b"dev2", True)
    assert Replica(tmp_path).state.state == SYNCING
    r.begin_session("s2", FP, NPAGES * PAGE_SIZE, PAGE_SIZE, [DISK])  # writes every page again
    r.commit(1, True, 4.0, np.arange(NPAGES, dtype=np.uint32), pages(2), b"dev",
             disk_synced=True)
    r.check_activatable(FP)


def test_a_file_not_written_since_its_last_flush_is_not_flushed_again(tmp_path, monkeypatch):
    r = committed_replica(tmp_path)
    journal = Journal(monkeypatch, tmp_path)
    r.commit(2, False, 2.0, np.array([5], np.uint32), pages(8, 1), b"dev2")  # RAM only
    assert [e for e in journal if e[0] == "fdatasync"] == [("fdatasync", "replica.ram")]
