/* Smallest useful guest: proves entry, stack, COM1 output, start_info and power-off. */
#include "rt.h"

int main(const struct hvm_start_info *si)
{
    (void)si;
    printf("hello from pvh guest\n");
    printf("cmdline: %s\n", si_cmdline());
    return 0;   /* the runtime powers off: VMM exit code 1 */
}
