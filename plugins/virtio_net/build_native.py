"""cffi build of virtio-net's native data path, `hvframe_virtio_net._native`, against
hvframe's native API (hvframe.native_build); run by setup.py's cffi_modules at install."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# This package, and hvframe: the build environment's, else the checkout this plugin lives in.
sys.path[:0] = [HERE]
sys.path.append(os.path.dirname(os.path.dirname(HERE)))
from hvframe.native_build import plugin_ffi  # noqa: E402
from hvframe_virtio_net import layout  # noqa: E402

# The structs the Python side allocates and reads (counters, state); `...;` leaves their
# exact layout to the C compiler.
CDEF = """
    int vnet_bind(const struct hv_api *api);
    struct vnet_port {
        int fd; int framing; uint32_t max_frame; int gone; int hup; int moved;
        uint8_t *rx_buf; uint32_t rx_cap, rx_start, rx_end, rx_skip;
        uint8_t *tx_buf; uint32_t tx_cap, tx_off, tx_len;
        uint64_t rx_oversize, rx_runt, rx_truncated, tx_partial;
        ...;
    };
    struct vnet_filter {
        uint8_t mac[6]; uint8_t promisc, allmulti, alluni; uint32_t n_uni, n_multi;
        uint8_t uni[64][6]; uint8_t multi[64][6];
    };
    struct vnet_feat {
        uint32_t hdr_len; uint8_t mrg_rxbuf;
        uint8_t csum, host_tso4, host_tso6, host_ecn;
        uint8_t guest_csum, guest_tso4, guest_tso6, guest_ecn;
        uint32_t rx_max_plain;
    };
    struct vnet_poll { uint64_t window; uint64_t since; };
    struct vnet_rxq {
        struct vnet_port *port; struct vnet_filter *filter; struct vnet_feat *feat;
        uint8_t *bounce; uint32_t bounce_cap; int wait; uint32_t served; int have_frame;
        struct vnet_poll poll;
        uint64_t frames, bytes, drop_filtered, drop_bad, drop_too_big, bad_buffers;
        ...;
    };
    struct vnet_txq {
        struct vnet_port *port; struct vnet_feat *feat;
        uint8_t *bounce; uint32_t bounce_cap; int wait; uint32_t served; uint32_t repoll;
        struct vnet_poll poll;
        uint64_t frames, bytes, drop_bad, drop_oversize, drop_error, drop_gone;
        ...;
    };
    enum { VNET_FRAMING_VNET_HDR = 1, VNET_FRAMING_BE32 = 2 };
    enum { VNET_WAIT_KICK = 0, VNET_WAIT_INPUT = 1, VNET_WAIT_RING = 2, VNET_WAIT_GONE = 3,
           VNET_WAIT_OUTPUT = 4 };
    int vnet_rx_cycle(struct hv_vq *q, struct vnet_rxq *rq, const struct hv_irq_gate *irq);
    int vnet_rx_drop_pending(struct vnet_rxq *rq);
    int vnet_rx_held(const struct vnet_rxq *rq);
    uint32_t vnet_rx_discard(struct vnet_rxq *rq);
    int vnet_rx_run(struct hv_vq *q, struct vnet_rxq *rq, const struct hv_irq_gate *irq,
                    const int *doorbells, int ndoorbells, int wake_fd, uint64_t poll_ns);
    int vnet_tx_cycle(struct hv_vq *q, struct vnet_txq *tq, const struct hv_irq_gate *irq,
                      uint64_t poll_ns);
    int vnet_tx_run(struct hv_vq *q, struct vnet_txq *tq, const struct hv_irq_gate *irq,
                    uint64_t poll_ns, const int *doorbells, int ndoorbells, int wake_fd);
"""

ffibuilder = plugin_ffi(
    "hvframe_virtio_net._native", os.path.join(HERE, "hvframe_virtio_net"), ["vnet.c"],
    cdef=CDEF,
    structs={"vnet_hdr": layout.VirtioNetHdr},
    constants={"VNET_HDR_F_NEEDS_CSUM": layout.HDR_F_NEEDS_CSUM,
               "VNET_HDR_F_DATA_VALID": layout.HDR_F_DATA_VALID,
               "VNET_GSO_NONE": layout.GSO_NONE, "VNET_GSO_TCPV4": layout.GSO_TCPV4,
               "VNET_GSO_TCPV6": layout.GSO_TCPV6, "VNET_GSO_ECN": layout.GSO_ECN,
               "VNET_ETH_HLEN": layout.ETH_HLEN,
               "VNET_STREAM_LEN_SIZE": layout.STREAM_LEN_SIZE})
