"""The AHCI host bus adapter: an Intel ICH9 SATA controller (8086:2922, class 01:06:01) with
its registers behind BAR5 (ABAR), up to 32 ports, MSI or INTA.

Registers. The ABAR is served by abar.c, this package's native register handler: the
registers a driver touches on every command (PxIS, PxCI, PxSACT, PxTFD, PxCMD, HBA IS, ...)
are read and written there by the vCPU without the GIL, in a native register file Python
changes only through the same native functions (see AhciPort, AhciHba); the rest is passed
to AhciHba.read/write.

Command flow. A guest write to PxCI (and, for NCQ, PxSACT first) sets the new slots in PxCI
and wakes the port's worker thread (AhciPort.serve_issued), which fetches each from host
memory (command header, command table, PRDs -- every pointer checked against guest RAM) and
hands it to the port's device (ata.AtaDisk or atapi.AtapiCdrom). A device answers at once with a Result, or submits the transfer to its
BlockQueue and completes the Command from a worker thread later. Completion writes the FISes
into the received-FIS area, updates PxTFD, clears PxCI (non-queued) or PxSACT (NCQ, through a
Set Device Bits FIS) and raises the port's interrupt, in that order, so a guest that sees the
interrupt sees the data.

NCQ READ/WRITE FPDMA QUEUED commands take a native path when the slots the worker takes are
all such (ncq.c: the same fetch and checks in C, the transfer with the GIL released) and
complete in batches: one Set Device Bits FIS and one interrupt per batch.
Anything the native path declines goes the Python way below, which gives its errors.
Shorter still: while nothing is under way on a port, Python offers its PxCI writes to the
exit (AhciPort.offer_inline), which serves a write whose slots are all NCQ reads the page
cache holds by itself -- fetch, transfer, SDB FIS, interrupt -- before the vCPU resumes, as
a disk that answers at once would (abar.c's serve_inline). Anything else it hands to the
worker as above, withdrawing the offer until the port is idle again.

Non-queued commands run one at a time in slot order; NCQ commands run concurrently. An error
stops the port as AHCI 1.3.1 section 6.2.2 says: PxIS.TFES (or HBFS/IFS/OFS for host-memory
and transfer problems), PxCI keeps the failed slot, PxCMD.CCS names it, and nothing more is
processed until software clears PxCMD.ST (which clears PxCI and PxSACT; PxCMD.CR stays set
until requests already with the backend have returned). Guest-controlled values never raise
through the exit loop: a bug in a device is logged and answered with ABRT.

Ownership. A slot's state belongs to its command until the backend has returned it, across
a stop or reset of the port: a stop (ST cleared, COMRESET, GHC.HR) forgets the commands for
the guest, but the port *drains* -- PxCMD.CR stays set and nothing new starts -- until every
request it had given the backend is back. Commands a guest issues meanwhile (ST set again
without waiting for CR, as a hostile or careless driver does) wait in PxCI and start when
the drain ends. So a stale request can neither run after a newer one on the same blocks nor
share a slot's native state with its successor, and no vCPU ever waits for a worker. Block
requests go to a bounded BlockQueue that refuses when full (the command fails with an ATA
error) instead of blocking the port's worker, which holds the HBA lock. Slots a guest issued
that the worker has not taken yet are forgotten by a stop like the others.

Checkpoint (DeviceState). quiesce() holds what guests issue from then on (the slots stay in
PxCI, kept in AhciPort.held) and waits until no port has a command with its device or one
issued and not yet taken; unquiesce() starts the held slots. The record: the PCI function's
part, GHC and IS, and per port its registers, the error state (halted, the slots waiting
behind the error), the held slots and the attached device's own record (ata.AtaDisk,
atapi.AtapiCdrom). A restored port starts its held slots once loaded.
"""
from __future__ import annotations

import errno
from collections import deque
from functools import partial

from hvframe.block.backend import BlockError
from hvframe.core_native import bind, set_ram_regions
from hvframe.core_native import ffi as core_ffi
from hvframe.dispatch import PythonHandle
from hvframe.memory import GuestMemoryError
from hvframe.pci.device import PciFunction
from hvframe.pci.msi import MsiCapability
from hvframe.errors import ConfigError
from hvframe.packed import declared_later
from hvframe.snapshot.pci import load_pci, save_pci
from hvframe.snapshot.state import DeviceState, encode, parse_record

from .regs import (ABAR_SIZE, AHCI_VERSION, CAP_ISS_SHIFT, CAP_NCS_SHIFT, CAP_PMD, CAP_S64A,
                   CAP_SAM, CAP_SCLO, CAP_SNCQ, CMD_ATAPI, CMD_CCS_SHIFT, CMD_CLO, CMD_CR,
                   CMD_FR, CMD_FRE, CMD_HEADER, CMD_HEADER_SIZE, CMD_POD, CMD_ST, CMD_SUD,
                   CMD_TABLE_ACMD, CMD_TABLE_CFIS, CMD_TABLE_PRDT, CMD_WRITABLE, CONTROL_SRST,
                   D2H, ERR_ABRT, ERR_UNC, FIS_D2H, FIS_H2D, FIS_I, FIS_PIO_SETUP, FIS_SDB, GHC_AE,
                   GHC_BY_OFFSET, GHC_HR, GHC_IE, H2D, H2D_COMMAND, H2D_INDEX, HDR_CFL_MASK,
                   IS_DEFINED, IS_DHRS, IS_DPS, IS_HBFS, IS_OFS, IS_PCS, IS_PRCS, IS_PSS, IS_SDBS,
                   IS_TFES, MAX_PORTS, PIO_SETUP, PIO_TO_HOST, PORT_BASE, PORT_BY_OFFSET,
                   PORT_STRIDE, PRD, PRD_DBC_MASK, PRD_IOC, PRD_SIZE, PRDBC_OFFSET, RX,
                   SCTL_DET_MASK, SDB, SERR_DIAG_N, SERR_DIAG_X, SERR_ERR_E, SSTS_UP, ST_BSY,
                   ST_DRQ, ST_ERR, ST_OK)
from hvframe import concurrency

from ._native import ffi, lib

bind(lib.ahci_bind)

VENDOR_INTEL, DEVICE_ICH9_AHCI = 0x8086, 0x2922
CLASS_AHCI = 0x010601
REVISION = 0x02
ABAR_INDEX = 5
INTA = 1
SLOTS = 32
NATIVE_JOB_BYTES = 256 << 10     # the native path gives each worker at least this much
ISSUE_SPIN_NS = 32_000           # a port's worker polls PxCI this long before it sleeps (QEMU's
                                 # and the virtqueues' 32 us): a driver served at once often issues
                                 # again within a wake-up's time (NCQ 4 KiB QD32 rounds here: 79
                                 # against 90 us, median of 5 each, 2026-12-04)
INLINE_COLD_SKIPS = 32           # offers skipped (of an idle port) after the exit met reads not
                                 # in the page cache
_U32 = 0xFFFFFFFF
QUIESCE_TIMEOUT_S = 30.0         # for the commands with the backends to come back

# The port registers in a port's checkpoint record (AhciHba.state_layout), in order.
_PORT_REGS = ("clb", "clbu", "fb", "fbu", "pxis", "ie", "cmd", "ccs", "tfd", "sig", "ssts",
              "sctl", "serr", "sntf", "sact", "ci")


