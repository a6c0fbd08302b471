"""cffi build of AHCI's native NCQ path, `hvframe_ahci._native`, against hvframe's native API
(hvframe.native_build); run by setup.py's cffi_modules at install."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# This package, and hvframe: the build environment's, else the checkout this plugin lives in.
sys.path[:0] = [HERE]
sys.path.append(os.path.dirname(os.path.dirname(HERE)))
from hvframe.native_build import plugin_ffi  # noqa: E402
from hvframe_ahci import regs  # noqa: E402

ffibuilder = plugin_ffi(
    "hvframe_ahci._native", os.path.join(HERE, "hvframe_ahci"), ["ncq.c"],
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
    """,
    structs={"ahci_cmd_header": regs.COMMAND_HEADER, "ahci_prd": regs.PRD_ENTRY,
             "ahci_h2d": regs.H2D_FIS},
    constants={"AHCI_CMD_HEADER_SIZE": regs.CMD_HEADER_SIZE,
               "AHCI_CMD_TABLE_PRDT": regs.CMD_TABLE_PRDT, "AHCI_FIS_H2D": regs.FIS_H2D,
               "AHCI_H2D_COMMAND": regs.H2D_COMMAND, "AHCI_CFL_MASK": regs.HDR_CFL_MASK,
               "AHCI_PRD_DBC_MASK": regs.PRD_DBC_MASK, "AHCI_PRD_IOC": regs.PRD_IOC,
               "AHCI_READ_FPDMA": regs.READ_FPDMA_QUEUED,
               "AHCI_WRITE_FPDMA": regs.WRITE_FPDMA_QUEUED, "AHCI_FUA": regs.FUA_BIT})
