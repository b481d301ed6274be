"""The frames the primary sends: hello, checkpoints, pre-copy rounds, input, bye
and handover."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import zstandard

from remus.common.protocol.checksum import Hasher, new_hasher
from remus.common.protocol.messages import (CODECS, INPUT_LEN, LE_U32, MAX_DISK_SIZE, MAX_EPOCH,
                                            MAX_FRAME_RAW, MAX_INPUT_COUNT, MAX_INPUT_FRAME,
                                            MAX_NICS, MIN_INPUT_FRAME, PROTOCOL_VERSION,
                                            SESSION_RE, check_int)
from remus.common.wire import encode_frame, encode_frame_parts


class CheckpointEncoder:
    """Produces the frames the primary sends, for one session. Between calls it
    keeps the reused zstd compression context and the device state of the last
    device frame it produced: the next one is sent as a delta against it, which
    is the base the backup holds (it takes the frames in the order they are
    produced)."""

    def __init__(self, page_size: int, compression: str = "zstd", level: int = 1) -> None:
        self.page_size = check_int("page_size", page_size, 1)
        if compression not in CODECS:
            raise ValueError(f"compression must be one of {CODECS}, got {compression!r}")
        self.compression = compression
        self.level = level
        self._cctx = zstandard.ZstdCompressor(level=level) if compression == "zstd" else None
        self._last_device: bytes | None = None

    def hello(self, fingerprint: str, session: str, ram_size: int, disk_sizes=(),
              generation: int = 1, media=()) -> bytes:
        if not isinstance(fingerprint, str):
            raise TypeError("fingerprint must be a str")
        if not isinstance(session, str) or not SESSION_RE.fullmatch(session):
            raise ValueError(f"session must be 32 lowercase hex digits, got {session!r}")
        check_int("ram_size", ram_size, self.page_size)
        if ram_size % self.page_size:
            raise ValueError(f"ram_size {ram_size} is not a multiple of page_size {self.page_size}")
        return encode_frame(
            {
                "t": "hello",
                "version": PROTOCOL_VERSION,
                "fingerprint": fingerprint,
                "session": session,
                "ram_size": ram_size,
                "page_size": self.page_size,
                "disk_sizes": [check_int("disk_size", d, 1, MAX_DISK_SIZE) for d in disk_sizes],
                "media": [str(m) for m in media],
                "generation": check_int("generation", generation, 1, MAX_EPOCH),
            }
        )

    def input(self, after_epoch: int, frames: list[bytes], nic: int = 0) -> bytes:
        """Frames passed to the guest's NIC `nic` after the barrier of `after_epoch`
        (0: before the first)."""
        check_int("after_epoch", after_epoch, 0, MAX_EPOCH)
        if not 1 <= len(frames) <= MAX_INPUT_COUNT:
            raise ValueError(f"an input message carries 1..{MAX_INPUT_COUNT} frames, not {len(frames)}")
        parts = []
        for f in frames:
            if not MIN_INPUT_FRAME <= len(f) <= MAX_INPUT_FRAME:
                raise ValueError(f"input frame of {len(f)} bytes is not an Ethernet frame")
            parts += (INPUT_LEN.pack(len(f)), f)
        return encode_frame_parts({"t": "input", "after_epoch": after_epoch, "count": len(frames),
                                   "nic": check_int("nic", nic, 0, MAX_NICS - 1)}, *parts)

    def bye(self, reason: str) -> bytes:
        if not isinstance(reason, str):
            raise TypeError("reason must be a str")
        return encode_frame({"t": "bye", "reason": reason})

    def handover(self, epoch: int, reason: str) -> bytes:
        if not isinstance(reason, str):
            raise TypeError("reason must be a str")
        return encode_frame({"t": "handover", "epoch": check_int("epoch", epoch, 1, MAX_EPOCH),
                             "reason": reason})

    def _encode(self, raw: memoryview | bytes) -> tuple[str, bytes | memoryview]:
        if self._cctx is not None:
            packed = self._cctx.compress(raw)
            if len(packed) < len(raw):
                return "zstd", packed
        return "none", raw

    def checkpoint(
        self,
        epoch: int,
        full: bool,
        taken_at: float,
        indices: np.ndarray,
        new_pages: np.ndarray,
        previous_pages: np.ndarray | None,
        device_state: bytes,
        batch_pages: int = 1024,
        disk_synced: bool = False,
        precopy: bool = False,
        disk_runs=(),
    ) -> Iterator[bytes]:
        """Validate the arguments now, then return an iterator over the encoded
        frames: begin, pages (batches of at most ``batch_pages`` pages), device, end.
        A ``precopy`` round has no device state (``device_state`` empty).

        The disk's writes come as ``disk_runs`` (``DiskRun``s in disk and offset
        order, zeroed ranges included, each at most MAX_FRAME_RAW bytes of data),
        encoded lazily, a frame at a time.

        ``previous_pages`` (same shape as ``new_pages``) turns on xor encoding;
        it must be None for a full checkpoint. Pages whose zstd output would not
        be smaller than the input are sent with codec "none".
        """
        check_int("epoch", epoch, 1, MAX_EPOCH)
        if not isinstance(full, (bool, np.bool_)):
            raise TypeError("full must be a bool")
        full = bool(full)
        taken_at = float(taken_at)
        if not math.isfinite(taken_at):
            raise ValueError("taken_at must be finite")
        check_int("batch_pages", batch_pages, 1)
        idx, pages, prev = self._checked_pages(full, indices, new_pages, previous_pages)
        device = bytes(device_state)
        if precopy:
            if device or disk_synced:
                raise ValueError("a pre-copy round carries no device state and no synced disk")
        elif not device:
            raise ValueError("device_state must not be empty")
        batch = max(1, min(batch_pages, MAX_FRAME_RAW // self.page_size))
        return self._stream(epoch, full, taken_at, _array_batches(idx, pages, prev, batch), device,
                            disk_runs, bool(disk_synced), bool(precopy), batch)

    def _checked_pages(self, full: bool, indices, new_pages, previous_pages):
        """The checkpoint's page arguments, checked and made contiguous: (idx, pages, prev)."""
        ps = self.page_size
        idx = np.asarray(indices)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} shape {idx.shape}")
        n = len(idx)
        if n:
            if int(idx.min()) < 0 or int(idx.max()) > 0xFFFFFFFF:
                raise ValueError("indices must fit in uint32")
            if not bool(np.all(idx[1:] > idx[:-1])):
                raise ValueError("indices must be strictly increasing")
        # Any integer dtype will do: _pages_frame puts them on the wire as LE_U32.
        if full and not np.array_equal(idx, np.arange(n)):
            raise ValueError("a full checkpoint must list every page 0..npages-1")
        pages = np.asarray(new_pages)
        if pages.dtype != np.uint8 or pages.shape != (n, ps):
            raise ValueError(
                f"new_pages must be uint8 of shape ({n}, {ps}), got {pages.dtype} {pages.shape}"
            )
        pages = np.ascontiguousarray(pages)
        prev = None
        if previous_pages is not None:
            if full:
                raise ValueError("a full checkpoint must not use xor (previous_pages must be None)")
            prev = np.asarray(previous_pages)
            if prev.dtype != np.uint8 or prev.shape != (n, ps):
                raise ValueError(
                    f"previous_pages must be uint8 of shape ({n}, {ps}), got {prev.dtype} {prev.shape}"
                )
        return idx, pages, prev

    def precopy_round(self, epoch: int, full: bool, taken_at: float, batches, disk_runs=(),
                      batch_pages: int = 1024) -> Iterator[bytes]:
        """A pre-copy round from page batches produced as it goes: `batches` yields
        (indices, new_pages, previous_pages or None), indices strictly increasing
        across batches (a full round: every page in order). Nothing here holds more
        than one batch."""
        check_int("epoch", epoch, 1, MAX_EPOCH)
        batch = max(1, min(check_int("batch_pages", batch_pages, 1), MAX_FRAME_RAW // self.page_size))
        return self._stream(epoch, bool(full), float(taken_at), batches, b"", disk_runs, False,
                            True, batch)

    def _stream(self, epoch: int, full: bool, taken_at: float, batches, device: bytes, runs,
                disk_synced: bool, precopy: bool, batch: int) -> Iterator[bytes]:
        h = new_hasher(epoch, full, taken_at, precopy)
        yield encode_frame({"t": "begin", "epoch": epoch, "full": full, "taken_at": taken_at,
                            "disk_synced": disk_synced, "precopy": precopy})
        n = 0
        for idx, new, prev in batches:
            for start in range(0, len(idx), batch):
                yield self._pages_frame(h, idx[start:start + batch], new[start:start + batch],
                                        None if prev is None else prev[start:start + batch])
            n += len(idx)
        for run in runs:
            yield self._disk_frame(h, run)
        if not precopy:
            h.update(device)  # the raw state: a delta against the wrong base fails the checksum
            yield self._device_frame(device, full)
        yield encode_frame({"t": "end", "epoch": epoch, "pages": n, "checksum": h.hexdigest()})

    def _pages_frame(self, h: Hasher, idx: np.ndarray, new: np.ndarray,
                     prev: np.ndarray | None) -> bytes:
        """One pages frame; the hasher keeps `new` until its digest is taken."""
        count, ps = len(idx), self.page_size
        if new.shape != (count, ps) or (prev is not None and prev.shape != new.shape):
            raise ValueError(f"a batch of {count} pages has pages of shape {new.shape}")
        idx_bytes = memoryview(np.ascontiguousarray(idx, dtype=LE_U32)).cast("B")
        new = np.ascontiguousarray(new)
        body = new if prev is None else np.bitwise_xor(new, prev)
        codec, encoded = self._encode(memoryview(body).cast("B"))
        h.update(idx_bytes)
        h.update(new)
        return encode_frame_parts({"t": "pages", "count": count, "codec": codec,
                                   "xor": prev is not None, "raw_len": count * ps},
                                  idx_bytes, encoded)

    def _device_frame(self, device: bytes, full: bool) -> bytes:
        """The device frame, a delta (XOR) against the previous one when they have the
        same length: most of QEMU's device state does not change between checkpoints,
        so the XOR is mostly zeros, which zstd shrinks to a few KiB. Without
        compression a delta saves nothing; a full checkpoint stands alone."""
        base = self._last_device
        delta = (self._cctx is not None and not full and base is not None
                 and len(base) == len(device))
        body: bytes | memoryview = device
        if delta:
            body = memoryview(np.bitwise_xor(np.frombuffer(device, np.uint8),
                                             np.frombuffer(base, np.uint8)))
        codec, encoded = self._encode(body)
        self._last_device = device
        return encode_frame_parts({"t": "device", "codec": codec, "raw_len": len(device),
                                   "delta": delta}, encoded)

    def _disk_frame(self, h: Hasher, run) -> bytes:
        """A disk frame for a run with data, a zero frame for one without."""
        table = memoryview(np.ascontiguousarray(run.table)).cast("B")
        h.update(table)
        if run.data is None:
            return encode_frame_parts({"t": "zero", "disk": run.disk, "count": len(run.table)},
                                      table)
        chunk = b"".join(run.data)
        codec, encoded = self._encode(chunk)
        h.update(chunk)
        return encode_frame_parts({"t": "disk", "disk": run.disk, "count": len(run.table),
                                   "codec": codec, "raw_len": len(chunk)}, table, encoded)


def _array_batches(idx: np.ndarray, pages: np.ndarray, prev: np.ndarray | None, batch: int):
    for start in range(0, len(idx), batch):
        stop = start + batch
        yield idx[start:stop], pages[start:stop], None if prev is None else prev[start:stop]
