/* The guest `hvframe run` boots when no kernel is given: it describes the machine it finds
 * (memory map, CPUs, command line, which legacy ports answer) and powers off. */
#include "rt.h"

#define ICR_BUSY        (1u << 12)
#define ICR_INIT        0x00004500u     /* delivery mode INIT, level assert */
#define ICR_INIT_DEASSERT 0x00008500u   /* INIT level de-assert (trigger level) */
#define ICR_SIPI        0x00004600u     /* delivery mode Start-up, low byte = vector */

/* AP trampoline: copied to 0x8000 (free: the loader uses 0x0-0x7fff and 0x20000+), run in
 * real mode by each AP after SIPI vector 0x08 (CS=0x0800, IP=0). Every instruction there is
 * emulated on nested KVM, so it only bumps a counter and stops. */
#define TRAMPOLINE      0x8000u
#define SIPI_VECTOR     (TRAMPOLINE >> 12)
#define AP_COUNTER      0x8ff0u         /* same page, written by the APs */

__asm__(
    ".pushsection .rodata.ap_tramp, \"a\"\n"
    ".globl ap_tramp_start, ap_tramp_end\n"
    "ap_tramp_start:\n"
    ".code16\n"
    "    cli\n"
    "    xorw %ax, %ax\n"
    "    movw %ax, %ds\n"
    "    lock incl 0x8ff0\n"            /* AP_COUNTER */
    "1:  cli\n"
    "    hlt\n"
    "    jmp 1b\n"
    ".code32\n"
    "ap_tramp_end:\n"
    ".popsection\n");
extern const u8 ap_tramp_start[], ap_tramp_end[];

static void lapic_wait_idle(void)
{
    for (u32 i = 0; i < 100000 && (lapic_read(LAPIC_ICR_LO) & ICR_BUSY); i++)
        cpu_relax();
}

static void lapic_ipi(u32 apic_id, u32 icr)
{
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, icr);         /* writing the low half sends it */
    lapic_wait_idle();
}

/* A short spin. No timer is assumed to exist; KVM needs no real INIT/SIPI delays. */
static void spin(u32 n)
{
    for (volatile u32 i = 0; i < n; i++)
        cpu_relax();
}

/* Logical processors per package from CPUID leaf 1; the VMM sets it to its vCPU count. */
static u32 cpuid_cpu_count(u32 *bsp_apic_id)
{
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    *bsp_apic_id = b >> 24;
    u32 n = (d & (1u << 28)) ? (b >> 16) & 0xff : 1;   /* EBX[23:16] valid only with HTT */
    return n ? n : 1;
}

static u32 count_cpus(u32 *expected)
{
    u32 bsp_id;
    u32 n = cpuid_cpu_count(&bsp_id);
    *expected = n;
    if (n <= 1)
        return 1;

    volatile u32 *counter = (volatile u32 *)AP_COUNTER;
    memcpy((void *)TRAMPOLINE, ap_tramp_start, ap_tramp_end - ap_tramp_start);
    *counter = 0;

    lapic_write(LAPIC_SVR, 0x1ff);          /* software-enable the LAPIC, spurious vector 0xff */
    bsp_id = lapic_read(LAPIC_ID) >> 24;    /* the LAPIC's view wins over CPUID's */
    for (u32 id = 0, sent = 0; sent < n - 1 && id < 0xff; id++) {
        if (id == bsp_id)
            continue;
        lapic_ipi(id, ICR_INIT);
        lapic_ipi(id, ICR_INIT_DEASSERT);
        spin(100);
        lapic_ipi(id, ICR_SIPI | SIPI_VECTOR);
        spin(100);
        lapic_ipi(id, ICR_SIPI | SIPI_VECTOR);  /* the second SIPI is ignored by a started AP */
        sent++;
    }

    /* Bounded wait, no timer: stop when all answered or after QUIET polls without a new AP
     * (about a second when this loop is emulated, milliseconds on hardware-assisted KVM). */
    enum { QUIET = 200000 };
    u32 seen = 0;
    for (u32 quiet = 0; quiet < QUIET && seen < n - 1; quiet++) {
        u32 now = *counter;
        if (now != seen) {
            seen = now;
            quiet = 0;
        }
        cpu_relax();
    }
    return 1 + *counter;
}

