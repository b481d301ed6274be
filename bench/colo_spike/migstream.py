"""Minimal reader of QEMU 7.2's migration stream and COLO checkpoint protocol.

Spike 17 prototype, not project code. Formats from QEMU 7.2 migration/savevm.c,
migration/ram.c, migration/colo.c and qapi/migration.json (COLOMessage).
"""
from __future__ import annotations

import json
import socket
import struct
import time

# savevm.c section types
QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

# ram.c record flags (low bits of the be64 address word)
RAM_SAVE_FLAG_FULL = 0x01
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
PAGE = 4096
PAGE_MASK = ~(PAGE - 1) & 0xFFFFFFFFFFFFFFFF

# qapi/migration.json COLOMessage, sent as be32
CHECKPOINT_READY, CHECKPOINT_REQUEST, CHECKPOINT_REPLY, VMSTATE_SEND, VMSTATE_SIZE, \
    VMSTATE_RECEIVED, VMSTATE_LOADED = range(7)
COLO_NAMES = ["checkpoint-ready", "checkpoint-request", "checkpoint-reply", "vmstate-send",
              "vmstate-size", "vmstate-received", "vmstate-loaded"]


class StreamError(RuntimeError):
    pass


class Reader:
    """Buffered exact reads from a socket; counts bytes."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0
        self.total = 0

    def _fill(self, n: int) -> None:
        while len(self.buf) - self.pos < n:
            if self.pos > (1 << 20):
                del self.buf[:self.pos]
                self.pos = 0
            chunk = self.sock.recv(max(1 << 20, n))
            if not chunk:
                raise StreamError("stream closed")
            self.buf += chunk

    def read(self, n: int) -> bytes:
        self._fill(n)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        self.total += n
        return out

    def u8(self) -> int:
        self._fill(1)
        v = self.buf[self.pos]
        self.pos += 1
        self.total += 1
        return v

    def be16(self) -> int:
        return struct.unpack(">H", self.read(2))[0]

    def be32(self) -> int:
        return struct.unpack(">I", self.read(4))[0]

    def be64(self) -> int:
        return struct.unpack(">Q", self.read(8))[0]

    def pending(self) -> int:
        return len(self.buf) - self.pos

    def drain_available(self, timeout: float) -> bytes:
        """Everything that arrives until the peer goes quiet for `timeout` s."""
        out = bytearray(self.buf[self.pos:])
        self.total += len(out)
        self.buf = bytearray()
        self.pos = 0
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    break
                out += chunk
                self.total += len(chunk)
        except socket.timeout:
            pass
        finally:
            self.sock.settimeout(None)
        return bytes(out)


class RamSink:
    """Where RAM records go: page index -> bytes of block `main`, others counted."""

    def __init__(self, main_block: str, write_page=None):
        self.main = main_block
        self.write_page = write_page  # f(page_index, bytes|None for zero)
        self.blocks: dict[str, int] = {}
        self.block: str | None = None
        self.reset()

    def reset(self):
        self.pages = 0
        self.zero_pages = 0
        self.other_pages = 0
        self.indices: list[int] = []


def read_ram_records(r: Reader, sink: RamSink) -> None:
    """ram_load_precopy: records until RAM_SAVE_FLAG_EOS.

    RAM_SAVE_FLAG_CONTINUE refers to the block of the previous record even across
    sections and checkpoints (ram.c keeps last_sent_block; the loader a static), so
    the current block lives in the sink.
    """
    block = sink.block
    while True:
        word = r.be64()
        flags = word & ~PAGE_MASK
        addr = word & PAGE_MASK
        if flags & RAM_SAVE_FLAG_MEM_SIZE:
            total = addr
            seen = 0
            while seen < total:
                name = r.read(r.u8()).decode()
                length = r.be64()
                sink.blocks[name] = length
                seen += length
            continue
        if flags & RAM_SAVE_FLAG_EOS:
            return
        if flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE):
            if not flags & RAM_SAVE_FLAG_CONTINUE:
                block = sink.block = r.read(r.u8()).decode()
            elif block is None:
                raise StreamError("RAM_SAVE_FLAG_CONTINUE without a previous block")
            if flags & RAM_SAVE_FLAG_ZERO:
                fill = r.u8()
                if fill:
                    raise StreamError(f"zero page with fill {fill}")
                data = None
                sink.zero_pages += 1
            else:
                data = r.read(PAGE)
                sink.pages += 1
            if block == sink.main:
                idx = addr // PAGE
                sink.indices.append(idx)
                if sink.write_page is not None:
                    sink.write_page(idx, data)
            else:
                sink.other_pages += 1
            continue
        raise StreamError(f"unsupported RAM flags {flags:#x} at {r.total}")


def read_section_header(r: Reader, kind: int, sections: dict[int, str]) -> tuple[int, str]:
    sid = r.be32()
    if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
        name = r.read(r.u8()).decode()
        instance = r.be32()
        version = r.be32()
        sections[sid] = name
        r.last_header = (bytes([kind]) + struct.pack(">I", sid) + bytes([len(name)])
                         + name.encode() + struct.pack(">II", instance, version))
        return sid, name
    return sid, sections[sid]


def read_footer(r: Reader, sid: int) -> None:
    if r.u8() != QEMU_VM_SECTION_FOOTER or r.be32() != sid:
        raise StreamError(f"bad section footer for section {sid}")


def read_initial(r: Reader, sink: RamSink, log=print) -> dict:
    """The first (full) migration, up to where QEMU waits for CHECKPOINT_READY.

    RAM sections are parsed; the device sections that follow have no length, so
    everything after the first device section up to the (quiet) end is kept raw.
    """
    info = {"sections": {}, "commands": []}
    if r.be32() != QEMU_VM_FILE_MAGIC or r.be32() != QEMU_VM_FILE_VERSION:
        raise StreamError("not a QEMU migration stream")
    header_start = r.total
    sections: dict[int, str] = {}
    while True:
        kind = r.u8()
        if kind == QEMU_VM_CONFIGURATION:
            name = r.read(r.be32())
            info["configuration"] = name.decode()
            # keep the exact bytes for building a loadable device-state file later
            info["configuration_record"] = bytes([QEMU_VM_CONFIGURATION]) + \
                struct.pack(">I", len(name)) + name
        elif kind == QEMU_VM_COMMAND:
            cmd, ln = r.be16(), r.be16()
            info["commands"].append((cmd, r.read(ln)))
        elif kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END,
                      QEMU_VM_SECTION_FULL):
            start = r.total - 1
            sid, name = read_section_header(r, kind, sections)
            if name == "ram":
                read_ram_records(r, sink)
                read_footer(r, sid)
            else:
                # first device section: the rest is device state + EOF (+ vmdesc)
                t = time.monotonic()
                rest = r.drain_available(0.3)
                info["device_tail"] = r.last_header + rest
                info["first_device_section"] = name
                info["sections"] = sections
                info["tail_wait_s"] = time.monotonic() - t
                return info
        elif kind == QEMU_VM_EOF:
            info["sections"] = sections
            return info
        else:
            raise StreamError(f"unknown section type {kind:#x} at {r.total}")


def split_vmdesc(tail: bytes) -> tuple[bytes, dict | None]:
    """Device bytes up to and including QEMU_VM_EOF, and the JSON vmdesc if present."""
    # vmdesc: 0x06, be32 len, json; it ends the stream
    for i in range(len(tail) - 6, -1, -1):
        if tail[i] == QEMU_VM_VMDESCRIPTION:
            ln = struct.unpack(">I", tail[i + 1:i + 5])[0]
            if i + 5 + ln == len(tail) and tail[i - 1] == QEMU_VM_EOF:
                try:
                    return tail[:i], json.loads(tail[i + 5:])
                except ValueError:
                    continue
    return tail, None


def send_msg(sock: socket.socket, msg: int, value: int | None = None) -> None:
    data = struct.pack(">I", msg)
    if value is not None:
        data += struct.pack(">Q", value)
    sock.sendall(data)


def expect_msg(r: Reader, msg: int) -> None:
    got = r.be32()
    if got != msg:
        raise StreamError(f"expected COLO {COLO_NAMES[msg]}, got {got}")


def read_live_state(r: Reader, sink: RamSink, sections: dict[int, str]) -> None:
    """qemu_savevm_live_state: END sections of the iterable devices (RAM), then EOF."""
    while True:
        kind = r.u8()
        if kind == QEMU_VM_EOF:
            return
        if kind not in (QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART):
            raise StreamError(f"unexpected section type {kind:#x} in live state")
        sid, name = read_section_header(r, kind, sections)
        if name != "ram":
            raise StreamError(f"unexpected live section {name}")
        read_ram_records(r, sink)
        read_footer(r, sid)


def device_state_file(config_record: bytes, blob: bytes) -> bytes:
    """A stream `migrate-incoming` accepts: header, configuration, COLO's device blob.

    COLO's qemu_save_device_state() omits magic and version while in COLO state;
    the blob is FULL sections + QEMU_VM_EOF.
    """
    return struct.pack(">II", QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION) + config_record + blob
