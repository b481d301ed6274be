"""What the backup receives from the primary, checked and turned into events, and
the frames it answers with.

Limits on the backup besides the frame limits in ``wire``: the decoded size of
one pages or device frame (``raw_len``) is at most ``max_payload`` too (the
encoder keeps pages frames at or below ``MAX_FRAME_RAW`` decoded bytes). Before
the handshake, the first frame is refused on its header alone (nothing of its
payload read) unless it is a hello announcing at most ``HANDSHAKE_MAX_PAYLOAD``
bytes: an unauthenticated peer cannot make the backup take in 64 MiB.

Disk data is handed out frame by frame as ``DiskWritten`` and ``DiskZeroed``
events, in stream order. Streaming (``BackupProtocol(stream=True)``, what the
daemon uses): pages are not gathered into the staged checkpoint either but handed
out the same way as ``PagesReceived``, from the ``events()`` generator; the daemon applies or stages each before it asks for
the next, so a later frame's xor base is what the daemon holds. Memory then
stays at one frame whatever the size of the checkpoint.

A ``bye`` is accepted between checkpoints and inside one (the open checkpoint
is then abandoned without error): either way the backup gets ``PeerBye``.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import zstandard

from remus.common.protocol.checksum import new_hasher
from remus.common.protocol.events import (CheckpointStaged, DiskWritten, DiskZeroed, InputReceived,
                                          PagesReceived, PeerBye, PeerHandover, Send,
                                          SessionOpened, StagedCheckpoint)
from remus.common.protocol.messages import (CODECS, DISK_EXTENT, DISK_SECTOR, FROM_PRIMARY,
                                            HANDSHAKE_MAX_PAYLOAD, INPUT_LEN, LE_U32,
                                            MAX_DISK_SIZE, MAX_EPOCH, MAX_FRAME_RAW,
                                            MAX_INPUT_COUNT, MAX_INPUT_FRAME, MAX_NICS,
                                            MIN_INPUT_FRAME, PROTOCOL_VERSION, SESSION_RE,
                                            ZERO_EXTENT, check_fields, check_int)
from remus.common.wire import DEFAULT_MAX_PAYLOAD, Frame, FrameDecoder, ProtocolError, encode_frame


class _Open:
    """A checkpoint between begin and end."""

    __slots__ = ("epoch", "full", "taken_at", "hasher", "received", "last_index", "precopy",
                 "full_pages", "idx_parts", "page_parts", "device", "disk_synced",
                 "disk_at", "bytes")

    def __init__(self, epoch: int, full: bool, taken_at: float, npages: int, page_size: int,
                 disk_synced: bool, precopy: bool, stream: bool):
        self.disk_synced = disk_synced
        self.precopy = precopy
        self.disk_at = (-1, 0)  # (disk, end of its last extent): frames come in that order
        self.bytes = 0  # payload bytes received
        self.epoch = epoch
        self.full = full
        self.taken_at = taken_at
        self.hasher = new_hasher(epoch, full, taken_at, precopy)
        self.received = 0
        self.last_index = -1
        # Lazily committed by the OS: costs nothing until written.
        self.full_pages = np.empty((npages, page_size), dtype=np.uint8) if full and not stream \
            else None
        self.idx_parts: list[np.ndarray] = []
        self.page_parts: list[np.ndarray] = []
        self.device: bytes | None = None


class BackupProtocol:
    """What the backup receives from the primary, turned into events.

    ``read_previous(indices)`` must return the committed replica's pages at
    ``indices`` as a (n, page_size) uint8 array; it is used to undo xor. A
    checkpoint staged but not yet acknowledged (``ack``) is overlaid on top of
    it, so xor decoding is right even when one ``receive`` call carries the end
    of one checkpoint and pages of the next before the daemon got to commit.
    The returned array is never modified.
    """

    def __init__(
        self,
        fingerprint: str,
        ram_size: int,
        page_size: int,
        read_previous: Callable[[np.ndarray], np.ndarray],
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        disks: int = 0,
        generation: int = 0,
        stream: bool = False,
        media: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if not isinstance(fingerprint, str):
            raise TypeError("fingerprint must be a str")
        self.fingerprint = fingerprint
        self.stream = stream  # hand out page and disk data per frame (see the module doc)
        # The highest generation known to have held the guest: a primary below it is stale.
        self.generation = check_int("generation", generation, 0, MAX_EPOCH)
        self._last_input_epoch = 0
        self._consistent_staged = False  # a non-pre-copy checkpoint was staged
        self.disks = disks  # how many mirrored disks the guest has
        self.media = tuple(media)  # (file, "SIZE:SHA256") of each read-only medium here
        self.disk_sizes: tuple[int, ...] = ()
        self.page_size = check_int("page_size", page_size, 1)
        self.ram_size = check_int("ram_size", ram_size, page_size)
        if ram_size % page_size:
            raise ValueError(f"ram_size {ram_size} is not a multiple of page_size {page_size}")
        self.npages = ram_size // page_size
        if self.npages > 2**32:
            raise ValueError("more pages than uint32 page indices can address")
        self.max_payload = max_payload
        self._read_previous = read_previous
        self._decoder = FrameDecoder(max_payload, header_check=self._check_header)
        self._headers = 0  # frame headers seen
        self._dctx = zstandard.ZstdDecompressor()
        self.session: str | None = None
        self.state = "await-hello"  # idle, in-checkpoint, bye, closed, failed
        self._open: _Open | None = None
        self._last_staged: int | None = None
        self._unacked: list[StagedCheckpoint] = []
        # The device state of the last checkpoint staged, in stream order, acked or
        # not: the base of the next device frame if it is a delta (the encoder's too).
        self._last_device: bytes | None = None
        self._error: str | None = None

    # -- public API ---------------------------------------------------------

    def receive(self, data: bytes) -> list:
        """All the events of `data` (see ``events``)."""
        return list(self.events(data))

    def events(self, data: bytes) -> Iterator:
        """The events of `data`, one frame's worth at a time: a streaming daemon
        applies or stages each data event before it takes the next."""
        if self._error is not None:
            raise ProtocolError(f"protocol is unusable after an earlier error ({self._error})")
        if self.state == "closed":
            raise ProtocolError("receive() after close()")
        handshake = self.state == "await-hello"
        try:
            for frame in self._decoder.feed(data):
                handshake = self.state == "await-hello"
                events: list = []
                self._handle(frame, events)
                yield from events
        except ProtocolError as exc:
            self._fail(str(exc))
            if handshake and exc.reply is None:
                exc.reply = encode_frame({"t": "reject", "reason": str(exc),
                                          "generation": self.generation})
            raise
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise

    @property
    def receiving(self) -> tuple[int, int] | None:
        """(epoch, payload bytes so far) of the checkpoint being received, if any."""
        return (self._open.epoch, self._open.bytes) if self._open is not None else None

    def progress(self, epoch: int, received: int) -> bytes:
        """A progress frame: the daemon tells the primary a big checkpoint is flowing."""
        return encode_frame({"t": "progress", "epoch": check_int("epoch", epoch, 1, MAX_EPOCH),
                             "bytes": check_int("bytes", received, 0)})

    def ack(self, epoch: int) -> bytes:
        """The ack frame for a staged checkpoint the daemon has committed.

        Acks go in staging order; normally ``epoch`` is the last staged one.
        """
        check_int("epoch", epoch, 1, MAX_EPOCH)
        if not self._unacked:
            raise ValueError(f"ack({epoch}): no staged checkpoint is awaiting an ack")
        if self._unacked[0].epoch != epoch:
            raise ValueError(
                f"ack({epoch}): the staged checkpoint awaiting an ack is epoch "
                f"{self._unacked[0].epoch}"
            )
        self._unacked.pop(0)
        return encode_frame({"t": "ack", "epoch": epoch})

    def close(self) -> None:
        """EOF from the primary. Raises ProtocolError if the stream was cut off
        in a frame or inside a checkpoint (which is then discarded)."""
        if self.state in ("closed", "failed"):
            return
        open_cp = self._open
        self._open = None
        self.state = "closed"
        try:
            self._decoder.close()
        except ProtocolError as exc:
            if open_cp is not None:
                raise ProtocolError(
                    f"{exc}; inside checkpoint {open_cp.epoch}, which was discarded"
                ) from None
            raise
        if open_cp is not None:
            raise ProtocolError(
                f"stream ended inside checkpoint {open_cp.epoch} (no end frame after "
                f"{open_cp.received} pages); the partial checkpoint was discarded"
            )

    # -- internals ----------------------------------------------------------

    def _fail(self, message: str) -> None:
        self._error = message
        self._open = None
        self.state = "failed"

    def _check_header(self, header: dict, payload_len: int) -> None:
        """The first frame, before a byte of its payload is read: a hello, and small.
        Until the hello is checked nothing vouches for the peer (over plain TCP it may
        be anyone), so it must not make this side read or hold a bulk payload."""
        self._headers += 1
        if self._headers > 1:
            return
        t = header["t"]
        if t != "hello":
            raise ProtocolError(f"the first message must be 'hello', got {t!r:.40}")
        if payload_len > HANDSHAKE_MAX_PAYLOAD:
            raise ProtocolError(f"hello with a payload of {payload_len} bytes; at most "
                                f"{HANDSHAKE_MAX_PAYLOAD} before the handshake")

    def _handle(self, frame: Frame, events: list) -> None:
        version = frame.header.get("version")
        if (self.state == "await-hello" and frame.header.get("t") == "hello"
                and type(version) is int and version != PROTOCOL_VERSION):
            # Another version may have other fields: name the version, not a field.
            raise ProtocolError(
                f"peer speaks protocol version {version!r:.20}, this backup speaks {PROTOCOL_VERSION}")
        t, f = check_fields(frame, "primary", FROM_PRIMARY)
        state = self.state
        if state == "await-hello":
            assert t == "hello"  # _check_header refused any other first frame
            events.extend(self._hello(f))
            return
        if state == "bye":
            raise ProtocolError(f"{t!r} message after bye")
        if t == "hello":
            raise ProtocolError("second hello in one session")
        if t == "bye":
            self._open = None  # a checkpoint in flight is abandoned on purpose
            self.state = "bye"
            events.append(PeerBye(f["reason"]))
            return
        if t == "input":
            events.append(self._input(f, frame.payload))
            return
        if t == "handover":
            if state != "idle" or self._last_staged != f["epoch"] or not self._consistent_staged:
                raise ProtocolError(
                    f"handover after epoch {f['epoch']}, but the last consistent checkpoint "
                    f"staged is {self._last_staged if self._consistent_staged else 'none'}"
                    f"{' and a checkpoint is open' if state != 'idle' else ''}")
            self.state = "bye"
            events.append(PeerHandover(f["epoch"], f["reason"]))
            return
        if state == "idle":
            if t != "begin":
                raise ProtocolError(f"{t!r} message outside a checkpoint (expected begin)")
            self._begin(f)
            return
        # in-checkpoint
        cp = self._open
        assert cp is not None
        if t == "begin":
            raise ProtocolError(
                f"begin of epoch {f['epoch']} while checkpoint {cp.epoch} is still open (no end)"
            )
        cp.bytes += len(frame.payload)
        if t == "pages":
            self._pages(cp, f, frame.payload, events)
        elif t == "disk":
            self._disk(cp, f, frame.payload, events)
        elif t == "zero":
            self._zero(cp, f, frame.payload, events)
        elif t == "device":
            self._device(cp, f, frame.payload)
        else:
            events.append(CheckpointStaged(self._end(cp, f)))

    def _hello(self, f: dict) -> list:
        # The version was checked in _handle, before the other fields.
        if f["fingerprint"] != self.fingerprint:
            raise ProtocolError(
                f"configuration fingerprint mismatch: primary has {f['fingerprint']!r:.80}, "
                f"this backup has {self.fingerprint!r} (the VM configs on the two hosts differ)"
            )
        if f["ram_size"] != self.ram_size:
            raise ProtocolError(
                f"ram_size mismatch: primary has {f['ram_size']}, this backup has {self.ram_size}"
            )
        if f["page_size"] != self.page_size:
            raise ProtocolError(
                f"page_size mismatch: primary has {f['page_size']}, this backup has {self.page_size}"
            )
        disk_sizes = tuple(f["disk_sizes"])
        if len(disk_sizes) != self.disks:
            raise ProtocolError(
                f"disk mismatch: primary mirrors {len(disk_sizes)} disk(s), this backup expects "
                f"{self.disks}")
        for i, size in enumerate(disk_sizes):
            if not DISK_SECTOR <= size <= MAX_DISK_SIZE or size % DISK_SECTOR:
                raise ProtocolError(f"disk {i}: size {size} is not a whole number of sectors up "
                                    f"to 1 PiB")
        self._check_media(f["media"])
        if f["generation"] < max(self.generation, 1):
            raise ProtocolError(
                f"stale primary: it holds the guest at generation {f['generation']}, but "
                f"generation {self.generation} has held it since (a failover happened); "
                f"the old copy must not be protected")
        self.disk_sizes = disk_sizes
        session = f["session"]
        if not SESSION_RE.fullmatch(session):
            raise ProtocolError(f"session must be 32 lowercase hex digits, got {session!r:.80}")
        self.session = session
        self.state = "idle"
        welcome = encode_frame({"t": "welcome", "version": PROTOCOL_VERSION, "session": session,
                                "generation": self.generation})
        return [SessionOpened(session, self.ram_size, self.page_size, disk_sizes), Send(welcome)]

    def _check_media(self, theirs: list[str]) -> None:
        """Read-only media are not replicated: both hosts must hold the same content."""
        if len(theirs) != len(self.media):
            raise ProtocolError(f"read-only media mismatch: primary has {len(theirs)}, this "
                                f"backup {len(self.media)}")
        for i, (mine, (name, digest)) in enumerate(zip(theirs, self.media)):
            if mine != digest:
                raise ProtocolError(
                    f"read-only medium #{i + 1} ({name} on this backup) differs between the "
                    f"hosts: primary has size:sha256 {mine:.80}, this backup {digest}; copy the "
                    f"same file to both hosts")

    def _input(self, f: dict, payload: bytes) -> InputReceived:
        after, count = f["after_epoch"], f["count"]
        newest = max(self._last_staged or 0, self._open.epoch if self._open else 0)
        if not self._last_input_epoch <= after <= newest + 1:
            raise ProtocolError(
                f"input after epoch {after}: expected {self._last_input_epoch}..{newest + 1} "
                f"(input comes in order, at most one barrier ahead of the checkpoints)")
        if not 1 <= count <= MAX_INPUT_COUNT:
            raise ProtocolError(f"input: count {count} is out of range (1..{MAX_INPUT_COUNT})")
        frames, view, pos = [], memoryview(payload), 0
        for _ in range(count):
            if pos + 4 > len(view):
                raise ProtocolError(f"input: payload ends inside frame {len(frames) + 1} of {count}")
            (n,) = INPUT_LEN.unpack_from(view, pos)
            pos += 4
            if not MIN_INPUT_FRAME <= n <= MAX_INPUT_FRAME or pos + n > len(view):
                raise ProtocolError(f"input: frame {len(frames) + 1} of {count} has a bad length {n}")
            frames.append(bytes(view[pos:pos + n]))
            pos += n
        if pos != len(view):
            raise ProtocolError(f"input: {len(view) - pos} bytes after the last of {count} frames")
        if not 0 <= f["nic"] < MAX_NICS:
            raise ProtocolError(f"input: NIC {f['nic']} is out of range (0..{MAX_NICS - 1})")
        self._last_input_epoch = after
        return InputReceived(after, frames, f["nic"])

    def _begin(self, f: dict) -> None:
        epoch = f["epoch"]
        if not 1 <= epoch <= MAX_EPOCH:
            raise ProtocolError(f"begin: epoch {epoch} is out of range (1..{MAX_EPOCH})")
        if self._last_staged is None:
            if not f["full"]:
                raise ProtocolError(
                    f"begin: the first checkpoint of a session must be full (epoch {epoch} is not)"
                )
        elif epoch != self._last_staged + 1:
            raise ProtocolError(
                f"begin: epoch {epoch} does not follow the last staged epoch {self._last_staged}"
            )
        if f["disk_synced"] and not self.disks:
            raise ProtocolError(f"begin: epoch {epoch} claims a synced disk in a session without one")
        if f["precopy"] and self._consistent_staged:
            raise ProtocolError(f"begin: pre-copy round {epoch} after the first consistent checkpoint")
        if f["precopy"] and f["disk_synced"]:
            raise ProtocolError(f"begin: pre-copy round {epoch} claims a synced disk")
        self._open = _Open(epoch, f["full"], f["taken_at"], self.npages, self.page_size,
                           f["disk_synced"], f["precopy"], self.stream)
        self.state = "in-checkpoint"

    def _decode(self, what: str, codec: str, data: memoryview, raw_len: int) -> bytes | memoryview:
        if codec == "none":
            if len(data) != raw_len:
                raise ProtocolError(
                    f"{what}: uncompressed data is {len(data)} bytes, raw_len says {raw_len}"
                )
            return data
        if codec != "zstd":
            raise ProtocolError(f"{what}: unknown codec {codec!r} (expected one of {CODECS})")
        try:
            declared = zstandard.frame_content_size(data)
        except Exception as exc:
            raise ProtocolError(f"{what}: not a zstd frame ({exc})") from None
        if declared != raw_len:
            shown = "no size" if declared < 0 else f"{declared} bytes"
            raise ProtocolError(
                f"{what}: zstd frame declares {shown}, raw_len says {raw_len}"
            )
        dobj = self._dctx.decompressobj()
        try:
            out = dobj.decompress(data)
        except Exception as exc:  # ZstdError, or anything else libzstd objects to
            raise ProtocolError(f"{what}: zstd data is corrupt ({exc})") from None
        # At the frame's end libzstd checks the declared size (raw_len): a frame short of
        # its end is the only way to come out with fewer bytes.
        if len(out) != raw_len or not dobj.eof:
            raise ProtocolError(
                f"{what}: zstd data decoded to {len(out)} bytes (frame incomplete), "
                f"raw_len says {raw_len}"
            )
        if dobj.unused_data:
            raise ProtocolError(
                f"{what}: {len(dobj.unused_data)} stray bytes after the zstd frame"
            )
        return out

    def _previous(self, idx: np.ndarray) -> np.ndarray:
        prev = self._read_previous(idx)
        shape = (len(idx), self.page_size)
        if not isinstance(prev, np.ndarray) or prev.dtype != np.uint8 or prev.shape != shape:
            raise TypeError(
                f"read_previous must return a uint8 array of shape {shape}, got "
                f"{getattr(prev, 'dtype', type(prev).__name__)} {getattr(prev, 'shape', '')}"
            )
        given = prev  # the caller's: never written to
        for sc in self._unacked:  # oldest first: later checkpoints win
            if not len(sc.indices):
                continue
            pos = np.searchsorted(sc.indices, idx)
            inside = pos < len(sc.indices)
            hit = np.zeros(len(idx), dtype=bool)
            hit[inside] = sc.indices[pos[inside]] == idx[inside]
            if hit.any():
                if prev is given:
                    prev = prev.copy()
                prev[hit] = sc.pages[pos[hit]]
        return prev

    def _pages(self, cp: _Open, f: dict, payload: bytes, events: list) -> None:
        count, codec, xor, raw_len = f["count"], f["codec"], f["xor"], f["raw_len"]
        ps = self.page_size
        what = f"pages frame in checkpoint {cp.epoch}"
        if cp.device is not None:
            raise ProtocolError(f"{what}: pages after the device frame")
        if cp.disk_at[0] >= 0:
            raise ProtocolError(f"{what}: pages after a disk frame")
        if not 1 <= count <= self.npages:
            raise ProtocolError(f"{what}: count {count} is out of range (1..{self.npages})")
        if 4 * count > len(payload):
            raise ProtocolError(
                f"{what}: count {count} needs {4 * count} index bytes, the payload has "
                f"only {len(payload)}"
            )
        if raw_len != count * ps:
            raise ProtocolError(
                f"{what}: raw_len {raw_len} is not count*page_size = {count * ps}"
            )
        if raw_len > self.max_payload:
            raise ProtocolError(
                f"{what}: raw_len {raw_len} exceeds the decoded-size limit of "
                f"{self.max_payload} bytes"
            )
        if xor and cp.full:
            raise ProtocolError(f"{what}: a full checkpoint must not use xor")
        view = memoryview(payload)
        idx_bytes = view[: 4 * count]
        idx_le = self._page_indices(cp, what, idx_bytes)
        data = self._decode(what, codec, view[4 * count :], raw_len)
        decoded = np.frombuffer(data, dtype=np.uint8).reshape(count, ps)
        idx = idx_le.astype(np.uint32)
        if cp.full_pages is not None:
            dest = cp.full_pages[cp.received : cp.received + count]
        else:
            dest = np.empty((count, ps), dtype=np.uint8)
        if xor:
            np.bitwise_xor(decoded, self._previous(idx), out=dest)
        else:
            dest[...] = decoded
        cp.hasher.update(idx_bytes)
        cp.hasher.update(dest)
        if self.stream:
            events.append(PagesReceived(cp.epoch, idx, dest))
        elif cp.full_pages is None:
            cp.idx_parts.append(idx)
            cp.page_parts.append(dest)
        cp.received += count
        cp.last_index = int(idx_le[-1])

    def _page_indices(self, cp: _Open, what: str, idx_bytes: memoryview) -> np.ndarray:
        """A pages frame's indices (uint32 LE), checked: strictly increasing, after the
        previous frame's, within the guest, and for a full checkpoint the next pages in order."""
        idx_le = np.frombuffer(idx_bytes, dtype=LE_U32)
        count = len(idx_le)
        first, last = int(idx_le[0]), int(idx_le[-1])
        if not bool(np.all(idx_le[1:] > idx_le[:-1])):
            raise ProtocolError(f"{what}: page indices are not strictly increasing")
        if first <= cp.last_index:
            raise ProtocolError(
                f"{what}: page index {first} does not follow the previous frame's last "
                f"index {cp.last_index}"
            )
        if last >= self.npages:
            raise ProtocolError(
                f"{what}: page index {last} is beyond the guest's {self.npages} pages"
            )
        if cp.full and (first != cp.received or last != cp.received + count - 1):
            raise ProtocolError(
                f"{what}: a full checkpoint must send pages 0..{self.npages - 1} in order, "
                f"got {first}..{last} after {cp.received} pages"
            )
        return idx_le

    def _disk(self, cp: _Open, f: dict, payload: bytes, events: list) -> None:
        count, codec, raw_len = f["count"], f["codec"], f["raw_len"]
        what = f"disk frame in checkpoint {cp.epoch}"
        size = DISK_EXTENT.itemsize * count
        if not 1 <= count or size > len(payload):
            raise ProtocolError(f"{what}: count {count} does not fit the {len(payload)}-byte payload")
        if not 1 <= raw_len <= min(self.max_payload, MAX_FRAME_RAW):
            raise ProtocolError(f"{what}: raw_len {raw_len} is out of range")
        view = memoryview(payload)
        table = np.frombuffer(view[:size], dtype=DISK_EXTENT)
        offs, lens = table["offset"], table["length"]
        if int(lens.sum()) != raw_len or (lens == 0).any():
            raise ProtocolError(f"{what}: extent lengths do not add up to raw_len {raw_len}")
        if (offs > MAX_DISK_SIZE).any():  # and so offs + lens stays far from overflowing
            raise ProtocolError(f"{what}: an extent is beyond any disk")
        self._place(cp, f["disk"], offs, offs + lens, what)
        data = self._decode(what, codec, view[size:], raw_len)
        chunk = bytes(data)  # no copy if it is bytes already
        cp.hasher.update(view[:size])
        cp.hasher.update(chunk)
        events.append(DiskWritten(cp.epoch, f["disk"], table.copy(), chunk))

    def _zero(self, cp: _Open, f: dict, payload: bytes, events: list) -> None:
        count = f["count"]
        what = f"zero frame in checkpoint {cp.epoch}"
        if count < 1 or ZERO_EXTENT.itemsize * count != len(payload):
            raise ProtocolError(f"{what}: count {count} does not match the {len(payload)}-byte payload")
        table = np.frombuffer(payload, dtype=ZERO_EXTENT)
        offs, lens = table["offset"], table["length"]
        if (lens == 0).any() or (offs > MAX_DISK_SIZE).any() or (lens > MAX_DISK_SIZE).any():
            raise ProtocolError(f"{what}: an extent is empty or beyond any disk")
        self._place(cp, f["disk"], offs, offs + lens, what)
        cp.hasher.update(payload)
        events.append(DiskZeroed(cp.epoch, f["disk"], table.copy()))

    def _place(self, cp: _Open, disk: int, offs: np.ndarray, ends: np.ndarray, what: str) -> None:
        """Extents of `disk` must fit it and follow the checkpoint's earlier ones (offsets
        and ends are unsigned and at most 2**51: the callers bound them)."""
        if not self.disks:
            raise ProtocolError(f"{what}: this session has no disk")
        if cp.device is not None:
            raise ProtocolError(f"{what}: disk data after the device frame")
        if not 0 <= disk < len(self.disk_sizes):
            raise ProtocolError(f"{what}: disk {disk} is not one of the "
                                f"{len(self.disk_sizes)} mirrored disks")
        last_disk, last_end = cp.disk_at
        start = last_end if disk == last_disk else 0
        if disk < last_disk or offs[0] < start or (offs[1:] < ends[:-1]).any():
            raise ProtocolError(f"{what}: extents are not sorted and disjoint")
        if int(ends[-1]) > self.disk_sizes[disk]:
            raise ProtocolError(f"{what}: an extent ends beyond disk {disk}'s "
                                f"{self.disk_sizes[disk]} bytes")
        cp.disk_at = (disk, int(ends[-1]))

    def _device(self, cp: _Open, f: dict, payload: bytes) -> None:
        codec, raw_len = f["codec"], f["raw_len"]
        what = f"device frame in checkpoint {cp.epoch}"
        if cp.precopy:
            raise ProtocolError(f"{what}: a pre-copy round carries no device state")
        if cp.device is not None:
            raise ProtocolError(f"{what}: second device frame")
        if not 1 <= raw_len <= self.max_payload:
            raise ProtocolError(f"{what}: raw_len {raw_len} is out of range (1..{self.max_payload})")
        base = self._delta_base(cp, what, raw_len) if f["delta"] else None
        data = self._decode(what, codec, memoryview(payload), raw_len)
        if base is None:
            device = bytes(data)  # no copy if it is bytes already
        else:
            device = np.bitwise_xor(np.frombuffer(data, np.uint8),
                                    np.frombuffer(base, np.uint8)).tobytes()
        # The raw state, never the delta: the checksum then also proves the base was right.
        cp.hasher.update(device)
        cp.device = device

    def _delta_base(self, cp: _Open, what: str, raw_len: int) -> bytes:
        """The device state a delta frame of `raw_len` bytes applies to."""
        if cp.full:
            raise ProtocolError(f"{what}: a full checkpoint's device state must be whole, "
                                f"not a delta")
        base = self._last_device
        if base is None:
            raise ProtocolError(f"{what}: a delta, but no earlier checkpoint of this session "
                                f"carried a device state")
        if len(base) != raw_len:
            raise ProtocolError(f"{what}: a delta of {raw_len} bytes against a previous device "
                                f"state of {len(base)} bytes")
        return base

    def _end(self, cp: _Open, f: dict) -> StagedCheckpoint:
        what = f"end of checkpoint {cp.epoch}"
        if f["epoch"] != cp.epoch:
            raise ProtocolError(f"{what}: end frame is for epoch {f['epoch']}")
        if cp.device is None and not cp.precopy:
            raise ProtocolError(f"{what}: no device frame")
        if f["pages"] != cp.received:
            raise ProtocolError(f"{what}: end says {f['pages']} pages, {cp.received} were received")
        if cp.full and cp.received != self.npages:
            raise ProtocolError(
                f"{what}: full checkpoint has {cp.received} of the guest's {self.npages} pages"
            )
        digest = cp.hasher.hexdigest()
        if f["checksum"] != digest:
            raise ProtocolError(
                f"{what}: checksum mismatch (sent {f['checksum']!r:.40}, computed {digest!r})"
            )
        if cp.full_pages is not None:
            indices = np.arange(self.npages, dtype=np.uint32)
            pages = cp.full_pages
        elif len(cp.idx_parts) == 1:
            indices, pages = cp.idx_parts[0], cp.page_parts[0]
        elif cp.idx_parts:
            indices = np.concatenate(cp.idx_parts)
            pages = np.concatenate(cp.page_parts)
        else:
            indices = np.empty(0, dtype=np.uint32)
            pages = np.empty((0, self.page_size), dtype=np.uint8)
        staged = StagedCheckpoint(cp.epoch, cp.full, cp.taken_at, indices, pages, cp.device or b"",
                                  cp.disk_synced, cp.precopy, cp.received)
        self._consistent_staged = self._consistent_staged or not cp.precopy
        self._last_device = cp.device  # None for a pre-copy round: no device state came yet
        self._open = None
        self._last_staged = cp.epoch
        self._unacked.append(staged)
        self.state = "idle"
        return staged
