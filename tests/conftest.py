import os
from pathlib import Path

import pytest


from remus.common.localpair import Pair  # noqa: E402

CACHE = Path(os.environ.get("REMUS_CACHE", Path.home() / ".cache" / "remus"))


@pytest.fixture(scope="session")
def guest_image():
    # The kernel lab has no network to build one: it brings the host's, built already.
    prebuilt = os.environ.get("REMUS_TEST_GUEST_DIR")
    if prebuilt:
        from remus.common.guest_image import _image
        return _image(Path(prebuilt))
    from remus.common.guest_image import build
    return build(CACHE)


@pytest.fixture(scope="module")
def lan(request):
    """Namespace hosts (common/netns.py), one set for the module's tests, deleted after
    its last test whether the tests passed or not. A module picks the Lan's options
    with a module-level dict, e.g. LAN_OPTIONS = {"second_link": True}; without it, a
    plain Lan()."""
    from remus.common.netns import Lan
    with Lan(**getattr(request.module, "LAN_OPTIONS", {})) as lan:
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
