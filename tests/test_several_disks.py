"""A guest shaped like operators' VMs: 2 vCPUs, booted through its firmware
(SeaBIOS, and UEFI with OVMF) from a qcow2 system disk (with SeaBIOS, an
overlay on a raw backing file), a raw data disk, a read-only seed image and
two NICs on two bridges. Both writable disks (and UEFI's variable store) are
mirrored and commit in one checkpoint; the seed is not replicated. The guest
writes each numbered record to both disks before reporting it, and clients
increment its counter through each NIC; the primary is killed at random
moments. After each failover both replica disks hold every reported record
and the counter never went back on either NIC."""
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from remus.common.boot_disk import make_boot_disk
from remus.common.localpair import Pair, assert_nothing_taken_back, records_on_disk, wait_until
from remus.common.probe import read_replies

pytestmark = pytest.mark.integration

MiB = 1 << 20

LAN_OPTIONS = {"guest_lan2": True}  # the conftest's `lan` fixture


OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"


def disks_config(workdir, rng: random.Random) -> str:
    system, data, seed = workdir / "system.qcow2", workdir / "data.raw", workdir / "seed.img"
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


def firmware_pair(image, lan, workdir, firmware: str, rng: random.Random) -> Pair:
    guest = "cpus = 2"
    if firmware == "uefi":
        shutil.copy(OVMF_VARS, workdir / "vars.fd")
        guest += f'\nfirmware = "uefi"\nuefi_vars = "{workdir / "vars.fd"}"'
    # syslinux.efi cannot place the 14 MiB kernel in a 128 MiB guest under OVMF.
    nics = (f'[[nic]]\nmac = "52:54:00:12:34:56"\nbridge = "{lan.bridge}"\n'
            f'[[nic]]\nmac = "52:54:00:12:34:57"\nbridge = "{lan.bridge2}"\n')
    pair = Pair(image, workdir, lan=lan, kernel_boot=False, guest_config=guest,
                extra_config=disks_config(workdir, rng) + nics,
                memory_mib=256 if firmware == "uefi" else 128,
                append_extra=f"remus.ip1={lan.addr3['guest']}/24")
    if firmware == "uefi":
        make_boot_disk(image, workdir / "system.qcow2", pair.boot_append, fmt="qcow2")
    else:  # a qcow2 overlay on the raw boot disk: the mirror reads through the chain
        make_boot_disk(image, workdir / "base.raw", pair.boot_append)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(workdir / "base.raw"), str(workdir / "system.qcow2")], check=True)
    return pair


