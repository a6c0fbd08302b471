"""cffi (API mode) build of the native exit-dispatch core: `hvframe.core_native._hvcore`.
(The API device plugins build against is the other module, build_api.py.)

Built by `pip install` through setuptools' cffi_modules. KVM structures are declared
partially (`...;`) so that their layout comes from the system's <linux/kvm.h>.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = r"""
typedef uint64_t (*hv_native_fn)(void *opaque, uint64_t offset, uint32_t size,
                                 uint64_t value, int is_write);
struct hv_bus { int count; uint64_t unclaimed; ...; };
enum { HV_PARTIAL_DROP, HV_PARTIAL_MERGE, HV_PARTIAL_ZERO };
struct hv_field { uint32_t off; uint8_t size; uint8_t partial; };
struct hv_access {
    uint8_t sizes; uint8_t aligned; uint8_t partial;
    uint32_t nfields; const struct hv_field *fields;
    uint64_t adapted; uint64_t dropped;
};
struct hv_vcpu {
    int fd; int index; void *run; size_t run_size;
    volatile int stop;
    uint32_t last_exit_reason; int last_errno;
    uint32_t internal_suberror; uint32_t internal_ndata; uint64_t internal_data[16];
    uint32_t event_type; uint64_t fail_reason;
    uint64_t exits_io; uint64_t exits_mmio; uint64_t exits_other;
    struct hv_coalesced *coalesced;
    ...;
};
struct hv_coalesced { uint32_t max; uint64_t drained; ...; };
enum { HV_EXIT_STOPPED, HV_EXIT_SHUTDOWN, HV_EXIT_INTERNAL, HV_EXIT_HLT,
       HV_EXIT_SYSTEM_EVENT, HV_EXIT_FAIL_ENTRY, HV_EXIT_UNKNOWN, HV_EXIT_ERROR };

int hv_py_set_handler(int handle, uintptr_t reader, uintptr_t writer);
void hv_py_set_failed(uintptr_t fn);
uint64_t hv_py_dispatch(int handle, uint64_t offset, uint32_t size, uint64_t value, int is_write);

struct hv_bus *hv_bus_new(void);
void hv_bus_free(struct hv_bus *b);
int hv_bus_add(struct hv_bus *b, uint64_t base, uint64_t len, int py_handle,
               hv_native_fn fn, void *opaque, struct hv_access *acc);
int hv_bus_remove(struct hv_bus *b, uint64_t base);
uint64_t hv_bus_dispatch(struct hv_bus *b, uint64_t addr, uint32_t size, uint64_t value,
                         int is_write);
int hv_bus_count(struct hv_bus *b);
uint64_t hv_bus_hits(struct hv_bus *b, uint64_t base);
uint64_t hv_native_sink(void *opaque, uint64_t offset, uint32_t size, uint64_t value, int is_write);
uint64_t hv_native_gil_only(void *opaque, uint64_t offset, uint32_t size, uint64_t value,
                            int is_write);
void hv_synthetic_exits(struct hv_bus *b, const uint64_t *addrs, const uint8_t *sizes,
                        uint64_t *values, const uint8_t *is_write, size_t n);

int hv_init(void);
struct hv_vcpu *hv_vcpu_new(int fd, int index, size_t run_size, struct hv_bus *pio,
                            struct hv_bus *mmio);
void hv_vcpu_free(struct hv_vcpu *v);
void hv_vcpu_stop(struct hv_vcpu *v);
int hv_vcpu_run(struct hv_vcpu *v);
struct hv_coalesced *hv_coalesced_new(int vcpu_fd, struct hv_bus *pio, struct hv_bus *mmio);
void hv_coalesced_free(struct hv_coalesced *c);
int hv_coalesced_drain(struct hv_coalesced *c);
int hv_floor_run(int fd, void *run_area, uint16_t stop_port, uint64_t *exits);
int hv_ioctl(int fd, unsigned long request, void *arg);
int hv_ioctl_int(int fd, unsigned long request, unsigned long arg);
int hv_irq_line(int vm_fd, uint32_t irq, int level);
int hv_fallocate(int fd, int mode, int64_t offset, int64_t length);

/* KVM ABI, laid out by <linux/kvm.h> */
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_SET_CPUID2 ...
#define KVM_TRANSLATE ...
#define KVM_GET_MP_STATE ...
#define KVM_SIGNAL_MSI ...
#define KVM_IOEVENTFD ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_CAP_SIGNAL_MSI ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_IRQFD ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_IRQFD ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_SET_MP_STATE ...
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_COALESCED_PIO ...
#define KVM_CAP_REINJECT_CONTROL ...
#define KVM_REINJECT_CONTROL ...
#define KVM_REGISTER_COALESCED_MMIO ...
#define KVM_UNREGISTER_COALESCED_MMIO ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_MEM_READONLY ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...
#define KVM_INTERNAL_ERROR_EMULATION ...

