"""virtio-blk's guest-visible layouts and numbers (virtio 1.2 section 5.2), declared once.

The Python model (virtio_blk.py) takes its fast struct.Struct objects from their compiled forms
(hvframe.packed: a run does not import construct), and the native module's C declarations
are generated from them at build time (build_native.py).
"""
from hvframe.packed import Declarations

VIRTIO_ID_BLOCK = 2
SECTOR = 512                      # virtio-blk sectors are always 512 bytes

# Feature bits (5.2.3).
F_SIZE_MAX, F_SEG_MAX, F_GEOMETRY, F_RO, F_BLK_SIZE = 1, 2, 4, 5, 6
F_FLUSH, F_TOPOLOGY, F_CONFIG_WCE, F_MQ, F_DISCARD, F_WRITE_ZEROES = 9, 10, 11, 12, 13, 14

# Request types and status values (5.2.6).
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20
WRITE_ZEROES_UNMAP = 1

MAX_DISCARD_SECTORS = (1 << 30) // SECTOR    # per segment
MAX_DISCARD_SEGMENTS = 64
MAX_WRITE_ZEROES_SEGMENTS = 64


def _declare():
    from construct import Int8ul, Int16ul, Int32ul, Int64ul, Struct

    VirtioBlkConfig = Struct(
        "capacity" / Int64ul,
        "size_max" / Int32ul,
        "seg_max" / Int32ul,
        "geometry_cylinders" / Int16ul,
        "geometry_heads" / Int8ul,
        "geometry_sectors" / Int8ul,
        "blk_size" / Int32ul,
        "physical_block_exp" / Int8ul,
        "alignment_offset" / Int8ul,
        "min_io_size" / Int16ul,
        "opt_io_size" / Int32ul,
        "writeback" / Int8ul,
        "unused0" / Int8ul,
        "num_queues" / Int16ul,
        "max_discard_sectors" / Int32ul,
        "max_discard_seg" / Int32ul,
        "discard_sector_alignment" / Int32ul,
        "max_write_zeroes_sectors" / Int32ul,
        "max_write_zeroes_seg" / Int32ul,
        "write_zeroes_may_unmap" / Int8ul,
        "unused1" / Int8ul[3],
    )
    VirtioBlkReqHeader = Struct("type" / Int32ul, "reserved" / Int32ul, "sector" / Int64ul)
    VirtioBlkDiscardSegment = Struct("sector" / Int64ul, "num_sectors" / Int32ul,
                                     "flags" / Int32ul)
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr     # the construct declarations, by name
