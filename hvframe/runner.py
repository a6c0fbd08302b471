"""From command line to configuration tree to a running machine (`hvframe run`)."""
from __future__ import annotations

import os
import re
import sys
from collections import namedtuple

from .config import Config
from .cpuid import POLICIES
from .device import parse_size
from .errors import ConfigError
from .machine import EXIT_ERROR, Machine
from .memory import DEFAULT_MEMORY
from .plugins import Registry

MAX_CPUS = 254     # the MP table's APIC IDs (the IOAPIC takes the next one); the MADT allows 255
TOP_LEVEL_KEYS = {"cpus", "memory", "pci", "lpc", "boot", "cpu", "platform", "config", "name",
                  "uuid"}
_PCI_ADDR = re.compile(r"^\d+(:\d+){0,2}$")


def parse_cpus(text: str) -> int:
    """bhyve's -c: N or cpus=N (sockets/cores/threads only describe the same count)."""
    n = None
    for item in str(text).split(","):
        key, eq, val = item.partition("=")
        if not eq:
            key, val = "cpus", key
        if key not in ("cpus", "sockets", "cores", "threads"):
            raise ConfigError(f"-c {text}: unknown item {key!r}; use -c N or -c cpus=N")
        if not val.isdigit() or int(val) < 1:
            raise ConfigError(f"-c {text}: {key} must be a positive number")
        if key == "cpus":
            n = int(val)
    if n is None:
        raise ConfigError(f"-c {text}: give the number of vCPUs, e.g. -c 2")
    return n


def parse_pci_address(text: str, where: str) -> tuple[int, int, int]:
    """slot, slot:func or bus:slot:func, as bhyve's -s."""
    if not _PCI_ADDR.match(text):
        raise ConfigError(f"{where}: bad PCI slot {text!r}; use slot, slot:func or bus:slot:func")
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 3:
        bus, slot, func = parts
    else:
        bus, slot, func = 0, parts[0], (parts[1] if len(parts) > 1 else 0)
    if bus > 255 or slot > 31 or func > 7:
        raise ConfigError(f"{where}: PCI address {text} out of range (bus 0-255, slot 0-31, function 0-7)")
    return bus, slot, func


def add_slot(cfg: Config, registry: Registry, arg: str) -> None:
    where = f"-s {arg}"
    addr, _, rest = arg.partition(",")
    emu, _, conf = rest.partition(",")
    if not emu:
        raise ConfigError(f"{where}: missing device name; use -s slot,device[,options]")
    b, s, f = parse_pci_address(addr, where)
    path = f"pci.{b}.{s}.{f}"
    if cfg.has(f"{path}.device"):
        raise ConfigError(f"{where}: PCI slot {b}:{s}:{f} is already used by {cfg.get(path + '.device')}")
    dt = registry.require(emu, "pci", where)
    cfg.set(f"{path}.device", dt.name)
    for k, v in dt.parse_conf(conf).items():
        cfg.set(f"{path}.{k}", v)


def add_lpc(cfg: Config, registry: Registry, arg: str) -> None:
    where = f"-l {arg}"
    name, _, conf = arg.partition(",")
    pdt = registry.get(name, "platform")
    if pdt is not None and registry.get(name, "lpc") is None and pdt.options:
        # A platform device configured bhyve-style, e.g. -l bootrom,FILE: its settings go
        # to platform.NAME (the same as -o platform.bootrom.path=FILE).
        if cfg.group(f"platform.{name}"):
            raise ConfigError(f"{where}: {name} is already configured")
        items = pdt.parse_conf(conf)
        if not items:
            raise ConfigError(f"{where}: {name} needs its settings, e.g. -l {name},"
                              f"{(pdt.positional or ('...',))[0].upper()}")
        pdt.validate(items, where=where)      # report a bad value against the -l argument
        for k, v in items.items():
            cfg.set(f"platform.{name}.{k}", v)
        return
    dt = registry.require(name, "lpc", where)
    if cfg.has(f"lpc.{name}.device"):
        raise ConfigError(f"{where}: {name} is already configured")
    cfg.set(f"lpc.{name}.device", dt.name)
    for k, v in dt.parse_conf(conf).items():
        cfg.set(f"lpc.{name}.{k}", v)


