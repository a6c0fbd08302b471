#!/usr/bin/env python3
"""Write the seed corpora under fuzz/corpus/<target>/ and check that every seed runs clean.

    python fuzz/make_corpus.py            # all targets
    python fuzz/make_corpus.py uart ahci  # some

Seeds are encoded with fuzzlib.provider.Encoder in exactly the format each target's
one_input() decodes, so they are meaningful starting points: valid rings and requests of
every type, driver bring-ups, valid AHCI command tables and NCQ batches, BAR sizing and
MSI/MSI-X programming, fw_cfg port and DMA transfers, UART start-up sequences. The fuzzer
mutates from there. Re-run this after changing a target's input format.
"""
from __future__ import annotations

import os
import sys

FUZZ_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, FUZZ_DIR)

from fuzzlib import virtio  # noqa: E402
from fuzzlib.machines import enc_addr, enc_length  # noqa: E402
from fuzzlib.provider import Encoder  # noqa: E402
from fuzzlib.runner import load_target  # noqa: E402

FOUR_GIB = 1 << 32


def target(name):
    return load_target(os.path.join(FUZZ_DIR, "targets", f"{name}.py"))


# -- virtqueue ---------------------------------------------------------------------------------

def virtqueue_seeds(t):
    from hvframe_virtio_blk import virtio_blk as vb
    low, high = t.LOW, t.HIGH

    def header(size_exp, flags, max_chain=None, start=None, places=(0, 0, 0)):
        e = Encoder().u8(size_exp).u8(flags)
        if flags & 4:
            e.u8(max_chain - 1)
        if flags & 32:
            e.u16(start)
        for how in places:
            e.u8(how)
        return e

    def req(e, slot, rtype, sector, n, bits=0, payload=b"\0" * 16):
        e.u8(t.OP_REQUEST).u8(slot).u8(bits).pick(t.TYPES, rtype).pick(t.SECTORS, sector) \
            .pick(t.DATA_LENS, n)
        if rtype in (vb.T_DISCARD, vb.T_WRITE_ZEROES) and n:
            e.bytes(payload, 16)

    def desc(e, which, i, a, n, flags, nxt):
        e.u8(t.OP_DESC).u8(which).u16(i)
        enc_addr(e, a, low, high)
        enc_length(e, n)
        e.u16(flags).u16(nxt)

    seeds = {}
    e = header(6, 1 | 2)                       # 64 entries, event idx, indirect
    req(e, 0, vb.T_IN, 1, 1024, 1)             # split in two
    req(e, 1, vb.T_OUT, 3, 512, 4)             # indirect
    req(e, 2, vb.T_FLUSH, 0, 0)
    req(e, 3, vb.T_GET_ID, 0, 16)
    req(e, 4, vb.T_IN, 0, 4096, 8 | 16 | 2)    # header split, data in high RAM
    req(e, 5, vb.T_DISCARD, 0, 16, 0, bytes(8) + (2).to_bytes(4, "little") + bytes(4))
    e.u8(t.OP_SERVE).u8(63)
    seeds["rw-mixed-event-idx"] = e

    e = header(4, 16 | 32 | 2, start=65530)     # serve_fast mode, index wrap
    for i in range(6):
        req(e, i, vb.T_OUT if i % 2 else vb.T_IN, (0, 1, 3)[i % 3], 512, i & 3)
    e.u8(t.OP_SERVE).u8(1)
    e.u8(t.OP_SERVE).u8(15)
    seeds["fast-wraparound"] = e

    e = header(3, 0)                           # a descriptor loop and one good chain
    req(e, 0, vb.T_IN, 0, 512)
    desc(e, 4, 3, t.HDRS, 16, t.NEXT, 4)
    desc(e, 4, 4, t.DATA, 512, t.NEXT | t.WRITE, 3)
    e.u8(t.OP_PUBLISH).u8(1).u16(3)
    e.u8(t.OP_SERVE).u8(7)
    seeds["loop"] = e

    e = header(3, 1 | 2, places=(1, 2, 1))     # rings at the very ends of both regions
    req(e, 0, vb.T_IN, 3, 512)
    req(e, 1, vb.T_OUT, 3, 1024, 4 | 16)
    e.u8(t.OP_EVENT).u16(1).bool(True)         # used_event
    e.u8(t.OP_SERVE).u8(7)
    seeds["rings-at-region-ends"] = e

    e = header(5, 8 | 4 | 2, max_chain=3)      # read-only, max_chain 3
    req(e, 0, vb.T_OUT, 1, 512)                # IOERR (read-only)
    req(e, 1, vb.T_IN, 1, 1024, 1)             # 4 buffers: over the cap
    e.u8(t.OP_SERVE).u8(31)
    seeds["ro-max-chain"] = e

    e = header(2, 2)                           # an indirect table reaching past low RAM
    desc(e, 0, 0, t.HDRS, 16, t.NEXT, 1)
    desc(e, 0, 1, low - 256, 512, t.WRITE | t.NEXT, 2)
    desc(e, 0, 2, t.STATUS, 1, t.WRITE, 0)
    desc(e, 4, 0, t.TABLES, 48, t.INDIRECT, 0)
    e.u8(t.OP_HEADER).u8(0).u8(1).pick(t.TYPES, vb.T_IN).u8(1).pick(t.SECTORS, 0)
    e.u8(t.OP_PUBLISH).u8(1).u16(0)
    e.u8(t.OP_SERVE).u8(3)
    seeds["indirect-past-ram"] = e
    return seeds


