"""The core guarantee with a real guest: after the primary dies, the backup resumes
the VM exactly at the last committed checkpoint."""
import json
import os
import re
import signal
import socket
import ssl
import stat
import time

import pytest

from remus.common.localpair import wait_until
from remus.common.protocol import CheckpointEncoder
from remus.common.wire import FrameDecoder

pytestmark = pytest.mark.integration

ACTIVATING = re.compile(r"\bWARNING activating ")


def assert_owner_only(pair) -> None:
    """What the daemons and their QEMUs made: directories 0700, files 0600 (sockets
    aside), the guest's RAM files included; and each host has its console log."""
    wrong = []
    for root in (pair.workdir / "primary", pair.workdir / "backup"):
        for path in [root, *root.rglob("*")]:
            mode = path.lstat().st_mode
            want = 0o700 if stat.S_ISDIR(mode) else 0o600
            if not stat.S_ISSOCK(mode) and stat.S_IMODE(mode) != want:
                wrong.append(f"{path}: {oct(stat.S_IMODE(mode))}")
    ram_files = [p for p in pair.ram_dir.rglob("*") if p.is_file()]
    for path in pair.ram_dir.rglob("*"):  # the primary's RAM file, in a directory of its own
        mode = path.lstat().st_mode
        want = 0o700 if stat.S_ISDIR(mode) else 0o600
        if stat.S_IMODE(mode) != want:
            wrong.append(f"{path}: {oct(stat.S_IMODE(mode))}")
    assert ram_files and not wrong, wrong
    for host in ("primary", "backup"):
        assert (pair.workdir / host / "run" / "serial.log").exists()


def test_activated_guest_resumes_the_last_committed_checkpoint(make_pair):
    # A long interval leaves a wide window after each commit in which the guest runs.
    pair = make_pair(interval_ms=1000)
    pair.protect()
    standby = pair.backup.wait_for(r"standby-guest-ready session=\S+ qemu_pid=(\d+)", 60).group(1)
    assert_owner_only(pair)
    base = int(pair.get("get"))
    seen = [int(pair.get("inc")) for _ in range(5)]
    assert seen == list(range(base + 1, base + 6))
    record = pair.committed_after(time.time())
    # Freeze checkpointing (the daemon, not the guest): what follows is never committed.
    pair.primary.signal(signal.SIGSTOP)
    try:
        uncommitted = [int(pair.get("inc", timeout=5)) for _ in range(3)]
    except OSError as exc:
        pytest.fail(f"guest did not answer with the primary daemon frozen ({exc}); was it paused?")
    assert uncommitted == [seen[-1] + 1, seen[-1] + 2, seen[-1] + 3]
    epoch_at_kill = pair.replica_record()["epoch"]
    assert epoch_at_kill >= record["epoch"]
    pair.primary.kill9()

    m = pair.backup.wait_for(r"activated epoch=(\d+)", 60)
    assert int(m.group(1)) == epoch_at_kill
    # The QEMU launched ahead of time ran the guest; none was started during the failover.
    assert re.search(rf"guest-prepared epoch={epoch_at_kill} qemu_pid={standby} standby=True",
                     pair.backup.log())
    after = int(wait_until(lambda: pair.try_get("inc"), 60, "the activated guest to answer"))
    # Not older: every committed increment survived. Not newer: nothing uncommitted did.
    assert after == seen[-1] + 1, (f"activated guest continued from {after - 1}, the last "
                                   f"committed value was {seen[-1]}, uncommitted ones {uncommitted}")
    assert pair.replica_record()["state"] == "activated"


def test_a_standby_guest_that_dies_is_replaced_and_the_failover_uses_the_new_one(make_pair):
    pair = make_pair()
    pair.protect()
    standby = r"standby-guest-ready session=\S+ qemu_pid=(\d+)"
    first = int(pair.backup.wait_for(standby, 60).group(1))
    mark = len(pair.backup.log())
    os.kill(first, signal.SIGKILL)
    pair.backup.wait_for(rf"standby-guest-gone session=\S+ qemu_pid={first} ", 15, start=mark)
    second = int(pair.backup.wait_for(standby, 30, start=mark).group(1))
    assert second != first
    value = int(pair.get("inc"))
    pair.committed_after(time.time())
    pair.primary.kill9()
    pair.backup.wait_for(rf"guest-prepared epoch=\d+ qemu_pid={second} standby=True", 60)
    after = int(wait_until(lambda: pair.try_get("inc"), 60, "the activated guest to answer"))
    assert after == value + 1
    # That discarding the dead standby leaves no QMP listener task pending is checked
    # in test_qemu_qmp.py: here the loop's "Task was destroyed but it is pending" would
    # show only if the garbage collector happened to reach the task before the end.


