"""`remusctl import libvirt DOMAIN.xml`: a guest's TOML from its libvirt definition.

Reads the XML `virsh dumpxml` prints (or the file virt-install writes) and maps
what Remus can protect: memory, vCPUs, machine, firmware (SeaBIOS, or OVMF with
its NVRAM file), a direct kernel boot, the CPU model, disks (file or block
device, raw or qcow2, virtio or virtio-scsi, serial, read-only CD-ROMs and
disks) and the NICs (bridges, or user networking for one NIC; virtio). Anything else that
is guest state or guest hardware is refused, one clear line per element,
rather than dropped; devices that only serve a console or a display (graphics,
video, input, serial consoles, the guest agent's channel) are left out with a
comment in the TOML, since Remus runs QEMU headless.

The TOML written is checked with the config loader before it is printed.
"""
from __future__ import annotations

import json
import re
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

from remus.common import config

UNITS = {"b": 1, "bytes": 1, "kb": 1000, "k": 1024, "kib": 1024, "mb": 10**6, "m": 1 << 20,
         "mib": 1 << 20, "gb": 10**9, "g": 1 << 30, "gib": 1 << 30, "tb": 10**12, "t": 1 << 40,
         "tib": 1 << 40}
# Devices refused outright: what each would lose.
REFUSED = {
    "hostdev": "a host device passed through cannot be checkpointed or moved to the backup",
    "filesystem": "a shared folder (virtiofs/9p) lives outside the guest and is not replicated",
    "shmem": "shared memory with the host is not guest state Remus can replicate",
    "redirdev": "a redirected USB device cannot follow the guest to the backup",
    "smartcard": "a smartcard device cannot follow the guest to the backup",
    "tpm": "TPM state is not replicated",
    "watchdog": "Remus does not create a watchdog device; the guest would lose it",
    "vsock": "vsock connections to the host cannot move to the backup",
    "iommu": "a virtual IOMMU is not supported",
    "memory": "memory devices (DIMM hotplug, virtio-mem) are not supported",
    "sound": "Remus does not create a sound device; the guest would lose it",
    "hub": "Remus does not create a USB hub; the guest would lose it",
    "panic": "Remus does not create a panic device; the guest would lose it",
}
# Left out with a note: a headless QEMU needs none of them for the guest to run.
LEFT_OUT = {"graphics", "video", "input", "console", "serial", "channel", "emulator",
            "controller", "rng", "audio", "parallel"}


class UnsupportedDomain(ValueError):
    """The domain cannot be protected as it is; the message has one line per reason."""


def _size(node: ET.Element | None, what: str) -> int:
    if node is None or not (node.text or "").strip().isdigit():
        raise UnsupportedDomain(f"<{what}>: missing or not a number")
    unit = node.get("unit", "KiB").lower()
    if unit not in UNITS:
        raise UnsupportedDomain(f"<{what} unit='{node.get('unit')}'>: unknown unit")
    return int(node.text.strip()) * UNITS[unit]