# -- virtio-blk through PCI ------------------------------------------------------------------

def virtio_blk_seeds(t):
    from hvframe_virtio_blk import virtio_blk as vb
    low, high = t.LOW, t.HIGH

    def init(e, bits, qsize_exp=4):
        virtio.enc_init(e, t.OP_INIT, bits, qsize_exp)

    def req(e, slot, rtype, sector, n, bits=0, q=0):
        e.u8(t.OP_REQUEST).u8(q).u8(slot).u8(bits).pick(t.TYPES, rtype) \
            .pick(t.SECTOR_CHOICES, sector).pick(t.DATA_LENS, n)
        if n and rtype in (vb.T_DISCARD, vb.T_WRITE_ZEROES):
            e.pick(t.SECTOR_CHOICES, 1).u8(2).u8(0)

    def access(e, op, off, size, value=None):
        virtio.enc_access(e, op, off, size, value, wide=op == t.OP_BAR4)

    def cfg(e, reg, size, value=None):
        virtio.enc_cfg(e, t.OP_CFG, reg, size, value)

    seeds = {}
    e = Encoder().u8(0)
    init(e, 2 | 4 | 8)                          # modern, MSI-X, event idx, indirect
    req(e, 0, vb.T_IN, 1, 1024, 1)
    req(e, 1, vb.T_OUT, 1, 512, 4)
    req(e, 2, vb.T_FLUSH, 0, 0)
    req(e, 3, vb.T_GET_ID, 0, 32)
    req(e, 4, vb.T_DISCARD, 0, 16)
    req(e, 5, vb.T_WRITE_ZEROES, 0, 16)
    req(e, 6, vb.T_IN, 63, 1024)                # runs past the end: IOERR
    seeds["modern-msix-all-types"] = e

    e = Encoder().u8(0)
    init(e, 1 | 8, 8)                           # legacy, INTx, indirect
    req(e, 0, vb.T_IN, 0, 512)
    req(e, 1, vb.T_OUT, 7, 4096, 3)
    access(e, t.OP_BAR0, 19, 1)                 # ISR read
    e.u8(t.OP_STATUS).u8(0)                     # reset
    init(e, 1, 5)
    req(e, 2, vb.T_IN, 7, 4096)
    seeds["legacy-intx-reset"] = e

    e = Encoder().u8(2)                         # irqfd eventfds: native gate path
    init(e, 2 | 4 | 8 | 0x20, 6)                # rings in high RAM
    for i in range(4):
        req(e, i, vb.T_IN if i % 2 else vb.T_OUT, (0, 1, 7)[i % 3], 1024, 4 | 16 | (i & 3))
    seeds["high-rings-eventfds"] = e

    e = Encoder().u8(1)                         # read-only image
    init(e, 2 | 8)
    req(e, 0, vb.T_OUT, 0, 512)
    req(e, 1, vb.T_WRITE_ZEROES, 0, 16)
    cfg(e, 0x04, 2, 0)                          # decoding off
    virtio.enc_kick(e, t.OP_KICK, 0, legacy=False)
    cfg(e, 0x04, 2, 7)
    cfg(e, 0x20, 4, 0xFFFFFFFF)                 # size BAR4, then move it
    cfg(e, 0x20, 4)
    cfg(e, 0x20, 4, 0xC8000000)
    seeds["ro-bar-move"] = e

    e = Encoder().u8(0)
    init(e, 2 | 4)
    access(e, t.OP_BAR4, 0x16, 2, 0)            # queue_select
    access(e, t.OP_BAR4, 0x1C, 2, 0)            # queue_enable off while live
    access(e, t.OP_BAR4, 0x14, 1, 0x0F)         # status
    access(e, t.OP_BAR4, 0x2000, 4)             # device config (read)
    access(e, t.OP_BAR4, 0x3000, 2, 0)          # notify
    e.u8(t.OP_MSIX).u8(1).u8(3).pick(t.SIZES, 4).u64(1).bool(True).u16(0xC000)
    virtio.enc_avail(e, t.OP_AVAIL, 0, idx=300)      # avail index a queue ahead
    virtio.enc_kick(e, t.OP_KICK, 0, legacy=False)
    seeds["registers-and-bad-avail"] = e

    e = Encoder().u8(0)
    init(e, 2 | 8)
    cfg(e, 0x40 + 0x14, 1, 0)                   # poke at the capability list area
    virtio.enc_desc(e, t.OP_DESC, 0, 0, low - 8, 16, 1, 1, low, high)
    virtio.enc_avail(e, t.OP_AVAIL, 0, head=0)
    virtio.enc_kick(e, t.OP_KICK, 0, legacy=True)
    seeds["desc-at-ram-end"] = e
    return seeds


