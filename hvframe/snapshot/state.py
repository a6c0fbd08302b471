"""What a device declares to be carried by a checkpoint: the DeviceState interface.

A device model that can be checkpointed subclasses DeviceState and declares

    state_version   an int, raised whenever the record's layout or meaning changes
    state_layout    the record's construct declaration (a Struct)
    save_state()    -> a dict for state_layout (called with the device quiesced)
    load_state(s)   the parsed record (a construct Container) into a freshly built device
                    of the same configuration, before its threads run for the guest (a
                    virtio model's: after the transport has activated it, see
                    VirtioPciFunction.load_state)

and, when it has work of its own in flight (worker threads, a native data path), quiesce()
and unquiesce(): quiesce returns once nothing the guest asked for is half done and nothing
new starts (requests already taken are completed and acknowledged); unquiesce lets work go
on. The vCPUs are paused before quiesce() is called. A machine with a device that is not a
DeviceState cannot be checkpointed (the refusal names it).

Records are framed as version + body, so a record of another version is refused with a
line saying so rather than misread.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from ..errors import ConfigError
from ..packed import Declarations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

    from construct import Struct


def _declare():
    # Only a checkpoint reads or writes records: a run that takes none never imports construct.
    from construct import GreedyBytes, Int16ul, Struct

    RECORD = Struct("version" / Int16ul, "body" / GreedyBytes)
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr


class DeviceState(ABC):
    """A device whose state a checkpoint carries (see the module docstring)."""

    state_version: ClassVar[int] = 1
    state_layout: ClassVar[Struct]

    def state_blocker(self) -> str | None:
        """Why this instance cannot be checkpointed after all (a part of it that has no
        support, say), or None. Default: None."""
        return None

    def quiesce(self) -> None:
        """Finish in-flight work and start nothing new until unquiesce(). Default: none."""

    def unquiesce(self) -> None:
        """Let work go on after quiesce()."""

    @abstractmethod
    def save_state(self) -> dict[str, Any]:
        """The device's state as a dict for state_layout."""

    @abstractmethod
    def load_state(self, state) -> None:
        """Take a parsed record (built by save_state of the same version)."""


def encode(device: DeviceState) -> bytes:
    return LAYOUTS.module_getattr("RECORD").build(dict(version=device.state_version,
                             body=device.state_layout.build(device.save_state())))


def parse_record(device: DeviceState, data: bytes, label: str):
    """Parse a record for `device` without giving it to the device; ConfigError (one line)
    for a record of another version or one that does not parse."""
    from construct import ConstructError
    try:
        rec = LAYOUTS.module_getattr("RECORD").parse(data)
    except ConstructError:
        raise ConfigError(f"snapshot: {label}: record too short") from None
    if rec.version != device.state_version:
        raise ConfigError(f"snapshot: {label}: state version {rec.version}, this hvframe "
                          f"reads version {device.state_version}")
    try:
        return device.state_layout.parse(rec.body)
    except ConstructError as e:
        raise ConfigError(f"snapshot: {label}: malformed record ({e.__class__.__name__})") from None


def decode_into(device: DeviceState, data: bytes, label: str) -> None:
    """Parse a record and give it to the device (ConfigError as parse_record)."""
    device.load_state(parse_record(device, data, label))
