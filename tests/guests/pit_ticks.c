/* The PIT's lost ticks. IRQ0 at 100 Hz through IOAPIC pin 2 (vector 0x30); the guest keeps
 * interrupts off for 100 tick periods, then counts the ticks of the next 20 periods. A PIT
 * that drops the ticks it could not deliver, as hardware does, gives about 20; one that
 * reinjects every missed tick (KVM's default) gives about 120, back to back -- the storm in
 * which a slow emulated Linux took no device interrupt (their vectors are below 0x30) for
 * seconds. Periods are measured in TSC cycles, calibrated against the PIT first. */
#include "rt.h"

#define VEC         0x30
#define HZ          100
#define DIVISOR     (1193182 / HZ)
#define WAIT_LOOPS  30000000

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

static void spin(u64 cycles)
{
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < cycles)
        cpu_relax();
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    irq_init("");
    ioapic_route(2, VEC, 0);
    outb(0x43, 0x34);                       /* channel 0, low then high byte, rate generator */
    outb(0x40, DIVISOR & 0xff);
    outb(0x40, DIVISOR >> 8);
    irq_enable();
    if (!irq_wait(VEC, 2, WAIT_LOOPS)) {
        printf("pit: no ticks\n");
        return 0;
    }
    u32 c0 = irq_count[VEC];
    u64 t0 = rdtsc();
    while (irq_count[VEC] < c0 + 10)
        cpu_relax();
    u64 ten = rdtsc() - t0;                 /* TSC cycles in 10 tick periods */

    irq_disable();
    spin(ten * 10);                         /* 100 periods with interrupts off */
    u32 before = irq_count[VEC];
    irq_enable();
    spin(ten * 2);                          /* 20 periods */
    irq_disable();
    printf("pit: %u ticks in 20 periods after 100 with interrupts off\n",
           irq_count[VEC] - before);
    outb(0x43, 0x30);                       /* mode 0 (one shot): no more ticks */
    return 0;
}
