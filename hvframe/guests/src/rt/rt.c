/* hvframe guest runtime (see rt.h). Everything here runs at CPL0, which on a nested KVM is
 * executed by KVM's instruction emulator: keep it plain integer code. */
#include "rt.h"

const struct hvm_start_info *start_info;

/* ---- 64-bit division: there is no 32-bit libgcc to link, so provide what gcc calls ---- */
static u64 udivmod64(u64 n, u64 d, u64 *rem)
{
    u64 q = 0, r = 0;
    if (d == 0) {               /* no trap: callers only divide by constants */
        if (rem)
            *rem = 0;
        return ~0ull;
    }
    if ((n >> 32) == 0 && (d >> 32) == 0) {     /* fast path: the hardware divide */
        u32 n32 = (u32)n, d32 = (u32)d;
        if (rem)
            *rem = n32 % d32;
        return n32 / d32;
    }
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1);
        if (r >= d) {
            r -= d;
            q |= 1ull << i;
        }
    }
    if (rem)
        *rem = r;
    return q;
}

u64 __udivdi3(u64 n, u64 d) { return udivmod64(n, d, 0); }
u64 __umoddi3(u64 n, u64 d) { u64 r; udivmod64(n, d, &r); return r; }
int64_t __divdi3(int64_t n, int64_t d)
{
    int neg = (n < 0) ^ (d < 0);
    u64 q = udivmod64(n < 0 ? -(u64)n : (u64)n, d < 0 ? -(u64)d : (u64)d, 0);
    return neg ? -(int64_t)q : (int64_t)q;
}
int64_t __moddi3(int64_t n, int64_t d)
{
    u64 r;
    udivmod64(n < 0 ? -(u64)n : (u64)n, d < 0 ? -(u64)d : (u64)d, &r);
    return n < 0 ? -(int64_t)r : (int64_t)r;
}

/* ---- memory and strings ---- */
void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    while (n--)
        *dp++ = *sp++;
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if (dp < sp || dp >= sp + n)
        return memcpy(d, s, n);
    while (n--)
        dp[n] = sp[n];
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

u32 sum_words(const void *p, size_t n)
{
    u32 s = 0;
    for (size_t i = 0; i + 4 <= n; i += 4)
        s += *(const u32 *)((const u8 *)p + i);
    return s;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (u8)*a - (u8)*b;
        if (!*a)
            break;
    }
    return 0;
}

int strcmp(const char *a, const char *b) { return strncmp(a, b, (size_t)-1); }

/* ---- COM1 ---- */
#define UART_THR 0
#define UART_RBR 0
#define UART_DLL 0
#define UART_IER 1
#define UART_DLM 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_DR   0x01
#define LSR_THRE 0x20

static u16 uart = COM1;

void serial_init(u16 base)
{
    uart = base;
    outb(base + UART_IER, 0x00);        /* polled: no UART interrupts */
    outb(base + UART_LCR, 0x80);        /* DLAB on */
    outb(base + UART_DLL, 0x01);        /* divisor 1: 115200 baud */
    outb(base + UART_DLM, 0x00);
    outb(base + UART_LCR, 0x03);        /* 8N1, DLAB off */
    outb(base + UART_FCR, 0xc7);        /* enable + clear FIFOs, 14-byte trigger */
    outb(base + UART_MCR, 0x0b);        /* DTR | RTS | OUT2 */
}

void serial_putc(char c)
{
    /* Bounded so a missing UART (reads 0xff, THRE set anyway) or a stuck one can't hang us. */
    for (u32 i = 0; i < 1000000 && !(inb(uart + UART_LSR) & LSR_THRE); i++)
        cpu_relax();
    outb(uart + UART_THR, (u8)c);
}

int serial_trygetc(void)
{
    u8 lsr = inb(uart + UART_LSR);
    if (lsr == 0xff || !(lsr & LSR_DR))     /* 0xff: nothing decodes the port */
        return -1;
    return inb(uart + UART_RBR);
}

int serial_getc(void)
{
    int c;
    while ((c = serial_trygetc()) < 0)
        cpu_relax();
    return c;
}

void console_putc(char c)
{
    if (c == '\n')
        serial_putc('\r');
    serial_putc(c);
}

void print(const char *s)
{
    while (*s)
        console_putc(*s++);
}

/* ---- printf-lite ---- */
struct sink {
    char *buf;      /* NULL: console */
    size_t size, len;
};

static void sink_put(struct sink *k, char c)
{
    if (!k->buf)
        console_putc(c);
    else if (k->len + 1 < k->size)
        k->buf[k->len] = c;
    k->len++;
}

static void emit(struct sink *k, const char *s, size_t n, int width, int left, char pad)
{
    int fill = width > (int)n ? width - (int)n : 0;
    if (!left)
        while (fill-- > 0)
            sink_put(k, pad);
    while (n--)
        sink_put(k, *s++);
    if (left)
        while (fill-- > 0)
            sink_put(k, ' ');
}

