"""QemuGuest's QMP connection against a minimal QMP server on a Unix socket: closing
it leaves no task of its own pending (no GC timing involved)."""
import asyncio
import json
from types import SimpleNamespace

from remus.common.qemu import QemuGuest


async def fake_qmp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Greets, then answers every command with an empty success; never sends an event."""
    writer.write(json.dumps({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                                 "package": ""}, "capabilities": []}}).encode()
                 + b"\r\n")
    await writer.drain()
    decoder, buf = json.JSONDecoder(), ""
    try:
        while chunk := await reader.read(4096):  # QMP is a JSON stream, not lines
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except json.JSONDecodeError:
                    break  # the rest is still on its way
                buf = buf.lstrip()[end:]
                reply = {"return": {}}
                if "id" in msg:
                    reply["id"] = msg["id"]
                writer.write(json.dumps(reply).encode() + b"\r\n")
                await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


def test_closing_qmp_leaves_no_task_pending(tmp_path):
    """A discarded standby once left its SHUTDOWN listener pending forever (the loop
    later said 'Task was destroyed but it is pending', whenever the GC got to it)."""
    async def scenario():
        sock = tmp_path / "qmp.sock"
        server = await asyncio.start_unix_server(fake_qmp, str(sock))
        cfg = SimpleNamespace(guest=SimpleNamespace(name="demo", accel="tcg"))
        guest = QemuGuest(cfg, SimpleNamespace(qmp_socket=sock, run_dir=tmp_path))
        before = asyncio.all_tasks()
        await asyncio.wait_for(guest._connect_qmp(timeout=10), 15)
        started = asyncio.all_tasks() - before
        assert started, "connecting started no task: this test no longer sees the listener"
        await asyncio.wait_for(guest.close_qmp(), 15)
        await asyncio.sleep(0)  # let cancelled tasks run their last step
        pending = [t for t in started if not t.done()]
        assert not pending, f"left pending after close_qmp: {pending}"
        server.close()
        await server.wait_closed()
    asyncio.run(scenario())
