"""The primary's guest RAM file: private from the start, and a planted file is refused."""
import os
import stat

import pytest

from remus.common.ramfile import RamFileError, create_ram_file


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_ram_file_is_0600_in_a_0700_directory_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = create_ram_file(tmp_path, "demo")
    finally:
        os.umask(old)
    assert path.parent == tmp_path / "remus-demo"
    assert _mode(path.parent) == 0o700 and _mode(path) == 0o600
    assert path.stat().st_size == 0


def test_an_open_directory_is_tightened(tmp_path):
    (tmp_path / "remus-demo").mkdir(mode=0o777)
    os.chmod(tmp_path / "remus-demo", 0o777)
    path = create_ram_file(tmp_path, "demo")
    assert _mode(path.parent) == 0o700


def test_a_leftover_of_ours_is_replaced_not_reused(tmp_path):
    first = create_ram_file(tmp_path, "demo")
    first.write_bytes(b"old guest memory")
    again = create_ram_file(tmp_path, "demo")
    assert again == first and again.stat().st_size == 0


def test_a_symlink_planted_at_the_ram_path_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "remus-demo").mkdir(mode=0o700)
    (tmp_path / "remus-demo" / "primary.ram").symlink_to(target)
    with pytest.raises(RamFileError, match="refusing"):
        create_ram_file(tmp_path, "demo")
    assert target.exists()


def test_a_hard_link_planted_at_the_ram_path_is_refused(tmp_path):
    target = tmp_path / "readable-by-someone"
    target.write_bytes(b"")
    (tmp_path / "remus-demo").mkdir(mode=0o700)
    os.link(target, tmp_path / "remus-demo" / "primary.ram")
    with pytest.raises(RamFileError, match="refusing"):
        create_ram_file(tmp_path, "demo")


def test_a_directory_symlink_or_someone_elses_directory_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "remus-demo").symlink_to(tmp_path / "real")
    with pytest.raises(RamFileError, match="not a directory"):
        create_ram_file(tmp_path, "demo")
    other = tmp_path / "remus-other"
    other.mkdir()
    os.chown(other, 4242, 4242)
    with pytest.raises(RamFileError, match="belongs to uid 4242"):
        create_ram_file(tmp_path, "other")
