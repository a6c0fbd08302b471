"""Device types of the virtio_blk plugin. None yet: the device model is its own issue, and until
then this package only reserves its place in the hvframe.devices entry-point group."""
from hvframe.hookspecs import hookimpl


@hookimpl
def hvframe_device_types():
    return []
