"""Heartbeat channel: real heartbeat processes on loopback, CURVE keys, free ports."""
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq.auth

from remus.common.heartbeat import (
    Heartbeat, HeartbeatConfig, HeartbeatError, Link, LinkDown, LinkUp, PeerBack, PeerBeat,
    PeerLost, generate_keys)

BIN = Path(sys.executable).parent
INTERVAL_MS = 100
MISS = 5
LOG = "remus.heartbeat"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    generate_keys(d, ["primary", "backup", "intruder"])
    return d


@pytest.fixture(autouse=True)
def heartbeat_logs(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    return caplog


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def addr(port):
    return f"127.0.0.1:{port}"


def config(keys, node, peer, links, key=None, peer_key=None, **kw):
    return HeartbeatConfig(node=node, peer_node=peer, links=links,
                           secret_key=keys / f"{key or node}.key_secret",
                           peer_public_key=keys / f"{peer_key or peer}.key",
                           interval_ms=INTERVAL_MS, miss=MISS, **kw)


def pair(keys, n_links=2):
    ports = free_ports(2 * n_links)
    a = [addr(p) for p in ports[:n_links]]
    b = [addr(p) for p in ports[n_links:]]
    primary = config(keys, "primary", "backup", [Link(x, y) for x, y in zip(a, b)])
    backup = config(keys, "backup", "primary", [Link(y, x) for x, y in zip(a, b)])
    return Heartbeat(primary), Heartbeat(backup)


class Watch:
    """Collects a Heartbeat's events with the time they reached the daemon side."""

    def __init__(self, hb):
        self.hb = hb
        self.events = []
        self.task = asyncio.create_task(self._run())

    async def _run(self):
        async for ev in self.hb.events():
            self.events.append((time.monotonic(), ev))

    def of(self, cls):
        return [(t, ev) for t, ev in self.events if isinstance(ev, cls)]

    async def wait(self, pred, timeout, after=0.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, ev in self.events:
                if t > after and pred(ev):
                    return t, ev
            await asyncio.sleep(0.01)
        raise AssertionError(f"no matching event within {timeout} s; got {self.events}")


async def until(cond, timeout, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout} s")


def all_up(hb):
    v = hb.view()
    return v.peer_alive and all(lk["up"] for lk in v.links)


def run(coro, timeout=35):
    asyncio.run(asyncio.wait_for(coro, timeout))


def log_lines(caplog, *words):
    return [r.getMessage() for r in caplog.records
            if r.name.startswith(LOG) and all(w in r.getMessage() for w in words)]


# --------------------------------------------------------------------------


def test_pair_sees_each_other_on_two_links_carries_state_and_detects_loss(keys, caplog):
    async def scenario():
        a, b = pair(keys)
        a.update("primary", "s-1", 3, 42)           # before start: the first beats carry it
        await asyncio.gather(a.start(), b.start())
        wa, wb = Watch(a), Watch(b)
        try:
            await until(lambda: all_up(a) and all_up(b), 10, "both links up on both nodes")
            _, back = await wb.wait(lambda e: isinstance(e, PeerBack), 1)
            assert back.first and back.beat["node"] == "primary"
            assert back.beat["generation"] == 3 and back.beat["epoch"] == 42
            assert {lk for _, e in wb.of(LinkUp) for lk in [e.link]} == \
                {lk.name for lk in b.cfg.links}
            # beats carry what the daemon says from now on
            a.update("primary", "s-1", 4, 43)
            _, beat = await wb.wait(lambda e: isinstance(e, PeerBeat)
                                    and e.beat["generation"] == 4, 3)
            assert beat.beat["epoch"] == 43 and beat.beat["role"] == "primary"
            a.update("primary", "s-1", 4, 44)       # epoch only: in the view within a beat or two
            await until(lambda: b.view().last_beat["epoch"] == 44, 3, "epoch 44 seen")
            await until(lambda: all(lk["rtt_ms"] is not None for lk in b.view().links), 3, "rtt")
            v = b.view()
            for lk in v.links:
                assert lk["up"] and lk["missed"] <= 2 and 0 <= lk["rtt_ms"] < 1000
                assert lk["last_beat_age_ms"] < 3 * INTERVAL_MS
            assert not wb.of(PeerLost) and not wb.of(LinkDown)

            # the primary stops: lost on both links, then PeerLost, after miss intervals
            t0 = time.monotonic()
            await a.stop()
            t_lost, lost = await wb.wait(lambda e: isinstance(e, PeerLost), 5)
            elapsed = t_lost - t0
            assert elapsed < 3.0, elapsed
            # the last beat left at most one interval before stop(); never sooner than miss
            assert lost.silent_ms >= MISS * INTERVAL_MS
            assert elapsed >= (MISS - 1) * INTERVAL_MS / 1000, elapsed
            downs = wb.of(LinkDown)
            assert len(downs) == 2 and all(t <= t_lost and e.missed >= MISS for t, e in downs)
            assert not b.view().peer_alive
            assert log_lines(caplog, "beat-lost", f"missed={MISS}", "node=backup")
            assert log_lines(caplog, "peer-lost", "node=backup")
            print(f"\nPeerLost {elapsed * 1000:.0f} ms after stop(), silent_ms={lost.silent_ms:.0f}")
        finally:
            await a.stop()
            await b.stop()
        await asyncio.gather(wa.task, wb.task)   # events() ends after stop()
    run(scenario())


def test_one_link_cut_is_link_down_not_peer_lost(keys):
    async def scenario():
        a, b = pair(keys)
        await asyncio.gather(a.start(), b.start())
        wb = Watch(b)
        try:
            await until(lambda: all_up(a) and all_up(b), 10, "both links up")
            cut = b.cfg.links[1].name
            a.mute_link(1)                       # the primary stops sending on link 1
            t0 = time.monotonic()
            t_down, down = await wb.wait(lambda e: isinstance(e, LinkDown), 5)
            assert down.link == cut and down.missed >= MISS
            assert (MISS - 1) * INTERVAL_MS / 1000 <= t_down - t0 < 3.0
            await asyncio.sleep(3 * INTERVAL_MS / 1000)
            v = b.view()
            assert v.peer_alive and v.links[0]["up"] and not v.links[1]["up"]
            assert v.links[1]["missed"] >= MISS
            assert not wb.of(PeerLost)
            assert all_up(a)                     # the other direction of link 1 still works
            a.mute_link(1, False)
            await wb.wait(lambda e: isinstance(e, LinkUp) and e.link == cut, 3, after=t_down)
            await until(lambda: all_up(b), 3, "link 1 back")
            assert not wb.of(PeerLost)
        finally:
            await a.stop()
            await b.stop()
    run(scenario())


def test_update_never_blocks_and_a_dead_heartbeat_process_is_reported(keys):
    async def scenario():
        a, b = pair(keys, n_links=1)
        await asyncio.gather(a.start(), b.start())
        wa = Watch(a)
        try:
            await until(lambda: all_up(a) and all_up(b), 10, "link up")
            os.kill(a.pid, signal.SIGSTOP)      # a stuck heartbeat process: the pipe fills up
            try:
                t0 = time.monotonic()
                for epoch in range(20_000):
                    a.update("primary", "s-2", 7, epoch)
                assert time.monotonic() - t0 < 2.0
            finally:
                os.kill(a.pid, signal.SIGCONT)
            await until(lambda: (b.view().last_beat or {}).get("epoch") == 19_999, 5,
                        "the last update reaches the peer")
            os.kill(a.pid, signal.SIGKILL)      # the heartbeat process dies under the daemon
            with pytest.raises(HeartbeatError, match="exited unexpectedly"):
                await asyncio.wait_for(wa.task, 5)
            assert not a.view().running
        finally:
            await a.stop()
            await b.stop()
    run(scenario())


def test_unknown_key_and_wrong_node_are_rejected_logged_and_never_the_peer(keys, caplog):
    """backup has three links: to the real primary; to an intruder with its own key
    (claiming the name "primary"); to a node holding the primary's key but named
    "intruder"."""
    async def scenario():
        p = free_ports(6)
        b_links = [Link(addr(p[0]), addr(p[1])), Link(addr(p[2]), addr(p[3])),
                   Link(addr(p[4]), addr(p[5]))]
        b = Heartbeat(config(keys, "backup", "primary", b_links))
        a = Heartbeat(config(keys, "primary", "backup", [Link(addr(p[1]), addr(p[0]))]))
        y = Heartbeat(config(keys, "primary", "backup", [Link(addr(p[3]), addr(p[2]))],
                             key="intruder"))
        z = Heartbeat(config(keys, "intruder", "backup", [Link(addr(p[5]), addr(p[4]))],
                             key="primary"))
        a.update("primary", "real", 1, 1)
        y.update("primary", "fake", 9, 9)
        z.update("primary", "fake", 9, 9)
        await asyncio.gather(*(h.start() for h in (a, b, y, z)))
        wb = Watch(b)
        try:
            await until(lambda: b.view().peer_alive, 10, "backup sees the primary")
            l0, l1, l2 = (lk.name for lk in b_links)
            # the intruder's SUB is refused by the backup's ZAP handler, and logged
            await until(lambda: log_lines(caplog, "peer-rejected", f"link={l1}",
                                          'reason="unknown peer key"', "node=backup"),
                        8, "unknown key logged")
            # beats from a node with the primary's key but another name are dropped, logged
            await until(lambda: log_lines(caplog, "peer-rejected", f"link={l2}",
                                          'reason="unexpected node"', "peer_node=intruder"),
                        8, "unexpected node logged")
            await asyncio.sleep(MISS * INTERVAL_MS / 1000)
            v = b.view()
            assert [lk["up"] for lk in v.links] == [True, False, False]
            assert v.links[1]["rejected"] >= 1 and v.links[2]["rejected"] >= 1
            assert v.last_beat["session"] == "real"
            assert {e.link for _, e in wb.of(LinkUp)} == {l0}
            for _, e in wb.of(PeerBack) + wb.of(PeerBeat):
                assert e.beat["session"] == "real" and e.beat["node"] == "primary"
            # the intruder never gets the backup's beats (its key is refused)
            assert not y.view().peer_alive and y.view().links[0]["last_beat_age_ms"] is None
            assert log_lines(caplog, "link-auth-failed", "node=primary")
        finally:
            await asyncio.gather(*(h.stop() for h in (a, b, y, z)))
    run(scenario())


def test_beats_stay_on_time_while_the_daemon_holds_the_gil(keys):
    """The reason for the separate process: the daemon's own thread is held up for
    seconds (a control ticker thread in this process shows it), the beats are not."""
    busy_s = 4.0

    async def scenario():
        a, b = pair(keys)
        await asyncio.gather(a.start(), b.start())
        wa, wb = Watch(a), Watch(b)
        try:
            await until(lambda: all_up(a) and all_up(b), 10, "both links up")
            a.reset_jitter()
            b.reset_jitter()
            await asyncio.sleep(3 * INTERVAL_MS / 1000)
            assert a.jitter()["window"] <= 5

            ticks = []
            stop = threading.Event()

            def ticker():
                nxt = time.monotonic()
                while not stop.is_set():
                    nxt += INTERVAL_MS / 1000
                    time.sleep(max(0.0, nxt - time.monotonic()))
                    ticks.append(time.monotonic())

            old = sys.getswitchinterval()
            sys.setswitchinterval(1.0)          # hand the GIL over only once a second
            th = threading.Thread(target=ticker)
            th.start()
            try:
                end = time.monotonic() + busy_s
                x = 0
                while time.monotonic() < end:   # pure Python, CPU-bound, loop blocked
                    for i in range(2000):
                        x = (x + i * i) % 1000003
            finally:
                sys.setswitchinterval(old)
                stop.set()
                th.join()
            await asyncio.sleep(3 * INTERVAL_MS / 1000)

            thread_dev = max(abs((t2 - t1) * 1000 - INTERVAL_MS) for t1, t2 in zip(ticks, ticks[1:]))
            ja, jb = a.jitter(), b.jitter()
            print(f"\nin-process thread ticker: max deviation {thread_dev:.1f} ms")
            print(f"primary send jitter: {ja}")
            print(f"backup send jitter:  {jb}")
            assert thread_dev > INTERVAL_MS, "the busy loop did not hold the GIL"
            for j in (ja, jb):
                assert j["window"] >= busy_s * 1000 / INTERVAL_MS * 0.8
                assert j["p99_ms"] < INTERVAL_MS / 2
                assert j["late_skips"] == 0
                assert j["receive"]["max_ms"] < (MISS - 1) * INTERVAL_MS
            assert not (wa.of(LinkDown) or wa.of(PeerLost) or wb.of(LinkDown) or wb.of(PeerLost))
        finally:
            await a.stop()
            await b.stop()
    run(scenario())


AS_NOBODY = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from remus.common.heartbeat import Heartbeat, HeartbeatConfig, HeartbeatError, Link
    links = [Link(a, b) for a, b in zip(sys.argv[3::2], sys.argv[4::2])]
    cfg = HeartbeatConfig(node="primary", peer_node="backup", links=links,
                          secret_key=Path(sys.argv[1]), peer_public_key=Path(sys.argv[2]),
                          interval_ms=100, miss=5)
    try:
        asyncio.run(Heartbeat(cfg).start())
    except HeartbeatError as exc:
        print(exc)
        sys.exit(3)
    print("started")
""")


def start_as_nobody(secret: bytes, links) -> str:
    """Start a heartbeat as user nobody with a secret key file it may not read (mode 0,
    in a directory it may enter); the HeartbeatError it reports."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        key = Path(d) / "secret.key_secret"
        key.write_bytes(secret)
        key.chmod(0)
        args = [str(key), str(Path(d) / "peer.key")]
        for lk in links:
            args += [lk.local, lk.peer]
        r = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                            sys.executable, "-c", AS_NOBODY, *args],
                           capture_output=True, text=True, timeout=30, env=os.environ.copy())
    assert r.returncode == 3, f"exit {r.returncode}: {r.stdout}{r.stderr}"
    return r.stdout