@pytest.mark.parametrize("firmware, runs", [("bios", 5), ("uefi", 2)])
def test_a_firmware_booted_guest_with_two_disks_and_a_seed_fails_over_with_every_record(
        guest_image, lan, tmp_path, firmware, runs):
    if firmware == "uefi" and not Path(OVMF_VARS).exists():
        pytest.skip("OVMF is not installed (Debian package ovmf)")
    rng = random.Random(13)
    for run in range(runs):
        workdir = tmp_path / f"run{run}"
        workdir.mkdir()
        pair = firmware_pair(guest_image, lan, workdir, firmware, rng)
        try:
            pair.start_backup()
            pair.start_primary()
            pair.primary.wait_for(r"protecting epoch=\d+", 120)
            mirrors = 3 if firmware == "uefi" else 2  # UEFI's variable store is mirrored too
            wait_until(lambda: pair.primary.log().count("disk-synced") == mirrors, 120,
                       "the mirrors' initial copies")
            wait_until(lambda: pair.replica_record().get("disk_synced"), 30,
                       "a committed checkpoint with both disks in sync")
            sizes = pair.replica_record()["disk_sizes"]
            assert sizes[:2] == [64 * MiB, 32 * MiB] and len(sizes) == mirrors, sizes
            backup_dir = workdir / "backup"
            assert not (backup_dir / f"replica.disk{mirrors}").exists(), \
                "the read-only seed was replicated"
            wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
            probe = pair.start_probe("record2")
            counters = [pair.start_probe("inc", nic) for nic in (0, 1)]
            for p in (probe, *counters):
                wait_until(lambda: len(read_replies(p.log())) >= 3, 30, "the first replies")
            time.sleep(rng.uniform(0, 0.4))  # the random kill moment
            probe.kill9()
            killed_at = time.time()
            pair.primary.kill9()
            reported = max(v for _, v in read_replies(probe.log()))
            pair.backup.wait_for(r"activated epoch=", 60)
            for nic, counter in enumerate(counters):
                assert_nothing_taken_back(counter, killed_at, f"run {run}, NIC {nic}")
            in_ram = int(wait_until(lambda: pair.try_get("disklast"), 30, "the guest's RAM counter"))
            pair.backup.stop()
            if firmware == "uefi":  # OVMF wrote its boot variables at boot: they came along
                assert (backup_dir / "replica.disk2").read_bytes() == (workdir / "vars.fd").read_bytes()
                assert (workdir / "vars.fd").read_bytes() != Path(OVMF_VARS).read_bytes()
            if firmware == "bios":  # the boot sector lives in the backing file only
                with open(backup_dir / "replica.disk", "rb") as f:
                    assert f.read(512) == (workdir / "base.raw").read_bytes()[:512]
            system = records_on_disk(backup_dir / "replica.disk")
            data = records_on_disk(backup_dir / "replica.disk1")
            assert min(system, data) >= reported, (
                f"run {run}: the client saw record {reported}; the system disk holds 1..{system}, "
                f"the data disk 1..{data}")
            assert in_ram == system == data, (
                f"run {run}: RAM says {in_ram}, the disks hold 1..{system} and 1..{data}")
        finally:
            pair.cleanup()


DOMAIN = """<domain type='kvm'>
  <name>web1</name>
  <memory unit='MiB'>128</memory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <cpu mode='host-model'/>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{workdir}/system.qcow2'/>
      <target dev='vda' bus='virtio'/><serial>system</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/><source file='{workdir}/data.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/><source file='{workdir}/seed.img'/>
      <target dev='sda' bus='sata'/><readonly/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:56'/><source bridge='{bridge}'/><model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:57'/><source bridge='{bridge2}'/><model type='virtio'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def test_the_toml_remusctl_import_libvirt_writes_protects_the_vm(guest_image, lan, tmp_path):
    from remus.common.libvirt_import import import_domain
    rng = random.Random(21)
    pair = firmware_pair(guest_image, lan, tmp_path, "bios", rng)
    domain = DOMAIN.format(workdir=tmp_path, bridge=lan.bridge, bridge2=lan.bridge2)
    toml = import_domain(domain, lan.addr["primary"],
                         f"{lan.addr['backup']}:{pair.stream_port}", str(pair.keys),
                         str(tmp_path))
    pair.config.write_text(toml.replace("[guest]\n", f'[guest]\nram_dir = "{pair.ram_dir}"\n'))
    try:
        pair.start_backup()
        pair.start_primary()
        pair.primary.wait_for(r"protecting epoch=\d+", 120)
        wait_until(lambda: pair.replica_record().get("disk_synced"), 60, "both disks in sync")
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        probe = pair.start_probe("record2")
        wait_until(lambda: len(read_replies(probe.log())) >= 3, 30, "the first records")
        probe.kill9()
        pair.primary.kill9()
        reported = max(v for _, v in read_replies(probe.log()))
        pair.backup.wait_for(r"activated epoch=", 60)
        wait_until(lambda: pair.try_get("disklast"), 30, "the resumed guest")
        assert int(pair.get("inc", nic=1)) >= 1  # its second NIC answers too
        pair.backup.stop()
        for replica in ("replica.disk", "replica.disk1"):
            assert records_on_disk(tmp_path / "backup" / replica) >= reported, replica
    finally:
        pair.cleanup()
