/* Handles the ACPI fixed-feature power button the way an OS does: PWRBTN_EN set in PM1_EN
 * (0x402), the SCI (GSI 9, level, active high) routed through the IOAPIC; the SCI handler
 * reads PM1_STS (0x400), clears PWRBTN_STS by writing it back (write-1-to-clear) and the
 * guest then powers off through PM1_CNT (S5). Meanwhile it counts on the console, so a test
 * can see it running (and pause it, read its registers, reset it).
 *   "power button armed"     the SCI is routed and enabled
 *   "tick N"                 every so often while waiting
 *   "power button pressed"   the SCI came, with PWRBTN_STS set; then the guest powers off */
#include "rt.h"

#define PM1_STS     0x400
#define PM1_EN      0x402
#define PWRBTN      (1u << 8)
#define SCI_GSI     9
#define SCI_VECTOR  0x59

static volatile u32 pressed;

static void sci(u32 vector)
{
    (void)vector;
    u16 sts = inw(PM1_STS);
    if (sts & PWRBTN) {
        outw(PM1_STS, PWRBTN);          /* W1C: the SCI line drops with it */
        pressed++;
    }
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    u32 ticks = cmdline_u32("ticks", 0);    /* 0: wait forever */
    u32 spin = cmdline_u32("spin", 200000); /* pause loops between ticks */
    irq_init("");
    irq_set_hook(SCI_VECTOR, sci);
    ioapic_route(SCI_GSI, SCI_VECTOR, IOAPIC_LEVEL);
    outw(PM1_EN, PWRBTN);
    irq_enable();
    printf("power button armed (PM1_CNT 0x%x)\n", inw(0x404));
    for (u32 n = 1; !pressed; n++) {
        for (volatile u32 i = 0; i < spin && !pressed; i++)
            cpu_relax();
        if (!pressed)
            printf("tick %u\n", n);
        if (ticks && n >= ticks) {
            printf("no power button after %u ticks\n", n);
            return 0;
        }
    }
    irq_disable();
    printf("power button pressed (PM1_STS now 0x%x)\n", inw(PM1_STS));
    return 0;
}