/* ---- port probes: an unclaimed port reads as all ones ---- */
static int probe_uart(u16 base)
{
    u8 save = inb(base + 7);
    outb(base + 7, 0x5a);
    int ok = inb(base + 7) == 0x5a;
    outb(base + 7, 0xa5);
    ok = ok && inb(base + 7) == 0xa5;
    outb(base + 7, save);
    return ok;
}

static int probe_cmos(void)
{
    outb(0x70, 0x0d);                   /* status register D: bit 7 = valid RAM, rest 0 */
    u8 d = inb(0x71);
    return d != 0xff && !(d & 0x7f);
}

static int probe_pci(u32 *id)
{
    u32 save = inl(0xcf8);
    outl(0xcf8, 0x80000000u);           /* mechanism #1 latches the address it was given */
    int ok = inl(0xcf8) == 0x80000000u;
    *id = ok ? inl(0xcfc) : 0xffffffffu; /* 00:00.0 vendor/device */
    outl(0xcf8, save);
    return ok;
}

static int probe_fw_cfg(void)
{
    outw(0x510, 0x0000);                /* FW_CFG_SIGNATURE */
    char sig[4];
    for (int i = 0; i < 4; i++)
        sig[i] = (char)inb(0x511);
    return !memcmp(sig, "QEMU", 4);
}

static int probe_pit(void)
{
    /* Channel 2, lobyte/hibyte, mode 0: with its gate low it holds the count, and running it
     * only counts down; either way a latched read gives <= the loaded count, never 0xffff. */
    outb(0x43, 0xb0);
    outb(0x42, 0x34);
    outb(0x42, 0x12);
    outb(0x43, 0x80);                   /* latch channel 2 */
    u16 v = inb(0x42);
    v |= (u16)inb(0x42) << 8;
    return v <= 0x1234;
}

static int probe_pic(u16 base)
{
    u8 save = inb(base + 1);            /* IMR (OCW1) */
    outb(base + 1, 0xa5);
    int ok = inb(base + 1) == 0xa5;
    outb(base + 1, save);
    return ok;
}

static const char *yn(int v) { return v ? "yes" : "no"; }

int main(const struct hvm_start_info *si)
{
    printf("hvframe demo guest (32-bit PVH, %s)\n", si ? "start_info ok" : "no start_info");
    if (si)
        printf("start_info: %p version %u flags %#x\n", (void *)si, si->version, si->flags);

    u64 ram = si_ram_total();
    u32 n = si_memmap_count();
    printf("memory: %u MiB RAM (%llu KiB) in %u map entries\n",
           (u32)((ram + (1 << 19)) >> 20), (unsigned long long)(ram >> 10), n);
    for (u32 i = 0; i < n; i++) {
        const struct hvm_memmap_entry *e = si_memmap(i);
        printf("  %016llx-%016llx %s\n", (unsigned long long)e->addr,
               (unsigned long long)(e->addr + e->size - 1), e820_type_name(e->type));
    }

    u32 expected;
    u32 online = count_cpus(&expected);
    printf("CPUs: %u online (%u expected)\n", online, expected);

    printf("cmdline: \"%s\"\n", si_cmdline());

    static const struct { u16 port; const char *name; } uarts[] = {
        {0x3f8, "COM1"}, {0x2f8, "COM2"}, {0x3e8, "COM3"}, {0x2e8, "COM4"},
    };
    for (u32 i = 0; i < 4; i++)
        printf("port %#x uart: %s\n", uarts[i].port, yn(probe_uart(uarts[i].port)));
    printf("port 0x70 cmos: %s\n", yn(probe_cmos()));
    u32 pci_id;
    if (probe_pci(&pci_id))
        printf("port 0xcf8 pci: yes (00:00.0 %04x:%04x)\n", pci_id & 0xffff, pci_id >> 16);
    else
        printf("port 0xcf8 pci: no\n");
    printf("port 0x510 fw_cfg: %s\n", yn(probe_fw_cfg()));
    printf("port 0x40 pit: %s\n", yn(probe_pit()));
    printf("port 0x20 pic: %s\n", yn(probe_pic(0x20)));
    printf("port 0xa0 pic: %s\n", yn(probe_pic(0xa0)));

    printf("hvframe demo guest: powering off\n");
    return 0;
}
