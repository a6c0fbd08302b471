/* hvframe guest runtime: the little a freestanding 32-bit PVH guest needs.
 *
 * A guest defines `int main(const struct hvm_start_info *si)`. The runtime's entry sets up a
 * GDT and a stack, initialises COM1, calls main and powers off when main returns. */
#ifndef HVFRAME_RT_H
#define HVFRAME_RT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* Xen public ABI, arch-x86/hvm/start_info.h. All offsets are naturally aligned, so the i386
 * layout (u64 only 4-aligned) matches the 64-bit one without packing. */
#define HVM_START_MAGIC 0x336ec578u

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;       /* version >= 1 */
    u32 memmap_entries;     /* version >= 1 */
    u32 reserved;
};

struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type;               /* E820 types: 1 RAM, 2 reserved, 3 ACPI, 4 NVS, 5 unusable */
    u32 reserved;
};

#define E820_RAM 1

_Static_assert(sizeof(struct hvm_start_info) == 56, "hvm_start_info layout");
_Static_assert(sizeof(struct hvm_memmap_entry) == 24, "hvm_memmap_entry layout");

/* ---- port and memory I/O ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u32 mmio_read32(u32 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u32 addr, u32 v) { *(volatile u32 *)addr = v; }

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* ---- COM1 16550 ---- */
#define COM1 0x3f8
void serial_init(u16 base);
void serial_putc(char c);           /* raw byte, waits for THRE */
int serial_getc(void);              /* blocks until a byte arrives */
int serial_trygetc(void);           /* -1 if nothing pending */
/* Console output goes to COM1; '\n' is sent as "\r\n" so terminals show lines.
 * printf knows %s %c %d %i %u %x %X %p %% with l/ll, '0' '-' '#' flags and a width. */
void console_putc(char c);
void print(const char *s);          /* no newline added */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
int snprintf(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---- memory and strings ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
u32 sum_words(const void *p, size_t n);  /* 32-bit sum of the little-endian words: a checksum */
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

/* ---- machine control ---- */
void poweroff(void) __attribute__((noreturn));  /* ACPI PM1a: 0x3400 to port 0x404 */
void reset(void) __attribute__((noreturn));     /* 0x06 to 0xcf9, then 0xfe to 0x64 */
void halt_forever(void) __attribute__((noreturn));

/* ---- start_info ---- */
extern const struct hvm_start_info *start_info;    /* NULL if %ebx had no valid magic */
extern u32 rt_entry_esi;                            /* %esi at entry: boot_params (Linux boot protocol) */
const char *si_cmdline(void);                       /* "" if none */
u32 si_memmap_count(void);
const struct hvm_memmap_entry *si_memmap(u32 i);    /* NULL past the end */
u64 si_ram_total(void);                             /* sum of type-1 entries */
const char *e820_type_name(u32 type);

/* Command line "key=value" / "flag" words (space separated). cmdline_value copies the value
 * of `key` into buf and returns 1, or returns 0 if the key is absent. */
int cmdline_value(const char *key, char *buf, size_t n);
int cmdline_flag(const char *word);                 /* bare word or key= present */
u32 cmdline_u32(const char *key, u32 dflt);         /* decimal or 0x hex */
u32 parse_u32(const char *s, const char **end);

/* ---- interrupts (rt_irq.c) ----
 * irq_init() installs an IDT in which every vector has a handler: 0-31 print
 * "<prefix>exception N" and power off; 32-255 count into irq_count[], run the vector's hook
 * if one is set, and EOI the LAPIC (except the spurious vector 0xff). It also masks the 8259s
 * (firmware may have left them on vectors 8-15) and software-enables the LAPIC. Handlers
 * return with popf + ret, not iret: KVM's instruction emulator on a nested host cannot
 * emulate a protected-mode iret. */
#define LAPIC_BASE      0xFEE00000u
#define LAPIC_ID        0x020           /* register offsets, for lapic_read/lapic_write */
#define LAPIC_EOI       0x0b0
#define LAPIC_SVR       0x0f0
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define IOAPIC_BASE     0xFEC00000u
#define VEC_SPURIOUS    0xff

extern volatile u32 irq_count[256];
void irq_init(const char *exception_prefix);
void irq_set_hook(u32 vector, void (*hook)(u32 vector));   /* runs before the EOI */
int irq_wait(u32 vector, u32 count, u32 loops);             /* 1 once irq_count[vector] >= count */
static inline u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static inline void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
static inline void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }
static inline void irq_enable(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void irq_disable(void) { __asm__ volatile("cli" ::: "memory"); }
/* IOAPIC pin `gsi` -> `vector` on APIC 0; `lo_flags` e.g. IOAPIC_LEVEL. */
#define IOAPIC_LEVEL    (1u << 15)
void ioapic_route(u32 gsi, u32 vector, u32 lo_flags);

/* ---- PCI on bus 0, configuration mechanism #1 (rt_pci.c) ----
 * A function is a handle PCI_DEV(slot, fn); lookups return -1 when nothing matches. */
#define PCI_DEV(slot, fn)   ((u32)(slot) << 3 | (u32)(fn))
#define PCI_SLOT(d)         ((u32)(d) >> 3)
#define PCI_FN(d)           ((u32)(d) & 7)
u32 pci_read32(u32 dev, u32 reg);
u16 pci_read16(u32 dev, u32 reg);
u8 pci_read8(u32 dev, u32 reg);
void pci_write32(u32 dev, u32 reg, u32 v);
void pci_write16(u32 dev, u32 reg, u16 v);
int pci_next(int after);                        /* next present function after `after` (-1: first) */
int pci_find_device(u16 vendor, u16 device);
int pci_find_class(u32 class_code);             /* class:subclass:prog-if, e.g. 0x010601 */
u32 pci_find_cap(u32 dev, u8 id);               /* config offset, 0 if absent */
u32 pci_bar_mem(u32 dev, u32 bar);              /* memory BAR's low 32 address bits */
u32 pci_msix_table(u32 dev, u32 cap);           /* address of the MSI-X table */
u32 pci_msix_pba(u32 dev, u32 cap);             /* address of the MSI-X pending bits */
void msix_route(u32 table, u32 entry, u32 vector);  /* entry -> APIC 0, unmasked */
void pci_msi_enable(u32 dev, u32 cap, u32 vector);  /* one vector -> APIC 0, enabled */

int main(const struct hvm_start_info *si);

#endif
