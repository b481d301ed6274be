import os
from pathlib import Path

import pytest


from remus.common.localpair import Pair  # noqa: E402

CACHE = Path(os.environ.get("REMUS_CACHE", Path.home() / ".cache" / "remus"))


@pytest.fixture(scope="session")
def guest_image():
    from remus.common.guest_image import build
    return build(CACHE)


@pytest.fixture(scope="module")
def two_wire_lan():
    """Namespace hosts on one switch plus a second heartbeat wire."""
    from remus.common.netns import Lan
    with Lan(second_link=True) as lan:
        yield lan


@pytest.fixture
def make_pair(guest_image, tmp_path):
    pairs = []

    def make(**replication) -> Pair:
        workdir = tmp_path / f"pair{len(pairs)}"
        workdir.mkdir()
        pair = Pair(guest_image, workdir, **replication)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.cleanup()
