"""The checksum in a checkpoint's end frame, and the worker pool that computes it
alongside the (de)compression.

It is the hex blake2b (digest_size=16) over, in order:

    1. the 17-byte preamble ``struct.pack("<QBd", epoch, flags, taken_at)``
       with flags = full | precopy << 1,
    2. for each pages frame, its index bytes (uint32 LE) then the NEW page
       contents (after undoing xor),
    3. for each disk frame, its extent table then the raw (decoded) data; for
       each zero frame, its extent table,
    4. the raw (decoded) device state, a delta undone: so a delta applied to
       the wrong base fails the checksum.

(1) is there so that a corrupted ``full`` flag or ``taken_at`` cannot slip
through either: every field of a staged checkpoint is covered.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from remus.common.protocol.messages import LE_U32

_PREAMBLE = struct.Struct("<QBd")

_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()
# Updates at least this big are hashed on a worker thread (hashlib releases
# the GIL for them), overlapping (de)compression and copying on the calling
# thread; smaller ones run inline when nothing of that hasher is queued.
_ASYNC_HASH_MIN = 256 * 1024
_HASH_BACKLOG = 32 << 20


_hash_pool_pid = 0


def _pool() -> ThreadPoolExecutor:
    global _hash_pool, _hash_pool_pid
    pid = os.getpid()
    with _hash_pool_lock:
        if _hash_pool_pid != pid:  # none yet (pid 0), or made before a fork: threads are gone
            workers = max(1, min(4, os.cpu_count() or 1))
            _hash_pool = ThreadPoolExecutor(workers, thread_name_prefix="remus-hash")
            _hash_pool_pid = pid
    return _hash_pool


class Hasher:
    """blake2b(digest_size=16) whose big updates run on a worker thread, in
    order (at most one drain task per hasher at a time). The buffers passed in
    must not change until ``hexdigest`` returns. At most ``_HASH_BACKLOG``
    bytes wait to be hashed: past that ``update`` waits, so a checkpoint's
    buffers cannot pile up here faster than they are hashed."""

    __slots__ = ("_h", "_queue", "_lock", "_task", "_queued")

    def __init__(self, epoch: int, full: bool, taken_at: float, precopy: bool = False) -> None:
        self._h = hashlib.blake2b(digest_size=16)
        self._h.update(_PREAMBLE.pack(epoch, (1 if full else 0) | (2 if precopy else 0), taken_at))
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._task: Future | None = None
        self._queued = 0

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._task = None
                    return
                data, size = self._queue.popleft()
            self._h.update(data)
            with self._lock:
                self._queued -= size

    def update(self, data) -> None:
        size = memoryview(data).nbytes
        with self._lock:
            idle = self._task is None
            if idle and size < _ASYNC_HASH_MIN:
                self._h.update(data)  # nothing queued: order is kept
                return
            self._queue.append((data, size))
            self._queued += size
            if idle:
                self._task = _pool().submit(self._drain)
            backlog = self._queued > _HASH_BACKLOG
        if backlog:
            self._wait()

    def _wait(self) -> None:
        while True:
            with self._lock:
                task = self._task
            if task is None:
                return
            task.result()

    def hexdigest(self) -> str:
        self._wait()
        return self._h.hexdigest()


def new_hasher(epoch: int, full: bool, taken_at: float, precopy: bool = False) -> Hasher:
    return Hasher(epoch, full, taken_at, precopy)


def checkpoint_checksum(
    epoch: int,
    full: bool,
    taken_at: float,
    indices: np.ndarray,
    pages: np.ndarray,
    device_state: bytes,
    batches: list[int] | None = None,
    precopy: bool = False,
) -> str:
    """The end-frame checksum of a checkpoint (see the module docstring).

    The index bytes and page contents are hashed per pages frame, so the
    result depends on how the pages were split into frames: ``batches`` is
    the list of per-frame page counts (default: one frame for all pages).
    """
    h = new_hasher(epoch, full, float(taken_at), precopy)
    idx = np.ascontiguousarray(indices, dtype=LE_U32)
    pg = np.ascontiguousarray(pages, dtype=np.uint8)
    if batches is None:
        batches = [len(idx)]  # with no pages, an empty update: no change
    start = 0
    for n in batches:
        h.update(idx[start : start + n])
        h.update(pg[start : start + n])
        start += n
    h.update(device_state)
    return h.hexdigest()