# -- virtio-net ------------------------------------------------------------------------------

def virtio_net_seeds(t):
    from hvframe_virtio_net import layout as L
    low, high = t.LOW, t.HIGH

    def init(e, bits, qsize_exp=5):
        virtio.enc_init(e, t.OP_INIT, bits, qsize_exp)

    def tx(e, q, slot, n, hflags=0, gso=0, csum=(0, 0), pieces=1, hlen=12, indirect=False):
        e.u8(t.OP_TX).u8(q).u8(slot).u8(hflags).pick(t.GSO_TYPES, gso).u16(0).u16(0) \
            .u16(csum[0]).u16(csum[1]).pick(t.FRAME_LENS, n).u8(pieces - 1) \
            .pick((12, 10, 6, 0), hlen).bool(indirect)

    def rx(e, q, count, size, writable=True, high_ram=False):
        e.u8(t.OP_RX).u8(q).u8(count - 1).pick(t.BUF_LENS, size).u8(1 if writable else 0) \
            .bool(high_ram)

    def ctrl(e, cls, cmd, body=b""):
        e.u8(t.OP_CTRL).u8(cls).u8(cmd).u8(len(body)).bytes(body)

    def peer(e, n, dst_index=0):
        e.u8(t.OP_PEER).pick(t.FRAME_LENS, n).u8(dst_index)

    seeds = {}
    e = Encoder().u8(0)
    init(e, 2)                                  # modern, MSI-X, every feature
    rx(e, 0, 8, 1526)
    tx(e, 1, 0, 60)
    tx(e, 1, 1, 1514, pieces=3)
    peer(e, 60)
    peer(e, 1514)
    peer(e, 4000)                               # merged over buffers, or over the MTU
    ctrl(e, L.CTRL_RX, L.CTRL_RX_PROMISC, b"\0")
    ctrl(e, L.CTRL_MAC, L.CTRL_MAC_TABLE_SET, bytes(4) + b"\1\0\0\0" + bytes.fromhex("01005e000001"))
    peer(e, 60, 2)
    peer(e, 60, 3)                              # filtered
    ctrl(e, L.CTRL_MQ, L.CTRL_MQ_VQ_PAIRS_SET, b"\2\0")
    rx(e, 2, 4, 4096)
    tx(e, 3, 2, 1514)
    seeds["modern-msix-mq-filter"] = e

    e = Encoder().u8(0)
    init(e, 1, 4)                               # legacy, INTx
    rx(e, 0, 4, 1526)
    tx(e, 1, 0, 60, hlen=10)
    peer(e, 60)
    e.u8(t.OP_STATUS).u8(0)                     # reset
    init(e, 1, 4)
    rx(e, 0, 2, 64)                             # too small: frames dropped whole
    peer(e, 1514)
    seeds["legacy-intx-reset"] = e

    e = Encoder().u8(2)                         # irqfd eventfds: the native gate path
    init(e, 2 | 0x20, 4)                        # rings in high RAM
    rx(e, 0, 8, 4096, high_ram=True)
    tx(e, 1, 3, 1514, hflags=L.HDR_F_NEEDS_CSUM, csum=(34, 6), indirect=True)
    tx(e, 1, 4, 1514, gso=L.GSO_UDP)            # never negotiable: dropped
    tx(e, 1, 5, 13)                             # a runt
    tx(e, 1, 6, t.MAX_FRAME + 1)                # oversize
    peer(e, t.MAX_FRAME)
    seeds["high-rings-eventfds-offloads"] = e

    e = Encoder().u8(0)
    init(e, 2)
    rx(e, 0, 4, 12)                             # header only
    rx(e, 0, 2, 1526, writable=False)
    e.u8(t.OP_RAW_STREAM).u8(8).bytes(b"\xff\xff\xff\xf0ABCD")
    peer(e, 60)
    e.u8(t.OP_HANGUP).u8(0)
    tx(e, 1, 0, 60)
    seeds["bad-buffers-raw-stream-hangup"] = e

    e = Encoder().u8(0)
    init(e, 2)
    virtio.enc_desc(e, t.OP_DESC, 1, 0, low - 8, 16, 1, 1, low, high)
    virtio.enc_avail(e, t.OP_AVAIL, 1, head=0)
    virtio.enc_kick(e, t.OP_KICK, 1, legacy=True)
    virtio.enc_avail(e, t.OP_AVAIL, 0, idx=300)      # avail index a queue ahead
    virtio.enc_kick(e, t.OP_KICK, 0, legacy=True)
    seeds["desc-at-ram-end-bad-avail"] = e
    return seeds


