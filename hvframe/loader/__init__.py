"""Direct guest kernel loading (PVH ELF or Linux bzImage) into GuestMemory."""
from .common import BootState
from .elfnote import find_pvh_entry
from .kernel import load_kernel

__all__ = ["BootState", "find_pvh_entry", "load_kernel"]
