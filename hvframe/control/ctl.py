"""`hvframe ctl`, after bhyvectl(8): control a running VM by name over its QMP socket.

    hvframe ctl --vm NAME [--get-all [--cpu N]] [--get-stats] [--pause] [--resume]
                          [--force-reset] [--force-poweroff] [--destroy]
                          [--checkpoint FILE | --suspend FILE]

--checkpoint is QMP `migrate` to file:FILE followed by `cont` (QEMU leaves a VM paused after
a migration), --suspend the same followed by `quit`; hvframe.snapshot has the rest.

Also the bhyve(8) flags `hvframe run` accepts for compatibility (add_bhyve_flags), with what
each means here (bhyve_notes, printed with -v).
"""
from __future__ import annotations

import os

from ..errors import ConfigError, HvError
from . import rundir

EXIT_ERROR = 4


# -- `hvframe run`: bhyve's flags ------------------------------------------------------------

# flag: (bhyve's meaning, what hvframe does with it). Not here: -a (bhyve's deprecated
# "xAPIC mode", the default anyway) and -k (a configuration file), which hvframe uses for
# --cmdline and --kernel.
BHYVE_FLAGS = {
    "A": ("generate ACPI tables", "always done for direct kernel boot; accepted"),
    "C": ("include guest memory in core files", "accepted and ignored"),
    "D": ("destroy the VM on guest power-off", "always so (the VM lives in this process); accepted"),
    "e": ("exit on unemulated I/O port accesses", "accepted and ignored (they read all ones)"),
    "H": ("yield the vCPU thread on HLT", "KVM's in-kernel HLT does; accepted"),
    "P": ("exit on PAUSE", "accepted and ignored (KVM's pause-loop exiting)"),
    "S": ("wire guest memory", "accepted and ignored"),
    "u": ("RTC keeps UTC", "the RTC always keeps UTC here; accepted"),
    "W": ("force virtio PCI devices to use MSI", "accepted and ignored (MSI-X is offered)"),
    "w": ("ignore unimplemented MSRs", "accepted and ignored (KVM decides)"),
    "x": ("x2APIC mode", "accepted and ignored (the guest may enable x2APIC itself)"),
    "Y": ("no MP table", "accepted and ignored (the MP table is always written)"),
}


def add_bhyve_flags(r) -> None:
    """bhyve(8) options with no effect here, so that its command lines run unchanged."""
    for flag, (meaning, _) in BHYVE_FLAGS.items():
        r.add_argument(f"-{flag}", dest=f"bhyve_{flag}", action="store_true",
                       help=f"bhyve: {meaning} (accepted; see -v)")
    r.add_argument("-p", dest="bhyve_pin", action="append", default=[], metavar="VCPU:HOSTCPU",
                   help="bhyve: pin a vCPU to a host CPU (accepted and ignored)")
    r.add_argument("-U", dest="bhyve_uuid", metavar="UUID",
                   help="the system UUID firmware finds in SMBIOS (default: derived from the "
                        "host's and the VM's names)")
    r.add_argument("-K", dest="bhyve_layout", metavar="LAYOUT",
                   help="bhyve: keyboard layout (accepted and ignored: no framebuffer)")
    r.add_argument("-G", dest="bhyve_gdb", metavar="PORT", help="bhyve: GDB server (not supported)")
    r.add_argument("-r", "--restore", dest="restore", metavar="FILE",
                   help="start from a checkpoint (hvframe ctl --checkpoint/--suspend, QMP "
                        "migrate file:PATH) instead of booting; give the same devices as the "
                        "VM it was taken of")
    r.add_argument("--incoming", metavar="ADDR",
                   help="wait for a VM migrated to unix:PATH or tcp:HOST:PORT (QMP migrate "
                        "on the source), then run it here")
    r.add_argument("--qmp", action="append", default=[], metavar="unix:PATH",
                   help="also serve QMP on this Unix socket (it is always on the VM's control "
                        "socket in its run directory)")
    r.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="after SIGTERM presses the power button, stop the VM if it has not "
                        "powered off within this time (default 30; 0 waits forever)")
    r.add_argument("vmname", nargs="?", help="the VM's name (bhyve's vmname; default vm-PID)")


