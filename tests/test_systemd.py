import asyncio
import shutil
import socket
import subprocess
import sys
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
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "40000")  # keep-alives every 20 ms
        healthy = [True]

        async def run():
            task = asyncio.create_task(sdnotify.keep_alive(lambda: healthy[0]))
            await asyncio.sleep(0.1)
            healthy[0] = False
            await asyncio.sleep(0.05)
            task.cancel()

        asyncio.run(run())
        got = []
        server.settimeout(0.2)
        try:
            while True:
                got.append(server.recv(64))
        except socket.timeout:
            pass
    assert 2 <= len(got) <= 8 and set(got) == {b"WATCHDOG=1"}
