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

int main(const struct hvm_start_info *si);

#endif
