"""A disk the demo guest boots from through its firmware, as operators' VMs do.

One MBR partition (type EF, active) holding a FAT file system with the kernel,
the initramfs and SYSLINUX, set up for both firmwares: SeaBIOS runs SYSLINUX's
MBR code and boot sector, OVMF finds \\EFI\\BOOT\\BOOTX64.EFI (syslinux.efi).
Built without loop devices or root: sfdisk and mkfs.fat on the image file at
an offset, mtools to copy files in, `syslinux --offset` to install the boot
sector, all from Debian packages (syslinux, syslinux-common, syslinux-efi,
mtools, dosfstools, fdisk). The kernel command line is written into the disk,
so a test builds one per network address.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from remus.common.guest_types import BuildError, GuestImage

START_SECTOR = 2048
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
EFI_LOADER = Path("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi")
EFI_LDLINUX = Path("/usr/lib/syslinux/modules/efi64/ldlinux.e64")
TOOLS = ("sfdisk", "mkfs.fat", "mcopy", "mmd", "syslinux", "qemu-img")


def _run(*cmd: str, stdin: str | None = None) -> None:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[:400]}")


def syslinux_cfg(append: str) -> str:
    return ("DEFAULT remus\nPROMPT 0\nTIMEOUT 0\nLABEL remus\n  KERNEL /vmlinuz\n"
            f"  APPEND initrd=/initrd.img {append}\n")


def make_boot_disk(image: GuestImage, out: Path, append: str, size_mib: int = 64,
                   fmt: str = "raw") -> Path:
    """Write a bootable disk of the demo guest to `out` (raw or qcow2)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    missing += [str(p) for p in (MBR_CODE, EFI_LOADER, EFI_LDLINUX) if not p.exists()]
    if missing:
        raise BuildError(f"a bootable disk needs {', '.join(missing)} (scripts/install-deps "
                         "installs them)")
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(size_mib << 20)
        _run("sfdisk", "-q", str(raw), stdin=f"label: dos\nstart={START_SECTOR}, type=ef, bootable\n")
        sectors = (size_mib << 20) // 512 - START_SECTOR
        _run("mkfs.fat", "-F", "16", "-n", "REMUS", "--offset", str(START_SECTOR), str(raw),
             str(sectors // 2))
        fs = f"{raw}@@{START_SECTOR * 512}"
        cfg = Path(tmp) / "syslinux.cfg"
        cfg.write_text(syslinux_cfg(append))
        _run("mcopy", "-i", fs, str(image.kernel), "::/vmlinuz")
        _run("mcopy", "-i", fs, str(image.initrd), "::/initrd.img")
        _run("mcopy", "-i", fs, str(cfg), "::/syslinux.cfg")
        _run("mmd", "-i", fs, "::/EFI", "::/EFI/BOOT")
        _run("mcopy", "-i", fs, str(EFI_LOADER), "::/EFI/BOOT/BOOTX64.EFI")
        _run("mcopy", "-i", fs, str(EFI_LDLINUX), "::/EFI/BOOT/ldlinux.e64")
        _run("mcopy", "-i", fs, str(cfg), "::/EFI/BOOT/syslinux.cfg")
        _run("syslinux", "--offset", str(START_SECTOR * 512), "--install", str(raw))
        with open(raw, "r+b") as f:  # SYSLINUX's MBR code, keeping the partition table
            f.write(MBR_CODE.read_bytes()[:440])
        if fmt == "qcow2":
            _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out))
        else:
            os.replace(raw, out)
    return out
