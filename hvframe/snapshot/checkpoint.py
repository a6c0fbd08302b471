"""Taking a checkpoint of a running machine and putting one into a freshly built machine.

Saving (save): the vCPUs are paused by the caller; every device is quiesced (its in-flight
I/O completed and acknowledged, no new work started), then guest RAM, the machine's own
bits, the in-kernel PICs/IOAPIC/PIT/clock, each vCPU and each device are written
(hvframe.snapshot.format) and the devices let go again. Stop-and-copy: the guest does not
run while its state is written.

Restoring (restore): the machine is built from the same command line as the one saved (the
runner does that, as for a fresh boot); its device set, RAM size and vCPU count must match
the snapshot's, and then everything is overwritten from it before any vCPU runs.

A device is identified by its place among the machine's devices and its type (and PCI
address), which the same command line always gives the same.
"""
from __future__ import annotations

import time
from typing import BinaryIO

from construct import Int32ul, Struct

from ..errors import ConfigError
from ..pci.device import PciFunction
from .format import Reader, SnapshotError, Writer
from .kvmstate import VCPU_RECORD_VERSION, VM_RECORD_VERSION, KvmStateIo
from .state import DeviceState, decode_into, encode

# The VMM's own state outside any device: the PCI configuration address latch (0xcf8).
MACHINE_RECORD = Struct("version" / Int32ul, "pci_config_address" / Int32ul)
MACHINE_RECORD_VERSION = 1


def device_entries(machine) -> list[tuple[str, object]]:
    """(id, device) for every device of the machine, in the order it was built."""
    out = []
    for i, d in enumerate(machine.devices):
        ident = f"{i}:{type(d).__name__}"
        address = d.address if isinstance(d, PciFunction) else None
        if address is not None:
            ident += "@{:02x}:{:02x}.{}".format(*address)
        out.append((ident, d))
    return out


def unsupported(machine) -> list[str]:
    """Why each device that cannot be checkpointed cannot be ([] if all can)."""
    out = []
    for ident, d in device_entries(machine):
        if not isinstance(d, DeviceState):
            out.append(f"{d.name} ({ident})" if isinstance(d, PciFunction) else ident)
        elif d.state_blocker():
            out.append(d.state_blocker())
    return out


def check_supported(machine) -> None:
    if machine.vm is None:
        raise ConfigError("checkpoint: only a KVM machine can be checkpointed")
    missing = unsupported(machine)
    if missing:
        raise ConfigError("checkpoint refused: no checkpoint support in "
                          + ", ".join(missing))


def describe(machine, cfg_items: dict, name: str) -> dict:
    return {"hvframe": "0.1.0", "name": name, "created": time.time(),
            "memory_size": machine.memory.size, "cpus": len(machine.vcpus),
            "config": cfg_items,
            "devices": [{"id": i, "type": type(d).__name__,
                         "version": d.state_version} for i, d in device_entries(machine)]}


def save(machine, out: BinaryIO, meta: dict) -> None:
    """Write the machine's checkpoint (vCPUs paused by the caller)."""
    check_supported(machine)
    devices = device_entries(machine)
    quiesced = []
    try:
        for _, d in devices:
            d.quiesce()
            quiesced.append(d)
        kio = KvmStateIo(machine)
        records = [("machine", MACHINE_RECORD.build(dict(
            version=MACHINE_RECORD_VERSION,
            pci_config_address=machine.pci.config_address if machine.pci is not None else 0))),
            ("kvm-vm", Int32ul.build(VM_RECORD_VERSION) + kio.save_vm())]
        records += [(f"vcpu{v.index}", Int32ul.build(VCPU_RECORD_VERSION) + kio.save_vcpu(v))
                    for v in machine.vcpus]
        records += [(f"dev:{i}", encode(d)) for i, d in devices]
        regions = machine.memory.regions
        sections = [(f"ram{k}", r.size) for k, r in enumerate(regions)]
        sections += [(n, len(b)) for n, b in records]
        w = Writer(out)
        w.write_header(meta, sections)
        for k, r in enumerate(regions):
            view = machine.memory.view(r.gpa, r.size)
            try:
                w.section(f"ram{k}", view)
            finally:
                view.release()
        for n, b in records:
            w.section(n, b)
        w.finish()
    finally:
        for d in reversed(quiesced):
            d.unquiesce()


