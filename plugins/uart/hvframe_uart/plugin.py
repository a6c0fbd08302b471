"""Device types com1-com4: a 16550A at the standard PC port and IRQ, with a chosen backend;
and uart: the same on PCI."""
from __future__ import annotations

from functools import partial

from hvframe.device import AcpiIsaDevice, DeviceOptions, DeviceType, PciOptions, option
from hvframe.hookspecs import hookimpl

from .backends import SPEC_HELP, FileBackend, NullBackend, StdioBackend, open_backend
from .uart16550 import BYTE_PORTS, Uart16550

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hvframe.bench import Benchmarks

# name: (I/O base, ISA IRQ). COM3/COM4 share IRQs with COM1/COM2, as on PCs.
COM_PORTS = {
    "com1": (0x3F8, 4),
    "com2": (0x2F8, 3),
    "com3": (0x3E8, 4),
    "com4": (0x2E8, 3),
}
PORT_COUNT = 8
# Backends whose write() only queues (a bounded buffer, or nothing): their ports' polled
# console is served natively (Uart16550.map_native).
NATIVE_OUTPUT = (StdioBackend, FileBackend, NullBackend)
BACKEND_HELP = f"where the port's bytes go: {SPEC_HELP.removeprefix('use ')}"


class ComOptions(DeviceOptions):
    backend: str = option("null", positional=True, example="stdio", help=BACKEND_HELP)
    native: bool = option(True, help="answer a polled console's LSR reads and THR writes in "
                                     "the native core (stdio, file and null backends)")


class PciUartOptions(PciOptions):
    backend: str = option("null", positional=True, example="stdio", help=BACKEND_HELP)


def console_quit(machine):
    """What Ctrl-A x on a stdio console does: end the run as a power-off by the host."""
    def quit_() -> None:
        from hvframe.control import CONSOLE_QUIT
        machine.request_exit(1, CONSOLE_QUIT)
    return quit_


def pci_uart_factory(machine, options: PciUartOptions, address):
    # The PCI UART brings the PCI layer (and construct): imported only when one is configured.
    from .pci_uart import pci_uart_factory as factory
    return factory(machine, options, address)


def _make_factory(name: str, base: int, irq: int):
    acpi = AcpiIsaDevice(name.upper(), "PNP0501", int(name[3:]), base, PORT_COUNT, irq)

    def factory(machine, options: ComOptions) -> Uart16550:
        backend = open_backend(options.backend or "null", label=name,
                               on_quit=console_quit(machine))
        # COM1/COM3 and COM2/COM4 share a line: each port is one source of it.
        uart = Uart16550(set_irq=machine.irq_source(irq), backend=backend, name=name, acpi=acpi)
        try:
            if options.native and isinstance(backend, NATIVE_OUTPUT):
                uart.map_native(machine.pio, base, name=name,
                                thr_writes=machine.coalesce_writes("pio", base, 1))
            else:
                machine.pio.register(base, PORT_COUNT, uart, name=name, access=BYTE_PORTS)
        except BaseException:
            backend.close()
            raise
        return uart     # the machine starts and closes it (Device.start, Device.close)
    return factory


def uart_benchmarks(bar: int | None) -> Benchmarks:
    """`hvframe bench`: every 16550 register read, and the writes a console makes (THR) and
    a probe makes (SCR); ports relative to the I/O BAR (PCI) or the COM port's base."""
    from hvframe.bench import Benchmarks, Register
    names = ("RBR", "IER", "IIR", "LCR", "MCR", "LSR", "MSR", "SCR")
    return Benchmarks(registers=(
        *(Register(f"{n} read", off, 1, bar=bar) for off, n in enumerate(names)),
        Register("THR write", 0, 1, write=0x41, bar=bar),
        Register("SCR write", 7, 1, write=0x5A, bar=bar)))


def uart_device_types() -> list[DeviceType]:
    pci_uart = DeviceType(name="uart", kind="pci", factory=pci_uart_factory,
                          summary="16550A UART on PCI (1b36:0002), I/O BAR 0, INTA",
                          options=PciUartOptions,
                          examples=("-s 4,uart,stdio", "-s 4,uart,tcp=127.0.0.1:4444"),
                          benchmarks=partial(uart_benchmarks, bar=0))
    return [pci_uart] + [
        DeviceType(
            name=name,
            kind="lpc",
            factory=_make_factory(name, base, irq),
            summary=f"16550A UART at I/O {base:#x}, IRQ {irq}",
            options=ComOptions,
            examples=(f"-l {name},stdio", f"-l {name},file=/tmp/{name}.log",
                      f"-l {name},tcp=127.0.0.1:4444", f"-o lpc.{name}.native=off"),
            benchmarks=partial(uart_benchmarks, bar=None),
        )
        for name, (base, irq) in COM_PORTS.items()
    ]


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return uart_device_types()
