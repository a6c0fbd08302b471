"""The QMP commands hvframe offers, QEMU's names and reply shapes, against a Lifecycle.

Two commands of hvframe's own, in QEMU's experimental namespace, give `hvframe ctl` the raw
numbers it lays out as bhyvectl does: x-query-registers (every vCPU's registers) and
x-query-exit-stats (exit counts per vCPU and reason, and per device range).
"""
from __future__ import annotations

import threading

from .inspect import (GPRS, device_access_counts, pci_functions, vcpu_exit_counts,
                      vcpu_registers)
from .qmp import Arg, Command, QmpError

VERSION = (0, 1, 0)
NO_UUID = "00000000-0000-0000-0000-000000000000"


def qmp_version() -> dict:
    major, minor, micro = VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": "hvframe"}


def monitor_commands(lc) -> dict[str, Command]:
    """name -> Command for the Lifecycle `lc`."""

    def query_status():
        status = lc.status
        return {"running": status == "running", "singlestep": False, "status": status}

    def stop():
        lc.stop()
        return {}

    def cont():
        lc.cont()
        return {}

    def system_powerdown():
        if not lc.power_button():
            raise QmpError("the machine has no ACPI power button")
        return {}

    def system_reset():
        lc.reset()
        return {}

    def quit_():
        lc.quit()
        return {}

    def query_name():
        return {"name": lc.name}

    def query_uuid():
        # The UUID firmware gives the guest (SMBIOS), fixed in the tree when the run began
        # (cli.main). A run without firmware and without -U has none: QEMU's answer for a VM
        # without a UUID.
        return {"UUID": str(lc.cfg.get("uuid") or NO_UUID)}

    def query_cpus_fast():
        with lc.using_machine() as m:
            threads = m.vcpu_thread_ids()
            return [{"cpu-index": v.index, "qom-path": f"/machine/unattached/device[{v.index}]",
                     "thread-id": threads.get(v.index) or threading.get_native_id(),
                     "props": {"core-id": 0, "socket-id": v.index, "thread-id": 0},
                     "target": "x86_64"} for v in m.vcpus]

    def query_pci():
        with lc.using_machine() as m:
            return pci_functions(m)

    def query_block():
        from ..block.backend import open_backends
        out = []
        for i, b in enumerate(open_backends()):
            out.append({"device": f"disk{i}", "qdev": b.path, "locked": False,
                        "removable": False, "type": "unknown",
                        "inserted": {"file": b.path, "ro": b.readonly, "drv": "raw",
                                     "image": {"filename": b.path, "format": "raw",
                                               "virtual-size": b.size}}})
        return out

    def query_version():
        return qmp_version()

    def query_commands():
        return [{"name": n} for n in sorted(list(table) + ["qmp_capabilities"])]

    def query_registers():
        with lc.paused_machine() as m:
            return [vcpu_registers(v) for v in m.vcpus]

    def query_exit_stats():
        with lc.using_machine() as m:
            return {"vcpus": [{"cpu": v.index, "exits": vcpu_exit_counts(v)} for v in m.vcpus],
                    "devices": device_access_counts(m),
                    "unclaimed": {"io": m.pio.unclaimed, "mmio": m.mmio.unclaimed}}

    def migrate(**args):
        lc.migrate(args["uri"])
        return {}

    def query_migrate():
        status = lc.migration_status
        return {} if status == "none" else {"status": status}

    def human_monitor_command(**args):
        line = args["command-line"].strip()
        words = line.split()
        if words[:2] == ["info", "registers"]:
            with lc.paused_machine() as m:
                vcpus = m.vcpus
                if "cpu-index" in args:
                    vcpus = [v for v in vcpus if v.index == args["cpu-index"]]
                    if not vcpus:
                        raise QmpError(f"CPU {args['cpu-index']} does not exist")
                return "".join(format_info_registers(vcpu_registers(v)) for v in vcpus)
        if words[:2] == ["info", "pci"]:
            with lc.using_machine() as m:
                return format_info_pci(pci_functions(m))
        if words[:1] == ["info"]:
            return "info registers -- show the CPU registers\ninfo pci -- show PCI info\n"
        return f"unknown command: '{words[0] if words else ''}'\n"

    table = {
        "query-status": Command("query-status", query_status),
        "stop": Command("stop", stop),
        "cont": Command("cont", cont),
        "system_powerdown": Command("system_powerdown", system_powerdown),
        "system_reset": Command("system_reset", system_reset),
        "quit": Command("quit", quit_),
        "query-name": Command("query-name", query_name),
        "query-uuid": Command("query-uuid", query_uuid),
        "query-cpus-fast": Command("query-cpus-fast", query_cpus_fast),
        "query-pci": Command("query-pci", query_pci),
        "query-block": Command("query-block", query_block),
        "query-version": Command("query-version", query_version),
        "query-commands": Command("query-commands", query_commands),
        "human-monitor-command": Command("human-monitor-command", human_monitor_command,
                                         (Arg("command-line", str, True), Arg("cpu-index", int))),
        # QEMU's detach/blk/inc/resume are accepted; hvframe's migrate is always
        # stop-and-copy and answers when it is over.
        "migrate": Command("migrate", migrate, (Arg("uri", str, True), Arg("detach", bool),
                                                Arg("blk", bool), Arg("inc", bool),
                                                Arg("resume", bool))),
        "query-migrate": Command("query-migrate", query_migrate),
        "x-query-registers": Command("x-query-registers", query_registers),
        "x-query-exit-stats": Command("x-query-exit-stats", query_exit_stats),
    }
    return table