# -- AHCI ------------------------------------------------------------------------------------

def ahci_seeds(t):
    from hvframe_ahci import ata, atapi
    low, high = t.LOW, t.HIGH

    def start(e, port, ie=None):
        e.u8(t.OP_START).u8(port).u8(2 if ie is not None else 0)
        if ie is not None:
            e.u32(ie)

    def prepare(e, port, slot, cmd, lba=0, count=1, prds=(), features=None, scsi=0,
                cdb=b"", ncq_tag=True, table=None, cfl=None):
        bits = 1 | (4 if features is not None else 0) | (0 if ncq_tag else 8)
        e.u8(t.OP_PREPARE).u8(port).u8(slot).u8(bits).pick(t.ATA_OPS, cmd)
        e.u8(1).pick(t.LBAS, lba) if lba in t.LBAS else e.u8(0).u64(lba)
        e.pick(t.COUNTS, count)
        if features is not None:
            e.u16(features)
        if cmd == atapi.ATA_PACKET:
            e.u8(1)                              # DMA
        e.u8(0)                                  # device
        e.pick(t.SCSI_OPS, scsi).bytes(cdb, 11)
        e.u8(len(prds))
        for a, n, ioc in prds:
            enc_addr(e, a, low, high)
            enc_length(e, n - 1)
            e.bool(ioc)
        more = (1 if table is not None else 0) | (2 if cfl is not None else 0)
        e.u8(more)
        if table is not None:
            enc_addr(e, table, low, high)
        if cfl is not None:
            e.u8(cfl)

    def issue(e, port, mask, sact=False):
        e.u8(t.OP_ISSUE).u8(port).u8(3 if sact else 0).u32(mask)

    def ncq(e, cmds, first=0):
        e.u8(t.OP_NCQ_BATCH).u8(len(cmds) - 1).u8(first)
        for write, nsect, lba, high_buf, split, fua in cmds:
            e.bool(write).u8(nsect).u8(lba).u8(8 if high_buf else 0).u8(split - 1).u8(fua)

    seeds = {}
    e = Encoder().u8(2)
    start(e, 0, 0xFFFFFFFF)
    prepare(e, 0, 0, ata.READ_DMA_EXT, 1, 2, [(t.BUF, 1024, True)])
    issue(e, 0, 1)
    prepare(e, 0, 1, ata.IDENTIFY_DEVICE, prds=[(t.BUF + 0x1000, 512, False)])
    issue(e, 0, 2)
    prepare(e, 0, 2, ata.WRITE_DMA_EXT, 7, 2, [(t.BUF, 512, False), (FOUR_GIB, 512, True)])
    issue(e, 0, 4)
    prepare(e, 0, 3, ata.FLUSH_CACHE_EXT)
    issue(e, 0, 8)
    seeds["dma-identify-write-flush"] = e

    e = Encoder().u8(2)
    start(e, 0, 0xFFFFFFFF)
    ncq(e, [(i % 2 == 0, 1 + i % 8, 8 * i, i % 3 == 0, 1 + i % 4, i % 2) for i in range(8)])
    ncq(e, [(False, 8, (4 * i) % 120, False, 2, 0) for i in range(32)])
    seeds["ncq-native-batches"] = e

    e = Encoder().u8(0)
    start(e, 1)
    prepare(e, 1, 0, atapi.ATA_PACKET, features=1, scsi=atapi.INQUIRY,
            cdb=bytes([0, 0, 0, 96, 0]), prds=[(t.BUF, 96, True)])
    issue(e, 1, 1)
    prepare(e, 1, 1, atapi.ATA_PACKET, features=1, scsi=atapi.READ_10,
            cdb=bytes([0, 0, 0, 0, 1, 0, 0, 2, 0]), prds=[(t.BUF, 4096, True)])
    issue(e, 1, 2)
    prepare(e, 1, 2, atapi.ATA_PACKET, features=1, scsi=atapi.READ_CAPACITY,
            prds=[(t.BUF, 8, True)])
    issue(e, 1, 4)
    seeds["atapi-inquiry-read"] = e

    e = Encoder().u8(0)
    start(e, 0)
    prepare(e, 0, 5, ata.READ_DMA_EXT, 0, 1, [(t.BUF, 512, False)], table=0xFFFFF000)
    issue(e, 0, 1 << 5)                          # host bus fatal error
    e.u8(t.OP_RECOVER).u8(0)
    prepare(e, 0, 5, ata.READ_DMA_EXT, 0, 1, [(low - 256, 512, False)])
    issue(e, 0, 1 << 5)                          # PRD crossing the end of RAM
    e.u8(t.OP_RECOVER).u8(0)
    prepare(e, 0, 6, ata.READ_DMA_EXT, 0, 1, [(t.BUF, 512, False)], cfl=2)
    issue(e, 0, 1 << 6)
    seeds["errors-and-recovery"] = e

    e = Encoder().u8(1)                          # read-only disk
    start(e, 0, 0xFFFFFFFF)
    ncq(e, [(True, 2, 4 * i, False, 1, 0) for i in range(4)])
    e.u8(t.OP_RECOVER).u8(0)
    prepare(e, 0, 0, ata.WRITE_FPDMA_QUEUED, 3, 1, [(t.BUF, 512, False)])
    issue(e, 0, 1, sact=True)
    seeds["ro-ncq-writes"] = e

    e = Encoder().u8(0)
    start(e, 0)
    e.u8(t.OP_REG).u8(0).u8(0).u8(0x18).pick((1, 2, 4, 8), 4).bool(True).u64(0)   # PxCMD off
    e.u8(t.OP_REG).u8(1).u16(0x04).pick((1, 2, 4, 8), 4).bool(True).u64(1)        # GHC.HR
    start(e, 0)
    prepare(e, 0, 0, ata.READ_DMA, HD_SECTORS_MINUS_1, 1, [(t.BUF, 512, False)])
    issue(e, 0, 1)
    seeds["reset-and-lba28"] = e
    return seeds


