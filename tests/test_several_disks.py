"""A guest with the disks operators give VMs: a qcow2 system disk, a raw data disk
and a read-only seed image. Both writable disks are mirrored and commit in one
checkpoint; the seed is not replicated. The guest writes each numbered record
to both disks before reporting it; the primary is killed at random moments,
and after each failover both replica disks hold every reported record."""
import random
import subprocess
import time

import pytest

from remus.common.localpair import Pair, wait_until
from remus.common.netns import Lan
from remus.common.probe import read_replies

pytestmark = pytest.mark.integration

SECTOR = 512
MiB = 1 << 20


@pytest.fixture(scope="module")
def lan():
    with Lan() as lan:
        yield lan


def records_on_disk(path) -> int:
    n = 0
    with open(path, "rb") as f:
        while True:
            f.seek((n + 1) * SECTOR)
            if f.read(12) != b"REC%08d\n" % (n + 1):
                return n
            n += 1


def disks_config(workdir, rng: random.Random) -> str:
    system, data, seed = workdir / "system.qcow2", workdir / "data.raw", workdir / "seed.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(system), "64M"], check=True)
    with open(data, "wb") as f:
        f.truncate(32 * MiB)
    seed.write_bytes(rng.randbytes(MiB))
    return f"""
[[disk]]
path = "{system}"
format = "qcow2"
serial = "system"

[[disk]]
path = "{data}"
bus = "virtio-blk"
serial = "data"

[[disk]]
path = "{seed}"
readonly = true
"""


def test_two_mirrored_disks_and_a_read_only_seed_fail_over_with_every_record(
        guest_image, lan, tmp_path):
    rng = random.Random(13)
    for run in range(5):
        workdir = tmp_path / f"run{run}"
        workdir.mkdir()
        pair = Pair(guest_image, workdir, lan=lan, extra_config=disks_config(workdir, rng))
        try:
            pair.start_backup()
            pair.start_primary()
            pair.primary.wait_for(r"protecting epoch=\d+", 60)
            wait_until(lambda: pair.primary.log().count("disk-synced") == 2, 60,
                       "both mirrors' initial copies")
            wait_until(lambda: pair.replica_record().get("disk_synced"), 30,
                       "a committed checkpoint with both disks in sync")
            assert pair.replica_record()["disk_sizes"] == [64 * MiB, 32 * MiB]
            backup_dir = workdir / "backup"
            assert not (backup_dir / "replica.disk2").exists(), "the read-only seed was replicated"
            wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
            probe = pair.start_probe("record2")
            wait_until(lambda: len(read_replies(probe.log())) >= 3, 30, "the first records")
            time.sleep(rng.uniform(0, 0.4))  # the random kill moment
            probe.kill9()
            pair.primary.kill9()
            reported = max(v for _, v in read_replies(probe.log()))
            pair.backup.wait_for(r"activated epoch=", 60)
            in_ram = int(wait_until(lambda: pair.try_get("disklast"), 30, "the guest's RAM counter"))
            pair.backup.stop()
            system = records_on_disk(backup_dir / "replica.disk")
            data = records_on_disk(backup_dir / "replica.disk1")
            assert min(system, data) >= reported, (
                f"run {run}: the client saw record {reported}; the system disk holds 1..{system}, "
                f"the data disk 1..{data}")
            assert in_ram == system == data, (
                f"run {run}: RAM says {in_ram}, the disks hold 1..{system} and 1..{data}")
        finally:
            pair.cleanup()