def add_option(cfg: Config, arg: str) -> None:
    path, eq, value = arg.partition("=")
    if not eq:
        raise ConfigError(f"-o {arg}: use -o path=value")
    top = path.split(".")[0]
    if top not in TOP_LEVEL_KEYS:
        raise ConfigError(f"-o {arg}: unknown setting {path!r}; settings start with "
                          f"{', '.join(sorted(TOP_LEVEL_KEYS))}")
    if top in ("name", "uuid") and path != top:
        raise ConfigError(f"-o {arg}: {top} is a single value (-o {top}=...)")
    cfg.set(path, value)


# memory_size, cpus: int; cpu_policy: str; kernel, initrd: str or None; cmdline: str;
# demo: bool; firmware: bool, a boot ROM (-l bootrom,FILE) starts the guest at the reset vector
RunPlan = namedtuple("RunPlan", "memory_size cpus cpu_policy kernel initrd cmdline demo firmware "
                     "system_uuid", defaults=(False, None))


def plan(cfg: Config) -> RunPlan:
    try:
        mem = parse_size(cfg.get("memory.size", DEFAULT_MEMORY), default_unit="m")
    except ValueError as e:
        raise ConfigError(f"-m {cfg.get('memory.size')}: {e}") from None
    if mem < (1 << 20) or mem % 4096:
        raise ConfigError(f"-m {cfg.get('memory.size')}: memory must be at least 1M and a multiple of 4K")
    cpus = parse_cpus(cfg.get("cpus", "1"))
    if cpus > MAX_CPUS:
        raise ConfigError(f"-c {cpus}: at most {MAX_CPUS} vCPUs fit the MP and ACPI tables")
    policy = cfg.get("cpu.policy", "auto")
    if policy not in POLICIES:
        raise ConfigError(f"cpu.policy={policy}: use one of {', '.join(POLICIES)}")
    kernel = cfg.get("boot.kernel")
    initrd = cfg.get("boot.initrd")
    for what, p in (("--kernel", kernel), ("--initrd", initrd)):
        if p is not None and not os.path.isfile(p):
            raise ConfigError(f"{what} {p}: no such file")
    if initrd and not kernel:
        raise ConfigError("--initrd needs --kernel")
    firmware = bool(cfg.get("platform.bootrom.path"))
    if firmware and kernel:
        raise ConfigError("--kernel cannot be used with a boot ROM (-l bootrom): the firmware boots")
    return RunPlan(mem, cpus, policy, kernel, initrd, cfg.get("boot.cmdline", ""),
                   kernel is None and not firmware, firmware,
                   # Only firmware reads it (SMBIOS); a bad -U is refused whatever boots.
                   system_uuid(cfg) if firmware or cfg.has("uuid") else None)


