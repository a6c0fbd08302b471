"""The kernel VFIO backend's structures and ioctl numbers against the kernel's own headers:
a small C program compiled against <linux/vfio.h> prints sizeof, offsetof and the size of
every field we declare with construct, and the constants we use (ioctl numbers, flags,
region and irq indexes, shared with the vfio-user protocol which reuses them)."""
import os
import shutil
import subprocess

import pytest

from hvframe.layout import fields_of
from hvframe_passthru import protocol as p
from hvframe_passthru import vfio_kernel as vk

HEADER = "/usr/include/linux/vfio.h"
pytestmark = [
    pytest.mark.skipif(not os.path.exists(HEADER),
                       reason=f"{HEADER} missing (Debian package linux-libc-dev)"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler (gcc)"),
]

# Our constant -> the header's macro (or enumerator).
CONSTANTS = {
    **{name: name for name in vk.KERNEL_IOCTLS},
    "VFIO_API_VERSION": "VFIO_API_VERSION",
    "VFIO_TYPE1_IOMMU": "VFIO_TYPE1_IOMMU",
    "GROUP_FLAGS_VIABLE": "VFIO_GROUP_FLAGS_VIABLE",
    "GROUP_FLAGS_CONTAINER_SET": "VFIO_GROUP_FLAGS_CONTAINER_SET",
    "DEVICE_FLAGS_RESET": "VFIO_DEVICE_FLAGS_RESET",
    "DEVICE_FLAGS_PCI": "VFIO_DEVICE_FLAGS_PCI",
    "DMA_MAP_FLAG_READ": "VFIO_DMA_MAP_FLAG_READ",
    "DMA_MAP_FLAG_WRITE": "VFIO_DMA_MAP_FLAG_WRITE",
    "p.REGION_FLAG_READ": "VFIO_REGION_INFO_FLAG_READ",
    "p.REGION_FLAG_WRITE": "VFIO_REGION_INFO_FLAG_WRITE",
    "p.REGION_FLAG_MMAP": "VFIO_REGION_INFO_FLAG_MMAP",
    "p.IRQ_INFO_EVENTFD": "VFIO_IRQ_INFO_EVENTFD",
    "p.IRQ_INFO_MASKABLE": "VFIO_IRQ_INFO_MASKABLE",
    "p.IRQ_INFO_AUTOMASKED": "VFIO_IRQ_INFO_AUTOMASKED",
    "p.IRQ_SET_DATA_NONE": "VFIO_IRQ_SET_DATA_NONE",
    "p.IRQ_SET_DATA_BOOL": "VFIO_IRQ_SET_DATA_BOOL",
    "p.IRQ_SET_DATA_EVENTFD": "VFIO_IRQ_SET_DATA_EVENTFD",
    "p.IRQ_SET_ACTION_MASK": "VFIO_IRQ_SET_ACTION_MASK",
    "p.IRQ_SET_ACTION_UNMASK": "VFIO_IRQ_SET_ACTION_UNMASK",
    "p.IRQ_SET_ACTION_TRIGGER": "VFIO_IRQ_SET_ACTION_TRIGGER",
    "p.PCI_BAR0_REGION": "VFIO_PCI_BAR0_REGION_INDEX",
    "p.PCI_ROM_REGION": "VFIO_PCI_ROM_REGION_INDEX",
    "p.PCI_CONFIG_REGION": "VFIO_PCI_CONFIG_REGION_INDEX",
    "p.PCI_NUM_REGIONS": "VFIO_PCI_NUM_REGIONS",
    "p.PCI_INTX_IRQ": "VFIO_PCI_INTX_IRQ_INDEX",
    "p.PCI_MSI_IRQ": "VFIO_PCI_MSI_IRQ_INDEX",
    "p.PCI_MSIX_IRQ": "VFIO_PCI_MSIX_IRQ_INDEX",
    "p.PCI_NUM_IRQS": "VFIO_PCI_NUM_IRQS",
}
# vfio-user payloads that are, by the protocol's definition, the kernel's structures.
# (vfio-user's DEVICE_GET_INFO stops before cap_offset: a leading part of the structure.)
SHARED_LAYOUTS = {"vfio_device_info": p.DeviceInfo, "vfio_region_info": p.RegionInfo,
                  "vfio_irq_info": p.IrqInfo, "vfio_irq_set": p.IrqSet}


def ours(name):
    return getattr(p, name[2:]) if name.startswith("p.") else getattr(vk, name)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """{'struct': size, 'struct.field': (offset, size), 'CONSTANT': value} from the header."""
    lines = []
    for struct, st in vk.KERNEL_STRUCTS.items():
        lines.append(f'printf("{struct} %zu\\n", sizeof(struct {struct}));')
        for sc in st.subcons:
            lines.append(f'printf("{struct}.{sc.name} %zu %zu\\n", '
                         f'offsetof(struct {struct}, {sc.name}), '
                         f'sizeof(((struct {struct} *)0)->{sc.name}));')
    for mine, theirs in CONSTANTS.items():
        lines.append(f'printf("{mine} %llu\\n", (unsigned long long)({theirs}));')
    src = ("#include <stdio.h>\n#include <stddef.h>\n#include <linux/vfio.h>\n"
           "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    d = tmp_path_factory.mktemp("vfio_abi")
    (d / "abi.c").write_text(src)
    subprocess.run(["gcc", "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    facts = {}
    for line in out.splitlines():
        key, *vals = line.split()
        facts[key] = tuple(int(v) for v in vals) if len(vals) > 1 else int(vals[0])
    return facts


@pytest.mark.parametrize("struct", sorted(vk.KERNEL_STRUCTS))
def test_structure_layout_matches_the_kernel(kernel, struct):
    st = vk.KERNEL_STRUCTS[struct]
    assert st.sizeof() == kernel[struct], f"sizeof(struct {struct})"
    for name, field in fields_of(st).items():
        assert field == kernel[f"{struct}.{name}"], f"{struct}.{name}"


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constant_matches_the_kernel(kernel, name):
    assert ours(name) == kernel[name], f"{name} vs {CONSTANTS[name]}"


@pytest.mark.parametrize("struct", sorted(SHARED_LAYOUTS))
def test_vfio_user_payloads_are_the_kernel_structures(kernel, struct):
    for name, field in fields_of(SHARED_LAYOUTS[struct]).items():
        assert field == kernel[f"{struct}.{name}"], f"{struct}.{name}"


def test_ioctl_table_is_complete():
    """Every request the backend issues is in the table the header is checked against."""
    src = open(vk.__file__).read()
    used = {w for w in src.replace("(", " ").replace(",", " ").split()
            if w.startswith("VFIO_") and w[5:6].isupper() and w in vars(vk)
            and isinstance(vars(vk)[w], int) and vars(vk)[w] > 0xFF}
    assert used <= set(vk.KERNEL_IOCTLS)
    assert {"VFIO_GROUP_GET_STATUS", "VFIO_IOMMU_MAP_DMA", "VFIO_DEVICE_SET_IRQS"} <= used