HD_SECTORS_MINUS_1 = 127


# -- PCI -------------------------------------------------------------------------------------

def pci_config_seeds(t):

    def fn(e, address):
        e.u8(1).pick(t.ADDRESSES, address)

    def cfg(e, address, reg, size, value=None, ecam=False):
        e.u8(t.OP_CFG)
        fn(e, address)
        e.bool(ecam)
        e.u16(reg) if ecam else e.u8(reg)
        e.pick(t.SIZES + (8,) if ecam else t.SIZES, size).bool(value is not None)
        if value is not None:
            e.u64(value)

    def bar(e, address, index, how, target=None, upper=None, ecam=False):
        e.u8(t.OP_BAR)
        fn(e, address)
        e.u8(index).bool(ecam).u8(how)
        if how & 2:
            e.pick(t.BAR_TARGETS, target) if how & 4 else e.u32(target)
        if how & 16 and how & 32:
            e.u32(upper)

    def msix_entry(e, vector, dword, value):
        e.u8(t.OP_MSIX).u8(0).u8(vector).u8(dword).pick((4, 4, 8, 1, 2), 4).u64(value)

    def raise_(e, vector, reg=None):
        e.u8(t.OP_RAISE).pick((0x8, 0x8, 0xC, 0x10), t.REG_RAISE if reg is None else reg)
        e.u8(1).u8(vector)

    seeds = {}
    e = Encoder().u8(0)
    bar(e, t.TESTDEV, 0, 1)                       # size BAR0 (unmapped meanwhile)
    bar(e, t.TESTDEV, 0, 2, 0xC0000000)           # and put it back
    bar(e, t.TESTDEV, 6, 1 | 2, 0xD0000000)       # size the ROM, move it (not enabled)
    bar(e, t.TESTDEV, 6, 2 | 4 | 8, 0xD0000000)   # enable it
    bar(e, t.TESTDEV, 1, 2, 0xC8000000)           # move the MSI-X BAR
    e.u8(t.OP_MSIX_CTL).u8(1).pick((0, 0x8000, 0xC000, 0x4000), 0x8000).bool(False)
    msix_entry(e, 1, 0, 0xFEE00000)
    msix_entry(e, 1, 2, 0x41)
    msix_entry(e, 1, 3, 0)                        # unmask
    raise_(e, 1)
    raise_(e, 2)                                  # masked: pending
    msix_entry(e, 2, 3, 0)                        # unmask: delivered
    seeds["bars-rom-msix"] = e

    e = Encoder().u8(0)
    msi = 0x40                                    # MSI is the first capability
    cfg(e, t.TESTDEV, msi + 4, 4, 0xFEE00000)
    cfg(e, t.TESTDEV, msi + 12, 2, 0x4041)
    cfg(e, t.TESTDEV, msi + 16, 4, 1)             # mask
    cfg(e, t.TESTDEV, msi + 2, 2, 1)              # enable
    raise_(e, 0)                                  # pending
    cfg(e, t.TESTDEV, msi + 16, 4, 0)             # unmask: delivered
    raise_(e, 0)
    raise_(e, 0, t.REG_RAISE_LATER)
    seeds["msi-mask-pending"] = e

    e = Encoder().u8(0)
    for address in t.ADDRESSES:
        cfg(e, address, 0, 4)
        cfg(e, address, 0x0E, 1, ecam=True)
        cfg(e, address, 0x34, 1)
    e.u8(t.OP_CF8).pick((4, 4, 4, 1, 2), 4).u32(0x80000000 | 4 << 11 | 1 << 8 | 0x10)
    e.u8(t.OP_CFC).u8(2).pick(t.SIZES, 2).bool(False)
    e.u8(t.OP_CF8).pick((4, 4, 4, 1, 2), 1).u8(1).u32(0xFF)
    cfg(e, t.BUS1, 0x100, 4, ecam=True)           # extended space of a conventional fn
    seeds["discovery"] = e

    e = Encoder().u8(0)
    cfg(e, t.LPC, 0x60, 4, 0x0B0A0905)            # PIRQ routes
    raise_(e, 0)                                  # INTx
    e.u8(t.OP_CMD)
    fn(e, t.TESTDEV)
    e.u8(1).pick(t.COMMANDS, 0x407).bool(False)   # INTx disable
    raise_(e, 0, t.REG_ACK)
    e.u8(t.OP_CMD)
    fn(e, t.TESTDEV)
    e.u8(1).pick(t.COMMANDS, 0).bool(True)        # decoding off through ECAM
    bar(e, t.UART0, 0, 1 | 2 | 4, 0xCF8)          # an I/O BAR over 0xcf8
    bar(e, t.UART1, 0, 2 | 4, 0xFFFC)             # past 64 KiB
    bar(e, t.UART0, 0, 2 | 4, 0x3F8)
    e.u8(t.OP_PIO).u8(0).u16(0x3FD).pick(t.SIZES, 1).bool(False)
    seeds["intx-routes-io-bars"] = e

    e = Encoder().u8(1)                           # irqfd eventfds: gates
    e.u8(t.OP_MSIX_CTL).u8(1).pick((0, 0x8000, 0xC000, 0x4000), 0xC000).bool(False)
    msix_entry(e, 0, 0, 0xFEE00000)
    msix_entry(e, 0, 3, 0)
    e.u8(t.OP_MSIX_CTL).u8(1).pick((0, 0x8000, 0xC000, 0x4000), 0x8000).bool(True)
    raise_(e, 0)
    msix_entry(e, 0, 3, 1)
    raise_(e, 0)
    bar(e, t.TESTDEV, 1, 2, t.LOW - 0x1000)       # onto RAM
    bar(e, t.TESTDEV, 0, 2 | 16 | 32, 0xC0001000, upper=1)
    seeds["gates-and-ram-overlap"] = e
    return seeds