def bhyve_notes(args) -> list[str]:
    """One line per bhyve flag given, saying what it means and what hvframe did with it."""
    notes = []
    for flag, (meaning, done) in BHYVE_FLAGS.items():
        if getattr(args, f"bhyve_{flag}"):
            notes.append(f"-{flag} ({meaning}): {done}")
    for pin in args.bhyve_pin:
        notes.append(f"-p {pin} (pin a vCPU to a host CPU): accepted and ignored")
    if args.bhyve_layout:
        notes.append(f"-K {args.bhyve_layout} (keyboard layout): accepted and ignored")
    return notes


def check_unsupported(args) -> None:
    if args.bhyve_gdb:
        raise ConfigError(f"-G {args.bhyve_gdb}: the GDB server is not supported")
    if args.restore and args.incoming:
        raise ConfigError("--restore and --incoming cannot be used together")
    if args.incoming:
        from ..snapshot.migrate import parse_address
        parse_address(args.incoming, "--incoming")


def qmp_paths(specs: list[str]) -> list[str]:
    paths = []
    for spec in specs:
        kind, _, path = spec.partition(":")
        if kind != "unix" or not path:
            raise ConfigError(f"--qmp {spec}: use --qmp unix:PATH")
        paths.append(path)
    return paths


# -- `hvframe ctl` ---------------------------------------------------------------------------

def add_ctl_parser(sub, help: str, arguments: bool = True) -> None:
    """`hvframe ctl`'s parser; without arguments, its name and help only (the command listing,
    or an unknown command's error)."""
    c = sub.add_parser("ctl", help=help)
    if not arguments:
        return
    c.add_argument("--vm", required=True, metavar="NAME", help="the VM's name")
    c.add_argument("--get-all", action="store_true", help="every vCPU's registers")
    c.add_argument("--cpu", type=int, metavar="N", help="only this vCPU (with --get-all)")
    c.add_argument("--get-stats", action="store_true",
                   help="exit counts per vCPU and reason, and per device")
    c.add_argument("--pause", action="store_true", help="stop the vCPUs")
    c.add_argument("--resume", action="store_true", help="let the vCPUs run again")
    c.add_argument("--force-reset", action="store_true", help="reset the VM (QMP system_reset)")
    c.add_argument("--force-poweroff", action="store_true",
                   help="power the VM off at once (as --destroy)")
    c.add_argument("--destroy", action="store_true", help="stop the VM (its process exits)")
    c.add_argument("--suspend", metavar="FILE",
                   help="save a checkpoint to FILE, then stop the VM (hvframe run --restore "
                        "FILE goes on from it)")
    c.add_argument("--checkpoint", metavar="FILE",
                   help="save a checkpoint to FILE; the VM runs on")


