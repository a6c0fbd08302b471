"""AHCI 1.3.1 and SATA 3.x layouts, declared once with construct.

Everything the HBA model reads or writes -- the generic host control registers, the port
registers, command headers, PRD entries, the FISes and the received-FIS area -- is declared
here, in _declare(). A run does not import construct: the hot paths use the compiled forms
(hvframe.packed), whose struct.Struct objects and field offsets are taken below, and
tests/test_packed.py checks every compiled layout against its declaration. The declarations
themselves are this module's attributes (regs.H2D_FIS, say), made on first use.
"""
from __future__ import annotations

from hvframe.packed import Declarations

PORT_BASE = 0x100
PORT_STRIDE = 0x80
MAX_PORTS = 32
ABAR_SIZE = 0x2000          # the last port's registers end at 0x1100

# FIS types (byte 0 of each FIS)
FIS_H2D = 0x27
FIS_D2H = 0x34
FIS_SDB = 0xA1
FIS_PIO_SETUP = 0x5F


def _declare():
    from construct import Bytes, Int8ul, Int16ul, Int32ul, Padding, Struct

    # ---------------------------------------------------------------------------- registers
    # Generic host control, ABAR offset 0x00 (AHCI 1.3.1 section 3.1).
    GHC_REGS = Struct(
        "cap" / Int32ul,        # host capabilities
        "ghc" / Int32ul,        # global host control
        "is" / Int32ul,         # interrupt status, one bit per port
        "pi" / Int32ul,         # ports implemented
        "vs" / Int32ul,         # version
        "ccc_ctl" / Int32ul,    # command completion coalescing (not offered)
        "ccc_ports" / Int32ul,
        "em_loc" / Int32ul,     # enclosure management (not offered)
        "em_ctl" / Int32ul,
        "cap2" / Int32ul,
        "bohc" / Int32ul,       # BIOS/OS handoff (not offered)
    )

    # One port's registers, at PORT_BASE + PORT_STRIDE * n (section 3.3).
    PORT_REGS = Struct(
        "clb" / Int32ul,        # command list base (1 KiB aligned)
        "clbu" / Int32ul,
        "fb" / Int32ul,         # received FIS base (256 bytes aligned)
        "fbu" / Int32ul,
        "is" / Int32ul,         # interrupt status
        "ie" / Int32ul,         # interrupt enable
        "cmd" / Int32ul,        # command and status
        Padding(4),
        "tfd" / Int32ul,        # task file data: status | error << 8
        "sig" / Int32ul,        # device signature
        "ssts" / Int32ul,       # SStatus
        "sctl" / Int32ul,       # SControl
        "serr" / Int32ul,       # SError
        "sact" / Int32ul,       # SActive (NCQ tags outstanding)
        "ci" / Int32ul,         # commands issued
        "sntf" / Int32ul,       # SNotification
        "fbs" / Int32ul,        # FIS-based switching (not offered)
        "devslp" / Int32ul,
    )

    # ----------------------------------------------------------------------- host memory
    # Command header: 32 of them (one per slot) make the command list (section 4.2.2).
    COMMAND_HEADER = Struct(
        "flags" / Int16ul,      # CFL 4:0, A 5, W 6, P 7, R 8, B 9, C 10, PMP 15:12
        "prdtl" / Int16ul,      # PRD entries in the command table
        "prdbc" / Int32ul,      # bytes transferred, written back by the HBA
        "ctba" / Int32ul,       # command table base (128-byte aligned)
        "ctbau" / Int32ul,
        Padding(16),
    )
    # Command table: the command FIS, the ATAPI command, then the PRD table (section 4.2.3).
    COMMAND_TABLE_HEADER = Struct(
        "cfis" / Bytes(64),
        "acmd" / Bytes(16),
        Padding(48),
    )
    PRD_ENTRY = Struct(
        "dba" / Int32ul,        # data base address (bit 0 reserved)
        "dbau" / Int32ul,
        Padding(4),
        "dbc" / Int32ul,        # byte count - 1 in bits 21:0, interrupt on completion in bit 31
    )

    # ---------------------------------------------------------------------------- FISes
    # Register FIS, host to device (SATA 3.x section 10.5.5).
    H2D_FIS = Struct(
        "type" / Int8ul,
        "flags" / Int8ul,       # bit 7: command (1) or device control (0) update; PM port 3:0
        "command" / Int8ul,
        "features" / Int8ul,
        "lba0" / Int8ul,
        "lba1" / Int8ul,
        "lba2" / Int8ul,
        "device" / Int8ul,
        "lba3" / Int8ul,
        "lba4" / Int8ul,
        "lba5" / Int8ul,
        "features_exp" / Int8ul,
        "count" / Int8ul,
        "count_exp" / Int8ul,
        "icc" / Int8ul,
        "control" / Int8ul,
        Padding(4),
    )
    # The device-to-host task file, bytes 0-13 of both the Register and PIO Setup FISes.
    _D2H_TASK_FILE = (
        "type" / Int8ul,
        "flags" / Int8ul,       # bit 6: interrupt; PIO Setup also bit 5: direction (1 = to host)
        "status" / Int8ul,
        "error" / Int8ul,
        "lba0" / Int8ul,
        "lba1" / Int8ul,
        "lba2" / Int8ul,
        "device" / Int8ul,
        "lba3" / Int8ul,
        "lba4" / Int8ul,
        "lba5" / Int8ul,
        Padding(1),
        "count" / Int8ul,
        "count_exp" / Int8ul,
    )
    # Register FIS, device to host (section 10.5.6).
    D2H_FIS = Struct(*_D2H_TASK_FILE, Padding(6))
    # PIO Setup FIS (section 10.5.11).
    PIO_SETUP_FIS = Struct(
        *_D2H_TASK_FILE,
        Padding(1),
        "e_status" / Int8ul,    # status once the data has been transferred
        "transfer_count" / Int16ul,
        Padding(2),
    )
    # Set Device Bits FIS (section 10.5.7): completes NCQ commands by tag.
    SDB_FIS = Struct(
        "type" / Int8ul,
        "flags" / Int8ul,       # bit 6: interrupt, bit 7: notification
        "status" / Int8ul,      # bits 6:4 and 2:0 of the status register
        "error" / Int8ul,
        "sactive" / Int32ul,    # tags completed
    )
    # Received FIS area, 256 bytes at PxFB (section 4.2.1).
    RECEIVED_FIS = Struct(
        "dsfis" / Bytes(28),    # DMA Setup FIS
        Padding(4),
        "psfis" / Bytes(20),    # PIO Setup FIS
        Padding(12),
        "rfis" / Bytes(20),     # D2H Register FIS
        Padding(4),
        "sdbfis" / Bytes(8),    # Set Device Bits FIS
        "ufis" / Bytes(64),     # unknown FIS
        Padding(96),
    )
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr      # regs.H2D_FIS: the construct declaration


