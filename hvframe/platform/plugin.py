"""The built-in platform devices as a plugin: every machine gets one of each."""
from ..core_native import lib
from ..device import DeviceType, NoOptions
from ..hookspecs import hookimpl
from .acpi_pm import AcpiPm
from .reset_control import ResetControl

POST_PORT = 0x80


def _post_port(machine, options: NoOptions) -> None:
    # Linux and firmware write port 0x80 as an I/O delay; answered in C, not Python.
    machine.pio.register_native(POST_PORT, 1, lib.hv_native_sink, name="post")
    return None


def _acpi_pm(machine, options: NoOptions) -> AcpiPm:
    return AcpiPm(machine)


def _reset_control(machine, options: NoOptions) -> ResetControl:
    return ResetControl(machine)


@hookimpl
def hvframe_device_types():
    return [
        DeviceType("acpi-pm", "platform", _acpi_pm, options=NoOptions,
                   summary="ACPI PM1a event/control and PM timer at 0x400 (S5 powers off)"),
        DeviceType("reset-control", "platform", _reset_control, options=NoOptions,
                   summary="PC reset control register at 0xcf9"),
        DeviceType("post", "platform", _post_port, options=NoOptions,
                   summary="POST/IO-delay port 0x80"),
    ]