class Importer:
    def __init__(self, root: ET.Element):
        if root.tag != "domain":
            raise UnsupportedDomain(f"not a libvirt domain: the root element is <{root.tag}>")
        self.root = root
        self.refusals: list[str] = []
        self.notes: list[str] = []
        self.guest: dict = {}
        self.disks: list[dict] = []
        self.network: dict = {"mode": "none"}
        self.nics: list[dict] = []  # bridged NICs, in the guest's order

    def refuse(self, why: str) -> None:
        self.refusals.append(why)

    def run(self) -> None:
        self._basics()
        self._os()
        self._cpu()
        devices = self.root.find("devices")
        for dev in list(devices) if devices is not None else []:
            self._device(dev)
        for tag in ("memoryBacking", "numatune", "iothreads", "sysinfo"):
            if self.root.find(tag) is not None:
                self.refuse(f"<{tag}>: not supported (Remus backs guest RAM with a shared "
                            "file of its own)" if tag == "memoryBacking" else
                            f"<{tag}>: not supported")
        if self.refusals:
            raise UnsupportedDomain("\n".join(self.refusals))

    def _basics(self) -> None:
        name = (self.root.findtext("name") or "").strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
            self.refuse(f"<name>{name}</name>: Remus needs letters, digits, '.', '_' and '-'")
        memory = _size(self.root.find("memory"), "memory")
        if memory % (1 << 20):
            self.refuse(f"<memory>: {memory} bytes is not a whole number of MiB")
        vcpu = (self.root.findtext("vcpu") or "1").strip()
        self.guest.update(name=name, memory_mib=memory >> 20, cpus=int(vcpu) if vcpu.isdigit() else 1)
        if self.root.find("vcpu") is not None and self.root.find("vcpu").get("current"):
            self.refuse("<vcpu current=...>: vCPU hotplug is not supported")

    def _os(self) -> None:
        os_ = self.root.find("os")
        if os_ is None:
            return self.refuse("<os>: missing")
        typ = os_.find("type")
        if typ is not None:
            arch, machine = typ.get("arch", "x86_64"), typ.get("machine", "q35")
            if arch != "x86_64":
                self.refuse(f"<type arch='{arch}'>: Remus runs x86_64 guests")
            self.guest["machine"] = "q35" if "q35" in machine else "pc"
        loader, nvram = os_.find("loader"), os_.find("nvram")
        if os_.get("firmware") == "efi" or (loader is not None and loader.get("type") == "pflash"):
            self._uefi(loader, nvram)
        for tag, key in (("kernel", "kernel"), ("initrd", "initrd"), ("cmdline", "append")):
            text = (os_.findtext(tag) or "").strip()
            if text:
                self.guest[key] = text

    def _uefi(self, loader: ET.Element | None, nvram: ET.Element | None) -> None:
        self.guest["firmware"] = "uefi"
        if loader is not None and (loader.text or "").strip():
            self.guest["uefi_code"] = loader.text.strip()
        if loader is not None and loader.get("secure") == "yes":
            self.refuse("<loader secure='yes'>: Secure Boot (SMM) is not supported")
        if nvram is None or not (nvram.text or "").strip():
            return self.refuse("<nvram>: a UEFI guest needs its NVRAM file named (virsh "
                               "dumpxml shows it once the domain has been defined)")
        self.guest["uefi_vars"] = nvram.text.strip()

    def _cpu(self) -> None:
        cpu = self.root.find("cpu")
        if cpu is None:
            return
        mode = cpu.get("mode", "custom")
        if mode == "host-passthrough":
            self.guest["cpu_model"] = "host"
        elif mode == "custom" and (cpu.findtext("model") or "").strip():
            self.guest["cpu_model"] = cpu.findtext("model").strip()
        elif mode == "host-model":
            self.notes.append("cpu mode host-model: left to Remus's default ('host' under KVM; "
                              "set cpu_model to a model both hosts run if they differ)")
        if cpu.find("numa") is not None:
            self.refuse("<cpu><numa>: guest NUMA topology is not supported")

    def _device(self, dev: ET.Element) -> None:
        tag = dev.tag
        if tag == "disk":
            self._disk(dev)
        elif tag == "interface":
            self._interface(dev)
        elif tag == "memballoon":
            if dev.get("model") != "none":
                self.refuse(f"<memballoon model='{dev.get('model')}'>: Remus does not create "
                            "a balloon device (set <memballoon model='none'/>)")
        elif tag in REFUSED:
            self.refuse(f"<{tag}>: {REFUSED[tag]}")
        elif tag in LEFT_OUT:
            if tag == "controller" and dev.get("type") == "scsi" and dev.get("model") not in (
                    None, "virtio-scsi"):
                self.refuse(f"<controller type='scsi' model='{dev.get('model')}'>: only "
                            "virtio-scsi")
            elif tag not in ("controller", "emulator"):
                self.notes.append(f"left out <{tag}{_attrs(dev)}>: QEMU runs headless")
        else:
            self.refuse(f"<{tag}>: not supported")

    def _disk(self, dev: ET.Element) -> None:
        kind, device = dev.get("type"), dev.get("device", "disk")
        source, target = dev.find("source"), dev.find("target")
        where = f"<disk target='{target.get('dev') if target is not None else '?'}'>"
        if kind not in ("file", "block"):
            return self.refuse(f"{where}: type '{kind}' (network or volume storage) is not "
                               "supported; use a file or block device")
        if device not in ("disk", "cdrom"):
            return self.refuse(f"{where}: device '{device}' is not supported")
        path = source.get("file" if kind == "file" else "dev") if source is not None else None
        if not path:
            return self.refuse(f"{where}: no medium (an empty CD-ROM cannot be checked on both "
                               "hosts; remove it)")
        fmt = dev.find("driver").get("type", "raw") if dev.find("driver") is not None else "raw"
        bus = target.get("bus", "virtio") if target is not None else "virtio"
        if fmt not in ("raw", "qcow2"):
            return self.refuse(f"{where}: format '{fmt}' is not supported (raw or qcow2)")
        readonly = device == "cdrom" or dev.find("readonly") is not None
        if bus in ("sata", "ide") and readonly:
            self.notes.append(f"{where}: a {bus} CD-ROM presented as a virtio-scsi CD-ROM "
                              "(the guest finds its medium by label, as cloud-init does)")
            bus = "scsi"
        if bus not in ("virtio", "scsi"):
            return self.refuse(f"{where}: bus '{bus}' is not supported (virtio or scsi; a "
                               "writable disk keeps its bus, or the guest may not find it)")
        if dev.find("shareable") is not None:
            return self.refuse(f"{where}: a shareable disk cannot be replicated")
        disk = {"path": path, "format": fmt, "bus": "virtio-blk" if bus == "virtio" else "virtio-scsi"}
        serial = (dev.findtext("serial") or "").strip()
        if serial:
            disk["serial"] = serial
        if readonly:
            disk["readonly"] = True
        self.disks.append(disk)

    def _interface(self, dev: ET.Element) -> None:
        kind = dev.get("type")
        model = dev.find("model").get("type") if dev.find("model") is not None else "virtio"
        mac = dev.find("mac").get("address") if dev.find("mac") is not None else None
        where = f"<interface type='{kind}'>"
        if model != "virtio":
            return self.refuse(f"{where}: model '{model}'; Remus gives the guest a virtio-net NIC")
        if kind == "user" and self.network["mode"] == "none":
            self.network = {"mode": "user", **({"mac": mac.lower()} if mac else {})}
        elif kind == "user" or (kind == "bridge" and self.network["mode"] == "user"):
            self.refuse(f"{where}: user networking is for a guest with one NIC")
        elif kind == "bridge":
            if not mac:
                return self.refuse(f"{where}: no <mac address=...>; the backup must give the "
                                   "guest the same one")
            self.network = {"mode": "bridged"}
            self.nics.append({"mac": mac.lower(), "bridge": dev.find("source").get("bridge")})
        else:
            self.refuse(f"{where}: not supported (a bridge, or user networking); "
                        "vhost-user, macvtap and libvirt networks cannot be held by "
                        "Remus's output buffer")


