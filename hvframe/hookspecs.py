"""The hooks device plugins implement. Plugins are found through the entry-point group
`hvframe.devices`; pluggy is used for discovery and construction only, never per exit."""
import pluggy

hookspec = pluggy.HookspecMarker("hvframe")
hookimpl = pluggy.HookimplMarker("hvframe")


@hookspec
def hvframe_device_types():
    """Return a list of hvframe.device.DeviceType this plugin offers."""
