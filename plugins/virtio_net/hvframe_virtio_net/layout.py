"""virtio-net's guest-visible layouts and numbers (virtio 1.2 section 5.1), declared once.

The device model derives its struct.Struct objects from these, and the native data path's C
declarations are generated from them at build time (build_native.py), so this module
imports nothing but construct.
"""
from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

VIRTIO_ID_NET = 1

# Feature bits (5.1.3).
F_CSUM, F_GUEST_CSUM, F_CTRL_GUEST_OFFLOADS, F_MTU, F_MAC = 0, 1, 2, 3, 5
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO = 7, 8, 9, 10
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO = 11, 12, 13, 14
F_MRG_RXBUF, F_STATUS, F_CTRL_VQ, F_CTRL_RX, F_CTRL_VLAN = 15, 16, 17, 18, 19
F_GUEST_ANNOUNCE, F_MQ, F_CTRL_MAC_ADDR = 21, 22, 23

# Configuration status (5.1.4).
S_LINK_UP, S_ANNOUNCE = 1, 2

# The header before every frame (5.1.6). Legacy drivers without MRG_RXBUF use the first 10
# bytes only (struct virtio_net_hdr); everyone else all 12.
HDR_F_NEEDS_CSUM, HDR_F_DATA_VALID, HDR_F_RSC_INFO = 1, 2, 4
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_ECN = 0, 1, 3, 4, 0x80
VirtioNetHdr = Struct(
    "flags" / Int8ul,
    "gso_type" / Int8ul,
    "hdr_len" / Int16ul,
    "gso_size" / Int16ul,
    "csum_start" / Int16ul,
    "csum_offset" / Int16ul,
    "num_buffers" / Int16ul,
)
HDR_SIZE = VirtioNetHdr.sizeof()          # 12
LEGACY_HDR_SIZE = HDR_SIZE - 2            # 10

# Configuration space (5.1.4); the RSS fields are there (zero) without F_RSS.
VirtioNetConfig = Struct(
    "mac" / Bytes(6),
    "status" / Int16ul,
    "max_virtqueue_pairs" / Int16ul,
    "mtu" / Int16ul,
    "speed" / Int32ul,
    "duplex" / Int8ul,
    "rss_max_key_size" / Int8ul,
    "rss_max_indirection_table_length" / Int16ul,
    "supported_hash_types" / Int32ul,
)
SPEED_UNKNOWN, DUPLEX_UNKNOWN = 0xFFFFFFFF, 0xFF

# Control virtqueue (5.1.6.5): class, command, data..., then the device's one-byte ack.
VirtioNetCtrlHdr = Struct("cls" / Int8ul, "command" / Int8ul)
CTRL_OK, CTRL_ERR = 0, 1
CTRL_RX, CTRL_RX_PROMISC, CTRL_RX_ALLMULTI = 0, 0, 1
CTRL_MAC, CTRL_MAC_TABLE_SET, CTRL_MAC_ADDR_SET = 1, 0, 1
CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET = 4, 0
CTRL_GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET = 5, 0
MQ_PAIRS_MIN, MQ_PAIRS_MAX = 1, 0x8000
VirtioNetCtrlMq = Struct("virtqueue_pairs" / Int16ul)
VirtioNetCtrlOffloads = Struct("offloads" / Int64ul)
MAC_TABLE_ENTRIES = 64     # per table (unicast, multicast); more means "accept all of that kind"

# The BE32_LENGTH framing of stream backends: a 4-byte big-endian length, then the frame.
STREAM_LEN_SIZE = 4
ETH_HLEN = 14