def test_primary_stopping_on_purpose_is_not_taken_over(make_pair):
    pair = make_pair(stream_timeout_ms=300, config_overrides={"primary": {"on_stop": "shutdown"}})
    pair.start_backup()
    pair.start_primary()
    pair.primary.wait_for(r"protecting epoch=\d+", 60)
    pair.primary.signal(signal.SIGTERM)
    pair.backup.wait_for(r"primary-bye", 15)
    assert pair.primary.proc.wait(15) == 0
    # Negative check, bounded: well past the stream timeout, still no activation.
    time.sleep(1.5)
    assert not ACTIVATING.search(pair.backup.log())
    assert pair.backup.proc.poll() is None


def test_bad_peers_are_refused_and_the_replica_is_untouched(make_pair):
    """Peers that get through TLS as the primary (its own certificate) but speak garbage
    or another protocol version; the refusals below TLS are in tests/test_tls_stream.py."""
    pair = make_pair(interval_ms=100)
    pair.start_backup()
    pair.start_primary()
    pair.primary.wait_for(r"protecting epoch=\d+", 60)
    before = pair.committed_after(0)

    # Garbage on the checkpoint stream.
    with authenticated_stream(pair) as s:
        s.sendall(b"\x00\x00\x00\x10\xff\xff\xff\xffGET / HTTP/1.0\r\n\r\n" * 4)
        while s.recv(4096):
            pass
    pair.backup.wait_for(r"stream-rejected", 10)

    # A peer speaking another protocol version gets a reject naming both versions.
    enc = CheckpointEncoder(4096)
    hello = enc.hello("0" * 32, "ab" * 16, 128 << 20)
    with authenticated_stream(pair) as s:
        s.sendall(_with_version(hello, 99))
        frames, dec = [], FrameDecoder()
        while not frames:
            data = s.recv(4096)
            if not data:
                break
            frames += dec.feed(data)
    assert frames and frames[0].header["t"] == "reject", frames
    assert "99" in frames[0].header["reason"]

    # The real session carried on, untouched: epochs still advance in the same session.
    after = pair.committed_after(time.time())
    assert after["session"] == before["session"]
    assert after["epoch"] > before["epoch"]
    assert not ACTIVATING.search(pair.backup.log())


def test_insecure_pair_warns_and_refuses_garbage(make_pair):
    pair = make_pair(interval_ms=100, insecure=True)
    pair.start_backup()
    pair.start_primary()
    pair.primary.wait_for(r"protecting epoch=\d+", 60)
    before = pair.committed_after(0)
    for daemon in (pair.backup, pair.primary):
        assert re.search(r"WARNING insecure-stream ", daemon.log()), daemon.tail()
    with socket.create_connection(("127.0.0.1", pair.stream_port), 5) as s:
        s.sendall(b"\x00\x00\x00\x10\xff\xff\xff\xffGET / HTTP/1.0\r\n\r\n" * 4)
        s.settimeout(10)
        while s.recv(4096):
            pass
    pair.backup.wait_for(r"stream-rejected", 10)
    after = pair.committed_after(time.time())
    assert after["session"] == before["session"] and after["epoch"] > before["epoch"]


