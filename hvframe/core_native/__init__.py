"""The compiled native core (built by `pip install`): the exit-dispatch core, ``ffi``/``lib``
(build_core.py), and the API device plugins' native modules build against, ``api_ffi``/
``api`` (build_api.py; see hvframe.native_build)."""
try:
    from ._hvcore import ffi, lib  # noqa: F401
    from ._api import ffi as api_ffi, lib as api  # noqa: F401
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "hvframe's native core is not built: install hvframe with pip "
        "(`pip install -e .`), which compiles hvframe/core_native with cffi") from e

# Plugins' native register handlers reach Python handlers through the API's py_call, which is
# the exit core's (the two are separate modules).
api.hv_api_set_py_call(api_ffi.cast(
    "hv_py_call_fn", int(ffi.cast("uintptr_t", ffi.addressof(lib, "hv_py_dispatch")))))


def set_ram_regions(ram, memory) -> None:
    """Describe guest RAM (a GuestMemory) in a ``struct hv_ram`` (its host mapping, ``mem``,
    is set only around each native call). ValueError if it has more regions than the struct
    holds."""
    regions = memory.regions
    if len(regions) > len(ram.regions):
        raise ValueError(f"{len(regions)} RAM regions; the native core takes {len(ram.regions)}")
    ram.mem_size = memory.size
    ram.nregions = len(regions)
    for i, r in enumerate(regions):
        ram.regions[i].gpa, ram.regions[i].size, ram.regions[i].host_offset = (
            r.gpa, r.size, r.host_offset)


def bind(bind_fn) -> None:
    """Hand the core's function table to a plugin's native module: ``bind_fn`` is the
    function its HV_PLUGIN_API(name) defined (``plugin_lib.name``). ImportError when the
    module was built against another version of the API."""
    if bind_fn(api.hv_api()) != 0:
        raise ImportError(
            f"native module built against another hvframe native API (the core has version "
            f"{api.HV_API_VERSION}): reinstall the plugin")
