"""cffi build of AHCI's native module, `hvframe_ahci._native` -- the NCQ data path (ncq.c) and
the ABAR registers served without the GIL (abar.c) -- against hvframe's native API
(hvframe.native_build); run by setup.py's cffi_modules at install."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# This package, and hvframe: the build environment's, else the checkout this plugin lives in.
sys.path[:0] = [HERE]
sys.path.append(os.path.dirname(os.path.dirname(HERE)))
from hvframe.native_build import plugin_ffi  # noqa: E402
from hvframe_ahci import regs  # noqa: E402

# The ABAR's register offsets and bits abar.c serves, from the construct declarations.
_ABAR = {"AHCI_MAX_PORTS": regs.MAX_PORTS, "AHCI_ABAR_SIZE": regs.ABAR_SIZE,
         "AHCI_PORT_BASE": regs.PORT_BASE, "AHCI_PORT_STRIDE": regs.PORT_STRIDE,
         "AHCI_IS_PCS": regs.IS_PCS, "AHCI_IS_PRCS": regs.IS_PRCS,
         "AHCI_SERR_DIAG_X": regs.SERR_DIAG_X, "AHCI_SERR_DIAG_N": regs.SERR_DIAG_N,
         "AHCI_GHC_IE": regs.GHC_IE, "AHCI_CMD_ST": regs.CMD_ST,
         # what a completion served in the exit writes (abar.c's serve_inline)
         "AHCI_CMD_FRE": regs.CMD_FRE, "AHCI_CMD_CCS_SHIFT": regs.CMD_CCS_SHIFT,
         "AHCI_ST_OK": regs.ST_OK, "AHCI_IS_SDBS": regs.IS_SDBS, "AHCI_IS_DPS": regs.IS_DPS,
         "AHCI_FIS_SDB": regs.FIS_SDB, "AHCI_FIS_I": regs.FIS_I,
         "AHCI_RX_SDBFIS": regs.RX["sdbfis"]}
_ABAR.update({f"AHCI_GHC_{n.upper()}": regs.GHC_OFFSETS[n] for n in ("cap", "ghc", "is", "pi", "vs")})
_ABAR.update({f"AHCI_PX_{n.upper()}": off for n, off in regs.PORT_OFFSETS.items()})

ffibuilder = plugin_ffi(
    "hvframe_ahci._native", os.path.join(HERE, "hvframe_ahci"), ["ncq.c", "abar.c"],
    cdef="""
        #define AHCI_SLOTS 32
        int ahci_bind(const struct hv_api *api);
        struct ahci_slot { uint64_t offset; uint64_t length; int niov; int write, fua; int err;
                           ...; };
        struct ahci_port {
            struct hv_ram ram;
            uint64_t clb; uint64_t sectors; uint32_t sector_size;
            int fd; int readonly; int write_through;
            uint32_t ioc; uint64_t bytes;
            struct ahci_slot slot[32];
            ...;
        };
        uint32_t ahci_prepare(struct ahci_port *p, uint32_t slots);
        uint32_t ahci_execute(struct ahci_port *p, uint32_t slots);
        uint32_t ahci_execute_cached(struct ahci_port *p, uint32_t slots);

        /* abar.c */
        enum { AHCI_F_IS, AHCI_F_IE, AHCI_F_CMD, AHCI_F_TFD, AHCI_F_SSTS, AHCI_F_SERR,
               AHCI_F_SACT, AHCI_F_CI, AHCI_F_PORT_FIELDS };
        enum { AHCI_H_GHC, AHCI_H_IS };
        enum { AHCI_IRQ_LEVEL = 1, AHCI_IRQ_FIRE = 2, AHCI_IRQ_OWED = 4 };
        #define AHCI_WAIT_IRQ ...
        struct ahci_port_regs { uint32_t f[8]; uint32_t issued; int efd; uint64_t inline_slots;
                                uint32_t inline_cold; uint32_t irq_owed; ...; };
        struct ahci_hba_regs {
            uint32_t native; uint32_t nports; uint32_t cap, pi, vs; uint32_t ghc, is;
            uint32_t level; uint32_t intx; uint64_t served, passed;
            struct ahci_port_regs port[32];
            ...;
        };
        uint64_t ahci_abar_access(void *opaque, uint64_t offset, uint32_t size,
                                  uint64_t value, int is_write);
        int ahci_hba_init(struct ahci_hba_regs *h, uint32_t nports, uint32_t cap, uint32_t pi,
                          uint32_t vs);
        void ahci_set_handler(struct ahci_hba_regs *h, int py_handle);
        void ahci_set_native(struct ahci_hba_regs *h, int on);
        void ahci_set_msi_gate(struct ahci_hba_regs *h, struct hv_irq_gate *g);
        uint32_t ahci_port_update(struct ahci_hba_regs *h, uint32_t port, uint32_t field,
                                  uint32_t clear, uint32_t set);
        uint32_t ahci_hba_update(struct ahci_hba_regs *h, uint32_t field, uint32_t clear,
                                 uint32_t set);
        void ahci_port_accepted(struct ahci_hba_regs *h, uint32_t port, uint32_t slots,
                                uint32_t status, uint32_t cmd);
        uint32_t ahci_port_done(struct ahci_hba_regs *h, uint32_t port, uint32_t tfd,
                                uint32_t cmd, uint32_t field, uint32_t clear, uint32_t events,
                                int msi_enabled);
        uint32_t ahci_port_issue(struct ahci_hba_regs *h, uint32_t port, uint32_t bits);
        uint32_t ahci_port_take(struct ahci_hba_regs *h, uint32_t port);
        void ahci_port_stop(struct ahci_hba_regs *h, uint32_t port);
        uint32_t ahci_irq_update(struct ahci_hba_regs *h, int msi_enabled);
        void ahci_irq_store(struct ahci_hba_regs *h, uint32_t hba_is, uint32_t level,
                            uint32_t intx);
        int ahci_port_worker_open(struct ahci_hba_regs *h, uint32_t port);
        int64_t ahci_port_wait(struct ahci_hba_regs *h, uint32_t port, uint64_t spin_ns,
                               int timeout_ms);
        void ahci_port_kick(struct ahci_hba_regs *h, uint32_t port);
        void ahci_port_worker_close(struct ahci_hba_regs *h, uint32_t port);
        void ahci_port_inline(struct ahci_hba_regs *h, uint32_t port, struct ahci_port *nat,
                              uint64_t fb, uint64_t max_bytes);
        uint32_t ahci_port_take_irq(struct ahci_hba_regs *h, uint32_t port);
    """,
    structs={"ahci_cmd_header": regs.COMMAND_HEADER, "ahci_prd": regs.PRD_ENTRY,
             "ahci_h2d": regs.H2D_FIS, "ahci_sdb_fis": regs.SDB_FIS},
    constants={"AHCI_CMD_HEADER_SIZE": regs.CMD_HEADER_SIZE,
               "AHCI_CMD_TABLE_PRDT": regs.CMD_TABLE_PRDT, "AHCI_FIS_H2D": regs.FIS_H2D,
               "AHCI_H2D_COMMAND": regs.H2D_COMMAND, "AHCI_CFL_MASK": regs.HDR_CFL_MASK,
               "AHCI_PRD_DBC_MASK": regs.PRD_DBC_MASK, "AHCI_PRD_IOC": regs.PRD_IOC,
               "AHCI_READ_FPDMA": regs.READ_FPDMA_QUEUED,
               "AHCI_WRITE_FPDMA": regs.WRITE_FPDMA_QUEUED, "AHCI_FUA": regs.FUA_BIT,
               **_ABAR})
