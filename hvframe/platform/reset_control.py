"""The PC reset control register at port 0xcf9: writing RST_CPU resets the machine, which
ends the run with exit status 0 (reboot), as bhyve does."""

from ..device import Device
from ..snapshot.state import DeviceState
from ..packed import declared_later

RESET_CONTROL_PORT = 0xCF9
RST_CPU = 1 << 2


class ResetControl(Device, DeviceState):
    name = "reset-control"
    state_version = 1

    @declared_later
    def state_layout():
        from construct import Int8ul, Struct
        return Struct("value" / Int8ul)

    def __init__(self, machine):
        self.machine = machine
        self.value = 0
        machine.pio.register(RESET_CONTROL_PORT, 1, self, name="reset-control")

    def save_state(self) -> dict:
        return dict(value=self.value)

    def load_state(self, s) -> None:
        self.value = s.value & 0x0E

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value & 0x0E
        if value & RST_CPU:
            self.machine.request_exit(0, "guest reset (port 0xcf9)")
