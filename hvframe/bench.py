"""`hvframe bench DEVICE[,options]`: a device's benchmark scenarios on the synthetic machine.

A device type declares what to measure in ``DeviceType.benchmarks`` (a ``Benchmarks``):

    Benchmarks(registers=(Register("LSR read", 5, 1, bar=0), Register("THR write", 0, 1, bar=0,
                                                                        write=0x41)),
               data_paths=(virtio_path("read 4 KiB x32", chain, depth=32, bytes_per_op=4096),),
               defaults=lambda scratch: {"path": make_image(scratch)})

The first row is the floor: the same exit to an empty Python handler, what the core and one
interpreter call cost on this host at this moment (the device's rows read against it; a
busy host moves both). Each register scenario is one exit repeated: the same access
dispatched ``exits`` times in one call into the native dispatch core
(hvframe.testing.synthetic.ExitBatch), exactly the path a vCPU's KVM_EXIT_IO /
KVM_EXIT_MMIO takes after KVM, so the figure is the device's own cost per exit (KVM's part
is not in it). A device that declares no registers gets one read at the start of every
range it registered. A data path is a setup function that returns ``step()``, which does
some operations (say, a batch of virtio requests) and returns how many; it is timed round
by round. Every scenario runs ``rounds`` times; the best round is reported.

The device is built as `hvframe run` builds it (hvframe.testing.rig): `-s 3,DEVICE,...`
for PCI devices, `-l DEVICE,...` for LPC ones; a platform device by DeviceType.create.

``--json`` prints the results as JSON (save them as a baseline); ``--baseline FILE`` compares
with such a file and exits 1 when a scenario got slower by more than ``--threshold`` percent.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .device import PciAddress
from .errors import ConfigError

EXIT_REGRESSION = 1


@dataclass(frozen=True)
class Register:
    """One register exit to time. With ``bar``, ``offset`` is within that BAR of the PCI
    function; without, within the device's lowest range on ``space`` ("pio" or "mmio")."""
    name: str
    offset: int
    size: int = 4
    write: int | None = None        # the value written; None: the exit is a read
    bar: int | None = None
    space: str = "pio"


@dataclass(frozen=True)
class DataPath:
    """A data path to time: ``setup(rig)`` prepares it and returns ``step() -> operations``."""
    name: str
    setup: Callable[["BenchRig"], Callable[[], int]]
    unit: str = "op"
    bytes_per_op: int = 0


@dataclass(frozen=True)
class Benchmarks:
    """What `hvframe bench` measures for a device type (DeviceType.benchmarks)."""
    registers: tuple[Register, ...] = ()
    data_paths: tuple[DataPath, ...] = ()
    # Options a benchmark run needs and the user need not give, made in a scratch
    # directory (a disk image); the user's options win.
    defaults: Callable[[str], dict[str, str]] | None = None


@dataclass
class BenchRig:
    """The machine a benchmark runs on and the device it built."""
    machine: Any
    device: Any
    address: PciAddress | None              # PCI devices
    ranges: dict[str, list] = field(default_factory=dict)   # space -> the device's ranges
    scratch: str = ""


@dataclass
class Result:
    name: str
    kind: str                 # "exit" or "data"
    ns_per_op: float
    unit: str = "exit"
    bytes_per_op: int = 0

    def as_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "ns_per_op": round(self.ns_per_op, 2),
                "unit": self.unit, "bytes_per_op": self.bytes_per_op}


BENCH_SLOT = 3


def virtio_path(name: str, chain: Callable[[Any, int, int], list], *, depth: int = 32,
                queue: int = 0, features: int = 0, bytes_per_op: int = 0) -> DataPath:
    """A virtio device's queue as a data path: ``chain(memory, base, i)`` lays out request i
    in guest RAM at base (64 KiB of room) and returns its buffers [(gpa, len, writable)];
    each step posts all ``depth`` requests, kicks once and waits for them (the driver in
    hvframe.testing.virtio, waiting on the queue's MSI-X irqfd as KVM would)."""
    def setup(rig: BenchRig) -> Callable[[], int]:
        from .testing.virtio import VirtioPciDriver
        drv = VirtioPciDriver(rig.machine, rig.address[1])
        drv.initialize(features)
        chains = [chain(rig.machine.memory, drv.data_base + i * 0x10000, i) for i in range(depth)]

        def step() -> int:
            for c in chains:
                drv.submit(queue, c, publish=False)
            drv.queues[queue].publish()
            drv.kick(queue)
            drv.wait_used(queue, depth)
            return depth
        return step
    return DataPath(name, setup, unit="request", bytes_per_op=bytes_per_op)


