"""cffi build of the core's native API for device plugins: `hvframe.core_native._api`.

Guest RAM, the split virtqueue, interrupt gates and file I/O (vq.c), declared in
include/hvframe_native.h. A plugin's native module includes this FFI (hvframe.native_build),
so the types are shared, and calls the functions through the `struct hv_api` table. It is a
module of its own, apart from the exit-dispatch core, so that a plugin's build sees only
these declarations.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

# Functions of vq.c Python calls directly (plugins reach the rest through struct hv_api).
CORE_API_CDEF = r"""
const struct hv_api *hv_api(void);
int hv_vq_cycle(struct hv_vq *q, hv_chain_fn fn, void *ctx, const struct hv_irq_gate *irq,
                uint64_t poll_ns);
int hv_vq_serve(struct hv_vq *q, hv_chain_fn fn, void *ctx, int max);
int hv_vq_cycle_batch(struct hv_vq *q, hv_batch_fn fn, void *ctx,
                      const struct hv_irq_gate *irq, uint64_t poll_ns);
int hv_vq_serve_batch(struct hv_vq *q, hv_batch_fn fn, void *ctx, int max);
int64_t hv_eventfd_wait(int fd, uint64_t spin_ns, int timeout_ms);
void hv_api_set_py_call(hv_py_call_fn fn);
"""

SOURCES = ["vq.c", "include/hvframe_native.h"]


def api_cdef() -> str:
    """The declarations of hvframe_native.h that are also the API's cffi cdef."""
    with open(os.path.join(HERE, "include", "hvframe_native.h")) as f:
        text = f.read()
    return text.split("/* HV_CDEF_BEGIN */", 1)[1].split("/* HV_CDEF_END */", 1)[0]


def ring_layouts() -> tuple[str, str]:
    """C declarations of the split virtqueue's layouts, generated from the construct
    declarations in hvframe.virtio.virtqueue (see hvframe.layout.c_layouts)."""
    root = os.path.dirname(os.path.dirname(HERE))
    if root not in sys.path:       # at build time hvframe is not installed yet
        sys.path.insert(0, root)
    from hvframe.layout import c_layouts
    from hvframe.virtio import virtqueue as vq
    assert vq.AVAIL_FLAGS_OFF == vq.USED_FLAGS_OFF      # one HV_VRING_FLAGS_OFF for both
    return c_layouts(
        {"hv_vring_desc": vq.VirtqDesc, "hv_vring_used_elem": vq.VirtqUsedElem},
        {"HV_VRING_DESC_F_NEXT": vq.VIRTQ_DESC_F_NEXT,
         "HV_VRING_DESC_F_WRITE": vq.VIRTQ_DESC_F_WRITE,
         "HV_VRING_DESC_F_INDIRECT": vq.VIRTQ_DESC_F_INDIRECT,
         "HV_VRING_AVAIL_IDX_OFF": vq.AVAIL_IDX_OFF,
         "HV_VRING_AVAIL_RING_OFF": vq.AVAIL_RING_OFF,
         "HV_VRING_AVAIL_ELEM_SIZE": vq.AVAIL_ELEM_SIZE,
         "HV_VRING_USED_IDX_OFF": vq.USED_IDX_OFF,
         "HV_VRING_USED_RING_OFF": vq.USED_RING_OFF,
         "HV_VRING_EVENT_SIZE": vq.EVENT_SIZE,
         "HV_VRING_FLAGS_OFF": vq.AVAIL_FLAGS_OFF,
         "HV_VRING_AVAIL_F_NO_INTERRUPT": vq.VRING_AVAIL_F_NO_INTERRUPT,
         "HV_VRING_USED_F_NO_NOTIFY": vq.VRING_USED_F_NO_NOTIFY,
         "HV_VRING_MAX_SIZE": vq.MAX_QUEUE_SIZE})


def make_ffi() -> FFI:
    decls, checks = ring_layouts()
    ffi = FFI()
    ffi.cdef("struct iovec { void *iov_base; size_t iov_len; };\n" + decls + api_cdef()
             + CORE_API_CDEF)
    ffi.set_source(
        "hvframe.core_native._api",
        "#include <stdint.h>\n" + decls + checks + '#include "vq.c"\n',
        include_dirs=[HERE, os.path.join(HERE, "include")],
        depends=[os.path.join(HERE, f) for f in SOURCES],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    )
    return ffi


ffibuilder = make_ffi()