_UUID_TEXT = re.compile(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")


def system_uuid(cfg: Config) -> "uuid.UUID":
    """The UUID in the guest's SMBIOS system information (bhyve's `uuid`, -U): the one given
    (the 8-4-4-4-12 form only), else one derived from the host's and the VM's names
    (bhyve_config(5)), so that a VM keeps its UUID from run to run and two VMs on one host
    differ. A VM with no name (`name`, set from the command line's vmname) gets the host's.
    `hvframe run` fixes the derived one in the tree once (cli.main), so resets, QMP and
    checkpoints all see the same."""
    import uuid
    text = cfg.get("uuid")
    if text is not None:
        if not _UUID_TEXT.match(str(text)):
            raise ConfigError(f"system UUID {text!r} (-U, uuid=): not a UUID (use the form "
                              "6ba7b810-9dad-11d1-80b4-00c04fd430c8)")
        return uuid.UUID(str(text))
    host = uuid.uuid5(uuid.NAMESPACE_DNS, f"{os.uname().nodename}.hvframe")
    name = cfg.get("name")
    # Two steps, so that no host and VM name pair reads as another (names may hold dots).
    return uuid.uuid5(host, str(name)) if name else host


def adopt_snapshot_uuid(cfg: Config, meta: dict) -> None:
    """A VM restored or migrated in (under whatever name) keeps the system UUID its guest
    booted with, the one its checkpoint's configuration records, unless -U says otherwise."""
    config = meta.get("config")
    saved = config.get("uuid") if isinstance(config, dict) else None
    if saved is not None and _UUID_TEXT.match(str(saved)):
        cfg.set("uuid", str(saved))


def demo_guest_path() -> str:
    """The demo guest shipped in the package (built at install), else built now and cached.
    Found by path: importing hvframe.guests would bring its build kit (compiler checks,
    subprocess, hashing), which the packaged guest does not need."""
    packaged = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guests", "demo.elf")
    if os.path.exists(packaged):
        return packaged
    from .guests.build import cached_guest
    return cached_guest("demo")


def _needs_shared_memory(cfg: Config, registry: Registry) -> bool:
    """Whether a -s device runs outside this process and maps guest RAM (DeviceType)."""
    for slots in cfg.group("pci").values():
        for funcs in (slots.values() if isinstance(slots, dict) else ()):
            for group in (funcs.values() if isinstance(funcs, dict) else ()):
                if isinstance(group, dict) and "device" in group:
                    dt = registry.get(group["device"], "pci")
                    if dt is not None and dt.shared_memory:
                        return True
    return False


def add_devices(m: Machine, cfg: Config, registry: Registry, *, direct_boot: bool = True,
                platform: bool = True) -> None:
    """Build every device the configuration names on machine m: the platform devices, the
    LPC devices (lpc.NAME) and the PCI devices (pci.B.S.F), each through DeviceType.create;
    then place the PCI BARs (and with direct_boot, when no firmware will, enable decoding).
    hvframe.testing.rig() builds devices with this too (without platform devices unless
    asked: platform=False)."""
    for dt in (registry.types if platform else ()):
        if dt.kind == "platform":
            where = f"platform.{dt.name}"
            dt.create(m, dt.validate(cfg.group(where), where=where))
    for name, group in sorted(cfg.group("lpc").items()):
        where = f"lpc.{name}"
        if not isinstance(group, dict) or "device" not in group:
            raise ConfigError(f"{where}: no device given (use -l {name},...)")
        dt = registry.require(group["device"], "lpc", where)
        dt.create(m, dt.validate(group, where=where))
    if cfg.group("pci"):
        from .pci.bus import add_pci_devices
        add_pci_devices(m, registry, cfg.group("pci"), direct_boot=direct_boot)


def build_machine(cfg: Config, registry: Registry, *, backend: str = "kvm",
                  vm_setup=None) -> tuple[Machine, RunPlan]:
    """The machine the configuration describes, ready to start; vm_setup: a VM made ahead
    (hvframe.kvm.VmSetup) for it to take."""
    p = plan(cfg)
    if p.demo and not cfg.has("lpc.com1.device") and registry.get("com1", "lpc") is not None:
        cfg.set("lpc.com1.device", "com1")
        cfg.set("lpc.com1.backend", "stdio")
    m = Machine(p.memory_size, p.cpus, backend=backend, cpu_policy=p.cpu_policy,
                shared_memory=_needs_shared_memory(cfg, registry), vm_setup=vm_setup)
    m.system_uuid = p.system_uuid     # before the devices: fw_cfg's SMBIOS tables carry it
    try:
        add_devices(m, cfg, registry, direct_boot=not p.firmware)
        if p.firmware:
            # Firmware finds fw_cfg (and through it the serial console) even without -s ,lpc.
            from .lpc.bridge import setup_fw_cfg
            setup_fw_cfg(m)
        if p.demo:
            kernel, cmdline = demo_guest_path(), p.cmdline
        else:
            kernel, cmdline = p.kernel, p.cmdline
        if backend == "kvm" and p.firmware:
            m.create_vcpus()      # KVM's reset state: vCPU 0 fetches from 0xFFFFFFF0
        elif backend == "kvm":
            from .acpi.build import install_direct_boot_tables
            from .loader import load_kernel
            # No firmware: the VMM provides the ACPI tables and the MP table itself.
            tables = install_direct_boot_tables(m)
            boot = load_kernel(m.memory, kernel, cmdline=cmdline, initrd_path=p.initrd,
                               e820=tables["e820"], rsdp_paddr=tables["rsdp"])
            m.create_vcpus()
            m.boot_direct(boot)
    except BaseException:
        m.close()
        raise
    return m, p


def run(cfg: Config, registry: Registry, *, verbose: bool = False, timeout: float | None = None) -> int:
    m, _ = build_machine(cfg, registry)
    try:
        m.start_devices()
        code = m.run(timeout=timeout)
    finally:
        m.close()
    if code not in (0, 1) or verbose:
        print(f"hvframe: {m.exit_reason} (exit {code})", file=sys.stderr)
    return code if code is not None else EXIT_ERROR
