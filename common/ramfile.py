"""The guest RAM file on the primary, private to this daemon.

QEMU maps guest RAM from a file (memory-backend-file, share=on) so the daemon
can read it; by default QEMU would create it with the umask, and a local user
could read guest memory, or plant a file of their own at the path first. So
the daemon creates it: in a directory of its own, mode 0700, and the file
itself with O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600, before QEMU starts. A path
that is not what this daemon would have left there is refused, never used.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


class RamFileError(RuntimeError):
    """The RAM file's place is not safe to use; the message says why."""


def _own_private_dir(path: Path) -> Path:
    """`path` as a directory only this user can enter: created 0700, or an existing one
    checked (a real directory, ours) and tightened to 0700. Stricter than
    durable.private_dir: its parent (/dev/shm) is writable by everyone, so what is
    there may have been planted."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise RamFileError(f"{path} exists and is not a directory (a symlink?): refusing "
                               "to keep guest RAM there") from None
        if st.st_uid != os.geteuid():
            raise RamFileError(f"{path} belongs to uid {st.st_uid}, not to this daemon: "
                               "refusing to keep guest RAM there") from None
    os.chmod(path, 0o700, follow_symlinks=False)
    return path


def create_ram_file(ram_dir: Path, guest: str, role: str = "primary") -> Path:
    """A new, empty RAM file for `guest`, readable by this user only. A leftover of this
    daemon (a regular file of ours) is removed first; anything else there is refused."""
    directory = _own_private_dir(Path(ram_dir) / f"remus-{guest}")
    path = directory / f"{role}.ram"
    _remove_own_leftover(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise RamFileError(f"{path} appeared while it was being created: refusing it") from None
    os.fchmod(fd, 0o600)  # whatever the umask
    os.close(fd)
    return path


def _remove_own_leftover(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        raise RamFileError(f"{path} exists and is not a RAM file this daemon left (a link, "
                           "or someone else's): refusing to use it")
    path.unlink()  # never start from an old RAM image
