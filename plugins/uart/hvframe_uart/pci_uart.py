"""A 16550A on PCI (`-s N,uart,BACKEND`): the same register model behind an 8-byte I/O BAR,
with IDs Linux's 8250_pci and other drivers of QEMU's pci-serial already know (1b36:0002,
class 07:00:02, a 16550-compatible serial controller) and its interrupt on INTA."""
from __future__ import annotations

from hvframe.packed import declared_later
from hvframe.pci.device import PciFunction
from hvframe.snapshot import pci as pci_state
from hvframe.snapshot.pci import load_pci, save_pci
from hvframe.snapshot.state import DeviceState

from .backends import open_backend
from . import uart16550
from .uart16550 import Uart16550

VENDOR, DEVICE = 0x1B36, 0x0002
CLASS_16550_SERIAL = 0x070002
INTA = 1


class PciUart(PciFunction, DeviceState):
    state_version = 1

    @declared_later
    def state_layout():
        from construct import Struct
        return Struct("pci" / pci_state.PCI_FUNCTION_STATE, "uart" / uart16550.UART_STATE)

    def __init__(self, backend, name: str = "uart"):
        super().__init__(VENDOR, DEVICE, CLASS_16550_SERIAL, pin=INTA, name=name)
        self.uart = Uart16550(set_irq=self.set_intx, backend=backend, name=name)
        self.add_bar(0, 8, "io", self.uart)

    def quiesce(self) -> None:
        self.uart.quiesce()

    def save_state(self) -> dict:
        return dict(pci=save_pci(self), uart=self.uart.save_state())

    def load_state(self, s) -> None:
        load_pci(self, s.pci)
        self.uart.load_state(s.uart)

    def start(self) -> None:
        self.uart.start()

    def close(self) -> None:
        self.uart.close()


def pci_uart_factory(machine, options, address) -> PciUart:
    """options: hvframe_uart.plugin.PciUartOptions; the runner puts the function at address."""
    name = f"uart {address}"
    from .plugin import console_quit
    backend = open_backend(options.backend or "null", label=name,
                           on_quit=console_quit(machine))
    try:
        return PciUart(backend, name=name)
    except BaseException:
        backend.close()
        raise