def check_match(machine, meta: dict, what: str) -> None:
    """The snapshot was taken of a machine like this one (same RAM, vCPUs and devices)."""
    if meta.get("memory_size") != machine.memory.size:
        raise SnapshotError(f"{what}: the snapshot has {int(meta.get('memory_size') or 0) >> 20} MiB "
                            f"of RAM, this command line {machine.memory.size >> 20} MiB")
    if meta.get("cpus") != len(machine.vcpus):
        raise SnapshotError(f"{what}: the snapshot has {meta.get('cpus')} vCPUs, this command "
                            f"line {len(machine.vcpus)}")
    saved = [d.get("id") for d in meta.get("devices", []) if isinstance(d, dict)]
    here = [i for i, _ in device_entries(machine)]
    if saved != here:
        gone = [i for i in saved if i not in here]
        new = [i for i in here if i not in saved]
        raise SnapshotError(f"{what}: its devices do not match this command line's "
                            f"(only in the snapshot: {', '.join(gone) or 'none'}; only here: "
                            f"{', '.join(new) or 'none'})")
    unsup = unsupported(machine)
    if unsup:
        raise SnapshotError(f"{what}: no checkpoint support in {', '.join(unsup)}")


def restore(machine, reader: Reader) -> None:
    """Overwrite a freshly built machine (vCPUs made, not running, devices not started)
    with the snapshot whose header `reader` has read."""
    what = reader.what
    check_match(machine, reader.meta, what)
    devices = dict(device_entries(machine))
    vcpus = {f"vcpu{v.index}": v for v in machine.vcpus}
    regions = machine.memory.regions
    kio = KvmStateIo(machine)
    wanted = {f"ram{k}" for k in range(len(regions))} | set(vcpus) | {"kvm-vm", "machine"} | \
        {f"dev:{i}" for i in devices}
    names = [n for n, _ in reader.section_list]
    if set(names) != wanted or len(names) != len(wanted):
        raise SnapshotError(f"{what}: its sections do not match this machine's")
    for name, length in reader.sections():
        if name.startswith("ram"):
            r = regions[int(name[3:])]
            if length != r.size:
                raise SnapshotError(f"{what}: {name} is {length} bytes, RAM here {r.size}")
            view = machine.memory.view(r.gpa, r.size)
            try:
                reader.readinto(view)
            finally:
                view.release()
            continue
        data = reader.read()
        try:
            if name == "machine":
                rec = MACHINE_RECORD.parse(data)
                _version(rec.version, MACHINE_RECORD_VERSION, what, name)
                if machine.pci is not None:
                    machine.pci.config_address = rec.pci_config_address
            elif name == "kvm-vm":
                _version(Int32ul.parse(data[:4]), VM_RECORD_VERSION, what, name)
                kio.load_vm(data[4:])
            elif name in vcpus:
                _version(Int32ul.parse(data[:4]), VCPU_RECORD_VERSION, what, name)
                kio.load_vcpu(vcpus[name], data[4:])
            else:
                ident = name[4:]
                decode_into(devices[ident], data, ident)
        except (ConfigError, SnapshotError):
            raise
        except Exception as e:     # construct's parse errors, a record a device refuses
            raise SnapshotError(f"{what}: section {name} cannot be restored: "
                                f"{type(e).__name__}: {e}") from None
    reader.verify()


def _version(found: int, want: int, what: str, name: str) -> None:
    if found != want:
        raise SnapshotError(f"{what}: {name} record version {found}, this hvframe reads {want}")