def format_info_registers(r: dict) -> str:
    """HMP's `info registers` for one vCPU, in QEMU's layout."""
    out = [f"CPU#{r['cpu']}"]
    names = [n for n in GPRS if n not in ("rip", "rflags")]
    for i in range(0, len(names), 4):
        out.append(" ".join(f"{n.upper()}={r[n]:016x}" for n in names[i:i + 4]))
    out.append(f"RIP={r['rip']:016x} RFL={r['rflags']:08x}")
    for n in ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr"):
        s = r[n]
        out.append(f"{n.upper():<3}={s['selector']:04x} {s['base']:016x} {s['limit']:08x} "
                   f"{s['access'] << 8:08x}")
    for n in ("gdt", "idt"):
        out.append(f"{n.upper()}=     {r[n]['base']:016x} {r[n]['limit']:08x}")
    out.append(f"CR0={r['cr0']:08x} CR2={r['cr2']:016x} CR3={r['cr3']:016x} CR4={r['cr4']:08x}")
    if "dr0" in r:
        out.append(" ".join(f"DR{i}={r[f'dr{i}']:016x}" for i in range(4)))
        out.append(f"DR6={r['dr6']:016x} DR7={r['dr7']:016x}")
    out.append(f"EFER={r['efer']:016x}")
    return "\n".join(out) + "\n"


def format_info_pci(buses: list[dict]) -> str:
    out = []
    for bus in buses:
        for d in bus["devices"]:
            out.append(f"  Bus {d['bus']:2d}, device {d['slot']:3d}, function {d['function']}:")
            out.append(f"    class {d['class_info']['class']:04x}: PCI device "
                       f"{d['id']['vendor']:04x}:{d['id']['device']:04x}")
            if "irq" in d:
                out.append(f"      IRQ {d['irq']}, pin {chr(ord('A') + d['irq_pin'] - 1)}")
            for r in d["regions"]:
                kind = "I/O at" if r["type"] == "io" else "BAR memory at"
                addr = r["address"]
                where = f"{addr:#x}" if addr >= 0 else "(unmapped)"
                label = "ROM" if r["bar"] == 6 else f"BAR{r['bar']}"
                out.append(f"      {label}: {kind} {where} [size {r['size']:#x}]")
            out.append(f"      id \"{d['qdev_id']}\"")
    return "\n".join(out) + "\n"
