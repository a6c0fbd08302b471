"""The failure policy of an AHCI HBA (class 01:06:01) whose server is gone.

While the device is lost the client answers for the HBA's registers (BAR5, ABAR) from a
shadow of what the driver last read and wrote: every command outstanding when the server
went, and every command issued while it is away, ends as a task file error (PxTFD ERR with
ABRT, PxIS.TFES, PxCI and PxSACT clear) with the port's interrupt when the driver enabled
it; the command engine's CR and FR follow ST and FRE so the driver's error recovery (stop the
port, clear PxSERR and PxIS, start it) completes. Acknowledged writes are the server's
business: the HBA clears a write's PxCI bit only once the backend has the data.

When a server is back its HBA is fresh from reset: before forwarding starts again the driver's
set-up (GHC.AE and IE; each port's command list and FIS bases, interrupt enables, FRE, spin-up
and ST) is written to it, so the driver carries on without resetting the HBA.
"""
from __future__ import annotations

from hvframe import concurrency
from hvframe_ahci.regs import (CMD_CLO, CMD_CR, CMD_FR, CMD_FRE, CMD_POD, CMD_ST, CMD_SUD,
                               ERR_ABRT, GHC_AE, GHC_HR, GHC_IE, GHC_OFFSETS, IS_TFES,
                               MAX_PORTS, PORT_BASE, PORT_OFFSETS, PORT_STRIDE, ST_DRDY, ST_ERR)

from .passthru import FailurePolicy

ABAR_REGION = 5
G = GHC_OFFSETS
P = PORT_OFFSETS
TFD_ABORTED = ST_ERR | ST_DRDY | ERR_ABRT << 8
W1C = (P["is"], P["serr"])
REPLAYED = ("clb", "clbu", "fb", "fbu")
CMD_KEPT = CMD_FRE | CMD_SUD | CMD_POD


class AhciFailure(FailurePolicy):
    def __init__(self):
        # Shadows only: nothing is called out under it.
        self._lock = concurrency.lock(concurrency.LEAF, "ahci failure shadow")
        self.ghc: dict[int, int] = {}            # offset -> value
        self.ports: dict[int, dict[int, int]] = {}
        self.lost_now = False

    @staticmethod
    def _where(region: int, offset: int, size: int):
        if region != ABAR_REGION or size != 4 or offset & 3:
            return None
        if offset < PORT_BASE:
            return None, offset
        port, reg = divmod(offset - PORT_BASE, PORT_STRIDE)
        return (port, reg) if port < MAX_PORTS else None

    # -- following the driver -------------------------------------------------------------------
    def observe_read(self, region, offset, size, value) -> None:
        w = self._where(region, offset, size)
        if w is None:
            return
        port, reg = w
        with self._lock:
            (self.ghc if port is None else self.ports.setdefault(port, {}))[reg] = value

    def observe_write(self, region, offset, size, value) -> None:
        w = self._where(region, offset, size)
        if w is None:
            return
        port, reg = w
        failed = False
        with self._lock:
            if port is None:
                if reg == G["is"]:
                    self.ghc[reg] = self.ghc.get(reg, 0) & ~value
                elif reg == G["ghc"] and value & GHC_HR and self.lost_now:
                    self._reset_shadow()
                else:
                    self.ghc[reg] = value & ~GHC_HR if reg == G["ghc"] else value
            else:
                regs = self.ports.setdefault(port, {})
                if reg in W1C:
                    regs[reg] = regs.get(reg, 0) & ~value
                elif reg == P["ci"] and self.lost_now:
                    failed = bool(value) and self._fail(port)
                elif reg in (P["ci"], P["sact"]):
                    regs[reg] = regs.get(reg, 0) | value
                else:
                    regs[reg] = value & ~CMD_CLO if reg == P["cmd"] else value
            irq_low = self.lost_now and not any(r.get(P["is"], 0) for r in self.ports.values())
        if failed:
            self._interrupt(port)
        elif irq_low and reg == (G["is"] if port is None else P["is"]):
            self.fn.set_intx(0)

    def _reset_shadow(self) -> None:
        """GHC.HR written while the server is away: the HBA's reset state, at once."""
        self.ghc[G["ghc"]] = GHC_AE
        self.ghc[G["is"]] = 0
        for regs in self.ports.values():
            for name in ("is", "ie", "cmd", "serr", "sact", "ci"):
                regs[P[name]] = 0

    def _fail(self, port: int) -> bool:
        """End the port's commands with a task file error (lock held); True if the driver
        wants an interrupt for it."""
        regs = self.ports.setdefault(port, {})
        regs[P["tfd"]] = TFD_ABORTED
        regs[P["ci"]] = regs[P["sact"]] = 0
        regs[P["is"]] = regs.get(P["is"], 0) | IS_TFES
        self.ghc[G["is"]] = self.ghc.get(G["is"], 0) | 1 << port
        return bool(regs.get(P["ie"], 0) & IS_TFES and self.ghc.get(G["ghc"], 0) & GHC_IE)

    def _interrupt(self, port: int) -> None:
        fn = self.fn
        if fn.msi is not None and fn.msi.enabled:
            fn.msi.notify(0)
        else:
            fn.set_intx(1)

    # -- the server is gone -----------------------------------------------------------------------
    def lost(self) -> None:
        wanted = []
        with self._lock:
            self.lost_now = True
            for port, regs in self.ports.items():
                if regs.get(P["cmd"], 0) & CMD_ST and (regs.get(P["ci"], 0) or
                                                        regs.get(P["sact"], 0)):
                    if self._fail(port):
                        wanted.append(port)
        for port in wanted:
            self._interrupt(port)

    def read_while_lost(self, region, offset, size):
        w = self._where(region, offset, size)
        if w is None:
            return None
        port, reg = w
        with self._lock:
            if port is None:
                v = self.ghc.get(reg)
                if v is not None and reg == G["ghc"]:
                    v = (v & ~GHC_HR) | GHC_AE      # a reset completes at once; AHCI only
                return v
            regs = self.ports.get(port, {})
            if reg in (P["ci"], P["sact"]):
                return 0
            if reg == P["cmd"]:
                cmd = regs.get(reg, 0) & ~(CMD_CR | CMD_FR | CMD_CLO)
                return cmd | (CMD_CR if cmd & CMD_ST else 0) | (CMD_FR if cmd & CMD_FRE else 0)
            return regs.get(reg)

    def recovered(self) -> None:
        """Hand the driver's set-up to the fresh HBA of the server that is back."""
        with self._lock:
            ghc = dict(self.ghc)
            ports = {p: dict(r) for p, r in self.ports.items()}
            self.lost_now = False
        backend = self.fn.backend

        def put(off: int, value: int) -> None:
            backend.region_write(ABAR_REGION, off, (value & 0xFFFFFFFF).to_bytes(4, "little"))

        put(G["ghc"], GHC_AE | (ghc.get(G["ghc"], 0) & GHC_IE))
        for port, regs in sorted(ports.items()):
            base = PORT_BASE + PORT_STRIDE * port
            cmd = regs.get(P["cmd"], 0)
            if not cmd & (CMD_FRE | CMD_ST):
                continue                          # a port the driver has not set up
            for name in REPLAYED:
                if P[name] in regs:
                    put(base + P[name], regs[P[name]])
            put(base + P["cmd"], cmd & CMD_KEPT)
            put(base + P["serr"], 0xFFFFFFFF)
            put(base + P["is"], 0xFFFFFFFF)
            put(base + P["ie"], regs.get(P["ie"], 0))
            if cmd & CMD_ST:
                put(base + P["cmd"], cmd & (CMD_KEPT | CMD_ST))
