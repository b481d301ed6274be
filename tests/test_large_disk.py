"""A disk of the size operators run: 20 GiB, sparse, with a real guest.

The initial sync, guest writes, a guest zeroing part of its disk in a loop and
a failover, with the daemons' anonymous memory sampled throughout: it must not
depend on the disk's size, and the replica must stay as sparse as the source."""
import os
import random
import time

import pytest

from remus.common.localpair import MemoryWatch, Pair, records_on_disk, wait_until
from remus.common.probe import read_replies

pytestmark = pytest.mark.integration

MiB = 1 << 20
DISK_MIB = 20 << 10
DATA_AT = [(k * 1536 + 100) * MiB for k in range(13)]  # 8 MiB of data at each
ZERO_AT_MIB, ZERO_MIB = 64, 128                         # the region the guest wipes
BOUND = 256 * MiB                                       # beyond guest RAM (compare's shadow)


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def fill_source(path, rng: random.Random) -> None:
    """What a used disk holds: scattered data in a mostly empty 20 GiB file."""
    with open(path, "r+b") as f:
        for at in DATA_AT + [ZERO_AT_MIB * MiB]:
            f.seek(at)
            f.write(rng.randbytes(8 * MiB) if at != ZERO_AT_MIB * MiB else rng.randbytes(ZERO_MIB * MiB))


def region(path, at: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(at)
        return f.read(size)


def test_a_20_gib_sparse_disk_syncs_fails_over_and_stays_within_a_fixed_memory_bound(
        guest_image, lan, tmp_path):
    rng = random.Random(12)
    pair = Pair(guest_image, tmp_path, lan=lan, disk_mib=DISK_MIB)
    fill_source(pair.disk, rng)
    source_allocated = allocated(pair.disk)
    watch = None
    try:
        pair.start_backup()
        pair.start_primary()
        watch = MemoryWatch({"primary": pair.primary, "backup": pair.backup})
        watch.start()
        t0 = time.monotonic()
        pair.primary.wait_for(r"protecting epoch=\d+", 300)
        wait_until(lambda: pair.replica_record().get("disk_synced"), 120,
                   "a committed checkpoint with the disk in sync")
        sync_s = time.monotonic() - t0
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        replica_disk = tmp_path / "backup" / "replica.disk"
        for at in DATA_AT:  # the source's data reached the replica
            assert region(replica_disk, at, 8 * MiB) == region(pair.disk, at, 8 * MiB), at
        assert allocated(replica_disk) <= source_allocated * 1.1 + 64 * MiB, (
            f"replica allocates {allocated(replica_disk)} bytes, the source {source_allocated}")
        assert pair.primary.log().count("session-start") == 1, "the sync restarted"

        assert pair.get(f"zeroes?at={ZERO_AT_MIB}&mib={ZERO_MIB}") == f"ok {ZERO_MIB}"
        wait_until(lambda: region(pair.disk, ZERO_AT_MIB * MiB, ZERO_MIB * MiB) == bytes(ZERO_MIB * MiB),
                   60, "the guest to zero its region of the source")
        probe = pair.start_probe("record")
        wait_until(lambda: len(read_replies(probe.log())) >= 5, 60, "the first records")
        time.sleep(rng.uniform(0, 1.0))  # the random kill moment, with the zero loop running
        probe.kill9()
        pair.primary.kill9()
        reported = max(v for _, v in read_replies(probe.log()))
        pair.backup.wait_for(r"activated epoch=", 60)
        wait_until(lambda: pair.try_get("disklast"), 30, "the resumed guest")
        pair.get("zeroes?at=1&mib=0")  # stop the loop before the disk is read
        pair.backup.stop()
        peaks = watch.stop()
        assert records_on_disk(replica_disk) >= reported
        assert region(replica_disk, ZERO_AT_MIB * MiB + 8 * MiB, MiB) == bytes(MiB), \
            "the zeroed region still holds data on the replica"
        assert allocated(replica_disk) <= source_allocated * 1.1 + 64 * MiB
        guest_ram = 128 * MiB
        print(f"sync {sync_s:.1f}s, source allocated {source_allocated >> 20} MiB, replica "
              f"{allocated(replica_disk) >> 20} MiB; peaks (MiB): "
              + ", ".join(f"{k}={v >> 20}" for k, v in sorted(peaks.items())))
        for key, peak in peaks.items():
            bound = BOUND + (guest_ram if key.startswith("primary:") else 0)
            assert peak <= bound, f"{key} peaked at {peak >> 20} MiB anonymous, bound {bound >> 20}"
    finally:
        if watch is not None:
            watch.stop()
        pair.cleanup()


def test_a_2_gib_guest_reaches_protecting_in_one_session_within_the_memory_bound(
        guest_image, lan, tmp_path):
    """The sync of a guest of several GiB finishes: one session, no restart, and the
    daemons' memory stays at the shadow copy plus a fixed amount."""
    pair = Pair(guest_image, tmp_path, lan=lan, disk_mib=1024, memory_mib=2048)
    watch = None
    try:
        pair.start_backup()
        t0 = time.monotonic()
        pair.start_primary()
        watch = MemoryWatch({"primary": pair.primary, "backup": pair.backup})
        watch.start()
        pair.primary.wait_for(r"protecting epoch=\d+", 300)
        seconds = time.monotonic() - t0
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        peaks = watch.stop()
        print(f"2 GiB guest protecting after {seconds:.1f}s; peaks (MiB): "
              + ", ".join(f"{k}={v >> 20}" for k, v in sorted(peaks.items())))
        assert pair.primary.log().count("session-start") == 1, "the sync restarted"
        for key, peak in peaks.items():
            bound = BOUND + (2048 * MiB if key.startswith("primary:") else 0)
            assert peak <= bound, f"{key} peaked at {peak >> 20} MiB anonymous, bound {bound >> 20}"
    finally:
        if watch is not None:
            watch.stop()
        pair.cleanup()
