"""Files that survive a power loss whole, and that only their owner can read.

The daemons keep guest memory, disk contents and their state records on disk:
all of it owner-only (files 0600, directories 0700, whatever the umask), and
every state file replaced atomically and durably: written to a temporary
file beside it, that file's data flushed, renamed over the old one, and the
directory flushed so the rename itself is on disk. A reader (or a host after
a power loss) then finds either the old file or the new one, never a torn one.

Each step calls the `os` function of the same name (os.fsync, os.replace...),
so a test can watch their order by patching those.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """`path` as an owner-only directory: created 0700 (missing parents with the
    umask's mode), an existing one tightened to 0700."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if stat.S_IMODE(os.stat(path).st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def open_private(path: Path, flags: int, mode: int = FILE_MODE) -> int:
    """os.open with the file created at `mode` (0600), or an existing one tightened
    to it: never readable by others, not even for a moment, whatever the umask."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def tighten(path: Path, mode: int = FILE_MODE) -> None:
    """An existing regular file (one an older version left readable) made `mode`;
    a missing file or a symlink is left alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def fsync_dir(path: Path) -> None:
    """Flush a directory: the renames and creations in it are on disk after this."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):  # a short write is not an error: write the rest
        done += os.write(fd, view[done:])


def temp_path(path: Path) -> Path:
    """Where write_atomic stages the next content of `path`."""
    return path.with_name(path.name + ".tmp")


def write_atomic(path: Path, data, mode: int = FILE_MODE) -> None:
    """Replace `path` with `data` so that after a crash or power loss at any point it
    holds either its old content or all of `data`: write a temporary file (created
    O_EXCL|O_NOFOLLOW at `mode`), fsync it, rename it over `path`, fsync the directory.

    When this returns, the new content is durable. When it raises before the rename,
    `path` is untouched and the temporary file is gone. One writer per `path` at a
    time (a second one fails on O_EXCL rather than mixing the two)."""
    path = Path(path)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)  # left by a crash; a symlink there is removed, not followed
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
                os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
