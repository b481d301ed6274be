"""What a demo guest build yields (GuestImage) and how it fails (BuildError).

Apart from guest_image so that boot_disk, which guest_image's CLI calls, can
use them without importing guest_image back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class BuildError(RuntimeError):
    """The guest cannot be built; the message says why."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str