# ---------------------------------------------------------------------------- derived
def _offsets(layout) -> dict[str, int]:
    return {name: off for name, (off, _) in layout.fields.items()}


GHC_OFFSETS = _offsets(LAYOUTS.GHC_REGS)
PORT_OFFSETS = _offsets(LAYOUTS.PORT_REGS)
GHC_BY_OFFSET = {off: name for name, off in GHC_OFFSETS.items()}
PORT_BY_OFFSET = {off: name for name, off in PORT_OFFSETS.items()}
PORT_REGS_SIZE = LAYOUTS.PORT_REGS.sizeof()

CMD_HEADER = LAYOUTS.COMMAND_HEADER.struct      # flags, prdtl, prdbc, ctba, ctbau
CMD_HEADER_SIZE = LAYOUTS.COMMAND_HEADER.sizeof()
PRDBC_OFFSET = LAYOUTS.COMMAND_HEADER.fields["prdbc"][0]
CMD_TABLE_CFIS = LAYOUTS.COMMAND_TABLE_HEADER.fields["cfis"][0]
CMD_TABLE_ACMD = LAYOUTS.COMMAND_TABLE_HEADER.fields["acmd"][0]
CMD_TABLE_PRDT = LAYOUTS.COMMAND_TABLE_HEADER.sizeof()
PRD = LAYOUTS.PRD_ENTRY.struct                  # dba, dbau, dbc
PRD_SIZE = LAYOUTS.PRD_ENTRY.sizeof()
H2D = LAYOUTS.H2D_FIS.struct
# Where each field lands in H2D.unpack()'s tuple: every field of the FIS is one number.
H2D_INDEX = {name: i for i, name in enumerate(LAYOUTS.H2D_FIS.fields)}
D2H = LAYOUTS.D2H_FIS.struct
PIO_SETUP = LAYOUTS.PIO_SETUP_FIS.struct
SDB = LAYOUTS.SDB_FIS.struct
RX = _offsets(LAYOUTS.RECEIVED_FIS)
RX_FIS_SIZE = LAYOUTS.RECEIVED_FIS.sizeof()
assert RX["psfis"] == 0x20 and RX["rfis"] == 0x40 and RX["sdbfis"] == 0x58 and RX_FIS_SIZE == 256
assert PORT_OFFSETS["ci"] == 0x38 and CMD_TABLE_PRDT == 0x80 and CMD_HEADER_SIZE == 32
assert len(H2D.unpack(bytes(H2D.size))) == len(H2D_INDEX)