# -- fw_cfg ----------------------------------------------------------------------------------

def fw_cfg_seeds(t):
    from hvframe.lpc import fw_cfg as fc
    low, high = t.LOW, t.HIGH

    def select(e, key, size=2):
        e.u8(t.OP_SELECT).pick((2, 2, 1, 4), size).u8(1).pick(t.KEYS, key)

    def dma(e, place, control, key, length, buf=None, desc=None):
        how = place | 4 | 8 | 16 | (32 if buf is None else 0)
        e.u8(t.OP_DMA).u8(how)
        if place == 3:
            enc_addr(e, desc, low, high)
        e.pick(t.CONTROLS, control).pick(t.KEYS, key).pick(t.LENGTHS, length)
        if buf is not None:
            enc_addr(e, buf, low, high)

    seeds = {}
    e = Encoder()
    select(e, fc.KEY_SIGNATURE)
    e.u8(t.OP_READ).u8(4)
    select(e, fc.KEY_FILE_DIR)
    e.u8(t.OP_READ).u8(79)
    select(e, fc.KEY_ID, 1)
    e.u8(t.OP_READ).u8(8)
    seeds["ports"] = e

    e = Encoder()
    dma(e, 0, fc.DMA_SELECT | fc.DMA_READ, fc.KEY_FILE_DIR, 64)
    dma(e, 0, fc.DMA_SKIP, 0, 4)
    dma(e, 0, fc.DMA_READ, 0, 4096)
    dma(e, 0, fc.DMA_SELECT | fc.DMA_WRITE, fc.KEY_FILE_FIRST + 2, 16)
    dma(e, 0, fc.DMA_SELECT | fc.DMA_READ, fc.KEY_FILE_FIRST + 2, 64)
    dma(e, 0, fc.DMA_SELECT | fc.DMA_WRITE, fc.KEY_SIGNATURE, 4)     # read-only: error
    seeds["dma-read-write"] = e

    e = Encoder()
    dma(e, 1, fc.DMA_SELECT | fc.DMA_READ, fc.KEY_FILE_FIRST + 3, 5000, buf=low - 100)
    dma(e, 2, fc.DMA_SELECT | fc.DMA_READ, fc.KEY_SIGNATURE, 4, buf=FOUR_GIB + high - 4)
    dma(e, 3, fc.DMA_READ, 0, 16, desc=low - 8)                       # descriptor past RAM
    dma(e, 0, fc.DMA_SELECT | fc.DMA_READ, fc.KEY_FILE_FIRST + 3, 4096, buf=t.DESC - 64)
    seeds["dma-edges"] = e

    e = Encoder()
    for off, size, value in ((0, 4, 0), (4, 4, int.from_bytes((t.DESC).to_bytes(4, "big"),
                                                               "little")),
                             (0, 8, 0), (6, 4, 0xFFFFFFFF), (7, 1, 0x80)):
        e.u8(t.OP_DMA_RAW).u8(off).pick((4, 1, 2, 8), size).u64(value)
    e.u8(t.OP_PORT).u8(4).pick((1, 2, 4, 8), 8).bool(False)         # "QEMU CFG"
    e.u8(t.OP_PORT).u8(0).pick((1, 2, 4, 8), 4).bool(True).u64(0x19)
    seeds["dma-raw-registers"] = e
    return seeds


