/* AHCI 1.3.1 for the AHCI test guests (ahci.c, and through it ahci_failover.c; ahci_restart.c):
 * HBA and port registers, the command list and table layouts, register access and the steps
 * of a port's bring-up they all take.
 *
 * A guest defines POLL_LOOPS (the budget of every wait) and may define AHCI_PRDS (PRD entries
 * of each command table, default 8) before including this. */
#ifndef AHCI_H
#define AHCI_H

#include "rt.h"

#ifndef POLL_LOOPS
#error "define POLL_LOOPS before including ahci.h"
#endif
#ifndef AHCI_PRDS
#define AHCI_PRDS 8
#endif

/* HBA registers */
#define CAP     0x00
#define GHC     0x04
#define IS      0x08
#define PI      0x0c
#define VS      0x10
#define GHC_HR  (1u << 0)
#define GHC_IE  (1u << 1)
#define GHC_AE  (1u << 31)
#define CAP_SCLO (1u << 24)
#define CAP_SSS (1u << 27)
#define CAP_SNCQ (1u << 30)

/* port registers, at 0x100 + 0x80 * port */
#define PxCLB   0x00
#define PxCLBU  0x04
#define PxFB    0x08
#define PxFBU   0x0c
#define PxIS    0x10
#define PxIE    0x14
#define PxCMD   0x18
#define PxTFD   0x20
#define PxSIG   0x24
#define PxSSTS  0x28
#define PxSCTL  0x2c
#define PxSERR  0x30
#define PxSACT  0x34
#define PxCI    0x38
#define CMD_ST  (1u << 0)
#define CMD_SUD (1u << 1)
#define CMD_POD (1u << 2)
#define CMD_CLO (1u << 3)
#define CMD_FRE (1u << 4)
#define CMD_FR  (1u << 14)
#define CMD_CR  (1u << 15)
#define CMD_CPD (1u << 20)
#define IS_TFES (1u << 30)
#define IS_ERRORS 0xfd800000u   /* TFES HBFS HBDS IFS INFS OFS IPMS (and CPDS) */
#define TFD_ERR 0x01
#define TFD_DRQ 0x08
#define TFD_BSY 0x80

/* ---- command structures ---- */
struct cmd_header {
    u16 flags;                  /* CFL 4:0, A 5, W 6, P 7, R 8, B 9, C 10, PMP 15:12 */
    u16 prdtl;
    volatile u32 prdbc;
    u32 ctba, ctbau;
    u32 reserved[4];
};
struct prd { u32 dba, dbau, reserved, dbc; };     /* dbc: byte count - 1, bit 31 I */
struct cmd_table {                                /* CTBA is 128-byte aligned: so is every table */
    u8 cfis[64];
    u8 acmd[16];
    u8 reserved[48];
    struct prd prdt[AHCI_PRDS];
} __attribute__((aligned(128)));
_Static_assert(sizeof(struct cmd_header) == 32, "command header");

/* ---- register access ---- */
static u32 abar, port_base;     /* ABAR (BAR5); the port in use */

static inline u32 hba_read(u32 r) { return mmio_read32(abar + r); }
static inline void hba_write(u32 r, u32 v) { mmio_write32(abar + r, v); }
static inline u32 port_read(u32 r) { return mmio_read32(port_base + r); }
static inline void port_write(u32 r, u32 v) { mmio_write32(port_base + r, v); }
static inline void port_select(int p) { port_base = abar + 0x100 + 0x80 * p; }

static inline int wait_clear(u32 reg, u32 mask)
{
    for (u32 i = 0; i < POLL_LOOPS; i++) {
        if (!(port_read(reg) & mask))
            return 1;
        cpu_relax();
    }
    return 0;
}

/* The first implemented port with a device (PxSSTS.DET = 3), or port 0; selected. */
static inline int port_select_first_linked(void)
{
    u32 pi = hba_read(PI);
    int port = -1;
    for (int p = 0; p < 32 && port < 0; p++) {
        if (!(pi & (1u << p)))
            continue;
        port_select(p);
        if ((port_read(PxSSTS) & 0xf) == 3)
            port = p;
    }
    if (port < 0)
        port = 0;
    port_select(port);
    return port;
}

/* Where the stopped port's command list and received FISes live (10.1.2 step 5). */
static inline void port_set_lists(const struct cmd_header *cmdlist, const u8 *rfis)
{
    port_write(PxCLB, (u32)cmdlist);
    port_write(PxCLBU, 0);
    port_write(PxFB, (u32)rfis);
    port_write(PxFBU, 0);
}

/* PxSERR and PxIS cleared (both are write-1-to-clear). */
static inline void port_clear_status(void)
{
    port_write(PxSERR, 0xffffffffu);
    port_write(PxIS, 0xffffffffu);
}

#endif