# ---------------------------------------------------------------------------- bits
# CAP
CAP_S64A = 1 << 31      # 64-bit addressing
CAP_SNCQ = 1 << 30      # native command queuing
CAP_SAM = 1 << 18       # AHCI mode only
CAP_SCLO = 1 << 24      # command list override
CAP_PMD = 1 << 15       # PIO multiple DRQ blocks
CAP_ISS_SHIFT = 20      # interface speed: 3 = 6 Gb/s
CAP_NCS_SHIFT = 8       # command slots - 1
# GHC
GHC_HR = 1 << 0
GHC_IE = 1 << 1
GHC_AE = 1 << 31
AHCI_VERSION = 0x00010301
# PxCMD
CMD_ST = 1 << 0
CMD_SUD = 1 << 1
CMD_POD = 1 << 2
CMD_CLO = 1 << 3
CMD_FRE = 1 << 4
CMD_CCS_SHIFT = 8
CMD_FR = 1 << 14
CMD_CR = 1 << 15
CMD_ATAPI = 1 << 24
CMD_ICC_SHIFT = 28
# Bits software may set in PxCMD (ATAPI LED, power management requests are kept as written).
CMD_WRITABLE = CMD_ST | CMD_CLO | CMD_FRE | CMD_ATAPI | (1 << 17) | (0x7 << 25) | (1 << 23)
# PxIS / PxIE
IS_DHRS = 1 << 0        # D2H register FIS received
IS_PSS = 1 << 1         # PIO Setup FIS received
IS_DSS = 1 << 2
IS_SDBS = 1 << 3        # Set Device Bits FIS received
IS_DPS = 1 << 5         # a PRD with its interrupt bit was processed
IS_PCS = 1 << 6         # port connect change (mirrors PxSERR.DIAG.X)
IS_PRCS = 1 << 22       # PhyRdy change (mirrors PxSERR.DIAG.N)
IS_OFS = 1 << 24        # overflow: more data than the PRDs hold
IS_IFS = 1 << 27        # interface fatal error
IS_HBDS = 1 << 28
IS_HBFS = 1 << 29       # host bus fatal error (a bad pointer into host memory)
IS_TFES = 1 << 30       # task file error
IS_DEFINED = 0xFDC000FF
IS_FATAL = IS_OFS | IS_IFS | IS_HBDS | IS_HBFS | IS_TFES
# PxSERR
SERR_ERR_P = 1 << 10    # protocol error
SERR_ERR_E = 1 << 11    # internal error
SERR_DIAG_N = 1 << 16   # PhyRdy change
SERR_DIAG_X = 1 << 26   # exchanged (COMINIT received)
# PxSSTS: device present with communication established, 6 Gb/s, interface active
SSTS_UP = 0x133
SCTL_DET_MASK = 0xF
# Command header flags
HDR_CFL_MASK = 0x1F
HDR_ATAPI = 1 << 5
HDR_WRITE = 1 << 6
HDR_RESET = 1 << 8
PRD_DBC_MASK = 0x3FFFFF
PRD_IOC = 1 << 31
# H2D FIS flags
H2D_COMMAND = 1 << 7
# The NCQ data commands (ATA8-ACS), here rather than in ata.py because the native module's
# build (build_native.py) reads this file alone.
READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED = 0x60, 0x61
FUA_BIT = 0x80                   # FPDMA: device register bit 7
FIS_I = 1 << 6
PIO_TO_HOST = 1 << 5
# ATA status and error bits
ST_ERR = 0x01
ST_DRQ = 0x08
ST_DSC = 0x10
ST_DRDY = 0x40
ST_BSY = 0x80
ST_OK = ST_DRDY | ST_DSC
ERR_ABRT = 0x04
ERR_IDNF = 0x10
ERR_UNC = 0x40
CONTROL_SRST = 0x04
# Device signatures (count, lba low, lba mid, lba high)
SIG_ATA = 0x00000101
SIG_ATAPI = 0xEB140101
