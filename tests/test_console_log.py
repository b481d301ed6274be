"""The guest's serial log stays under its cap, keeping the newest output, while
QEMU (here: a descriptor opened O_APPEND, as `-chardev file,append=on` does) writes on."""
import asyncio
import errno
import os
import stat

import pytest

from remus.common import console_log
from remus.common.console_log import keep_capped, trim

CAP, KEEP = 1 << 20, 256 << 10


def lines(start: int, count: int) -> bytes:
    return b"".join(b"line %08d\n" % i for i in range(start, start + count))


@pytest.fixture
def qemu_log(tmp_path):
    """The log and QEMU's descriptor of it."""
    path = tmp_path / "serial.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    yield path, fd
    os.close(fd)


def test_under_the_cap_nothing_changes(qemu_log):
    path, fd = qemu_log
    os.write(fd, lines(0, 1000))
    assert trim(path, CAP, KEEP) == 0 and path.read_bytes() == lines(0, 1000)
    assert trim(path.with_name("missing"), CAP, KEEP) == 0


def test_over_the_cap_the_head_goes_and_the_newest_output_stays_in_order(qemu_log):
    path, fd = qemu_log
    written = lines(0, 200_000)  # ~3.6 MiB
    os.write(fd, written)
    removed = trim(path, CAP, KEEP)
    assert removed > 0 and removed % os.statvfs(path).f_bsize == 0
    left = path.read_bytes()
    assert KEEP <= len(left) < KEEP + os.statvfs(path).f_bsize
    assert left == written[removed:]  # exactly the tail: nothing lost, nothing reordered
    os.write(fd, b"after\n")  # QEMU's next append lands at the new end
    assert path.read_bytes() == written[removed:] + b"after\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_without_collapse_the_tail_is_kept_in_a_second_file(qemu_log, monkeypatch):
    path, fd = qemu_log

    def unsupported(*args):
        import ctypes
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(console_log, "_fallocate", unsupported)
    written = lines(0, 200_000)
    os.write(fd, written)
    assert trim(path, CAP, KEEP) == len(written)
    old = path.with_name("serial.log.1")
    assert old.read_bytes() == written[-KEEP:] and path.stat().st_size == 0
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    os.write(fd, b"after\n")  # at offset 0, not after a hole
    assert path.read_bytes() == b"after\n"


def test_the_watch_keeps_a_guest_printing_in_a_loop_under_the_cap(qemu_log):
    path, fd = qemu_log
    biggest = 0

    async def run():
        nonlocal biggest
        done = asyncio.Event()
        watch = asyncio.create_task(keep_capped(path, lambda: not done.is_set(), CAP, KEEP,
                                                every=0.01))
        for i in range(100):  # 100 x 36 KiB = 3.6 MiB in all
            os.write(fd, lines(i * 2000, 2000))
            biggest = max(biggest, path.stat().st_size)
            await asyncio.sleep(0.005)
        for _ in range(500):
            if path.stat().st_size <= CAP:
                break
            await asyncio.sleep(0.01)
        done.set()
        await asyncio.wait_for(watch, 5)  # ends by itself once QEMU is gone

    asyncio.run(run())
    assert path.stat().st_size <= CAP
    assert biggest < 2.5 * CAP  # trimmed while the guest printed, not only at the end
    assert path.read_bytes().endswith(lines(199_000, 1000))


def test_qemu_appends_the_serial_port_to_the_log(tmp_path):
    args = console_log.qemu_args(tmp_path / "a,b" / "serial.log")
    assert args == ["-chardev", f"file,id=serial0,path={tmp_path}/a,,b/serial.log,append=on",
                    "-serial", "chardev:serial0"]