class QmpClient:
    """A minimal blocking QMP client (the standard library only, so `hvframe ctl` needs
    nothing else): greeting, capabilities, then one command at a time; events are skipped."""

    def __init__(self, path: str, timeout: float = 30.0):
        # json and socket imported where used: `hvframe run` imports this module for its
        # bhyve flags.
        import json
        import socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = ""
        self._dec = json.JSONDecoder()
        greeting = self._read()
        if "QMP" not in greeting:
            raise HvError(f"{path}: not a QMP server")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        import json
        while True:
            s = self._buf.lstrip()
            if s:
                try:
                    obj, end = self._dec.raw_decode(s)
                    self._buf = s[end:]
                    return obj
                except json.JSONDecodeError:
                    pass
            data = self.sock.recv(65536)
            if not data:
                raise HvError("the VM closed the control connection")
            self._buf += data.decode()

    def execute(self, name: str, arguments: dict | None = None):
        import json
        msg = {"execute": name, "id": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise HvError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()


def connect(name: str) -> QmpClient:
    path = rundir.socket_path(name)
    try:
        return QmpClient(path)
    except (FileNotFoundError, ConnectionRefusedError):
        running = rundir.running_vms()
        raise ConfigError(f"no VM named {name!r} is running"
                          + (f" (running: {', '.join(running)})" if running else "")) from None
    except OSError as e:
        raise ConfigError(f"VM {name!r}: cannot connect to {path}: {e.strerror or e}") from None


def format_get_all(regs: list[dict]) -> str:
    """bhyvectl's --get-all layout: `name[vcpu]\\tvalue` lines; descriptors as
    `seg desc[vcpu]\\tbase/limit/access`."""
    out = []
    for r in regs:
        i = r["cpu"]
        for n in ("efer", "cr0", "cr2", "cr3", "cr4", "dr0", "dr1", "dr2", "dr3", "dr6", "dr7",
                  "rsp", "rip", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9",
                  "r10", "r11", "r12", "r13", "r14", "r15", "rflags"):
            if n in r:
                out.append(f"{n}[{i}]\t\t0x{r[n]:016x}")
        for n in ("ds", "es", "fs", "gs", "ss", "cs", "tr", "ldt"):
            s = r[n]
            name = "ldtr" if n == "ldt" else n
            out.append(f"{name} desc[{i}]\t0x{s['base']:016x}/0x{s['limit']:08x}/0x{s['access']:08x}")
        for n in ("gdt", "idt"):
            t = r[n]
            out.append(f"{n}r desc[{i}]\t0x{t['base']:016x}/0x{t['limit']:08x}")
        for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
            name = "ldtr" if n == "ldt" else n
            out.append(f"{name}[{i}]\t\t0x{r[n]['selector']:04x}")
        msrs = r.get("msrs", {})
        if "pat" in msrs:
            out.append(f"guest_pat[{i}]\t\t0x{msrs['pat']:016x}")
        for n in ("sysenter_cs", "sysenter_esp", "sysenter_eip"):
            if n in msrs:
                out.append(f"guest_{n}[{i}]\t0x{msrs[n]:016x}")
        out.append(f"apic_base[{i}]\t\t0x{r['apic_base']:016x}")
    return "\n".join(out)


def format_get_stats(stats: dict) -> str:
    """bhyvectl's --get-stats layout: `vcpuN stats:` then `%-40s\\t%d` rows; then the same
    per device range."""
    out = []
    for v in stats["vcpus"]:
        out.append(f"vcpu{v['cpu']} stats:")
        e = v["exits"]
        for label, key in (("number of port I/O exits", "io"), ("number of MMIO exits", "mmio"),
                           ("number of other exits (interrupts)", "other")):
            out.append(f"{label:<40}\t{e[key]}")
        out.append(f"{'total exits to user space':<40}\t{sum(e.values())}")
    out.append("device stats:")
    for d in stats["devices"]:
        label = f"{d['device']} ({d['space']} {d['base']:#x}+{d['length']:#x})"
        out.append(f"{label:<40}\t{d['count']}")
    u = stats["unclaimed"]
    out.append(f"{'unclaimed port I/O accesses':<40}\t{u['io']}")
    out.append(f"{'unclaimed MMIO accesses':<40}\t{u['mmio']}")
    return "\n".join(out)


def ctl_main(args) -> int:
    rundir.check_name(args.vm)
    if args.suspend and args.checkpoint:
        raise ConfigError("ctl: --suspend and --checkpoint cannot be used together")
    actions = [a for a in ("get_all", "get_stats", "pause", "resume", "force_reset",
                           "force_poweroff", "destroy", "suspend", "checkpoint")
               if getattr(args, a)]
    if not actions:
        raise ConfigError("ctl: nothing to do; give --get-all, --get-stats, --pause, --resume, "
                          "--force-reset, --force-poweroff, --destroy, --checkpoint FILE or "
                          "--suspend FILE")
    client = connect(args.vm)
    try:
        if args.pause:
            client.execute("stop")
        if args.get_all:
            regs = client.execute("x-query-registers")
            if args.cpu is not None:
                regs = [r for r in regs if r["cpu"] == args.cpu]
                if not regs:
                    raise ConfigError(f"--cpu {args.cpu}: VM {args.vm} has no such vCPU")
            print(format_get_all(regs))
        if args.get_stats:
            print(format_get_stats(client.execute("x-query-exit-stats")))
        target = args.suspend or args.checkpoint
        if target:
            # QEMU's way: migrate to a file leaves the VM paused ("postmigrate").
            running = client.execute("query-status").get("running")
            try:
                client.execute("migrate", {"uri": f"file:{os.path.abspath(target)}"})
            except HvError as e:
                raise ConfigError(f"{'--suspend' if args.suspend else '--checkpoint'} "
                                  f"{target}: {e}") from None
            if args.suspend:
                client.execute("quit")
            elif running:
                client.execute("cont")
        if args.resume:
            client.execute("cont")
        if args.force_reset:
            client.execute("system_reset")
        if args.destroy or args.force_poweroff:
            client.execute("quit")
    except OSError as e:
        raise HvError(f"VM {args.vm}: control connection failed: {e.strerror or e}") from None
    finally:
        client.close()
    return 0
