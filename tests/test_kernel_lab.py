"""The kernel lab's verdict from its console (the boot itself: `make test-kernel`)."""
import tarfile

from remus.common import kernel_lab as lab

BOOTED = "REMUS-LAB-KERNEL 6.1.0-57-cloud-amd64\n"
PASSED = "==== 11 passed, 30 deselected in 20.23s ====\nREMUS-LAB-EXIT 0 25\n"
NEGATIVES = "REMUS-LAB-NEGATIVE keep-bits 1\nREMUS-LAB-NEGATIVE drop-page 1\n"
END = "REMUS-LAB-END\n"


def test_pass_names_the_kernel_and_the_negative_controls():
    v = lab.judge(BOOTED + PASSED + NEGATIVES + END, lab.Plan())
    assert v.code == lab.EXIT_PASSED
    assert "6.1.0-57-cloud-amd64" in v.lines[0]
    assert sum("negative control failed as expected" in line for line in v.lines) == 2


def test_failed_and_skipped_tests_are_test_failures():
    failed = "==== 1 failed, 10 passed in 25.46s ====\nREMUS-LAB-EXIT 1 30\n"
    assert lab.judge(BOOTED + failed + END, lab.Plan(negative=False)).code == lab.EXIT_FAILED
    skipped = "==== 10 passed, 1 skipped in 25.46s ====\nREMUS-LAB-EXIT 0 30\n"
    assert lab.judge(BOOTED + skipped + END, lab.Plan(negative=False)).code == lab.EXIT_FAILED


def test_a_negative_control_that_passes_fails_the_lab():
    v = lab.judge(BOOTED + PASSED + NEGATIVES.replace("drop-page 1", "drop-page 0") + END, lab.Plan())
    assert v.code == lab.EXIT_FAILED
    assert any("DID NOT FAIL" in line and "drop-page" in line for line in v.lines)
    # Exit 5 (nothing collected) is no proof either.
    v = lab.judge(BOOTED + PASSED + NEGATIVES.replace("keep-bits 1", "keep-bits 5") + END, lab.Plan())
    assert v.code == lab.EXIT_FAILED


def test_no_result_is_a_lab_error_not_a_test_failure():
    for console in ("", BOOTED, BOOTED + PASSED, BOOTED + "REMUS-LAB-ERROR modprobe sch_plug failed\n" + PASSED + END):
        v = lab.judge(console, lab.Plan(negative=False))
        assert v.code == lab.EXIT_LAB_ERROR
        assert v.lines[0].startswith("kernel lab error (not a test result)")
    v = lab.judge(BOOTED + PASSED + END, lab.Plan())  # negative controls asked for, none reported
    assert v.code == lab.EXIT_LAB_ERROR


def test_run_disk_holds_the_tree_the_package_links_and_the_script(tmp_path):
    disk = tmp_path / "run.tar"
    lab.write_run_disk(disk, lab.Plan())
    assert disk.stat().st_size % 512 == 0
    with tarfile.open(disk) as tar:
        names = set(tar.getnames())
        script = tar.extractfile("run.sh").read().decode()
        link = tar.getmember("pkg/remus/common")
    assert {"repo/common/kernel_lab.py", "repo/tests/test_capture.py", "run.sh"} <= names
    assert link.issym() and link.linkname == "../../repo/common"
    assert "modprobe sch_plug" in script and "REMUS_LAB=1" in script
    assert "REMUS_TEST_SOFTDIRTY_BREAK=keep-bits" in script and "REMUS_TEST_SOFTDIRTY_BREAK=drop-page" in script


def test_a_build_step_failing_is_a_lab_error_with_its_output(monkeypatch, capsys):
    try:
        lab._run("sh", "-c", "echo E: Couldn\\'t find these debs; exit 1")
    except lab.LabError as exc:
        assert "Couldn't find these debs" in str(exc) and "failed (1)" in str(exc)
    else:
        raise AssertionError("no LabError")

    def broken_build(*args, **kwargs):
        raise lab.LabError("debootstrap failed")
    monkeypatch.setattr(lab, "build", broken_build)
    assert lab.main(["--no-negative"]) == lab.EXIT_LAB_ERROR
    assert "kernel lab error (not a test result): debootstrap failed" in capsys.readouterr().err