def virtio_registers() -> tuple[Register, ...]:
    """The register exits every virtio-pci device has (hvframe.virtio.pci's layout): modern
    common configuration, ISR, device configuration, the legacy header; the notify write is
    served by the doorbell's ioeventfd under KVM and never exits there, so it is left out."""
    from .layout import offsets_of
    from .virtio.pci import (COMMON_OFF, DEVICE_OFF, ISR_OFF, LEGACY_BAR, MODERN_BAR,
                             VirtioPciCommonCfg, VirtioPciLegacyHeader)
    common, legacy = offsets_of(VirtioPciCommonCfg), offsets_of(VirtioPciLegacyHeader)
    return (Register("common device_feature read", COMMON_OFF + common["device_feature"], 4,
                     bar=MODERN_BAR),
            Register("common queue_select write", COMMON_OFF + common["queue_select"], 2,
                     write=0, bar=MODERN_BAR),
            Register("common device_status read", COMMON_OFF + common["device_status"], 1,
                     bar=MODERN_BAR),
            Register("isr read", ISR_OFF, 1, bar=MODERN_BAR),
            Register("device config read", DEVICE_OFF, 4, bar=MODERN_BAR),
            Register("legacy host_features read", legacy["host_features"], 4, bar=LEGACY_BAR))


# -- building the device -------------------------------------------------------------------
def build(registry, spec: str, scratch: str):
    """(machine, BenchRig, Benchmarks) for ``spec``: the device built on a synthetic machine
    (the caller closes it) through the runner's path, hvframe.testing.rig (`-s 3,DEVICE,...`
    or `-l DEVICE,...`), or DeviceType.create for a platform device; ``scratch`` is a
    directory for what Benchmarks.defaults makes."""
    from .testing.rig import rig
    from .testing.synthetic import SyntheticMachine
    name, _, conf = spec.partition(",")
    kind = registry.kind_of(name)
    if kind is None:
        raise ConfigError(f"bench {spec}: no device {name!r} (see `hvframe devices`)")
    dt = registry.get(name, kind)
    declared = dt.benchmarks() if callable(dt.benchmarks) else dt.benchmarks
    bench = declared or Benchmarks()
    if bench.defaults is not None:
        given = dt.parse_conf(conf)
        extra = {k: v for k, v in bench.defaults(scratch).items() if k not in given}
        conf = ",".join([conf] * bool(conf) + [f"{k}={v}" for k, v in extra.items()])
    m = SyntheticMachine(256 << 20, irqfd_eventfds=True)
    try:
        if dt.kind == "pci":         # the bus's own ports are not the device's registers
            m.pci_bus()
        buses = {"pio": m.pio, "mmio": m.mmio}
        before = {s: {r.base for r in bus.ranges()} for s, bus in buses.items()}
        address = PciAddress(0, BENCH_SLOT, 0) if dt.kind == "pci" else None
        if dt.kind == "platform":    # rig builds every platform device or none
            device = dt.create(m, dt.validate(dt.parse_conf(conf), where=f"platform.{name}"))
        else:
            arg = f"-s {BENCH_SLOT},{name}" if dt.kind == "pci" else f"-l {name}"
            built = rig(m, arg + (f",{conf}" if conf else ""), registry=registry)
            device = built[0] if built else None
        m.start_devices()
        ranges = {s: [r for r in bus.ranges() if r.base not in before[s]]
                  for s, bus in buses.items()}
        return m, BenchRig(m, device, address, ranges, scratch), bench
    except BaseException:
        m.close()
        raise


def register_exits(rig: BenchRig, bench: Benchmarks) -> list[tuple[Register, str, int]]:
    """(register, space, absolute address) of every register scenario."""
    out = []
    if not bench.registers:      # nothing declared: one read at the start of each range
        for space, ranges in rig.ranges.items():
            for r in ranges:
                out.append((Register(f"{r.name or hex(r.base)} read", 0, min(4, r.length)),
                            space, r.base))
        return out
    for reg in bench.registers:
        if reg.bar is not None:
            if rig.address is None:
                raise ConfigError(f"bench: register {reg.name} names BAR{reg.bar}, but the "
                                  "device is not a PCI function")
            bar = rig.device.bar(reg.bar)
            space = "pio" if bar.kind == "io" else "mmio"
            out.append((reg, space, rig.device.bar_address(reg.bar) + reg.offset))
        else:
            ranges = rig.ranges.get(reg.space) or []
            if not ranges:
                raise ConfigError(f"bench: register {reg.name}: the device has no "
                                  f"{reg.space} range")
            out.append((reg, reg.space, ranges[0].base + reg.offset))
    return out


