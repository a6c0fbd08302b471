"""hvframe plugin: 16550A UARTs as LPC devices com1-com4."""
from .uart16550 import Uart16550

__all__ = ["Uart16550"]