struct kvm_reinject_control { uint8_t pit_reinject; ...; };
struct kvm_coalesced_mmio_zone { uint64_t addr; uint32_t size; uint32_t pio; ...; };
struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size;
    uint64_t userspace_addr;
};
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector; uint8_t type; uint8_t present, dpl, db,
    s, l, g, avl; uint8_t unusable; ...;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss; struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8; uint64_t efer; uint64_t apic_base;
    ...;
};
struct kvm_cpuid_entry2 {
    uint32_t function; uint32_t index; uint32_t flags; uint32_t eax; uint32_t ebx;
    uint32_t ecx; uint32_t edx; ...;
};
struct kvm_cpuid2 { uint32_t nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_translation {
    uint64_t linear_address; uint64_t physical_address; uint8_t valid; uint8_t writeable;
    uint8_t usermode; ...;
};
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_ioeventfd { uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags; ...; };
struct kvm_msi { uint32_t address_lo; uint32_t address_hi; uint32_t data; uint32_t flags; ...; };
struct kvm_irq_routing_irqchip { uint32_t irqchip; uint32_t pin; };
struct kvm_irq_routing_msi { uint32_t address_lo; uint32_t address_hi; uint32_t data; uint32_t pad; };
struct kvm_irq_routing_entry {
    uint32_t gsi; uint32_t type; uint32_t flags; uint32_t pad;
    union { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi;
            uint32_t pad[8]; } u;
    ...;
};
struct kvm_irq_routing { uint32_t nr; uint32_t flags; struct kvm_irq_routing_entry entries[]; ...; };
struct kvm_irqfd { uint32_t fd; uint32_t gsi; uint32_t flags; uint32_t resamplefd; ...; };

"""

# Declared register blocks (regblock.c), kept apart from CDEF above.
REGBLOCK_CDEF = r"""
enum { HV_REG_STORAGE, HV_REG_READ_ONLY, HV_REG_W1C, HV_REG_PY_VALUE, HV_REG_FIFO,
       HV_REG_PYTHON, HV_REG_KINDS };
enum { HV_FIFO_FULL_PYTHON, HV_FIFO_FULL_DROP };
#define HV_REGBLOCK_MAX_LEN ...
#define HV_REGBLOCK_MAX_REGS ...
#define HV_REGBLOCK_MAX_FIFOS ...
#define HV_FIFO_MAX_ENTRIES ...
struct hv_regblock { uint64_t served; uint64_t passed; ...; };
struct hv_regblock *hv_regblock_new(uint32_t len, uint32_t nregs, uint32_t nfifos);
void hv_regblock_free(struct hv_regblock *rb);
int hv_regblock_def_fifo(struct hv_regblock *rb, uint32_t f, uint32_t cap, uint32_t width,
                         uint32_t full_policy);
int hv_regblock_def_reg(struct hv_regblock *rb, uint32_t i, uint32_t offset, uint32_t size,
                        uint32_t kind, int32_t fifo, uint64_t value, uint64_t write_mask,
                        uint64_t room_bits, uint64_t empty_bits, uint32_t native);
void hv_regblock_set_handler(struct hv_regblock *rb, int py_handle);
uint64_t hv_regblock_access(void *opaque, uint64_t offset, uint32_t size, uint64_t value,
                            int is_write);
uint64_t hv_regblock_read(struct hv_regblock *rb, uint32_t i);
uint64_t hv_regblock_update(struct hv_regblock *rb, uint32_t i, uint64_t clear, uint64_t set);
void hv_regblock_set_native(struct hv_regblock *rb, uint64_t mask, int on);
uint64_t hv_regblock_native_mask(struct hv_regblock *rb);
uint32_t hv_regblock_fifo_take(struct hv_regblock *rb, uint32_t f, uint8_t *out, uint32_t max);
uint32_t hv_regblock_fifo_level(struct hv_regblock *rb, uint32_t f);
int64_t hv_regblock_fifo_wait(struct hv_regblock *rb, uint32_t f, int timeout_ms);
void hv_regblock_fifo_kick(struct hv_regblock *rb, uint32_t f);
void hv_regblock_close(struct hv_regblock *rb);
void hv_regblock_fifo_counts(struct hv_regblock *rb, uint32_t f, uint64_t *pushed,
                             uint64_t *taken, uint64_t *dropped);
"""
CDEF += REGBLOCK_CDEF


def make_ffi() -> FFI:
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "hvframe.core_native._hvcore",
        '#include "hvcore.c"\n#include "regblock.c"\n',
        py_limited_api=False,  # the exit path calls the interpreter with vectorcall
        include_dirs=[HERE],
        depends=[os.path.join(HERE, f) for f in ("hvcore.c", "hvcore.h", "regblock.c")],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
        libraries=["pthread"],
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(HERE, "..", ".."), verbose=True)
