"""A 16550A on PCI (`-s N,uart,BACKEND`): the same register model behind an 8-byte I/O BAR,
with IDs Linux's 8250_pci and other drivers of QEMU's pci-serial already know (1b36:0002,
class 07:00:02, a 16550-compatible serial controller) and its interrupt on INTA."""
from __future__ import annotations

from hvframe.pci.device import PciFunction

from .backends import open_backend
from .uart16550 import Uart16550

VENDOR, DEVICE = 0x1B36, 0x0002
CLASS_16550_SERIAL = 0x070002
INTA = 1


class PciUart(PciFunction):
    def __init__(self, backend, name: str = "uart"):
        super().__init__(VENDOR, DEVICE, CLASS_16550_SERIAL, pin=INTA, name=name)
        self.uart = Uart16550(set_irq=self.set_intx, backend=backend, name=name)
        self.add_bar(0, 8, "io", self.uart)

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
