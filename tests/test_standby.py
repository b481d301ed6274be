"""The standby guest: one QEMU per session, launched ahead of a failover, replaced when
it dies, never reused across sessions, and never a writer of the replica's RAM."""
import asyncio
import hashlib
import os

import numpy as np
import pytest

from remus.backup import standby as standby_mod
from remus.backup.replica import Replica
from remus.backup.standby import StandbyGuest, launch_guest
from remus.common.config import load


class FakeProc:
    def __init__(self):
        self.returncode = None


class FakeGuest:
    def __init__(self, pid):
        self.pid = pid
        self.proc = FakeProc()


class FakeLaunched:
    def __init__(self, pid, journal):
        self.guest = FakeGuest(pid)
        self.netbuf = None
        self.launch_ms = 1.0
        self.journal = journal

    def alive(self):
        return self.guest.proc.returncode is None

    async def discard(self):
        self.journal.append(("discard", self.guest.pid))


@pytest.fixture
def fake_launch(monkeypatch):
    """launch_guest replaced: each launch gets the next pid; `gate` holds launches back,
    `fail` makes the next ones raise."""
    state = {"next": 100, "journal": [], "gate": None, "fail": 0}

    async def launch(cfg, replica):
        if state["gate"] is not None:
            await state["gate"].wait()
        if state["fail"]:
            state["fail"] -= 1
            raise RuntimeError("qemu-system-x86_64: no such file")
        state["next"] += 1
        state["journal"].append(("launch", state["next"]))
        return FakeLaunched(state["next"], state["journal"])

    monkeypatch.setattr(standby_mod, "launch_guest", launch)
    return state


async def settle(standby: StandbyGuest):
    task = standby._task
    if task is not None:
        await asyncio.wait({task})


def test_one_launch_per_session_and_a_take_hands_it_over(fake_launch):
    async def main():
        sg = StandbyGuest(None, None)
        for _ in range(3):
            sg.want("s1")
            await settle(sg)
        assert sg.describe() == {"state": "ready", "session": "s1", "qemu_pid": 101}
        launched = await sg.take("s1")
        assert launched.guest.pid == 101
        assert await sg.take("s1") is None  # taken once
        assert sg.describe() == {"state": "none"}
        assert fake_launch["journal"] == [("launch", 101)]
    asyncio.run(main())


def test_a_new_session_discards_the_old_standby_before_launching(fake_launch):
    async def main():
        sg = StandbyGuest(None, None)
        sg.want("s1")
        await settle(sg)
        sg.want("s2")
        await settle(sg)
        # The old QEMU is gone before the new one takes the TAP and sockets.
        assert fake_launch["journal"] == [("launch", 101), ("discard", 101), ("launch", 102)]
        assert await sg.take("s1") is None  # the replica moved on: not this standby
        assert fake_launch["journal"][-1] == ("discard", 102)
    asyncio.run(main())


def test_a_take_during_the_launch_waits_for_it(fake_launch):
    async def main():
        fake_launch["gate"] = asyncio.Event()
        sg = StandbyGuest(None, None)
        sg.want("s1")
        assert sg.describe()["state"] == "launching"
        taking = asyncio.create_task(sg.take("s1"))
        await asyncio.sleep(0)
        assert not taking.done()
        fake_launch["gate"].set()
        launched = await asyncio.wait_for(taking, 5)
        assert launched.guest.pid == 101
    asyncio.run(main())


def test_a_failed_launch_is_reported_and_retried_with_backoff(fake_launch, monkeypatch):
    async def main():
        fake_launch["fail"] = 1
        sg = StandbyGuest(None, None)
        sg.want("s1")
        await settle(sg)
        assert sg.describe() == {"state": "failed", "session": "s1",
                                 "error": "RuntimeError: qemu-system-x86_64: no such file"}
        sg.want("s1")  # within the backoff: no new attempt
        assert sg.describe()["state"] == "failed" and fake_launch["journal"] == []
        assert await sg.take("s1") is None  # a failover launches its own
        monkeypatch.setattr(standby_mod, "RETRY_FIRST_S", 0.0)
        sg.want("s1")
        await settle(sg)
        assert sg.describe()["state"] == "ready"
    asyncio.run(main())


def test_a_standby_whose_qemu_died_is_relaunched_after_the_backoff(fake_launch, monkeypatch):
    async def main():
        sg = StandbyGuest(None, None)
        sg.want("s1")
        await settle(sg)
        sg._task.result().guest.proc.returncode = -9
        assert sg.describe()["state"] == "gone"
        sg.want("s1")  # noticed; relaunch waits out the backoff
        assert sg.describe()["state"] == "gone"
        monkeypatch.setattr(sg, "_retry_at", 0.0)
        sg.want("s1")
        await settle(sg)
        assert sg.describe() == {"state": "ready", "session": "s1", "qemu_pid": 102}
        assert ("discard", 101) in fake_launch["journal"]
        await sg.close()
        assert fake_launch["journal"][-1] == ("discard", 102)
    asyncio.run(main())


@pytest.mark.integration
def test_a_standby_qemu_never_writes_the_replica_ram(make_pair, tmp_path):
    """QEMU waiting for incoming state on the replica's RAM file while the daemon keeps
    writing that file: it must not write a byte of it, at start-up or at exit."""
    pair = make_pair()
    cfg = load(pair.config)
    replica = Replica(tmp_path / "replica")
    rng = np.random.default_rng(7)
    replica.ram_file.write_bytes(rng.integers(0, 256, cfg.memory_bytes, dtype=np.uint8).tobytes())
    written = rng.integers(0, 256, cfg.memory_bytes, dtype=np.uint8).tobytes()

    async def main():
        launched = await launch_guest(cfg, replica)
        try:
            assert await launched.guest.status() == "inmigrate"
            # The daemon commits a checkpoint into the file QEMU has mapped (shared):
            # in place, never truncating it under QEMU.
            with open(replica.ram_file, "r+b") as f:
                f.write(written)
                f.flush()
                os.fsync(f.fileno())
            assert await launched.guest.status() == "inmigrate"
            await launched.guest.quit()  # QEMU's own exit path (QMP quit), not a SIGKILL
            assert launched.guest.proc.returncode == 0
        finally:
            await launched.discard()
        assert not launched.alive()
    asyncio.run(main())
    assert hashlib.sha256(replica.ram_file.read_bytes()).digest() == hashlib.sha256(written).digest()


@pytest.mark.integration
def test_forwarded_ports_are_bound_once_their_old_holder_lets_go(make_pair, tmp_path):
    """User networking on a one-host pair: at activation the lost primary's QEMU may
    still hold the forwarded port for a moment. Binding waits for it, within bounds."""
    import socket

    from remus.common.qemu import GuestError

    pair = make_pair()
    cfg = load(pair.config)
    replica = Replica(tmp_path / "replica")
    replica.ram_file.write_bytes(bytes(cfg.memory_bytes))
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", pair.http_port))
    holder.listen()

    async def main():
        launched = await launch_guest(cfg, replica)
        try:
            with pytest.raises(GuestError, match=f"host forward tcp:127.0.0.1:{pair.http_port}"):
                await launched.guest.add_host_forwards(timeout=0.3)
            asyncio.get_running_loop().call_later(0.3, holder.close)
            await launched.guest.add_host_forwards(timeout=10)
            probe = socket.create_connection(("127.0.0.1", pair.http_port), timeout=5)
            probe.close()  # QEMU's slirp listens there now
        finally:
            holder.close()
            await launched.discard()
    asyncio.run(main())
