/* Resets through the 0xcf9 reset control register (VMM exit code 0). */
#include "rt.h"

int main(const struct hvm_start_info *si)
{
    (void)si;
    printf("resetting via 0xcf9\n");
    reset();
}