def run(registry, spec: str, *, rounds: int = 5, exits: int = 2000,
        data_seconds: float = 0.2) -> tuple[str, list[Result]]:
    """Build the device of ``spec`` on a synthetic machine and time its scenarios."""
    if rounds < 1 or exits < 1:
        raise ConfigError("bench: --rounds and --exits must be at least 1")
    results: list[Result] = []
    import tempfile     # here: device plugins import this module on every run's path
    with tempfile.TemporaryDirectory(prefix="hvframe-bench-") as scratch:
        m, rig, bench = build(registry, spec, scratch)
        try:
            floor = _floor_port(m)
            exits_to_time = [(Register(FLOOR, 0, 1), "pio", floor), *register_exits(rig, bench)]
            for reg, space, addr in exits_to_time:
                is_write = reg.write is not None
                batch = m.prepare_exits([(addr, reg.size, reg.write or 0, is_write)] * exits,
                                        mmio=space == "mmio")
                best = min(_timed(batch.run_only) for _ in range(rounds))
                results.append(Result(reg.name, "exit", best * 1e9 / exits))
            for path in bench.data_paths:
                step = path.setup(rig)
                step()                                   # warm-up
                best = float("inf")
                for _ in range(rounds):
                    ops, start = 0, time.perf_counter()
                    while True:
                        ops += step()
                        elapsed = time.perf_counter() - start
                        if elapsed >= data_seconds:
                            break
                    best = min(best, elapsed / ops)
                results.append(Result(path.name, "data", best * 1e9, path.unit,
                                      path.bytes_per_op))
        finally:
            m.close()
    return spec, results


FLOOR = "(floor: an empty Python handler's read)"


class _EmptyHandler:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def _floor_port(m) -> int:
    """A free port with an empty handler on it: the row that shows what the dispatch core and
    one Python call cost on this host now, for reading the device's rows against."""
    port = 0x600
    while m.pio.find_overlap(port, 1) is not None:
        port += 1
    m.pio.register(port, 1, _EmptyHandler(), name="bench floor")
    return port


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- reporting -----------------------------------------------------------------------------
def _rate(per_s: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= div:
            return f"{per_s / div:.2f}{suffix}"
    return f"{per_s:.1f}"


def table(device: str, results: list[Result], compared: dict[str, float] | None = None) -> str:
    rows = [("scenario", "kind", "time/op", "ops/s", "MB/s", "vs baseline" if compared else "")]
    for r in results:
        per_op = f"{r.ns_per_op / 1000:.3f} us" if r.ns_per_op >= 1000 else f"{r.ns_per_op:.1f} ns"
        mb = r.bytes_per_op * 1e3 / r.ns_per_op
        mbs = (f"{mb:.0f}" if mb >= 10 else f"{mb:.2f}") if r.bytes_per_op else ""
        delta = ""
        if compared and r.name in compared:
            delta = f"{(compared[r.name] - 1) * 100:+.0f}%"
        rows.append((r.name, r.kind, per_op, _rate(1e9 / r.ns_per_op), mbs, delta))
    if not any(r.bytes_per_op for r in results):      # no data path: no MB/s column
        rows = [row[:4] + row[5:] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"hvframe bench {device}: synthetic exits through the dispatch core, best round"]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)


def as_json(device: str, results: list[Result]) -> str:
    import json
    return json.dumps({"device": device, "results": [r.as_json() for r in results]}, indent=1)


def load_baseline(path: str) -> dict[str, float]:
    """{scenario name: ns per op} of a saved `--json` run; ConfigError if unusable."""
    import json
    try:
        with open(path) as f:
            data = json.load(f)
        return {r["name"]: float(r["ns_per_op"]) for r in data["results"]}
    except OSError as e:
        raise ConfigError(f"--baseline {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--baseline {path}: not a saved `hvframe bench --json` run "
                          f"({type(e).__name__}: {e})") from None


def compare(results: list[Result], baseline: dict[str, float]) -> dict[str, float]:
    """Scenario name -> time now / time in the baseline, for scenarios in both."""
    return {r.name: r.ns_per_op / baseline[r.name] for r in results
            if r.name in baseline and baseline[r.name] > 0}


def main(args, registry) -> int:
    if not 0 <= args.threshold:
        raise ConfigError(f"--threshold {args.threshold}: must be a percentage >= 0")
    baseline = load_baseline(args.baseline) if args.baseline else None
    device, results = run(registry, args.device, rounds=args.rounds, exits=args.exits)
    ratios = compare(results, baseline) if baseline is not None else None
    print(as_json(device, results) if args.json else table(device, results, ratios))
    if ratios is None:
        return 0
    limit = 1 + args.threshold / 100
    # The floor is the host, not the device: reported, never a regression of the device's.
    worse = {n: q for n, q in ratios.items() if q > limit and n != FLOOR}
    if FLOOR in ratios and not 1 / limit <= ratios[FLOOR] <= limit:
        print(f"hvframe: bench: note: the floor moved {(ratios[FLOOR] - 1) * 100:+.0f}% since "
              "the baseline: the host is busier or quieter than it was", file=sys.stderr)
    missing = sorted(set(baseline) - {r.name for r in results})
    if missing:
        print(f"hvframe: bench: not in this run: {', '.join(missing)}", file=sys.stderr)
    for n, q in sorted(worse.items()):
        print(f"hvframe: bench: regression: {n}: {(q - 1) * 100:+.0f}% "
              f"(threshold {args.threshold:g}%)", file=sys.stderr)
    return EXIT_REGRESSION if worse else 0
