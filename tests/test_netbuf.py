import pytest

from remus.common.netbuf import FRAME_OVERHEAD, EpochQueue


def test_frames_leave_only_when_their_epoch_commits():
    q = EpochQueue(cap_bytes=1 << 20)
    q.hold(b"a1")
    q.hold(b"a2")
    q.seal(1)
    q.hold(b"b1")          # produced during epoch 2
    assert q.release(0) == []
    assert q.release(1) == [b"a1", b"a2"]
    q.seal(2)
    q.hold(b"c1")
    q.seal(3)
    assert q.release(3) == [b"b1", b"c1"]   # in order, across epochs
    assert q.held_frames == 0 and q.held_bytes == 0


def test_release_all_keeps_order_and_includes_the_open_epoch():
    q = EpochQueue(1 << 20)
    q.hold(b"1")
    q.seal(5)
    q.hold(b"2")
    assert q.release_all() == [b"1", b"2"]
    assert q.held_frames == 0 and q.released_frames == 2


def test_cap_drops_new_frames_and_counts_them():
    q = EpochQueue(cap_bytes=10 + 2 * FRAME_OVERHEAD)
    assert q.hold(b"x" * 6)
    assert not q.hold(b"y" * 6)
    assert q.dropped_frames == 1 and q.held_bytes == 6 + FRAME_OVERHEAD
    q.seal(1)
    q.release(1)
    assert q.hold(b"y" * 6)  # room again once released


def test_tiny_frames_cannot_hold_many_times_the_cap():
    cap = 1 << 20
    q = EpochQueue(cap)
    held = sum(q.hold(b"xy") for _ in range(100_000))
    # What 2-byte frames really cost (bytes object and list slot) counts against the cap.
    assert held * FRAME_OVERHEAD <= cap and held >= cap // (FRAME_OVERHEAD + 2) - 1
    assert q.dropped_frames == 100_000 - held


def test_barriers_must_advance():
    q = EpochQueue(100)
    q.seal(2)
    with pytest.raises(ValueError):
        q.seal(2)


def test_plug_is_chosen_only_where_the_kernel_has_it(tmp_path):
    from remus.common.config import load
    from remus.common.qemu import GuestError
    from remus.common.nicgroup import make_netbuf
    from remus.common.netbuf import UserspaceNetBuffer
    from remus.common.netbuf_plug import PlugNetBuffer, plug_supported

    def cfg(buffer):
        p = tmp_path / f"{buffer}.toml"
        p.write_text(f'[guest]\nname = "g"\nkernel = "k"\n[network]\nmode = "bridged"\nbridge = "br0"\n'
                     f'buffer = "{buffer}"\n[primary]\naddress = "127.0.0.1"\n'
                     f'[backup]\naddress = "127.0.0.1:1"\n[tls]\ninsecure = true\n')
        return load(p)

    def only(group):
        (buffer,) = group.buffers
        return buffer

    ok, why = plug_supported()
    assert isinstance(only(make_netbuf(cfg("userspace"), tmp_path, True)), UserspaceNetBuffer)
    auto = only(make_netbuf(cfg("auto"), tmp_path, True))
    assert isinstance(auto, PlugNetBuffer if ok else UserspaceNetBuffer)
    if ok:
        assert isinstance(only(make_netbuf(cfg("plug"), tmp_path, True)), PlugNetBuffer)
    else:
        with pytest.raises(GuestError, match="sch_plug"):
            make_netbuf(cfg("plug"), tmp_path, True)
    # --no-net never holds output, whatever the buffer setting.
    assert not only(make_netbuf(cfg("auto"), tmp_path, False)).buffering_enabled


def test_carry_over_keeps_held_frames_for_the_next_session():
    q = EpochQueue(1 << 20)
    q.hold(b"a")
    q.seal(57)
    q.hold(b"b")
    q.carry_over()       # session lost, guest paused: epochs restart at 1
    q.seal(1)            # the new session's first barrier
    assert q.release(1) == [b"a", b"b"]


def test_replayed_frames_reach_the_guest_nic_stream_framed_and_in_order(tmp_path):
    import asyncio
    import struct

    from remus.common.netbuf import UserspaceNetBuffer

    async def main():
        nb = UserspaceNetBuffer("unused", tmp_path / "net.sock", 1 << 20)
        assert nb.to_guest([b"x" * 60]) == 0  # no QEMU connected: nothing to hand over
        server = await asyncio.start_unix_server(nb._serve_guest, path=str(nb.socket_path))
        try:
            reader, writer = await asyncio.open_unix_connection(str(nb.socket_path))
            await nb.wait_connected(5)
            frames = [bytes([i]) * (60 + i) for i in range(3)]
            assert nb.to_guest(frames) == 3
            got = []
            for _ in frames:
                (length,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), 5))
                got.append(await asyncio.wait_for(reader.readexactly(length), 5))
            assert got == frames
            writer.close()
        finally:
            server.close()
    asyncio.run(main())


def _with_guest_stream(tmp_path, body):
    """Run `body(nb, reader, writer)` with a UserspaceNetBuffer whose guest side is a
    unix socket connection standing in for QEMU."""
    import asyncio

    from remus.common.netbuf import UserspaceNetBuffer

    async def main():
        nb = UserspaceNetBuffer("unused", tmp_path / "net.sock", 1 << 20)
        server = await asyncio.start_unix_server(nb._serve_guest, path=str(nb.socket_path))
        try:
            reader, writer = await asyncio.open_unix_connection(str(nb.socket_path))
            await nb.wait_connected(5)
            await body(nb, reader, writer)
            writer.close()
        finally:
            server.close()
    asyncio.run(main())


def test_frames_shorter_than_an_ethernet_header_are_counted_not_sent(tmp_path):
    import asyncio
    import struct

    async def body(nb, reader, writer):
        sent = []
        nb._write_tap = sent.append
        for frame in (b"ab", b"x" * 13, b"y" * 60):
            writer.write(struct.pack(">I", len(frame)) + frame)
        await writer.drain()
        for _ in range(100):
            if sent:
                break
            await asyncio.sleep(0.01)
        assert sent == [b"y" * 60] and nb.runt_frames == 2
    _with_guest_stream(tmp_path, body)


def test_input_for_a_guest_that_does_not_read_is_capped(tmp_path):
    """The guest (QEMU) never reads its stream: frames from the wire beyond INBOUND_CAP
    are dropped and counted, not queued without bound, and not copied to the backup."""
    import os

    from remus.common import netbuf

    async def body(nb, reader, writer):
        r, w = os.pipe()
        os.set_blocking(r, False)
        nb._tap_fd = r
        copied = []
        nb.inbound_listener = copied.extend
        frame = b"z" * 1500
        for _ in range(20_000):  # 30 MB of input; the pipe holds a few frames at a time
            os.write(w, frame)
            nb._from_wire()
        buffered = nb._to_guest.transport.get_write_buffer_size()
        assert buffered <= netbuf.INBOUND_CAP + 64 * (len(frame) + 4)
        assert nb.inbound_dropped > 10_000
        assert len(copied) + nb.inbound_dropped == 20_000
        os.close(r)
        os.close(w)
        nb._tap_fd = -1
    _with_guest_stream(tmp_path, body)