def test_start_errors_are_clear(keys, tmp_path):
    async def scenario():
        p = free_ports(2)
        links = [Link(addr(p[0]), addr(p[1]))]
        missing = config(keys, "primary", "backup", links)
        missing.secret_key = tmp_path / "nope.key_secret"
        with pytest.raises(HeartbeatError, match="nope.key_secret does not exist"):
            await Heartbeat(missing).start()

        public_only = config(keys, "primary", "backup", links)
        public_only.secret_key = keys / "primary.key"
        with pytest.raises(HeartbeatError, match="holds no secret key"):
            await Heartbeat(public_only).start()

        garbage = tmp_path / "garbage.key"
        garbage.write_text("not a key\n")
        bad_peer = config(keys, "primary", "backup", links)
        bad_peer.peer_public_key = garbage
        with pytest.raises(HeartbeatError, match="garbage.key"):
            await Heartbeat(bad_peer).start()

        unreadable = tmp_path / "secret.key_secret"
        unreadable.write_bytes((keys / "primary.key_secret").read_bytes())
        unreadable.chmod(0)
        if os.geteuid() != 0:
            cfg = config(keys, "primary", "backup", links)
            cfg.secret_key = unreadable
            with pytest.raises(HeartbeatError, match="cannot be read"):
                await Heartbeat(cfg).start()
        else:  # root reads any file: ask as nobody instead
            error = start_as_nobody((keys / "primary.key_secret").read_bytes(), links)
            assert "cannot be read" in error and "Permission denied" in error, error

        with socket.socket() as busy:             # the local address is taken
            busy.bind(("127.0.0.1", p[0]))
            busy.listen()
            hb = Heartbeat(config(keys, "primary", "backup", links))
            with pytest.raises(HeartbeatError, match=f"cannot bind 127.0.0.1:{p[0]}"):
                await hb.start()
            assert not hb.view().running
    run(scenario())


