import asyncio
import select
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from remus.common import sdnotify

UNITS = Path(__file__).parent.parent / "systemd"
BIN = Path(sys.executable).parent


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["remus-primary@.service", "remus-backup@.service"])
def test_unit_files_verify(tmp_path, unit):
    # The installed units run /usr/local/bin/remus-*; point them at this checkout's.
    text = (UNITS / unit).read_text().replace("/usr/local/bin/", f"{BIN}/")
    (tmp_path / unit).write_text(text)
    instance = unit.replace("@.", "@demo.")
    r = subprocess.run(["systemd-analyze", "verify", f"./{instance}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr + r.stdout


def service_settings(unit: str) -> dict[str, list[str]]:
    """The [Service] section's settings, each key with its values in order."""
    out: dict[str, list[str]] = {}
    section = None
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("unit", ["remus-primary@.service", "remus-backup@.service"])
def test_units_keep_the_state_private_and_allow_enough_descriptors(unit):
    settings = service_settings(unit)
    assert settings["UMask"] == ["0077"]
    assert settings["StateDirectory"] == ["remus"]
    assert settings["StateDirectoryMode"] == ["0700"]
    assert settings["LimitNOFILE"] == ["65536"]


def test_notify_reaches_the_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1", "STATUS=protecting")
        assert server.recv(1024) == b"READY=1\nSTATUS=protecting"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1")


def test_keep_alive_only_while_healthy(tmp_path, monkeypatch):
    """Each turn of keep_alive asks healthy() once and sends WATCHDOG=1 only on a yes:
    at every question we count what reached the socket so far. Healthy for 3 turns,
    unhealthy for 5 (several watchdog intervals: not one keep-alive), healthy again
    for 2."""
    answers = [True] * 3 + [False] * 5 + [True] * 2
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "20000")  # a turn every 10 ms
        got: list[bytes] = []
        seen_at_turn: list[int] = []  # datagrams received before turn i asked
        lock = threading.Lock()
        done = threading.Event()

        def drain() -> None:
            with lock:
                while True:
                    try:
                        got.append(server.recv(64))
                    except BlockingIOError:
                        break
                if len(got) > sum(answers):
                    done.set()  # more keep-alives than healthy answers: stop here

        def reader() -> None:  # a full socket would block the sender (and the loop)
            while not done.is_set():
                select.select([server], [], [], 0.05)
                drain()

        def healthy() -> bool:
            drain()  # a datagram socket delivers at send: all earlier ones are here
            seen_at_turn.append(len(got))
            if len(seen_at_turn) > len(answers):
                done.set()
                return False
            return answers[len(seen_at_turn) - 1]

        async def run():
            task = asyncio.create_task(sdnotify.keep_alive(healthy))
            try:
                await asyncio.to_thread(done.wait, 10)
            finally:
                task.cancel()

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        try:
            asyncio.run(run())
        finally:
            done.set()
            thread.join(5)
        drain()
    assert set(got) <= {b"WATCHDOG=1"}, got
    assert len(got) <= sum(answers), (f"{len(got)} keep-alives for {sum(answers)} healthy "
                                      f"answers: sent while unhealthy (counts at each "
                                      f"question: {seen_at_turn})")
    assert len(seen_at_turn) > len(answers), \
        f"keep_alive asked healthy() only {len(seen_at_turn)} times in 10 s"
    # Turn i asks after turns 0..i-1 sent (or not): one keep-alive per healthy turn.
    expected = [sum(answers[:i]) for i in range(len(answers) + 1)]
    assert seen_at_turn == expected, (seen_at_turn, expected)
    assert len(got) == 5