def authenticated_stream(pair) -> ssl.SSLSocket:
    """A TLS connection to the backup's stream port presenting the primary's certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pair.keys / "ca.crt")
    ctx.load_cert_chain(pair.keys / "primary.crt", pair.keys / "primary.tls.key")
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", pair.stream_port), 5),
                        server_hostname="backup")
    s.settimeout(10)
    return s


def _with_version(hello: bytes, version: int) -> bytes:
    import msgpack
    import struct
    hlen, plen = struct.unpack(">II", hello[:8])
    header = msgpack.unpackb(hello[8:8 + hlen])
    header["version"] = version
    packed = msgpack.packb(header)
    return struct.pack(">II", len(packed), plen) + packed + hello[8 + hlen:]


def test_stopping_the_primary_hands_the_guest_over_without_fencing(make_pair):
    pair = make_pair()
    pair.protect()
    value = int(pair.get("inc"))
    pair.primary.signal(signal.SIGTERM)  # on_stop = "handover", the default
    pair.primary.wait_for(r"handed-over epoch=", 30)
    assert pair.primary.proc.wait(15) == 0
    pair.backup.wait_for(r"activating reason=\"the primary handed the guest over", 30)
    pair.backup.wait_for(r"failover-complete", 30)
    # That no fencing happens is checked where fencing is configured (test_restart.py).
    # The guest went on from where it stopped: nothing lost, nothing repeated.
    assert int(wait_until(lambda: pair.try_get("inc"), 60, "the guest on the backup")) == value + 1


def test_primary_that_may_have_been_taken_over_does_not_boot_a_second_copy(make_pair):
    pair = make_pair()
    state = pair.workdir / "primary"
    state.mkdir()
    (state / "primary.json").write_text(json.dumps({"generation": 1, "running": True}))
    refused = pair.start_primary()
    refused.wait_for(r"peer-unknown", 30)
    assert refused.proc.wait(15) == 6
    assert "qemu-launch" not in refused.log()
    forced = pair.start_primary("--force-start")  # the operator checked the backup host
    forced.wait_for(r"qemu-launch", 30)


def test_a_primary_below_the_known_generation_is_refused_in_the_handshake(make_pair):
    pair = make_pair()
    backup_dir = pair.workdir / "backup"
    backup_dir.mkdir()
    # This backup has seen the guest held at generation 3 (a failover happened).
    record = json.dumps({"format": 1, "generation": 3})
    (backup_dir / "replica.json").write_text(record)
    pair.start_backup()
    stale = pair.start_primary()  # generation 1: it never heard of the failover
    stale.wait_for(r"stood-down .*holder_generation=3", 60)
    assert stale.proc.wait(30) == 5
    assert "stale primary" in pair.backup.log()
    assert (backup_dir / "replica.json").read_text() == record, "the stale session touched the replica"


def test_torn_replica_is_refused(make_pair):
    pair = make_pair(config_overrides={"primary": {"on_stop": "shutdown"}})
    pair.start_backup()
    pair.start_primary()
    pair.primary.wait_for(r"protecting epoch=\d+", 60)
    pair.committed_after(0)
    pair.primary.signal(signal.SIGTERM)
    pair.backup.wait_for(r"primary-bye", 15)
    pair.backup.stop()
    record_file = pair.workdir / "backup" / "replica.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "state": "applying"}))
    takeover = pair.start_backup("--activate-now")
    m = takeover.wait_for(r"activation-refused reason=(.*)", 30)
    assert "torn" in m.group(1)
    assert takeover.proc.wait(15) == 4


def test_on_backup_loss_pause_keeps_the_guest_stopped_until_the_backup_returns(make_pair):
    pair = make_pair(interval_ms=200, config_overrides={"primary": {"on_backup_loss": "pause"}})
    pair.protect()
    value = int(pair.get("inc"))
    pair.backup.kill9()
    pair.primary.wait_for(r"guest-paused", 30)
    assert pair.try_get("get", timeout=2) is None, "the guest answered while paused"
    mark = len(pair.primary.log())
    pair.start_backup()  # the backup returns: a new session resumes the guest
    pair.primary.wait_for(r"guest-resumed", 60, start=mark)
    pair.primary.wait_for(r"protecting epoch=\d+", 60, start=mark)
    assert int(wait_until(lambda: pair.try_get("inc"), 30, "the resumed guest")) == value + 1
    # An operator can also resume it without a backup.
    mark = len(pair.primary.log())
    pair.backup.kill9()
    pair.primary.wait_for(r"guest-paused", 30, start=mark)
    pair.primary.signal(signal.SIGUSR1)
    pair.primary.wait_for(r"operator-resume detail=\"guest resumed", 30, start=mark)
    assert int(wait_until(lambda: pair.try_get("inc"), 30, "the guest resumed by the operator")) == value + 2


TUNED_WMEM = 4 << 20  # net_bench's tuned guest; this 128 MiB guest's own limit is 651 KiB


@pytest.fixture(scope="module")
def watched_pair(guest_image, tmp_path_factory):
    """One protected pair with metrics endpoints, shared by the tests below that only
    read its status and metrics: none of them may stop, kill or reconfigure it."""
    from remus.common.localpair import Pair, free_port

    ports = free_port(), free_port()
    pair = Pair(guest_image, tmp_path_factory.mktemp("watched"), interval_ms=100,
                append_extra=f"remus.tcp_wmem={TUNED_WMEM} tcp_cubic.hystart=0",
                config_overrides={"metrics": {"primary": f"127.0.0.1:{ports[0]}",
                                              "backup": f"127.0.0.1:{ports[1]}"}})
    try:
        pair.start_backup()
        pair.start_primary()
        pair.primary.wait_for(r"protecting epoch=\d+", 60)
        yield pair
    finally:
        pair.cleanup()


def test_status_reports_both_daemons_consistently(watched_pair):
    import json
    import subprocess
    import sys
    from pathlib import Path

    pair = watched_pair
    ctl = [str(Path(sys.executable).parent / "remusctl"), "status", "--config", str(pair.config)]

    def status():
        r = subprocess.run(ctl + ["--json"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    first = wait_until(lambda: (s := status())["primary"]["last_committed_epoch"] >= 5 and s, 30,
                       "five committed epochs")
    p, b = first["primary"], first["backup"]
    assert p["state"] == "protecting" and b["state"] == "standby"
    assert p["session"] == b["session"] and p["generation"] == b["generation"] == 1
    # remusctl asks the primary first: the backup commits an epoch before the primary
    # counts it, so the backup is never behind, and ahead only by what committed
    # between the two questions.
    assert p["last_committed_epoch"] <= b["last_committed_epoch"] <= p["last_committed_epoch"] + 10
    assert p["checkpoints_per_s"] > 0 and p["pause_p50_ms"] > 0 and p["bytes_per_s"] > 0
    assert p["heartbeat"] is None and b["fencing"]["configured"] is False
    assert p["pipeline"] == 1 and p["in_flight"] in (0, 1)
    later = wait_until(lambda: (s := status())["primary"]["last_committed_epoch"]
                       > p["last_committed_epoch"] and s, 30, "the epoch to advance")
    assert later["backup"]["last_committed_epoch"] >= b["last_committed_epoch"]
    text = subprocess.run(ctl, capture_output=True, text=True, timeout=30).stdout
    assert "PROTECTING" in text and "STANDBY" in text


def test_metrics_endpoints_are_scraped_and_parsed(watched_pair):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    endpoints = watched_pair.config_overrides["metrics"]

    def scrape(role):
        with urllib.request.urlopen(f"http://{endpoints[role]}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}

    def primary_after(n):
        m = scrape("primary")
        return m if m.get("remus_checkpoints_total") and m["remus_checkpoints_total"].value >= n else None

    m = wait_until(lambda: primary_after(5), 30, "five checkpoints in the metrics")
    assert m["remus_pause_seconds_count"].value >= 4
    assert m["remus_ack_latency_seconds_count"].value >= 4
    assert m["remus_checkpoint_bytes_total"].value > 0
    assert m["remus_state"].labels == {"role": "primary", "state": "protecting"}
    assert m["remus_checkpoints_in_flight"].value in (0, 1)
    later = wait_until(lambda: primary_after(m["remus_checkpoints_total"].value + 3), 30, "more checkpoints")
    assert later["remus_last_committed_epoch"].value > m["remus_last_committed_epoch"].value
    b = wait_until(lambda: (b := scrape("backup"))["remus_standby_guest"].labels["state"] == "ready"
                   and b, 30, "the backup's standby guest in the metrics")
    assert b["remus_state"].labels == {"role": "backup", "state": "standby"}
    assert b["remus_failovers_total"].value == 0


def test_the_guest_takes_its_tcp_settings_from_the_command_line(watched_pair):
    """remus.tcp_wmem= (the guest's init) and tcp_cubic.hystart= (the kernel), as
    net_bench's tuned guest boots; /cgi-bin/tcp reports what is in effect."""
    text = wait_until(lambda: watched_pair.try_get("tcp"), 120, "the guest's tcp settings")
    settings = dict(line.split(" ", 1) for line in text.splitlines())
    assert settings["tcp_wmem"].split() == ["4096", "16384", str(TUNED_WMEM)], text
    assert settings["hystart"] == "0" and settings["congestion_control"] == "cubic", text
