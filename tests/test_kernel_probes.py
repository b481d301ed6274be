"""The kernel probes say what the kernel really has, on both kinds of kernel.

On this project's CI machines neither soft-dirty tracking nor sch_plug exists,
and the probes must say so (the capture and the output buffer then fall back
or refuse); inside the kernel lab (`make test-kernel`, which sets REMUS_LAB=1)
Debian's cloud kernel has both, and the probes must find them. Elsewhere the
expected answer is read from the running kernel's own build config.
"""
import gzip
import os
from pathlib import Path

import pytest

from remus.common.capture import softdirty_supported
from remus.common.netbuf_plug import plug_supported


def _kernel_config() -> str | None:
    release = os.uname().release
    try:
        return gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        pass
    try:
        return Path(f"/boot/config-{release}").read_text()
    except OSError:
        return None


def _expected(option: str, module: str) -> bool:
    """True in the lab; else what the kernel config says (a module counts only if installed)."""
    if os.environ.get("REMUS_LAB") == "1":
        return True
    config = _kernel_config()
    if config is None:
        pytest.skip("no kernel config to compare the probe with (/proc/config.gz, /boot/config-*)")
    if f"\n{option}=y" in config:
        return True
    if f"\n{option}=m" in config:
        tree = Path("/lib/modules") / os.uname().release / "kernel"
        return any(tree.rglob(f"{module}.ko*")) if tree.is_dir() else False
    return False


def test_softdirty_probe_matches_the_kernel():
    ok, why = softdirty_supported()
    assert ok == _expected("CONFIG_MEM_SOFT_DIRTY", "no-such-module"), why


def test_plug_probe_matches_the_kernel():
    if os.geteuid() != 0:
        pytest.skip("the plug probe needs root (a network namespace)")
    ok, why = plug_supported()
    assert ok == _expected("CONFIG_NET_SCH_PLUG", "sch_plug"), why