# -- UART ------------------------------------------------------------------------------------

def uart_seeds(t):
    from hvframe_uart import uart16550 as u

    def write(e, offset, value, size=1):
        e.u8(t.OP_WRITE).u8(offset).pick((1, 1, 1, 2, 4), size).u8(0).u32(value)

    def read(e, offset, size=1):
        e.u8(t.OP_READ).u8(offset).pick((1, 1, 1, 2, 4), size)

    seeds = {}
    e = Encoder().u8(0)
    e.u8(t.OP_INIT).u8(0xC1 | (0x0F << 2)).u8(1)   # FIFO trigger 14, all interrupts
    for c in b"Hello":
        write(e, u.THR, c)
    read(e, u.IIR)
    e.u8(t.OP_INPUT).u8(3).bytes(b"abc")
    e.u8(t.OP_DRAIN).u8(10)
    seeds["hello"] = e

    e = Encoder().u8(0)
    e.u8(t.OP_INIT).u8(0x01 | 0x02 | (0x0F << 2)).u8(12)   # loopback
    for c in range(20):
        write(e, u.THR, c)                         # overruns the FIFO
    read(e, u.LSR)
    read(e, u.MSR)
    write(e, u.MCR, 0x0B)                          # leave loopback
    e.u8(t.OP_DRAIN).u8(30)
    seeds["loopback-overrun"] = e

    e = Encoder().u8(64 | 7)                       # backlog limit 8
    e.u8(t.OP_INIT).u8(0x41 | (1 << 2)).u8(1)
    e.u8(t.OP_INPUT).u8(40).bytes(bytes(range(40)))
    write(e, u.FCR, u.FCR_ENABLE | u.FCR_RX_RESET)
    e.u8(t.OP_INPUT).u8(8).bytes(b"XYZXYZXY")
    e.u8(t.OP_DRAIN).u8(39)
    seeds["small-backlog-fifo-reset"] = e

    e = Encoder().u8(0)
    e.u8(t.OP_INIT).u8(0x02 | (0x05 << 2)).u8(3)   # 16450 mode, loopback
    e.u8(t.OP_INPUT).u8(4).bytes(b"host")
    write(e, u.THR, 0x55)
    write(e, u.THR, 0x66)                          # overwrites RBR
    write(e, u.MCR, 0x08)
    write(e, u.LCR, 0x83)
    write(e, u.DLL, 1)
    read(e, u.DLL)
    write(e, u.LCR, 0x03, 2)
    e.u8(t.OP_DRAIN).u8(10)
    seeds["16450-loopback-dlab"] = e
    return seeds


SEEDS = {"virtqueue": virtqueue_seeds, "virtio_blk": virtio_blk_seeds,
         "virtio_net": virtio_net_seeds, "ahci": ahci_seeds,
         "pci_config": pci_config_seeds, "fw_cfg": fw_cfg_seeds, "uart": uart_seeds}


def main(names) -> int:
    bad = 0
    for name in names or SEEDS:
        t = target(name)
        seeds = SEEDS[name](t)
        out = os.path.join(FUZZ_DIR, "corpus", name)
        os.makedirs(out, exist_ok=True)
        for old in os.listdir(out):
            if old.startswith("seed-"):
                os.unlink(os.path.join(out, old))
        for i, (label, enc) in enumerate(seeds.items()):
            data = enc.getvalue()
            with open(os.path.join(out, f"seed-{i:02d}-{label}"), "wb") as f:
                f.write(data)
            try:
                t.one_input(data)
                status = "ok"
            except Exception as e:   # a seed must run clean: report, keep going
                status = f"FAILS: {type(e).__name__}: {e}"
                bad += 1
            print(f"{name}/seed-{i:02d}-{label}: {len(data)} bytes, {status}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
