"""The test pair's config writing (common/localpair.py), without starting anything:
TOML values, and config_overrides merged into the TOML a Pair writes."""
import math
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from remus.common.config import load
from remus.common.localpair import Pair, ha_config, toml_document, toml_value
from remus.common.netns import Lan


@pytest.mark.parametrize("value", [
    "plain", 'quote " and backslash \\ and C:\\dir', "new\nline\ttab\r\f\b", "\x00\x1f\x7f",
    "ünïcode ✓ 😀", "", True, False, 0, -7, 2 ** 40, 0.5, -1e-05, 1e16, float("inf"),
    [], [1, 2, 3], ["a", "b\"c"], [[1, 2], ["x"]], {"a": 1, "b c": "d"}, {},
])
def test_toml_value_reads_back_as_the_same_value(value):
    assert tomllib.loads(f"x = {toml_value(value)}")["x"] == value


def test_toml_value_spells_bools_lowercase_and_refuses_what_toml_lacks():
    assert toml_value(True) == "true" and toml_value(False) == "false"
    assert math.isnan(tomllib.loads(f"x = {toml_value(float('nan'))}")["x"])
    with pytest.raises(TypeError):
        toml_value(None)


@pytest.fixture
def image(tmp_path):
    return SimpleNamespace(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd")


@pytest.fixture
def pairs():
    made = []
    yield made
    for pair in made:
        pair.cleanup()


def test_config_overrides_replace_add_and_create_tables(image, tmp_path, pairs):
    pair = Pair(image, tmp_path, interval_ms=50, config_overrides={
        "primary": {"on_backup_loss": "pause", "address": "127.0.0.2"},
        "replication": {"interval_ms": 75, "compression": "none"},
        "metrics": {"primary": "127.0.0.1:9101", "backup": "127.0.0.1:9102"},
    })
    pairs.append(pair)
    data = tomllib.loads(pair.config.read_text())
    assert data["primary"] == {"address": "127.0.0.2", "state_dir": str(tmp_path / "primary"),
                               "on_backup_loss": "pause"}
    assert data["replication"] == {"interval_ms": 75, "stream_timeout_ms": 2000, "compression": "none"}
    assert data["metrics"] == {"primary": "127.0.0.1:9101", "backup": "127.0.0.1:9102"}
    # Nothing else changed.
    expected = tomllib.loads(pair.base_config)
    for table in ("primary", "replication", "metrics"):
        expected[table] = data[table]
    assert data == expected
    cfg = load(pair.config)  # and the daemons' own loader takes it
    assert cfg.primary.on_backup_loss == "pause" and cfg.replication.interval_ms == 75


def test_without_overrides_the_built_text_is_written_as_is(image, tmp_path, pairs):
    (tmp_path / "p").mkdir()
    pair = Pair(image, tmp_path / "p", insecure=True, reprotect="auto")
    pairs.append(pair)
    assert pair.config.read_text() == pair.base_config
    data = tomllib.loads(pair.base_config)
    assert data["tls"] == {"insecure": True} and data["replication"]["reprotect"] == "auto"


def test_overrides_keep_arrays_of_tables_and_inline_tables_of_the_extra_config(image, tmp_path, pairs):
    lan = Lan(index=7, second_link=True)  # addresses only: no namespace is made
    extra, _ = ha_config(lan, tmp_path)
    extra += '[[nic]]\nmac = "52:54:00:12:34:56"\nbridge = "br0"\n'
    pair = Pair(image, tmp_path, lan=lan, extra_config=extra,
                config_overrides={"fencing": {"timeout_s": 20}, "heartbeat": {"interval_ms": 100}})
    pairs.append(pair)
    written = tomllib.loads(pair.config.read_text())
    expected = tomllib.loads(pair.base_config)
    expected["fencing"]["timeout_s"] = 20
    expected["heartbeat"]["interval_ms"] = 100
    assert written == expected
    assert written["fencing"]["level"][0]["device"][0]["options"]["type"] == "file"
    assert tomllib.loads(toml_document(expected)) == expected


def test_write_config_can_hand_one_daemon_a_different_config(image, tmp_path, pairs):
    pair = Pair(image, tmp_path, config_overrides={"primary": {"on_stop": "shutdown"}})
    pairs.append(pair)
    pair.write_config({"tls": {"dir": str(tmp_path / "other")}})
    data = tomllib.loads(pair.config.read_text())
    assert data["tls"]["dir"] == str(tmp_path / "other") and data["primary"]["on_stop"] == "shutdown"
    pair.write_config()
    data = tomllib.loads(pair.config.read_text())
    assert data["tls"]["dir"] == str(pair.keys) and data["primary"]["on_stop"] == "shutdown"


def test_an_array_of_tables_cannot_be_overridden_as_a_table(image, tmp_path, pairs):
    pair = Pair(image, tmp_path, extra_config='[[nic]]\nmac = "52:54:00:12:34:56"\n')
    pairs.append(pair)
    with pytest.raises(ValueError, match=r"\[nic\] is an array of tables"):
        pair.write_config({"nic": {"mac": "52:54:00:12:34:57"}})
    assert Path(pair.config).read_text() == pair.base_config