def _declare_state():
    # The HBA's checkpoint record (DeviceState, version 1), each port's part in it: made when a
    # checkpoint is taken or read (construct).
    from construct import Flag, GreedyBytes, Int8ul, Int32ul, Prefixed, PrefixedArray, Struct
    from hvframe.snapshot.pci import PCI_FUNCTION_STATE
    AHCI_PORT_STATE = Struct(
        *(name / Int32ul for name in _PORT_REGS),   # cmd as written; pxis as stored (PxIS)
        "halted" / Flag,                            # stopped by an error until ST is cleared
        "pending" / PrefixedArray(Int8ul, Int8ul),  # slots waiting behind the error, in order
        "held" / Int32ul,                           # slots issued during the quiesce
        "atapi" / Flag,                             # the device is a CD-ROM
        "device" / Prefixed(Int32ul, GreedyBytes),  # the device's record; empty: no device
    )
    AHCI_HBA_STATE = Struct(
        "pci" / PCI_FUNCTION_STATE,
        "ghc" / Int32ul,
        "is" / Int32ul,
        "irq_level" / Flag,                         # the interrupt as last driven
        "ports" / PrefixedArray(Int8ul, AHCI_PORT_STATE),
    )
    return {"AHCI_PORT_STATE": AHCI_PORT_STATE, "AHCI_HBA_STATE": AHCI_HBA_STATE,
            "PCI_FUNCTION_STATE": PCI_FUNCTION_STATE}


_states: dict | None = None


def _state(name: str):
    global _states
    if _states is None:
        _states = _declare_state()
    return _states[name]


def __getattr__(name: str):
    # The names this module had before its records were declared late (tools reading
    # checkpoints import them); asking for one imports construct.
    if name in ("AHCI_PORT_STATE", "AHCI_HBA_STATE", "PCI_FUNCTION_STATE"):
        return _state(name)
    if name == "SnapshotError":
        from hvframe.snapshot.format import SnapshotError
        return SnapshotError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TransferError(Exception):
    """Host memory the HBA cannot use for a command: answered with a fatal PxIS bit."""

    def __init__(self, is_bit: int, serr: int = 0, message: str = ""):
        super().__init__(message)
        self.is_bit, self.serr = is_bit, serr


class Result:
    """How a command ended: ATA status/error, bytes moved, and how the device reported it."""

    __slots__ = ("status", "error", "transferred", "pio", "regs", "fatal", "serr")

    def __init__(self, status: int = ST_OK, error: int = 0, transferred: int = 0,
                 pio: str | None = None, regs: dict | None = None, fatal: int = 0,
                 serr: int = 0):
        self.status, self.error, self.transferred = status, error, transferred
        self.pio = pio          # "in" / "out": a PIO Setup FIS precedes the data
        self.regs = regs        # D2H FIS register values (signature, count) besides status
        self.fatal, self.serr = fatal, serr

    @property
    def failed(self) -> bool:
        return bool(self.status & ST_ERR or self.fatal)

    def __repr__(self) -> str:
        return (f"Result(status={self.status:#x}, error={self.error:#x}, "
                f"transferred={self.transferred}, fatal={self.fatal:#x})")


def ata_error(error: int = ERR_ABRT, status: int = ST_OK | ST_ERR, regs=None) -> Result:
    return Result(status=status, error=error, regs=regs)


(_F_TYPE, _F_FLAGS, _F_COMMAND, _F_FEATURES, _F_LBA0, _F_LBA1, _F_LBA2, _F_DEVICE, _F_LBA3,
 _F_LBA4, _F_LBA5, _F_FEATURES_EXP, _F_COUNT, _F_COUNT_EXP, _F_CONTROL) = (
    H2D_INDEX[n] for n in ("type", "flags", "command", "features", "lba0", "lba1", "lba2",
                           "device", "lba3", "lba4", "lba5", "features_exp", "count",
                           "count_exp", "control"))


class Command:
    """One issued slot as fetched from host memory. Devices read the H2D FIS fields, the
    ATAPI command (acmd), and move data with buffers()/scatter()/gather()."""

    __slots__ = ("port", "slot", "fis", "acmd", "prds", "prd_total", "ioc", "epoch", "ncq")

    def __init__(self, port: "AhciPort", slot: int, fis: tuple, acmd: bytes, prds: list,
                 ioc: bool, epoch: int):
        self.port, self.slot, self.fis, self.acmd = port, slot, fis, acmd
        self.prds = prds                  # [(guest address, length)]
        self.prd_total = sum(n for _, n in prds)
        self.ioc, self.epoch = ioc, epoch
        self.ncq = False

    # H2D FIS fields, by their places in the unpacked tuple (derived from regs.H2D_FIS)
    @property
    def command(self) -> int:
        return self.fis[_F_COMMAND]

    @property
    def features(self) -> int:
        return self.fis[_F_FEATURES] | self.fis[_F_FEATURES_EXP] << 8

    @property
    def device(self) -> int:
        return self.fis[_F_DEVICE]

    @property
    def count(self) -> int:
        return self.fis[_F_COUNT] | self.fis[_F_COUNT_EXP] << 8

    @property
    def lba48(self) -> int:
        f = self.fis
        return (f[_F_LBA0] | f[_F_LBA1] << 8 | f[_F_LBA2] << 16 | f[_F_LBA3] << 24
                | f[_F_LBA4] << 32 | f[_F_LBA5] << 40)

    @property
    def lba28(self) -> int:
        f = self.fis
        return f[_F_LBA0] | f[_F_LBA1] << 8 | f[_F_LBA2] << 16 | (f[_F_DEVICE] & 0xF) << 24

    # data movement
    def buffers(self, length: int) -> list[memoryview]:
        """Views of guest RAM covering the first `length` bytes the PRDs describe."""
        if length > self.prd_total:
            raise TransferError(IS_OFS, 0, f"{length} bytes but PRDs hold {self.prd_total}")
        out, left = [], length
        mem = self.port.hba.memory
        try:
            for addr, n in self.prds:
                if not left:
                    break
                n = min(n, left)
                out.append(mem.view(addr, n))
                left -= n
        except GuestMemoryError as e:
            raise TransferError(IS_HBFS, SERR_ERR_E, str(e)) from None
        return out

    def scatter(self, data: bytes) -> int:
        """Copy data into the PRD buffers (all of it must fit); returns the byte count."""
        pos = 0
        for v in self.buffers(len(data)):
            v[:] = data[pos:pos + len(v)]
            pos += len(v)
        return pos

    def gather(self, length: int) -> bytes:
        return b"".join(bytes(v) for v in self.buffers(length))

    def submit(self, fn, *args, callback) -> None:
        """Run fn(*args) on the device's BlockQueue and pass its result (or BlockError) to
        callback. Requests started by one PxCI write go out together, in a few batches."""
        self.port.batch.append((fn, args, callback))

    def complete(self, result: Result) -> None:
        """Finish the command (from any thread)."""
        self.port.complete(self, result)


class _NativeCommand:
    """What completion needs of a natively served NCQ command (see AhciPort._finish)."""

    __slots__ = ("slot", "epoch", "ioc", "ncq")

    def __init__(self, slot: int, epoch: int, ioc: bool):
        self.slot, self.epoch, self.ioc, self.ncq = slot, epoch, ioc, True


# Port fields kept in the native register file (abar.c, struct ahci_port_regs).
F_IS, F_IE, F_CMD, F_TFD, F_SSTS, F_SERR, F_SACT, F_CI = (
    lib.AHCI_F_IS, lib.AHCI_F_IE, lib.AHCI_F_CMD, lib.AHCI_F_TFD, lib.AHCI_F_SSTS,
    lib.AHCI_F_SERR, lib.AHCI_F_SACT, lib.AHCI_F_CI)


def _native_field(field: int, doc: str) -> property:
    """A port register only Python writes (under the HBA lock) and native reads serve: the
    value lives in the native register file."""
    def get(self) -> int:
        return self._r.f[field]

    def put(self, value: int) -> None:
        lib.ahci_port_update(self._h, self.index, field, _U32, value & _U32)
    return property(get, put, doc=doc)


