"""`hvframe` command line, in bhyve's terms:

    hvframe run [-c N] [-m SIZE] [-s slot,device[,conf]]... [-l dev,conf]... [-o path=value]...
                [--kernel FILE [--initrd FILE] [--cmdline TEXT]]
    hvframe devices [-v] [NAME...]
    hvframe bench DEVICE[,options] [--json] [--baseline FILE [--threshold PCT]]
    hvframe new-device NAME --kind port|pci|virtio [--dir DIR]

Start-up imports only what the command line asks for: device plugins are found from their
entry-point metadata (hvframe.plugins) and imported when one of their devices is named.

Exit status of `run` is bhyve's: 0 reboot, 1 poweroff, 2 halt, 3 triple fault, 4 error.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import HvError

EXIT_ERROR = 4    # bhyve's error status (hvframe.machine.EXIT_ERROR; not imported for `devices`)


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns without importing shutil: argparse makes a help
    formatter (which asks shutil) for every add_argument, and shutil (with bz2, lzma) costs
    every start-up ~4 ms."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() if width is None else width)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, bhyve's error status, no usage dump
        print(f"hvframe: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_ERROR)

    def parse_args(self, args=None, namespace=None):
        # Arguments no parser took are reported by the top parser; name the command's help.
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            command = self._commands.get(ns.command) if self._commands else None
            (command or self).error(f"unrecognized arguments: {' '.join(extra)}")
        return ns

    _commands: dict | None = None


COMMANDS = {   # name -> its one-line help (`hvframe --help`)
    "run": "run a guest (the embedded demo guest when none is given)",
    "devices": "list installed devices, their kinds and packages (-v or NAMEs: summaries and "
               "options too)",
    "bench": "time a device's register exits and data paths on the synthetic machine",
    "new-device": "write a new device plugin package from the template",
    "serve-device": "run one PCI device as a vfio-user server (the passthru plugin)",
    "ctl": "control a running VM by name (as bhyvectl)",
}


def make_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser: every command's, or with a known command only that one's
    (each parser argparse makes looks up its translations: a run does not pay for the
    others'); an unknown name gets the commands' names and help, for its error."""
    p = _Parser(prog="hvframe", description="A bhyve-style virtual machine monitor on KVM.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    p._commands = sub.choices
    names = [command] if command in COMMANDS else list(COMMANDS)
    for name in names:
        arguments = command is None or command == name
        if name == "ctl":
            from .control.ctl import add_ctl_parser
            add_ctl_parser(sub, help=COMMANDS[name], arguments=arguments)
            continue
        kwargs = {"add_help": False} if name == "serve-device" else {}
        c = sub.add_parser(name, help=COMMANDS[name], **kwargs)
        if not arguments:
            continue
        if name == "run":
            _run_arguments(c)
        elif name == "devices":
            c.add_argument("-v", "--verbose", action="store_true",
                           help="summaries and options of every device (imports every plugin)")
            c.add_argument("names", nargs="*", metavar="NAME", help="describe just these devices")
        elif name == "bench":
            _bench_arguments(c)
        elif name == "new-device":
            c.add_argument("name", help="device name, e.g. my-dev")
            c.add_argument("--kind", required=True, choices=("port", "pci", "virtio"),
                           help="port: an LPC port device; pci: MMIO BAR and MSI-X; virtio: a "
                                "virtio-pci device")
            c.add_argument("--dir", default=".", help="where to make the package's directory "
                                                      "(default .)")
    return p


def _run_arguments(r) -> None:
    r.add_argument("-c", dest="cpus", metavar="N", help="vCPUs: N or cpus=N (default 1)")
    r.add_argument("-m", dest="memory", metavar="SIZE", help="guest RAM, e.g. 512M or 2G (default 256M; bare number = MiB)")
    r.add_argument("-s", dest="slots", action="append", default=[], metavar="SLOT,EMU[,CONF]",
                   help="PCI device: slot[:func] or bus:slot:func, device name, options")
    r.add_argument("-l", dest="lpc", action="append", default=[], metavar="DEV,CONF",
                   help="LPC device, e.g. com1,stdio / com2,tcp=127.0.0.1:4444")
    r.add_argument("-o", dest="options", action="append", default=[], metavar="PATH=VALUE",
                   help="set a configuration value, e.g. cpu.policy=host")
    r.add_argument("-k", "--kernel", help="kernel to boot directly (PVH ELF or bzImage)")
    r.add_argument("-i", "--initrd", help="initial ramdisk for --kernel")
    r.add_argument("-a", "--cmdline", help="kernel command line")
    r.add_argument("-v", "--verbose", action="store_true", help="say why the guest stopped")
    r.add_argument("--timeout", type=float, help="stop the guest after this many seconds (exit 4)")
    from .control.ctl import add_bhyve_flags
    add_bhyve_flags(r)          # bhyve's other flags, the VM name, --qmp, --grace


def _bench_arguments(b) -> None:
    b.add_argument("device", metavar="DEVICE[,options]", help="a device and its options, as after -s N, or -l")
    b.add_argument("--json", action="store_true", help="print the results as JSON (a baseline)")
    b.add_argument("--baseline", metavar="FILE", help="compare with a saved --json run; exit 1 "
                                                      "on a regression")
    b.add_argument("--threshold", type=float, default=20.0, metavar="PCT",
                   help="how much slower than the baseline is a regression (default 20%%)")
    b.add_argument("--rounds", type=int, default=5, help="rounds per scenario, best kept (default 5)")
    b.add_argument("--exits", type=int, default=2000, help="exits per round (default 2000)")


def config_from_args(args, registry):
    from .config import Config
    from .runner import add_lpc, add_option, add_slot
    cfg = Config()
    # -o first, so that explicit options override; then the short forms.
    for o in args.options:
        add_option(cfg, o)
    if args.cpus is not None:
        cfg.set("cpus", args.cpus)
    if args.memory is not None:
        cfg.set("memory.size", args.memory)
    for s in args.slots:
        add_slot(cfg, registry, s)
    for l in args.lpc:
        add_lpc(cfg, registry, l)
    for key, value in (("boot.kernel", args.kernel), ("boot.initrd", args.initrd),
                       ("boot.cmdline", args.cmdline), ("uuid", args.bhyve_uuid)):
        if value is not None:
            cfg.set(key, value)
    return cfg


def _memory_size_hint(args) -> int | None:
    """Guest RAM's size as the run's plan will find it, from the command line alone (-m, or
    else the last -o memory.size=), for the VM made ahead; None when in doubt (the machine
    then makes its RAM itself, and reports a bad size)."""
    # Only what the VM set-up thread needs anyway: it starts before the rest is imported.
    from .device import parse_size
    from .memory import DEFAULT_MEMORY
    text = args.memory
    if text is None:
        text = DEFAULT_MEMORY
        for o in args.options:
            path, eq, value = o.partition("=")
            if eq and path == "memory.size":
                text = value
    try:
        size = parse_size(text, default_unit="m")
    except ValueError:
        return None
    return size if size >= (1 << 20) and size % 4096 == 0 else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve-device"]:     # its options are the passthru plugin's to parse
        try:
            from hvframe_passthru.server import main as serve_device
        except ImportError:
            print("hvframe: serve-device needs the hvframe-passthru plugin", file=sys.stderr)
            return EXIT_ERROR
        return serve_device(argv[1:])
    # Only the command given gets its arguments made (none given, or an option first: all).
    args = make_parser(argv[0] if argv and not argv[0].startswith("-") else None).parse_args(argv)
    vm_setup = None
    try:
        if args.command == "run" and not args.incoming:
            # KVM's VM is made on a thread meanwhile (its ioctls wait on the kernel, not on
            # the GIL); the first machine takes it, and whatever happens it is closed below.
            from .kvm import VmSetup, kvm_available
            if kvm_available() is None:
                vm_setup = VmSetup(_memory_size_hint(args))
        if args.command == "ctl":
            from .control.ctl import ctl_main
            return ctl_main(args)
        if args.command == "new-device":
            from .template import new_device
            print(new_device(args.name, args.kind, args.dir))
            return 0
        from .plugins import Registry
        # `devices` builds no machine: no plugin is imported for its platform devices, and
        # a plugin that cannot be loaded is reported and skipped.
        listing = args.command == "devices"
        registry = Registry(platform=args.command == "run",
                            skip_broken=listing and not args.names)
        if args.command == "bench":
            from .bench import main as bench_main
            return bench_main(args, registry)
        if listing:
            print(registry.describe(verbose=args.verbose, names=args.names))
            for problem in registry.broken:
                print(f"hvframe: skipped: {problem}", file=sys.stderr)
            return 0
        if args.command != "run":
            make_parser().print_help()
            return EXIT_ERROR
        from .control.ctl import bhyve_notes, check_unsupported, qmp_paths
        from .control.lifecycle import DEFAULT_GRACE, Lifecycle
        from .control.rundir import check_name, default_name
        check_unsupported(args)
        cfg = config_from_args(args, registry)
        # bhyve's VM name: the last argument, else -o name=; it is in the tree (the system
        # UUID derives from it). An unnamed VM is called vm-PID, a name not kept.
        if args.vmname or cfg.has("name"):
            cfg.set("name", check_name(args.vmname or str(cfg.get("name"))))
        name = cfg.get("name") or default_name()
        # The system UUID, checked now (a bad -U is refused before anything starts) and, when
        # derived, fixed in the tree for the whole run: resets, QMP and checkpoints see the
        # one the guest booted with. Only firmware reads it: other runs skip the uuid import.
        uuid_given = cfg.has("uuid")
        if uuid_given or cfg.get("platform.bootrom.path"):
            from .runner import system_uuid
            cfg.set("uuid", str(system_uuid(cfg)))
        if str(cfg.get("config.dump", "")).lower() in ("1", "true", "yes", "on"):
            print(f"name={name}")       # bhyve's -o config.dump=1: the tree, then exit
            print("\n".join(f"{k}={v}" for k, v in cfg.items() if k not in ("config.dump", "name")))
            return 0
        grace = DEFAULT_GRACE if args.grace is None else (args.grace or None)
        return Lifecycle(cfg, registry, name=name, qmp_paths=qmp_paths(args.qmp),
                         verbose=args.verbose, timeout=args.timeout, grace=grace,
                         notes=bhyve_notes(args), restore=args.restore,
                         incoming=args.incoming, vm_setup=vm_setup,
                         uuid_given=uuid_given).run()
    except HvError as e:
        print(f"hvframe: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:   # Ctrl-C before the run's own SIGINT handling is in place
        print("hvframe: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:     # stdout's reader went away (`hvframe devices | head`): stop
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:      # a VMM bug or a host failure: one line, never a traceback
        if os.environ.get("HVFRAME_TRACEBACK"):
            raise
        print(f"hvframe: internal error: {type(e).__name__}: {e} "
              "(HVFRAME_TRACEBACK=1 shows where)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if vm_setup is not None:
            vm_setup.close()


def entry() -> None:
    """The `hvframe` program: main(), then an exit that skips the interpreter's teardown of
    its modules (40-70 ms here, a sixth of a short run) once nothing is left to it: the VM is
    closed and no other thread runs; the atexit functions (weakref finalizers among them)
    run and stdout and stderr are flushed first. With another thread alive, the ordinary
    exit (which waits for it)."""
    rc = main()
    import atexit
    import threading
    if threading.active_count() > 1:
        sys.exit(rc)
    atexit._run_exitfuncs()
    rc = rc if isinstance(rc, int) else 0 if rc is None else 1
    for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        if stream is None:          # started with the descriptor closed (`>&-`)
            continue
        try:
            stream.flush()
        except BrokenPipeError:
            pass                    # its reader went away (`hvframe devices | head`)
        except (OSError, ValueError) as e:
            # Output lost (a full disk, say): never a silent success.
            _report_lost_output(name, e)
            rc = EXIT_ERROR
    os._exit(rc)


def _report_lost_output(name: str, e: Exception) -> None:
    why = e.strerror if isinstance(e, OSError) and e.strerror else e
    try:
        os.write(2, f"hvframe: {name}: {why}\n".encode())
    except OSError:
        pass


if __name__ == "__main__":
    entry()