static int format(struct sink *k, const char *fmt, va_list ap)
{
    char tmp[24];
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            sink_put(k, *fmt);
            continue;
        }
        int left = 0, width = 0, lng = 0, alt = 0;
        char pad = ' ';
        fmt++;
        for (;; fmt++) {
            if (*fmt == '-')
                left = 1;
            else if (*fmt == '#')
                alt = 1;
            else if (*fmt == '0')
                pad = '0';
            else
                break;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            lng++;
            fmt++;
        }
        if (*fmt == 'z')        /* size_t is 32-bit here */
            fmt++;
        char conv = *fmt;
        if (!conv)
            break;
        switch (conv) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            emit(k, s, strlen(s), width, left, ' ');
            break;
        }
        case 'c':
            tmp[0] = (char)va_arg(ap, int);
            emit(k, tmp, 1, width, left, ' ');
            break;
        case 'd': case 'i': case 'u': case 'x': case 'X': case 'p': {
            u64 v;
            int neg = 0;
            if (conv == 'p')
                v = (u32)va_arg(ap, void *);
            else if (conv == 'd' || conv == 'i') {
                int64_t sv = lng >= 2 ? va_arg(ap, int64_t) : (int64_t)va_arg(ap, int32_t);
                neg = sv < 0;
                v = neg ? -(u64)sv : (u64)sv;
            } else
                v = lng >= 2 ? va_arg(ap, u64) : (u64)va_arg(ap, u32);
            const char *digits = conv == 'X' ? "0123456789ABCDEF" : "0123456789abcdef";
            u32 base = (conv == 'd' || conv == 'i' || conv == 'u') ? 10 : 16;
            int n = 0;
            do {
                u64 r;
                v = udivmod64(v, base, &r);
                tmp[sizeof tmp - 1 - n++] = digits[r];
            } while (v);
            if (conv == 'p' || (alt && base == 16)) {
                tmp[sizeof tmp - 1 - n++] = 'x';
                tmp[sizeof tmp - 1 - n++] = '0';
            }
            if (neg) {
                if (pad == '0' && !left) {      /* sign goes before zero padding */
                    sink_put(k, '-');
                    width = width > 0 ? width - 1 : 0;
                } else
                    tmp[sizeof tmp - 1 - n++] = '-';
            }
            emit(k, tmp + sizeof tmp - n, n, width, left, pad);
            break;
        }
        case '%':
            sink_put(k, '%');
            break;
        default:                /* unknown: print it literally */
            sink_put(k, '%');
            sink_put(k, conv);
        }
    }
    return (int)k->len;
}

int vprintf(const char *fmt, va_list ap)
{
    struct sink k = {0, 0, 0};
    return format(&k, fmt, ap);
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

int snprintf(char *buf, size_t n, const char *fmt, ...)
{
    struct sink k = {buf, n, 0};
    va_list ap;
    va_start(ap, fmt);
    format(&k, fmt, ap);
    va_end(ap);
    if (n)
        buf[k.len < n ? k.len : n - 1] = 0;
    return (int)k.len;
}

/* ---- machine control ---- */
void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void poweroff(void)
{
    outw(0x404, (5 << 10) | (1 << 13));     /* PM1a_CNT: SLP_TYP=5 (S5), SLP_EN */
    halt_forever();                         /* a platform without that port: just stop */
}

void reset(void)
{
    outb(0xcf9, 0x06);                      /* reset control register: SYS_RST | RST_CPU */
    outb(0x64, 0xfe);                       /* keyboard controller pulse of the reset line */
    halt_forever();
}

/* ---- start_info ---- */
const char *si_cmdline(void)
{
    if (!start_info || !start_info->cmdline_paddr || (start_info->cmdline_paddr >> 32))
        return "";
    return (const char *)(u32)start_info->cmdline_paddr;
}

u32 si_memmap_count(void)
{
    if (!start_info || start_info->version < 1 || !start_info->memmap_paddr)
        return 0;
    return start_info->memmap_entries;
}

const struct hvm_memmap_entry *si_memmap(u32 i)
{
    if (i >= si_memmap_count())
        return 0;
    return (const struct hvm_memmap_entry *)(u32)start_info->memmap_paddr + i;
}

u64 si_ram_total(void)
{
    u64 total = 0;
    for (u32 i = 0; i < si_memmap_count(); i++)
        if (si_memmap(i)->type == E820_RAM)
            total += si_memmap(i)->size;
    return total;
}

const char *e820_type_name(u32 type)
{
    switch (type) {
    case 1: return "RAM";
    case 2: return "reserved";
    case 3: return "ACPI";
    case 4: return "ACPI NVS";
    case 5: return "unusable";
    case 7: return "persistent";
    default: return "unknown";
    }
}

/* Find `key` as a whole word (followed by '=', space or end); returns the char after it. */
static const char *cmdline_find(const char *key)
{
    const char *s = si_cmdline();
    size_t kl = strlen(key);
    while (*s) {
        while (*s == ' ')
            s++;
        const char *w = s;
        while (*s && *s != ' ')
            s++;
        if ((size_t)(s - w) >= kl && !strncmp(w, key, kl) && (w[kl] == '=' || w + kl == s))
            return w + kl;
    }
    return 0;
}

int cmdline_flag(const char *word) { return cmdline_find(word) != 0; }

int cmdline_value(const char *key, char *buf, size_t n)
{
    const char *p = cmdline_find(key);
    if (!p)
        return 0;
    if (*p == '=')
        p++;
    size_t i = 0;
    for (; p[i] && p[i] != ' ' && i + 1 < n; i++)
        buf[i] = p[i];
    if (n)
        buf[i] = 0;
    return 1;
}

u32 parse_u32(const char *s, const char **end)
{
    u32 v = 0, base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (;; s++) {
        u32 d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            break;
        v = v * base + d;
    }
    if (end)
        *end = s;
    return v;
}

u32 cmdline_u32(const char *key, u32 dflt)
{
    char buf[24];
    const char *end;
    if (!cmdline_value(key, buf, sizeof buf) || !buf[0])
        return dflt;
    u32 v = parse_u32(buf, &end);
    return *end ? dflt : v;
}

/* Called by start.S with the %ebx the loader passed. */
void rt_main(const struct hvm_start_info *si) __attribute__((noreturn));
void rt_main(const struct hvm_start_info *si)
{
    start_info = (si && si->magic == HVM_START_MAGIC) ? si : 0;
    serial_init(COM1);
    main(start_info);
    poweroff();
}
