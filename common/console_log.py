"""The guest's serial console log (run/serial.log), kept under a size cap.

A guest printing in a loop must not fill the file system that holds the
replica. QEMU writes the console to the file itself (`-chardev file` with
`append=on`, so every write goes to the file's current end, O_APPEND), and
the daemon that launched it checks the size every CHECK_S seconds: once over
CAP it cuts the head off so that about the newest KEEP bytes remain.

The cut is fallocate(FALLOC_FL_COLLAPSE_RANGE) from offset 0: the file
system removes the head in place, holding the inode lock as QEMU's appends
do, so no byte is lost or reordered and QEMU's descriptor stays valid
(ext4 and XFS support it; the length is a multiple of the block size, so a
little more than KEEP remains). Where the file system cannot collapse
(tmpfs, btrfs, NFS), the newest KEEP bytes are copied to serial.log.1 and
serial.log is truncated to zero; QEMU's next append lands at offset 0, and
only what the guest prints between the copy and the truncation is lost.

So the file stays below CAP plus what the guest prints in CHECK_S (an
emulated 16550 UART moves a few MB/s at most).

A daemon's pipe or socket in between (QEMU writing to the daemon, the daemon
to a rotating file) would cap exactly, but ties the console to the daemon's
event loop: a busy or stopped loop would stall the guest's console writes.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import os
from pathlib import Path
from typing import Callable

from remus.common import log
from remus.common.durable import write_atomic

_log = log.get("remus.console")

CAP = 16 << 20
KEEP = 8 << 20
CHECK_S = 1.0

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_COLLAPSE_RANGE = 0x08


def qemu_args(path: Path) -> list[str]:
    """The guest's first serial port, appended to `path` (never truncated by QEMU)."""
    return ["-chardev", f"file,id=serial0,path={str(path).replace(',', ',,')},append=on",
            "-serial", "chardev:serial0"]


def trim(path: Path, cap: int = CAP, keep: int = KEEP) -> int:
    """Cut the head of `path` if it is larger than `cap`, so about its newest `keep`
    bytes remain. Returns how many bytes were removed (0: nothing to do)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        size, keep = os.fstat(fd).st_size, min(keep, cap)
        if size <= cap:
            return 0
        block = os.fstatvfs(fd).f_bsize or 4096
        cut = (size - keep) // block * block
        if cut > 0 and _fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, cut) == 0:
            return cut
        err = ctypes.get_errno() if cut > 0 else errno.EINVAL
        if err not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise OSError(err, f"fallocate(COLLAPSE_RANGE) of {path}: {os.strerror(err)}")
        write_atomic(path.with_name(path.name + ".1"), os.pread(fd, keep, size - keep))
        os.ftruncate(fd, 0)
        return size
    finally:
        os.close(fd)


async def keep_capped(path: Path, alive: Callable[[], bool], cap: int = CAP, keep: int = KEEP,
                      every: float = CHECK_S) -> None:
    """Trim `path` every `every` seconds while `alive()` (the QEMU writing it runs)."""
    trims = 0
    while alive():
        await asyncio.sleep(every)
        try:
            cut = await asyncio.to_thread(trim, path, cap, keep)
        except OSError as exc:
            _log.warning("console-log-trim-failed", path=str(path), error=str(exc))
            continue
        if cut:
            trims += 1
            # The first time loudly (a guest printing in a loop), then quietly.
            (_log.warning if trims == 1 else _log.debug)(
                "console-log-trimmed", path=str(path), removed=cut, cap=cap, trims=trims,
                detail="the guest's console output passed the cap; its oldest part was dropped")
