"""`remusctl import libvirt`: domain XMLs as virt-install and virsh dumpxml write them."""
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from remus.common import ctl
from remus.common.libvirt_import import UnsupportedDomain, import_domain

DATA = Path(__file__).parent / "data" / "libvirt"
ARGS = {"primary": "10.0.0.1", "backup": "10.0.0.2:7788"}


def load(name: str) -> dict:
    return tomllib.loads(import_domain((DATA / name).read_text(), **ARGS))


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.xml")))
def test_fixtures_are_valid_libvirt_domains(name):
    if shutil.which("virt-xml-validate") is None or shutil.which("xmllint") is None:
        pytest.skip("virt-xml-validate (libvirt-clients, libxml2-utils) not installed")
    r = subprocess.run(["virt-xml-validate", str(DATA / name), "domain"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_virt_install_uefi_domain():
    cfg = load("web-uefi.xml")
    assert cfg["guest"] == {
        "name": "web1", "memory_mib": 2048, "cpus": 2, "machine": "q35", "firmware": "uefi",
        "uefi_code": "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "uefi_vars": "/var/lib/libvirt/qemu/nvram/web1_VARS.fd", "cpu_model": "host"}
    assert cfg["disk"] == [
        {"path": "/var/lib/libvirt/images/web1.qcow2", "format": "qcow2", "bus": "virtio-blk",
         "serial": "web1-system"},
        {"path": "/dev/vg0/web1-data", "format": "raw", "bus": "virtio-scsi"},
        {"path": "/var/lib/libvirt/images/web1-seed.iso", "format": "raw", "bus": "virtio-scsi",
         "readonly": True}]
    assert cfg["network"] == {"mode": "bridged", "bridge": "br0", "mac": "52:54:00:ab:cd:ef"}
    assert cfg["primary"]["address"] == "10.0.0.1" and cfg["backup"]["address"] == "10.0.0.2:7788"


def test_left_out_devices_are_named_in_the_toml():
    text = import_domain((DATA / "web-uefi.xml").read_text(), **ARGS)
    for tag in ("graphics", "video", "input", "serial", "console", "channel", "rng"):
        assert f"# left out <{tag}" in text, tag
    assert "sata CD-ROM presented as a virtio-scsi CD-ROM" in text


def test_a_bios_domain_with_a_named_cpu_model_and_user_networking():
    cfg = load("db-bios.xml")
    assert cfg["guest"]["machine"] == "pc" and cfg["guest"]["memory_mib"] == 4096
    assert cfg["guest"]["cpu_model"] == "Skylake-Server" and cfg["guest"]["cpus"] == 4
    assert "firmware" not in cfg["guest"]
    assert cfg["network"] == {"mode": "user", "mac": "52:54:00:00:00:42"}


def test_everything_that_cannot_be_protected_is_refused_one_line_each():
    with pytest.raises(UnsupportedDomain) as err:
        import_domain((DATA / "refused.xml").read_text(), **ARGS)
    lines = str(err.value).splitlines()
    expected = ["<disk target='vda'>: type 'network'", "<disk target='sda'>: bus 'sata'",
                "<disk target='vdb'>: format 'vmdk'", "<filesystem>: a shared folder",
                "<interface type='vhostuser'>: not supported", "<hostdev>: a host device",
                "<memballoon model='virtio'>"]
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected):
        assert line.startswith(start), (line, start)


@pytest.mark.parametrize("edit, message", [
    (("<vcpu>4</vcpu>", "<vcpu>4</vcpu><memoryBacking><hugepages/></memoryBacking>"),
     "<memoryBacking>: not supported"),
    (("<model type='virtio'/>", "<model type='e1000'/>"), "model 'e1000'"),
    (("<interface type='user'>", "<interface type='user'><!-- -->"), None),
    (("<memballoon model='none'/>", "<memballoon model='none'/><tpm model='tpm-crb'/>"),
     "<tpm>: TPM state is not replicated"),
    (("arch='x86_64'", "arch='aarch64'"), "Remus runs x86_64 guests"),
    (("<name>db1</name>", "<name>db 1</name>"), "<name>db 1</name>"),
    (("<memory unit='GiB'>4</memory>", "<memory unit='KiB'>1000</memory>"), "whole number of MiB"),
])
def test_single_refusals(edit, message):
    xml = (DATA / "db-bios.xml").read_text().replace(*edit)
    if message is None:
        import_domain(xml, **ARGS)
        return
    with pytest.raises(UnsupportedDomain, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_domain(xml, **ARGS)


def test_a_uefi_domain_without_its_nvram_is_refused():
    xml = (DATA / "web-uefi.xml").read_text()
    start, end = xml.index("<nvram"), xml.index("</nvram>") + len("</nvram>")
    with pytest.raises(UnsupportedDomain, match="<nvram>: a UEFI guest needs its NVRAM file"):
        import_domain(xml[:start] + xml[end:], **ARGS)


def test_not_xml_or_not_a_domain():
    with pytest.raises(UnsupportedDomain, match="not well-formed XML"):
        import_domain("<domain>", **ARGS)
    with pytest.raises(UnsupportedDomain, match="not a libvirt domain"):
        import_domain("<network/>", **ARGS)


def test_the_command_line_writes_a_config_or_lists_the_refusals(tmp_path, capsys):
    out = tmp_path / "web1.toml"
    code = ctl.main(["import", "libvirt", str(DATA / "web-uefi.xml"), "--primary", "10.0.0.1",
                     "--backup", "10.0.0.2:7788", "-o", str(out)])
    assert code == 0 and tomllib.loads(out.read_text())["guest"]["name"] == "web1"
    code = ctl.main(["import", "libvirt", str(DATA / "refused.xml"), "--primary", "10.0.0.1",
                     "--backup", "10.0.0.2:7788"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("remusctl import libvirt: ") == 7


def test_two_bridged_nics_become_nic_tables_and_user_networking_stays_single():
    second = """<interface type='bridge'>
      <mac address='52:54:00:ab:cd:f0'/>
      <source bridge='br-storage'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>"""
    xml = (DATA / "web-uefi.xml").read_text().replace("<serial type='pty'>", second, 1)
    cfg = tomllib.loads(import_domain(xml, **ARGS))
    assert cfg["network"] == {"mode": "bridged"}
    assert cfg["nic"] == [{"mac": "52:54:00:ab:cd:ef", "bridge": "br0"},
                          {"mac": "52:54:00:ab:cd:f0", "bridge": "br-storage"}]
    user = (DATA / "db-bios.xml").read_text().replace(
        "<memballoon", "<interface type='user'><model type='virtio'/></interface><memballoon")
    with pytest.raises(UnsupportedDomain, match="user networking is for a guest with one NIC"):
        import_domain(user, **ARGS)
