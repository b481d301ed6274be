"""ocf:remus:remus through Pacemaker's own tools, against real daemons and a real guest.

Pacemaker's tools find agents only under their built-in OCF root
(/usr/lib/ocf/resource.d), so the agent is installed there for the test (as
`make install` does, pointing at this test's Python) and what was there before
is put back afterwards.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT_DIR = Path("/usr/lib/ocf/resource.d/remus")
AGENT = AGENT_DIR / "remus"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("ocf-tester") is None or shutil.which("crm_resource") is None,
                       reason="needs Debian's resource-agents and pacemaker-cli-utils "
                              "(scripts/install-deps installs them)"),
]


@pytest.fixture(scope="module")
def installed_agent(tmp_path_factory):
    if not AGENT_DIR.parent.is_dir():
        pytest.skip(f"no OCF root at {AGENT_DIR.parent}")
    saved = tmp_path_factory.mktemp("ocf") / "remus.saved"
    had = AGENT.exists()
    if had:
        shutil.copy2(AGENT, saved)
    AGENT_DIR.mkdir(exist_ok=True)
    text = (ROOT / "ocf" / "remus").read_text().replace("@PYTHON@", sys.executable)
    AGENT.write_text(text)
    AGENT.chmod(0o755)
    try:
        yield AGENT
    finally:
        if had:
            shutil.copy2(saved, AGENT)
        else:
            AGENT.unlink(missing_ok=True)
            if not any(AGENT_DIR.iterdir()):
                AGENT_DIR.rmdir()


def test_ocf_tester_passes_against_a_real_guest(make_pair, installed_agent):
    """Start (standing by), promote (boots the guest: no replica anywhere), demote,
    promote again, stop, and the probes in between, as ocf-tester drives them."""
    pair = make_pair(config_overrides={"cluster": {"manager": "pacemaker"}})
    log = pair.workdir / "ocf-daemon.log"
    r = subprocess.run(["ocf-tester", "-n", "remus-vm", "-o", f"config={pair.config}",
                        "-o", "side=primary", "-o", f"log={log}", str(installed_agent)],
                       capture_output=True, text=True, timeout=600)
    daemon_log = log.read_text() if log.exists() else "(no daemon log)"
    assert r.returncode == 0 and "* rc=" not in r.stdout, (
        f"ocf-tester failed:\n{r.stdout}\n{r.stderr}\n--- daemon log ---\n{daemon_log[-4000:]}")
    assert daemon_log.count("primary-start") >= 2, \
        f"promote should have booted the guest twice:\n{daemon_log[-3000:]}"
