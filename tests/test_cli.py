import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("tool", ["remus-primary", "remus-backup"])
def test_bad_config_is_refused_at_start_with_the_key_named(tmp_path, tool):
    cfg = tmp_path / "g.toml"
    cfg.write_text('[guest]\nname = "x"\nkernel = "k"\n[primary]\naddress = "127.0.0.1"\n'
                   '[backup]\naddress = "127.0.0.1:7788"\n[tls]\ninsecure = true\n[replication]\ninterval_ms = -3\n')
    r = subprocess.run([str(BIN / tool), "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "[replication] interval_ms" in r.stderr


def test_interval_override_is_validated(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text('[guest]\nname = "x"\nkernel = "k"\n[primary]\naddress = "127.0.0.1"\n'
                   '[backup]\naddress = "127.0.0.1:7788"\n[tls]\ninsecure = true\n')
    r = subprocess.run([str(BIN / "remus-primary"), "--config", str(cfg), "-i", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "interval_ms" in r.stderr


@pytest.mark.parametrize("tool, words", [
    ("remus-primary", ["--interval", "checkpoint every MS"]),
    ("remus-backup", ["--activate-now", "torn"]),
    ("remusctl", ["guest"]),
])
def test_help_explains(tool, words):
    r = subprocess.run([str(BIN / tool), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for w in words:
        assert w in r.stdout