def test_config_is_checked():
    base = dict(links=[Link("127.0.0.1:1", "127.0.0.1:2")], secret_key="s", peer_public_key="p")
    with pytest.raises(ValueError, match="both"):
        HeartbeatConfig(node="a", peer_node="a", **base)
    with pytest.raises(ValueError, match="HOST:PORT"):
        HeartbeatConfig(node="a", peer_node="b", **{**base, "links": [Link("x", "127.0.0.1:2")]})
    with pytest.raises(ValueError, match="interval_ms"):
        HeartbeatConfig(node="a", peer_node="b", interval_ms=0, **base)
    cfg = HeartbeatConfig(node="a", peer_node="b", **{**base, "links": [("[::1]:5", "[::1]:6")]})
    assert cfg.links[0].name == "[::1]:5->[::1]:6" and isinstance(cfg.secret_key, Path)


def test_heartbeat_process_exits_when_the_daemon_dies(keys, tmp_path):
    p = free_ports(2)
    script = tmp_path / "daemon.py"          # no __main__ guard: spawn must not re-run it
    script.write_text(textwrap.dedent(f"""
        import asyncio, os, signal
        from remus.common.heartbeat import Heartbeat, HeartbeatConfig, Link
        async def main():
            hb = Heartbeat(HeartbeatConfig(node="primary", peer_node="backup",
                links=[Link("127.0.0.1:{p[0]}", "127.0.0.1:{p[1]}")],
                secret_key="{keys}/primary.key_secret", peer_public_key="{keys}/backup.key"))
            await hb.start()
            print(hb.pid, flush=True)
            await asyncio.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == -signal.SIGKILL, r.stderr
    pid = int(r.stdout.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            gone = True
        if gone:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the heartbeat process outlived its daemon")


def test_remusctl_keys_generate(tmp_path):
    d = tmp_path / "keys"
    r = subprocess.run([str(BIN / "remusctl"), "keys", "generate", "--dir", str(d),
                        "--node", "primary", "--node", "backup"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for name in ("primary", "backup"):
        public, secret = d / f"{name}.key", d / f"{name}.key_secret"
        assert str(public) in r.stdout and str(secret) in r.stdout
        assert secret.stat().st_mode & 0o777 == 0o600
        assert public.stat().st_mode & 0o077 == 0o044
        pub, sec = zmq.auth.load_certificate(secret)
        assert sec is not None and zmq.auth.load_certificate(public) == (pub, None)
    again = subprocess.run([str(BIN / "remusctl"), "keys", "generate", "--dir", str(d),
                            "--node", "primary"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr
    h = subprocess.run([str(BIN / "remusctl"), "keys", "generate", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "--node" in h.stdout and "0600" in h.stdout


BEAT = {"node": "primary", "role": "primary", "session": "s", "generation": 1, "epoch": 1,
        "seq": 1, "sent_at": 1.0}


@pytest.mark.parametrize("extra, accepted", [
    (b"", True),
    (b"\xa1x" + b"\x91" * 2 + b"\xc0", False),       # a beat is flat
    (b"\xa1x" + b"\x91" * 1000 + b"\xc0", False),    # ~1000 deep: unpacks, then recursion
    (b"\xa1x" + b"\x91" * 3000 + b"\xc0", False),    # deeper than msgpack's own stack
], ids=["flat", "2-deep", "1000-deep", "3000-deep"])
def test_a_nested_beat_is_dropped_as_malformed(keys, caplog, extra, accepted):
    """The beat loop's handling of one received beat, without sockets."""
    from types import SimpleNamespace

    from remus.common.heartbeat.runner import Runner
    cfg = config(keys, "backup", "primary", [Link(addr(1), addr(2))])
    outbox = SimpleNamespace(put=lambda msg: None)
    runner = Runner(cfg, ("backup", "", 1, 0), None, outbox, os.getpid())
    packed = msgpack.packb(BEAT)
    data = bytes([packed[0] + (1 if extra else 0)]) + packed[1:] + extra
    runner.on_beat(0, data)
    assert (runner.last_beat == BEAT) is accepted
    assert runner.links[0].rejected == (0 if accepted else 1)
    if not accepted:
        assert log_lines(caplog, "peer-rejected", 'reason="malformed beat"')