def _attrs(dev: ET.Element) -> str:
    return "".join(f" {k}='{v}'" for k, v in sorted(dev.attrib.items()))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def render(imp: Importer, primary: str, backup: str, tls_dir: str, state: str) -> str:
    lines = [f"# Imported from libvirt domain {imp.guest['name']!r} by remusctl import libvirt."]
    lines += [f"# {note}" for note in imp.notes]
    lines += ["", "[guest]"] + [f"{k} = {_toml_value(v)}" for k, v in imp.guest.items()]
    if not imp.guest.get("kernel") and "append" in imp.guest:
        lines.remove(f"append = {_toml_value(imp.guest['append'])}")
    network = dict(imp.network)
    if len(imp.nics) == 1:
        network.update(bridge=imp.nics[0]["bridge"], mac=imp.nics[0]["mac"])
    lines += ["", "[network]"] + [f"{k} = {_toml_value(v)}" for k, v in network.items()]
    for nic in imp.nics if len(imp.nics) > 1 else ():
        lines += ["", "[[nic]]"] + [f"{k} = {_toml_value(v)}" for k, v in nic.items()]
    for disk in imp.disks:
        lines += ["", "[[disk]]"] + [f"{k} = {_toml_value(v)}" for k, v in disk.items()]
    lines += ["", "[primary]", f"address = {_toml_value(primary)}",
              f"state_dir = {_toml_value(f'{state}/primary')}",
              "", "[backup]", f"address = {_toml_value(backup)}",
              f"state_dir = {_toml_value(f'{state}/backup')}",
              "", "[tls]", f"dir = {_toml_value(tls_dir)}", ""]
    return "\n".join(lines)


def import_domain(xml_text: str, primary: str, backup: str, tls_dir: str = "/etc/remus/keys",
                  state: str = "/var/lib/remus", where: Path = Path("imported.toml")) -> str:
    """The TOML for a libvirt domain; UnsupportedDomain lists every reason it cannot be."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise UnsupportedDomain(f"not well-formed XML: {exc}") from None
    imp = Importer(root)
    imp.run()
    text = render(imp, primary, backup, tls_dir, state)
    try:
        config.parse(tomllib.loads(text), where)
    except config.ConfigError as exc:
        raise UnsupportedDomain(f"the imported config does not load: {exc}") from None
    return text


def add_import_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="write a guest's TOML from another tool's definition",
        description="Write the TOML config of a VM defined elsewhere, checked with the config "
                    "loader. Everything Remus cannot protect is refused, one line per element.")
    sub = p.add_subparsers(dest="source", required=True)
    lv = sub.add_parser("libvirt", help="from a libvirt domain XML (virsh dumpxml NAME)",
                        description=__doc__.split("\n\n")[1])
    lv.add_argument("xml", type=Path, help="the domain XML file ('-': standard input)")
    lv.add_argument("--primary", required=True, metavar="HOST",
                    help="address the primary sends the checkpoint stream from")
    lv.add_argument("--backup", required=True, metavar="HOST:PORT",
                    help="address the backup listens on for the checkpoint stream")
    lv.add_argument("--tls-dir", default="/etc/remus/keys", help="TLS material (default %(default)s)")
    lv.add_argument("--state", default="/var/lib/remus", help="state directories' parent")
    lv.add_argument("-o", "--output", type=Path, help="write here instead of standard output")
    lv.set_defaults(func=run_import)


def run_import(args) -> int:
    text = sys.stdin.read() if str(args.xml) == "-" else args.xml.read_text()
    try:
        toml = import_domain(text, args.primary, args.backup, args.tls_dir, args.state,
                             args.output or Path("imported.toml"))
    except UnsupportedDomain as exc:
        for line in str(exc).splitlines():
            print(f"remusctl import libvirt: {line}", file=sys.stderr)
        return 2
    if args.output:
        args.output.write_text(toml)
        print(f"config: {args.output}")
    else:
        sys.stdout.write(toml)
    return 0