def _cmd_part(name: str, doc: str) -> property:
    """State PxCMD's value as read depends on: each change is stored natively at once."""
    attr = "_" + name

    def get(self) -> int:
        return getattr(self, attr)

    def put(self, value: int) -> None:
        setattr(self, attr, value)
        lib.ahci_port_update(self._h, self.index, F_CMD, _U32, self.cmd_value())
    return property(get, put, doc=doc)


class AhciPort:
    """One port's registers and command engine. All state is guarded by the HBA's lock.

    The registers a guest's driver touches on every command live in the HBA's native
    register file (abar.c), where the vCPU's exits read and change them without the GIL:
    PxIS, PxCI and PxSACT are changed from both sides, so Python changes them only with
    read-modify-writes there (_set/_clear); PxIE, PxTFD, PxSSTS, PxSERR and PxCMD's value as
    read only Python writes (properties). New PxCI slots a guest writes are taken from there
    by the port's worker thread (serve_issued), which starts them."""

    ie = _native_field(F_IE, "PxIE")
    tfd = _native_field(F_TFD, "PxTFD: status | error << 8")
    ssts = _native_field(F_SSTS, "PxSSTS")
    serr = _native_field(F_SERR, "PxSERR")
    cmd = _cmd_part("cmd", "PxCMD as written (CR, FR and CCS are added when read)")
    ccs = _cmd_part("ccs", "the slot PxCMD.CCS names")
    inflight = _cmd_part("inflight", "commands with the device, any epoch (PxCMD.CR)")

    def __init__(self, hba: "AhciHba", index: int, device=None):
        self.hba, self.index, self.device = hba, index, device
        self._h, self._r = hba._regs, hba._regs.port[index]
        self._cmd = self._ccs = self._inflight = 0
        self._inline_ram = None      # the guest RAM export an offer to serve in the exit uses
        self._cold_skips = 0         # offers still skipped after the exit met uncached reads
        self.bit = 1 << index
        self.inflight = 0            # commands with the device (any epoch)
        self.epoch = 0               # bumped by stop/reset: late completions are dropped
        self.draining = False        # stopped with commands still in flight: nothing starts
        self.batch: list = []        # requests devices submitted during this _run()
        self._native = None          # struct ahci_port, made on first use
        # Slots the port's worker gave the native path, and of those the reads it moved from
        # the page cache itself (statistics, and what tests check the paths by; slots served
        # in the exit are inline_slots).
        self.native_slots = self.native_cached = 0
        self.held = 0                # slots issued while the HBA is quiesced
        self.reset_registers()
        self.comreset()

    # -- native register file -----------------------------------------------------------
    @property
    def is_(self) -> int:
        """PxIS bits as stored (status_bits() is what a read returns)."""
        return self._r.f[F_IS]

    @property
    def ci(self) -> int:
        return self._r.f[F_CI]

    @property
    def sact(self) -> int:
        return self._r.f[F_SACT]

    def _set(self, field: int, bits: int) -> None:
        """Set bits of PxIS, PxCI or PxSACT in one step against the guest's writes."""
        lib.ahci_port_update(self._h, self.index, field, 0, bits)

    def _clear(self, field: int, bits: int) -> None:
        lib.ahci_port_update(self._h, self.index, field, bits, 0)

    # -- state -----------------------------------------------------------------------------
    def reset_registers(self) -> None:
        self.clb = self.clbu = self.fb = self.fbu = 0
        self._clear(F_IS, _U32)
        self.ie = 0
        self.cmd = CMD_SUD | CMD_POD     # no staggered spin-up, no cold presence detect
        self.sctl = self.serr = self.sntf = 0
        self._stop()

    def _stop(self) -> None:
        """Forget every issued command (ST cleared, reset)."""
        lib.ahci_port_stop(self._h, self.index)     # PxCI, PxSACT and what was not taken
        self.pending: deque[int] = deque()
        self.busy: int | None = None     # the non-queued slot being executed
        self.ncq_active = 0
        self.halted = False
        self.ccs = 0
        self.epoch += 1
        self.draining = self.inflight > 0

    def _returned(self, n: int, sync: bool = True) -> None:
        """n commands came back from the device; the last one of a drain lets the port
        start what the guest issued meanwhile. sync=False: the caller stores PxCMD's value
        itself (with the rest of a completion, in one call)."""
        self._inflight -= n
        if sync:
            self._sync_cmd()
        if self._inflight:
            return
        self.hba.idle.notify_all()
        if self.draining:
            self.draining = False
            if self.cmd & CMD_ST and self.ci:
                # Everything in PxCI was issued during the drain: start it (and not again
                # when the worker looks).
                lib.ahci_port_take(self._h, self.index)
                self._start_issued(self.ci)

    def comreset(self) -> None:
        """The link comes up and the device sends its signature FIS. The driver starts over,
        so a failed write-back stops being reported (as after a virtio device reset). The
        driver starting over also gets the in-exit service offered again at once: the skips
        after a cold read were about the workload before the reset."""
        self._stop()
        self._cold_skips = 0
        self._r.inline_cold = 0
        if self.device is None:
            self.ssts, self.tfd, self.sig = 0, 0x7F, _U32
            return
        self.device.backend.clear_error()
        self.ssts = SSTS_UP
        self.serr |= SERR_DIAG_X | SERR_DIAG_N    # COMINIT seen, PhyRdy changed
        self.sig = self.device.signature
        status = self.device.reset_status
        self.tfd = status
        s = self.sig
        self._post_d2h(status, 0, {"count": s & 0xFF, "lba0": s >> 8 & 0xFF,
                                   "lba1": s >> 16 & 0xFF, "lba2": s >> 24 & 0xFF}, irq=False)

    @property
    def clb_addr(self) -> int:
        return (self.clbu << 32) | (self.clb & 0xFFFFFC00)

    @property
    def fb_addr(self) -> int:
        return (self.fbu << 32) | (self.fb & 0xFFFFFF00)

    def status_bits(self) -> int:
        """PxIS as read: PCS and PRCS mirror PxSERR.DIAG.X and DIAG.N."""
        v = self.is_ & ~(IS_PCS | IS_PRCS)
        if self.serr & SERR_DIAG_X:
            v |= IS_PCS
        if self.serr & SERR_DIAG_N:
            v |= IS_PRCS
        return v

    def _sync_cmd(self) -> None:
        lib.ahci_port_update(self._h, self.index, F_CMD, _U32, self.cmd_value())

    def cmd_value(self) -> int:
        cmd = self._cmd
        v = cmd & ~(CMD_CR | CMD_FR | (0x1F << CMD_CCS_SHIFT) | CMD_CLO)
        if cmd & CMD_ST or self._inflight:
            v |= CMD_CR
        if cmd & CMD_FRE:
            v |= CMD_FR
        # While exits may serve commands (offer_inline), they keep CCS up to date.
        ccs = self._ccs if self._inline_ram is None else self._native_ccs()
        return v | ccs << CMD_CCS_SHIFT

    def _native_ccs(self) -> int:
        """PxCMD.CCS as the register file has it (an exit serving commands sets it)."""
        return (self._r.f[F_CMD] >> CMD_CCS_SHIFT) & 0x1F

    # -- registers -------------------------------------------------------------------------
    def read_reg(self, name: str) -> int:
        if name == "is":
            return self.status_bits()
        if name == "cmd":
            return self.cmd_value()
        if name in ("fbs", "devslp"):
            return 0
        return getattr(self, name)

    def write_reg(self, name: str, value: int, mask: int) -> None:
        if name in ("clb", "clbu", "fb", "fbu", "ie"):
            old = getattr(self, name)
            new = (old & ~mask) | (value & mask)
            if name == "ie":
                new &= IS_DEFINED
            setattr(self, name, new)
            if name == "ie":
                self.hba.update_irq()
        elif name == "is":
            self._clear(F_IS, value & mask)
            self.hba.update_irq()
        elif name == "serr":
            self.serr &= ~(value & mask)
            self.hba.update_irq()
        elif name == "sntf":
            self.sntf &= ~(value & mask)
        elif name == "cmd":
            self._write_cmd((self.cmd & ~mask) | (value & mask))
        elif name == "sctl":
            self._write_sctl((self.sctl & ~mask) | (value & mask))
        elif name == "sact":
            if self.cmd & CMD_ST:
                self._set(F_SACT, value & mask)
        elif name == "ci":
            if self.cmd & CMD_ST:
                self._issue(value & mask)
        # tfd, sig, ssts and the reserved registers are read-only

    def _write_cmd(self, value: int) -> None:
        old = self.cmd
        new = (old & ~CMD_WRITABLE) | (value & CMD_WRITABLE)
        if new & CMD_CLO:
            # Command list override: forget a hung device's BSY/DRQ so a reset can be sent.
            self.tfd &= ~(ST_BSY | ST_DRQ)
            new &= ~CMD_CLO
        self.cmd = new
        if old & CMD_ST and not new & CMD_ST:
            self._stop()
        elif new & CMD_ST and not old & CMD_ST:
            self.halted = False
            self.ccs = 0

    def _write_sctl(self, value: int) -> None:
        old_det = self.sctl & SCTL_DET_MASK
        self.sctl = value & 0xFFF
        det = value & SCTL_DET_MASK
        if det and not old_det:
            # COMRESET (1) or interface off (4): the link is down while DET is set.
            self._stop()
            self.ssts, self.tfd = 0, 0x7F
        elif old_det and not det:
            self.comreset()
            self.hba.update_irq()

    # -- command issue ---------------------------------------------------------------------
    def _issue(self, bits: int) -> None:
        """PxCI written through Python: the new slots start now (with any a native write
        left for the worker)."""
        lib.ahci_port_issue(self._h, self.index, bits)
        self._start_issued(lib.ahci_port_take(self._h, self.index))

    def serve_issued(self, thread) -> None:
        """(the port's worker, a DeviceThread) Start the slots guests' PxCI writes issue
        natively: the vCPU sets them in PxCI and wakes this thread, which takes the GIL and
        the HBA lock the exit does without."""
        while not thread.stopping:
            n = lib.ahci_port_wait(self._h, self.index, ISSUE_SPIN_NS, -1)
            if thread.stopping or n == -errno.EBADF:
                return
            if n < 0:
                # poll() itself failed (EINTR is retried there): this worker cannot go on;
                # its failure handler hands PxCI writes to Python (_worker_failed).
                raise OSError(-n, f"port {self.index}: waiting for issued slots")
            if n == 0:
                continue
            with self.hba.lock:
                self.withdraw_inline()
                if n & lib.AHCI_WAIT_IRQ:
                    self.hba.deliver_owed(lib.ahci_port_take_irq(self._h, self.index))
                self._start_issued(lib.ahci_port_take(self._h, self.index))
                self.hba.idle.notify_all()
                self.offer_inline()

    def _start_issued(self, new: int) -> None:
        """(hba.lock held) Start slots new to PxCI (already set there)."""
        if not new or self.draining:
            return                       # they start when the stale requests are back
        if self.hba.quiesced:
            self.held |= new             # a checkpoint is being taken: they start after it
            return
        if self._issue_native(new):
            return
        for slot in range(SLOTS):
            if new >> slot & 1:
                self.pending.append(slot)
        self._run()

    # -- checkpoint (hba.lock held; the HBA is quiesced) --------------------------------------
    def settled(self) -> bool:
        """Nothing with the device, nothing issued and not taken, nothing about to start."""
        return not (self._inflight or self._r.issued or (self.pending and not self.halted))

    def save_state(self) -> dict:
        # Issued during the quiesce and not yet taken by the worker: held like the others.
        self.held |= lib.ahci_port_take(self._h, self.index)
        regs = dict(clb=self.clb, clbu=self.clbu, fb=self.fb, fbu=self.fbu, pxis=self.is_,
                    ie=self.ie, cmd=self._cmd, ccs=self._ccs, tfd=self.tfd, sig=self.sig,
                    ssts=self.ssts, sctl=self.sctl, serr=self.serr, sntf=self.sntf,
                    sact=self.sact, ci=self.ci)
        return dict(regs, halted=self.halted, pending=list(self.pending), held=self.held,
                    atapi=self.device is not None and self.device.atapi,
                    device=encode(self.device) if self.device is not None else b"")

    def load_state(self, s, device_state) -> None:
        """Into a port fresh from its configuration, before its worker has anything to do."""
        self.clb, self.clbu, self.fb, self.fbu = s.clb, s.clbu, s.fb, s.fbu
        self.sctl, self.sntf, self.sig = s.sctl, s.sntf, s.sig
        self.ie, self.tfd, self.ssts, self.serr = s.ie & IS_DEFINED, s.tfd, s.ssts, s.serr
        self._cmd, self._ccs = s.cmd, s.ccs & 0x1F
        self._sync_cmd()
        for field, value in ((F_IS, s.pxis), (F_SACT, s.sact), (F_CI, s.ci)):
            self._clear(field, _U32)
            self._set(field, value)
        self.halted = bool(s.halted)
        self.pending = deque(s.pending)
        self.held = s.held
        if device_state is not None:
            self.device.load_state(device_state)

    # -- the native NCQ path ---------------------------------------------------------------
    def _issue_native(self, new: int) -> bool:
        """Serve the slots of one PxCI write natively if every one of them is an NCQ
        READ/WRITE the native path takes and nothing is under way that orders them (a
        pending or running non-queued command, an error, a slot still in flight)."""
        dev = self.device
        if dev is None or self.halted \
                or self.busy is not None or self.pending or new & ~self.sact \
                or new & self.ncq_active:
            return False
        ready = self._native_ready()
        if ready is None:
            return False
        nat, ram = ready
        if lib.ahci_prepare(nat, new) != new:
            return False
        # Accepted, as _start_pending accepts an NCQ command: BSY clears, PxCI with it.
        slots = [s for s in range(SLOTS) if new >> s & 1]
        self.ncq_active |= new
        self._inflight += len(slots)
        self._ccs = slots[-1]
        lib.ahci_port_accepted(self._h, self.index, new, ST_OK, self.cmd_value())
        ioc, epoch = nat.ioc, self.epoch
        # Reads the page cache holds are moved now, by the port's worker (GIL released,
        # nothing waited for): another hand-off, to the disk's workers, costs more than they
        # do. io_uring completes cached buffered reads inline the same way. Only small
        # batches: the HBA lock is held meanwhile. The rest go to the disk's workers.
        cached = (lib.ahci_execute_cached(nat, new)
                  if dev.cached_reads and nat.bytes <= NATIVE_JOB_BYTES else 0)
        self.native_slots += len(slots)
        self.native_cached += bin(cached).count("1")
        slots = [s for s in slots if not cached >> s & 1]
        # A worker hand-off costs more than a small transfer: spread only large batches.
        jobs = min(len(slots), max(1, min(dev.workers, nat.bytes // NATIVE_JOB_BYTES)))
        for i in range(jobs):
            mask = sum(1 << s for s in slots[i::jobs])
            done = partial(self._native_done, mask, ioc & mask, epoch)
            try:
                dev.queue.submit(self._native_transfer, nat, mask, ram, callback=done)
            except BlockError:
                done(mask)               # the device is closing: fail them
        if cached:
            self._settle_native(cached, ioc & cached, epoch, 0)
        return True

    def _native_ready(self):
        """(hba.lock held) The port's struct ahci_port set up for its disk and for guest RAM,
        with the RAM export its buffers will point into (Guest RAM stays mapped --
        GuestMemory.close() refused -- while the export lives); None if the native path
        cannot serve now."""
        nat = self._native
        if nat is None:
            nat = self._native = ffi.new("struct ahci_port *")
            try:
                set_ram_regions(nat.ram, self.hba.memory)
            except ValueError:
                return None              # nregions stays 0: the native path never takes
        if not self.device.native_setup(nat):
            return None
        try:
            ram = ffi.from_buffer(self.hba.memory.buffer)
        except (ValueError, BufferError):
            return None
        nat.ram.mem = ram
        nat.clb = self.clb_addr
        return nat, ram

    # -- served in the exit ----------------------------------------------------------------
    @property
    def inline_slots(self) -> int:
        """Slots served in the guest's PxCI write itself (abar.c's serve_inline)."""
        return self._r.inline_slots

    def offer_inline(self) -> None:
        """(hba.lock held) While nothing is under way on the port that could order a new
        command (nothing in flight, pending, held or halted, no drain, no checkpoint), let a
        guest's PxCI write of NCQ reads the page cache holds be served and completed in the
        exit itself: no hand-off to this port's worker and back. The exit withdraws the
        offer when it declines a write (the worker then takes the slots) and Python offers it
        again once the port is idle. Otherwise withdraw it."""
        self.withdraw_inline()           # first: no exit uses the state set up below
        if self._r.inline_cold:
            # The exit met reads the page cache lacked: a disk that is read cold would pay
            # the exit's attempt on every command; try again after a while.
            self._r.inline_cold = 0
            self._cold_skips = INLINE_COLD_SKIPS
        dev = self.device
        if dev is None or not dev.cached_reads or not self.hba._native_on or self.hba.closing \
                or not self.cmd & CMD_ST or self._r.efd < 0 \
                or self.halted or self.busy is not None or self.pending or self.ncq_active \
                or self._inflight or self.draining or self.held or self.hba.quiesced \
                or self._r.issued:
            return
        if self._cold_skips:             # counted only where it would have been offered
            self._cold_skips -= 1
            return
        ready = self._native_ready()
        if ready is None:
            return
        nat, self._inline_ram = ready
        lib.ahci_port_inline(self._h, self.index, nat, self.fb_addr, NATIVE_JOB_BYTES)

    def withdraw_inline(self) -> None:
        """(hba.lock held) PxCI writes go to the worker again; once this returns no exit is
        serving. PxCMD.CCS is taken as the exits left it."""
        if self._inline_ram is None:
            return                       # not offered
        lib.ahci_port_inline(self._h, self.index, ffi.NULL, 0, 0)
        self._ccs = self._native_ccs()
        self._inline_ram = None

    @staticmethod
    def _native_transfer(nat, mask: int, ram) -> int:
        """(a BlockQueue worker) The data of `mask`'s slots; returns the slots that failed.
        `ram` is the guest RAM export the prepared buffers point into."""
        return lib.ahci_execute(nat, mask)

    def _native_done(self, mask: int, ioc: int, epoch: int, failed) -> None:
        """Complete a natively served batch: one SDB FIS and one interrupt for what went
        well, the Python completion (_finish) for each slot that failed."""
        if not isinstance(failed, int):
            failed = mask                # the worker could not run it (BlockError)
        with self.hba.lock:
            self._settle_native(mask, ioc, epoch, failed)
            self.offer_inline()

    def _settle_native(self, mask: int, ioc: int, epoch: int, failed: int) -> None:
        """(hba.lock held) _native_done's work: the slots of `mask` are back."""
        ok = mask & ~failed
        for s in range(SLOTS):
            if failed >> s & 1 and self._native.slot[s].write and self._native.slot[s].fua:
                # Its write-through flush may be what failed, which the kernel reports
                # once: from now on every FLUSH CACHE fails too, even if the port was
                # stopped meanwhile (the data lost may be an acknowledged write's).
                self.device.backend.writeback_failed(self._native.slot[s].err or errno.EIO)
        if epoch != self.epoch:      # stopped meanwhile: nothing to tell the guest
            self._returned(bin(mask).count("1"))
            return
        sdb = unreported = False
        if ok and not self.halted:
            try:
                self._post_sdb(ST_OK, 0, ok)
                sdb = True
            except TransferError as e:
                # The FIS area is bad: the port halts. These slots are back all the same,
                # and counted back here only (the port is halted now: not again below).
                self._returned(bin(ok).count("1"))
                self.ncq_active &= ~ok
                self._fatal(e.is_bit, e.serr)
                unreported = True
        if unreported:
            pass
        elif sdb:
            # One call: the status, then the tags, then the event, then the interrupt.
            self._returned(bin(ok).count("1"), sync=False)
            self.ncq_active &= ~ok
            self._done(ST_OK, F_SACT, ok, IS_SDBS | (IS_DPS if ok & ioc else 0))
        elif ok and self.halted:
            self._returned(bin(ok).count("1"))
            self.ncq_active &= ~ok
        elif not ok:
            self._returned(0)
        for s in range(SLOTS):
            if failed >> s & 1:
                write = self._native.slot[s].write
                self._finish(_NativeCommand(s, epoch, bool(ioc >> s & 1)),
                             ata_error(ERR_ABRT if write else ERR_UNC))
        if ok and not self.halted:
            self._run()

    def _run(self) -> None:
        """Start what may start: NCQ commands all at once, others one at a time."""
        self._start_pending()
        if self.batch:
            # A queue hand-off per command costs more than 4 KiB from the page cache: send
            # the requests in as many jobs as there are workers.
            batch, self.batch = self.batch, []
            jobs = min(len(batch), self.device.workers)
            for i in range(jobs):
                job = batch[i::jobs]
                try:
                    self.device.queue.submit_many(job)
                except BlockError as e:  # full or closing: those commands fail, nothing waits
                    for _, _, callback in job:
                        callback(e)

    def _start_pending(self) -> None:
        while self.pending and not self.halted and self.busy is None:
            slot = self.pending.popleft()
            self.ccs = slot
            try:
                cmd = self._fetch(slot)
            except TransferError as e:
                self._fatal(e.is_bit, e.serr)
                return
            if cmd is None:
                continue
            dev = self.device
            if dev is not None and dev.is_queued(cmd.command):
                cmd.ncq = True
                tag = cmd.count >> 3
                if tag != slot or not self.sact & (1 << slot):
                    # AHCI uses the tag to find the slot; without its SActive bit the
                    # completion would be invisible to the host.
                    self._start(cmd, ata_error(ERR_ABRT))
                    continue
                # The device accepts the command: BSY clears, PxCI with it.
                self._clear(F_CI, 1 << slot)
                self.tfd = (self.tfd & ~0xFF) | ST_OK
                self.ncq_active |= 1 << slot
            elif self.ncq_active or self.sact:
                self.busy = slot
                self._start(cmd, ata_error(ERR_ABRT))   # non-queued while NCQ is active
                continue
            else:
                self.busy = slot
            self._start(cmd, None)

    def _start(self, cmd: Command, result: Result | None) -> None:
        self.inflight += 1
        if result is None:
            dev = self.device
            try:
                if dev is None:
                    result = ata_error(ERR_ABRT)
                else:
                    result = dev.execute(cmd)
            except TransferError as e:
                result = Result(fatal=e.is_bit, serr=e.serr)
            except Exception:  # a device model bug must not take the VMM down
                self.hba.log.exception("%s port %d: command %#x failed", self.hba.name, self.index,
                              cmd.command)
                result = ata_error(ERR_ABRT)
        if result is not None:
            self._finish(cmd, result)

    def _fetch(self, slot: int) -> Command | None:
        """Read slot's command header, FIS and PRDs; None for a device control FIS."""
        mem = self.hba.memory
        try:
            hdr = mem.view(self.clb_addr + slot * CMD_HEADER_SIZE, CMD_HEADER_SIZE)
            flags, prdtl, _, ctba, ctbau = CMD_HEADER.unpack(hdr)
            table = mem.view((ctbau << 32) | (ctba & ~0x7F), CMD_TABLE_PRDT + prdtl * PRD_SIZE)
        except GuestMemoryError as e:
            raise TransferError(IS_HBFS, SERR_ERR_E, str(e)) from None
        hdr[PRDBC_OFFSET:PRDBC_OFFSET + 4] = b"\0\0\0\0"
        fis = H2D.unpack_from(table, CMD_TABLE_CFIS)
        acmd = bytes(table[CMD_TABLE_ACMD:CMD_TABLE_ACMD + 16])
        prds, ioc = [], False
        end = -1
        for dba, dbau, dbc in PRD.iter_unpack(table[CMD_TABLE_PRDT:]):
            addr, n = (dbau << 32) | (dba & ~1), (dbc & PRD_DBC_MASK) + 1
            if addr == end:
                # Physically contiguous with the previous entry (pages a guest allocated in
                # a row): one buffer, as QEMU's scatter-gather lists merge them too.
                prds[-1] = (prds[-1][0], prds[-1][1] + n)
            else:
                prds.append((addr, n))
            end = addr + n
            ioc = ioc or bool(dbc & PRD_IOC)
        cmd = Command(self, slot, fis, acmd, prds, ioc, self.epoch)
        cfl = flags & HDR_CFL_MASK
        if fis[_F_TYPE] != FIS_H2D or not 5 <= cfl <= 16:
            self.busy = slot
            self._start(cmd, ata_error(ERR_ABRT))
            return None
        if not fis[_F_FLAGS] & H2D_COMMAND:
            self._device_control(slot, fis[_F_CONTROL])
            return None
        return cmd

    def _device_control(self, slot: int, control: int) -> None:
        """A Device Control FIS: SRST set holds the device in reset, SRST cleared ends the
        software reset and the device answers with its signature."""
        self._clear(F_CI, 1 << slot)
        if control & CONTROL_SRST:
            self.tfd = (self.tfd & ~0xFF) | ST_BSY
            return
        if self.device is not None:
            self.sig = s = self.device.signature
            self.tfd = self.device.reset_status
            self._post_d2h(self.tfd, 0, {"count": s & 0xFF, "lba0": s >> 8 & 0xFF,
                                         "lba1": s >> 16 & 0xFF, "lba2": s >> 24 & 0xFF})
            self._set(F_IS, IS_DHRS)
            self.hba.update_irq()

    # -- completion -------------------------------------------------------------------------
    def complete(self, cmd: Command, result: Result) -> None:
        with self.hba.lock:
            self._finish(cmd, result)
            self.offer_inline()

    def _finish(self, cmd: Command, result: Result) -> None:
        bit = 1 << cmd.slot
        if cmd.epoch != self.epoch:
            self._returned(1)            # the port was stopped or reset meanwhile
            return
        self._returned(1)
        if cmd.ncq:
            self.ncq_active &= ~bit
        elif self.busy == cmd.slot:
            self.busy = None
        if self.halted:
            return                       # aborted by an earlier error
        if result.fatal:
            self._fatal(result.fatal, result.serr)
            return
        ok = not result.status & ST_ERR
        events = 0
        try:
            if cmd.ncq:
                self._post_sdb(result.status, result.error, bit if ok else 0)
                events = IS_SDBS
            else:
                if result.transferred:
                    self._write_prdbc(cmd.slot, result.transferred)
                if result.pio and ok:
                    events = self._post_pio_setup(result, cmd)
                self._post_d2h(result.status, result.error, result.regs)
                events |= IS_DHRS
        except TransferError as e:
            self._fatal(e.is_bit, e.serr)
            return
        # The status first, then the slot, then the events: a guest polling PxCI (or
        # PxSACT) that sees the slot done reads its status (native reads take no lock).
        tfd = result.status | result.error << 8
        if not ok:
            self.tfd = tfd
            self._set(F_IS, events)
            self.ccs = cmd.slot
            self._fatal(IS_TFES, 0)
            return
        if cmd.ioc:
            events |= IS_DPS
        self._done(tfd, F_SACT if cmd.ncq else F_CI, bit, events)
        self._run()

    def _done(self, tfd: int, field: int, slots: int, events: int) -> None:
        """Commands done well, in one native call: PxTFD (and PxCMD's value), then their
        PxCI or PxSACT bits cleared, then the PxIS events, then the interrupt."""
        mode = self.hba.irq_mode()
        r = lib.ahci_port_done(self._h, self.index, tfd, self.cmd_value(), field, slots,
                               events, mode)
        if mode < 0:
            self.hba.update_irq()
        else:
            self.hba.drive_irq(r, mode)

    def _fatal(self, is_bit: int, serr: int) -> None:
        """Stop processing until software clears PxCMD.ST (section 6.2.2)."""
        self.serr |= serr
        self._set(F_IS, is_bit)
        self.halted = True
        self.hba.update_irq()

    def _write_prdbc(self, slot: int, n: int) -> None:
        try:
            self.hba.memory.view(self.clb_addr + slot * CMD_HEADER_SIZE + PRDBC_OFFSET, 4)[:] = \
                n.to_bytes(4, "little")
        except GuestMemoryError as e:
            raise TransferError(IS_HBFS, SERR_ERR_E, str(e)) from None

    def _rx(self, name: str, size: int):
        """The received-FIS slot `name`, or None while FIS receive is off."""
        if not self.cmd & CMD_FRE:
            return None
        try:
            return self.hba.memory.view(self.fb_addr + RX[name], size)
        except GuestMemoryError as e:
            raise TransferError(IS_HBFS, SERR_ERR_E, str(e)) from None

    def _post_d2h(self, status: int, error: int, regs: dict | None, irq: bool = True) -> None:
        try:
            v = self._rx("rfis", D2H.size)
        except TransferError:
            if not irq:
                return                   # at reset nothing can be reported; software will look
            raise
        if v is None:
            return
        r = regs or {}
        # pack, then copy: pack_into would zero the FIS in guest memory before filling it in
        v[:] = D2H.pack(FIS_D2H, FIS_I if irq else 0, status, error, r.get("lba0", 0),
                         r.get("lba1", 0), r.get("lba2", 0), r.get("device", 0),
                         r.get("lba3", 0), r.get("lba4", 0), r.get("lba5", 0),
                         r.get("count", 0), r.get("count_exp", 0))

    def _post_pio_setup(self, result: Result, cmd: Command) -> int:
        """Post the PIO Setup FIS; the PxIS bit it sets (reported with the D2H FIS's)."""
        v = self._rx("psfis", PIO_SETUP.size)
        if v is None:
            return 0
        to_host = result.pio == "in"
        f = cmd.fis
        v[:] = PIO_SETUP.pack(FIS_PIO_SETUP, (PIO_TO_HOST | FIS_I) if to_host else 0,
                              ST_OK | ST_DRQ, 0, f[4], f[5], f[6], f[7], f[8], f[9], f[10],
                              f[12], f[13], result.status, min(result.transferred, 0xFFFF))
        return IS_PSS if to_host else 0

    def _post_sdb(self, status: int, error: int, sactive: int) -> None:
        v = self._rx("sdbfis", SDB.size)
        if v is not None:
            v[:] = SDB.pack(FIS_SDB, FIS_I, status & 0x77, error, sactive)


class _AbarFallback(PythonHandle):
    """The HBA's Python handler as the native ABAR handler's fallback; dropped with the
    range, when it also stops being called."""

    def __init__(self, hba: "AhciHba", name: str):
        super().__init__(hba, name)
        self._regs = hba._regs
        lib.ahci_set_handler(self._regs, self.handle)

    def drop(self) -> None:
        lib.ahci_set_handler(self._regs, -1)
        super().drop()


class NativeAbar:
    """BAR5 served by abar.c (a hvframe.pci.device.NativeBar): hot registers without the
    GIL, the rest passed on to AhciHba.read/write."""

    def __init__(self, hba: "AhciHba"):
        self.hba = hba
        # The bus core's function and argument types are another cffi module's.
        self._fn = core_ffi.cast("hv_native_fn", int(ffi.cast("uintptr_t", lib.ahci_abar_access)))
        self._opaque = core_ffi.cast("void *", int(ffi.cast("uintptr_t", hba._regs)))

    def map(self, bus, base: int, name: str):
        fallback = _AbarFallback(self.hba, name)
        try:
            r = bus.register_native(base, ABAR_SIZE, self._fn, self._opaque, name=name,
                                    fallback=fallback)
        except BaseException:
            fallback.drop()
            raise
        r.handler = self.hba
        return r


class AhciHba(PciFunction, DeviceState):
    """The HBA: generic host control registers, ports, MSI and INTA.

    Registers live in a native register file (abar.c, struct ahci_hba_regs) that BAR5's
    native handler serves; Python keeps everything else and does the rare accesses. Locks,
    outermost first: hba.lock (DEVICE; all Python state, every Python change of the register
    file), then the register file's mutex (innermost, native: never held across Python).
    The vCPU takes only the mutex for the accesses served natively."""

    state_version = 1

    state_layout = declared_later(lambda: _state("AHCI_HBA_STATE"))

    def __init__(self, machine, devices: dict[int, object], name: str = "ahci"):
        super().__init__(VENDOR_INTEL, DEVICE_ICH9_AHCI, CLASS_AHCI, revision=REVISION,
                         subsystem_vendor=VENDOR_INTEL, subsystem_id=DEVICE_ICH9_AHCI,
                         pin=INTA, name=name)
        self.machine = machine
        self.memory = machine.memory
        self.lock = concurrency.lock(concurrency.DEVICE, f"{name} hba", reentrant=True)
        self.idle = concurrency.condition(self.lock)
        self.quiesced = False            # a checkpoint: slots issued now are held
        self.closing = False             # close() began: nothing is offered to exits again
        nports = max(devices) + 1 if devices else 1
        if nports > MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS} ports")
        self.devices = devices
        self.cap = (CAP_S64A | CAP_SNCQ | CAP_SCLO | CAP_SAM | CAP_PMD | 3 << CAP_ISS_SHIFT
                    | (SLOTS - 1) << CAP_NCS_SHIFT | (nports - 1))
        self.pi = (1 << nports) - 1
        self._regs = ffi.new("struct ahci_hba_regs *")
        lib.ahci_hba_init(self._regs, nports, self.cap, self.pi, AHCI_VERSION)
        self._native_on = True           # serve natively (off: every access to Python)
        self.ports = [AhciPort(self, i, devices.get(i)) for i in range(nports)]
        self.ghc = GHC_AE
        self.add_bar(ABAR_INDEX, ABAR_SIZE, "mmio32", self, native=NativeAbar(self))
        MsiCapability(self)
        lib.ahci_set_msi_gate(self._regs, self.msi.gate())
        # Each port with a device gets the worker that starts what guests issue natively.
        self._workers = []
        for p in self.ports:
            if p.device is None or lib.ahci_port_worker_open(self._regs, p.index) < 0:
                continue                 # PxCI writes then go the Python way
            t = concurrency.DeviceThread(
                f"{name} port {p.index} issue", p.serve_issued,
                wake=partial(lib.ahci_port_kick, self._regs, p.index),
                on_error=partial(self._worker_failed, p))
            self._workers.append((p, t.start()))

    def _worker_failed(self, port: "AhciPort", error: BaseException) -> None:
        """A port's worker died: PxCI writes go through Python from now on, and what it had
        not taken is started here."""
        with self.lock:
            port.withdraw_inline()
            lib.ahci_port_worker_close(self._regs, port.index)
            self.deliver_owed(lib.ahci_port_take_irq(self._regs, port.index))
            port._start_issued(lib.ahci_port_take(self._regs, port.index))

    # -- native register file ---------------------------------------------------------------
    @property
    def ghc(self) -> int:
        return self._regs.ghc

    @ghc.setter
    def ghc(self, value: int) -> None:
        lib.ahci_hba_update(self._regs, lib.AHCI_H_GHC, _U32, value)

    @property
    def is_(self) -> int:
        return getattr(self._regs, "is")

    @property
    def native(self) -> bool:
        """Whether BAR5's hot registers are served natively (False: all by Python, for
        tests comparing the two)."""
        return self._native_on

    @native.setter
    def native(self, on: bool) -> None:
        with self.lock:
            self._native_on = bool(on)
            lib.ahci_set_native(self._regs, 1 if on else 0)
            self._offer_inline()

    @property
    def native_counts(self) -> tuple[int, int]:
        """(accesses served natively, accesses passed to Python) since the HBA was made."""
        return self._regs.served, self._regs.passed

    # -- interrupts ------------------------------------------------------------------------
    def update_irq(self) -> None:
        """Recompute IS from the ports and drive MSI (on new events) or INTA (as a level).
        (hba.lock held.) The computation is the native one the guest's W1C exits make, on
        the same state under the same mutex; those exits deliver an MSI themselves only
        through the vector's open gate and leave anything else (INTx, a masked vector) to
        this method, so interrupts are driven in the order of the changes."""
        msi = self.msi_enabled()
        if self._native_on:
            r = lib.ahci_irq_update(self._regs, msi)
        else:
            r = self._irq_reference(msi)
        self.drive_irq(r, msi)

    def _irq_reference(self, msi: int) -> int:
        """ahci_irq_update's computation in Python: what runs while native accesses are off,
        so that tests comparing the two modes compare the C exits with an independent
        reference. Stores the outcome natively, for native accesses to carry on from."""
        old = self.is_
        new = old
        for p in self.ports:
            if p.status_bits() & p.ie:
                new |= p.bit
        level = bool(self.ghc & GHC_IE and new)
        fire = level and bool(new & ~old or not self._regs.level)
        lib.ahci_irq_store(self._regs, new, level, 0 if msi else level)
        return (lib.AHCI_IRQ_LEVEL if level else 0) | (lib.AHCI_IRQ_FIRE if fire else 0)

    def irq_mode(self) -> int:
        """msi_enabled() for the native functions that recompute the interrupt; -1 while
        native accesses are off (update_irq computes it then)."""
        return self.msi_enabled() if self._native_on else -1

    def msi_enabled(self) -> int:
        return 1 if self.msi is not None and self.msi.enabled else 0

    def deliver_owed(self, owed: int) -> None:
        """(hba.lock held) The interrupt a completion in an exit left to Python (abar.c's
        inline_irq): the line as the registers are now, and the MSI the completion called
        for unless the guest has cleared the status meanwhile."""
        if not owed:
            return
        msi = self.msi_enabled()
        r = lib.ahci_irq_update(self._regs, msi) if self._native_on else self._irq_reference(msi)
        if r & lib.AHCI_IRQ_LEVEL:
            r |= owed & lib.AHCI_IRQ_FIRE
        self.drive_irq(r, msi)
        self.idle.notify_all()

    def drive_irq(self, r: int, msi: int) -> None:
        """(hba.lock held) Deliver what a native recomputation (AHCI_IRQ_*) asked for."""
        level = bool(r & lib.AHCI_IRQ_LEVEL)
        if msi:
            if self.intx_level:
                self.set_intx(0)
            if r & lib.AHCI_IRQ_FIRE:
                self.msi.notify(0)
        elif level != bool(self.intx_level):
            self.set_intx(1 if level else 0)

    # -- ABAR accesses ---------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size == 8:
            return self.read(offset, 4) | self.read(offset + 4, 4) << 32
        with self.lock:
            dword = self._read32(offset & ~3)
        return (dword >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.write(offset, 4, value & _U32)
            self.write(offset + 4, 4, value >> 32)
            return
        shift = 8 * (offset & 3)
        if (offset & 3) + size > 4:
            return                       # a dword-crossing access means nothing here
        mask = ((1 << (8 * size)) - 1) << shift
        off = offset & ~3
        n = (off - PORT_BASE) // PORT_STRIDE if off >= PORT_BASE else -1
        # Nothing is served in an exit while Python changes registers: the port's own, or
        # every port's for the HBA's (GHC, a reset).
        ports = self.ports if n < 0 else self.ports[n:n + 1]
        with self.lock:
            for p in ports:
                p.withdraw_inline()
            try:
                self._write32(off, (value << shift) & mask, mask)
            finally:
                for p in ports:
                    p.offer_inline()

    def _read32(self, off: int) -> int:
        if off < PORT_BASE:
            name = GHC_BY_OFFSET.get(off)
            if name == "is":
                return self.is_
            return getattr(self, name) if name in ("cap", "ghc", "pi") else \
                AHCI_VERSION if name == "vs" else 0
        n, reg = divmod(off - PORT_BASE, PORT_STRIDE)
        name = PORT_BY_OFFSET.get(reg)
        if n >= len(self.ports) or name is None:
            return 0
        return self.ports[n].read_reg(name)

    def _write32(self, off: int, value: int, mask: int) -> None:
        if off < PORT_BASE:
            name = GHC_BY_OFFSET.get(off)
            if name == "ghc":
                if value & mask & GHC_HR:
                    self._reset()            # write() holds the lock, the offers withdrawn
                else:
                    self.ghc = GHC_AE | (((self.ghc & ~mask) | (value & mask)) & GHC_IE)
                    self.update_irq()
            elif name == "is":
                lib.ahci_hba_update(self._regs, lib.AHCI_H_IS, value & mask, 0)
                self.update_irq()
            return                        # cap, pi, vs and the rest are read-only
        n, reg = divmod(off - PORT_BASE, PORT_STRIDE)
        name = PORT_BY_OFFSET.get(reg)
        if n < len(self.ports) and name is not None:
            self.ports[n].write_reg(name, value, mask)

    def reset(self) -> None:
        """The HBA reset from outside a register write (a device server's
        VFIO_USER_DEVICE_RESET, from its own thread): under the HBA's lock, with the serving
        in the exit withdrawn meanwhile, as a register write has them."""
        with self.lock:
            self._withdraw_inline()
            try:
                self._reset()
            finally:
                self._offer_inline()

    def _reset(self) -> None:
        """(hba.lock held, offers withdrawn) GHC.HR: every port stops and re-runs COMRESET;
        GHC.IE and IS clear. Other vCPUs' accesses wait for it in Python (native accesses off
        meanwhile), so none of them sees, or changes, half a reset."""
        lib.ahci_set_native(self._regs, 0)
        try:
            self.ghc = GHC_AE
            lib.ahci_hba_update(self._regs, lib.AHCI_H_IS, _U32, 0)
            for p in self.ports:
                p.reset_registers()
                p.comreset()
            self.update_irq()
        finally:
            lib.ahci_set_native(self._regs, 1 if self._native_on else 0)

    def _withdraw_inline(self) -> None:
        for p in self.ports:
            p.withdraw_inline()

    def _offer_inline(self) -> None:
        for p in self.ports:
            p.offer_inline()

    # -- lifecycle -------------------------------------------------------------------------
    def wait_idle(self, timeout: float | None = 5.0) -> bool:
        """Wait until no command is with a device and no interrupt is owed (tests and
        shutdown)."""
        with self.lock:
            return self.idle.wait_for(
                lambda: not any(p.inflight or p._r.issued or p._r.irq_owed
                                for p in self.ports), timeout)

    # -- checkpoint -------------------------------------------------------------------------
    def quiesce(self) -> None:
        """Hold what guests issue from now on and wait until every command already issued
        is back from its device (NCQ batches included); then the devices' own quiesce."""
        with self.lock:
            self.quiesced = True
            self._withdraw_inline()
            for p in self.ports:         # an interrupt an exit left to a worker: sent now
                self.deliver_owed(lib.ahci_port_take_irq(self._regs, p.index))
            settled = self.idle.wait_for(lambda: all(p.settled() for p in self.ports),
                                         QUIESCE_TIMEOUT_S)
        if not settled:
            self.unquiesce()
            # Here, not at the top: the snapshot format's module imports construct.
            from hvframe.snapshot.format import SnapshotError
            raise SnapshotError(f"{self.name}: commands still with the disk after "
                              f"{QUIESCE_TIMEOUT_S:.0f} s; no checkpoint taken")
        for p in self.ports:
            if isinstance(p.device, DeviceState):
                p.device.quiesce()

    def unquiesce(self) -> None:
        with self.lock:
            self.quiesced = False
            self._start_held()
            self._offer_inline()

    def _start_held(self) -> None:
        """(hba.lock held) Start the slots a quiesce held, on ports still running."""
        for p in self.ports:
            held, p.held = p.held, 0
            if held and p.cmd & CMD_ST:
                p._start_issued(held & p.ci)

    def save_state(self) -> dict:
        with self.lock:
            return {"pci": save_pci(self), "ghc": self.ghc, "is": self.is_,
                    "irq_level": bool(self._regs.level),
                    "ports": [p.save_state() for p in self.ports]}

    def load_state(self, s) -> None:
        """Into an HBA fresh from the same configuration, guest RAM already in place."""
        if len(s.ports) != len(self.ports):
            raise ConfigError(f"snapshot: {self.name}: {len(s.ports)} ports saved, this HBA "
                              f"has {len(self.ports)}")
        device_states = []
        for p, sp in zip(self.ports, s.ports):
            if bool(sp.device) != (p.device is not None):
                raise ConfigError(f"snapshot: {self.name} port {p.index}: saved "
                                  f"{'with' if sp.device else 'without'} a device, configured "
                                  f"{'with' if p.device is not None else 'without'} one")
            if p.device is not None and bool(sp.atapi) != p.device.atapi:
                raise ConfigError(f"snapshot: {self.name} port {p.index}: saved with a "
                                  f"{'CD-ROM' if sp.atapi else 'disk'}, configured with a "
                                  f"{'CD-ROM' if p.device.atapi else 'disk'}")
            device_states.append(parse_record(p.device, sp.device,
                                              f"{self.name} port {p.index} device")
                                 if p.device is not None else None)
            if any(slot >= SLOTS for slot in sp.pending):
                raise ConfigError(f"snapshot: {self.name} port {p.index}: a slot above 31")
        load_pci(self, s.pci)
        with self.lock:
            self.ghc = GHC_AE | (s.ghc & GHC_IE)
            for p, sp, ds in zip(self.ports, s.ports, device_states):
                p.load_state(sp, ds)
            # The line as load_pci drove it again (INTx), for the native exits to go on from.
            lib.ahci_irq_store(self._regs, s["is"], 1 if s.irq_level else 0,
                               1 if self.intx_level else 0)
            self._start_held()
            self._offer_inline()

    def close(self) -> None:
        with self.lock:
            self.closing = True          # a late completion must not offer again
            self._withdraw_inline()
        for port, thread in self._workers:
            thread.stop()
            lib.ahci_port_worker_close(self._regs, port.index)
        self._workers = []
        for dev in self.devices.values():
            dev.close()


__all__ = ["AhciHba", "AhciPort", "Command", "Result", "TransferError", "ata_error",
           "CMD_ATAPI"]
