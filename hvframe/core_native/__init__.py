"""The compiled exit-dispatch core (built by `pip install`; see build_core.py)."""
try:
    from ._hvcore import ffi, lib  # noqa: F401
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "hvframe's native core is not built: install hvframe with pip "
        "(`pip install -e .`), which compiles hvframe/core_native with cffi") from e


def set_ram_regions(c, memory) -> None:
    """Describe guest RAM (a GuestMemory) in a native struct with ``mem_size``, ``nregions``
    and ``regions[]`` fields (struct hv_vq, struct hv_ahci_port). ValueError if it has more
    regions than the struct holds."""
    regions = memory.regions
    if len(regions) > len(c.regions):
        raise ValueError(f"{len(regions)} RAM regions; the native core takes {len(c.regions)}")
    c.mem_size = memory.size
    c.nregions = len(regions)
    for i, r in enumerate(regions):
        c.regions[i].gpa, c.regions[i].size, c.regions[i].host_offset = (
            r.gpa, r.size, r.host_offset)
