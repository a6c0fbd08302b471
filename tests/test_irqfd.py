"""MSI and MSI-X through KVM irqfds: a device thread interrupts the guest by writing an
eventfd. The real-guest tests run tests/guests/irqfd.c against pci-testdev (whose register
0x10 raises a vector from a thread of the device's own) in this process, so that they can
also check that no message went through KVM_SIGNAL_MSI; the rest use the synthetic backend."""
import os
import re
import threading

import pytest

from conftest import requires_kvm
from hvframe.kvm import FIRST_MSI_GSI, default_irqchip_routes
from hvframe.machine import Machine
from hvframe.pci.msi import MSIX_CONTROL, MSIX_ENABLE
from hvframe.pci.testdev import PciTestDev, REG_RAISE_LATER
from hvframe.synthetic import SyntheticMachine

ARGS = ["run", "-m", "64M", "-s", "0,hostbridge", "-s", "3,pci-testdev"]


# -- KVM's default routing table, as reproduced ----------------------------------------------

def test_default_routes_are_a_pcs():
    """ISA IRQ0 (the PIT) on IOAPIC pin 2 as the MP table and MADT say, GSI 2 (the cascade)
    routed nowhere, every other GSI on its own pin and the PICs."""
    from hvframe.core_native import lib
    routes = default_irqchip_routes()
    assert len(routes) == 15 * 2 + 8
    assert [(c, p) for g, c, p in routes if c == lib.KVM_IRQCHIP_IOAPIC and p == 2] == \
        [(lib.KVM_IRQCHIP_IOAPIC, 2)]
    for gsi in range(24):
        chips = {(c, p) for g, c, p in routes if g == gsi}
        want = set() if gsi == 2 else {(lib.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi)}
        if gsi < 16 and gsi != 2:
            want.add((lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE,
                      gsi % 8))
        assert chips == want
    assert FIRST_MSI_GSI == 24


# -- synthetic backend ------------------------------------------------------------------------

def test_synthetic_irqfd_records_like_signal_msi():
    m = SyntheticMachine()
    irq = m.add_msi_irqfd()
    assert irq.fd >= 0 and irq.gsi is None
    irq.fire()                       # no message yet: dropped
    assert m.msis == []
    irq.set_message(0xFEE00000, 0x40)
    irq.fire()
    irq.set_message(0xFEE01000, 0x41)
    irq.fire()
    m.signal_msi(0xFEE00000, 0x42)
    assert m.msis == [(0xFEE00000, 0x40), (0xFEE01000, 0x41), (0xFEE00000, 0x42)]
    m.close()
    assert irq.fd == -1
    irq.fire()                       # after close: dropped, no error
    assert len(m.msis) == 3


def test_synthetic_msix_vectors_get_irqfds_that_follow_the_table():
    m = SyntheticMachine(64 << 20)
    from hvframe.pci.bus import attach
    dev = attach(m, PciTestDev(), {"pci.address": (0, 3, 0)})
    m.pci.assign_bars()
    m.pci.enable_all()
    msix = dev.msix
    table = dev.bar_address(1)
    cfg = dev.config_write
    # vector 0: written masked, unmasked after MSI-X is enabled
    m.mmio.write(table, 4, 0xFEE00000)
    m.mmio.write(table + 8, 4, 0x40)
    assert msix.irqfd(0) is None              # nothing made while it cannot fire
    cfg(msix.offset + MSIX_CONTROL, 2, MSIX_ENABLE)
    m.mmio.write(table + 12, 4, 0)
    irq = msix.irqfd(0)
    assert irq is not None and irq.message == (0xFEE00000, 0x40)
    # a device thread raises it
    t = threading.Thread(target=dev.interrupt, args=(0,))
    t.start()
    t.join()
    assert m.msis == [(0xFEE00000, 0x40)]
    # reprogrammed while unmasked: the route follows at once
    m.mmio.write(table + 8, 4, 0x43)
    assert irq.message == (0xFEE00000, 0x43)
    # masked: held pending, nothing fired; the unmask delivers it through the irqfd
    m.mmio.write(table + 12, 4, 1)
    m.mmio.write(table + 8, 4, 0x44)
    assert irq.message == (0xFEE00000, 0x43)  # not followed while masked...
    assert dev.interrupt(0) == "msix" and msix.is_pending(0)
    m.mmio.write(table + 12, 4, 0)
    assert irq.message == (0xFEE00000, 0x44)  # ...but before anything can fire
    assert m.msis == [(0xFEE00000, 0x40), (0xFEE00000, 0x44)] and not msix.is_pending(0)
    # the delayed-raise register
    m.mmio.write(dev.bar_address(0) + REG_RAISE_LATER, 4, 0 | 1 << 16)
    for _ in range(500):
        if m.mmio.read(dev.bar_address(0) + REG_RAISE_LATER, 4) == 1:
            break
        threading.Event().wait(0.01)
    assert m.msis[-1] == (0xFEE00000, 0x44) and len(m.msis) == 3
    m.close()
    assert irq.fd == -1


def test_a_vector_becoming_deliverable_never_fires_a_stale_route():
    """The lock-free path of notify() is used only while the irqfd's route is the guest's
    message: the enable bit lands in config space before the capability hears of the write,
    and a device thread firing in between must not send what the entry said before."""
    m = SyntheticMachine(64 << 20)
    from hvframe.pci.bus import attach
    from hvframe.pci.msi import MSI_CONTROL, MSI_DATA, MSI_ADDR_LO, MSI_ENABLE
    dev = attach(m, PciTestDev(), {"pci.address": (0, 3, 0)})
    m.pci.assign_bars()
    m.pci.enable_all()
    msix, cfg = dev.msix, dev.config_write
    for off, value in ((0, 0xFEE00000), (8, 0x40), (12, 0)):
        msix.bar_write(off, 4, value)
    cfg(msix.offset + MSIX_CONTROL, 2, MSIX_ENABLE)
    assert msix.notify(0) and m.msis == [(0xFEE00000, 0x40)]
    cfg(msix.offset + MSIX_CONTROL, 2, 0)                 # disabled, then retargeted
    msix.bar_write(8, 4, 0x41)
    dev.config.put(msix.offset + MSIX_CONTROL, 2, MSIX_ENABLE)   # enable, watcher not yet run
    assert msix.notify(0) and m.msis[-1] == (0xFEE00000, 0x41)
    # MSI likewise: message changed while disabled
    cfg(msix.offset + MSIX_CONTROL, 2, 0)
    msi = dev.msi
    cfg(msi.offset + MSI_ADDR_LO, 4, 0xFEE00000)
    cfg(msi.offset + MSI_DATA, 2, 0x42)
    cfg(msi.offset + MSI_CONTROL, 2, MSI_ENABLE)
    assert msi.notify(0) and m.msis[-1] == (0xFEE00000, 0x42)
    cfg(msi.offset + MSI_CONTROL, 2, 0)
    cfg(msi.offset + MSI_DATA, 2, 0x43)
    dev.config.put(msi.offset + MSI_CONTROL, 2, MSI_ENABLE)
    assert msi.notify(0) and m.msis[-1] == (0xFEE00000, 0x43)
    m.close()


# -- real KVM -----------------------------------------------------------------------------------

@requires_kvm
def test_kvm_routes_and_irqfd_assign():
    m = Machine(16 << 20)
    try:
        vm = m.vm
        assert vm.has_irqfd and vm.max_gsi > FIRST_MSI_GSI
        a = m.add_msi_irqfd()
        b = m.add_msi_irqfd(0xFEE00000, 0x41)
        assert (a.gsi, b.gsi) == (FIRST_MSI_GSI, FIRST_MSI_GSI + 1)
        commits = vm.route_commits
        b.set_message(0xFEE00000, 0x41)           # unchanged: no table update
        assert vm.route_commits == commits
        with m.msi_route_batch():
            a.set_message(0xFEE00000, 0x40)
            b.set_message(0xFEE00000, 0x42)
        assert vm.route_commits == commits + 1    # one update for both
        table = vm.routing_table()
        assert table[:len(default_irqchip_routes())] == [("irqchip", g, c, p) for g, c, p in default_irqchip_routes()]
        assert table[len(default_irqchip_routes()):] == [("msi", a.gsi, 0xFEE00000, 0x40), ("msi", b.gsi, 0xFEE00000, 0x42)]
        a.fire()                                  # no vCPU yet: the LAPIC just latches it
        gsi = a.gsi
        a.close()
        c = m.add_msi_irqfd()
        assert c.gsi == gsi                       # GSIs are reused
    finally:
        m.close()
    assert b.fd == -1 and c.fd == -1


@pytest.fixture(scope="module")
def irqfd_run(tmp_path_factory):
    from hvframe.kvm import KvmError
    from hvframe.cli import config_from_args, make_parser
    from hvframe.guests.build import build_guest
    from hvframe.kvm import KvmVm
    from hvframe.plugins import Registry
    from hvframe.runner import build_machine
    d = tmp_path_factory.mktemp("irqfd")
    elf = build_guest(["tests/guests/irqfd.c"], d / "irqfd.elf")
    out = d / "com1.txt"
    reg = Registry()
    args = make_parser().parse_args(ARGS + ["-l", f"com1,file={out}", "--kernel", str(elf)])
    m, _ = build_machine(config_from_args(args, reg), reg)
    signalled = []
    real_signal = KvmVm.signal_msi
    try:
        m.vm.signal_msi = lambda a, dt: signalled.append((a, dt)) or real_signal(m.vm, a, dt)
        m.start_devices()
        code = m.run(timeout=120)
        dev = next(f for f in m.pci.functions.values() if isinstance(f, PciTestDev))
        state = {"code": code, "reason": m.exit_reason, "signalled": signalled,
                 "table": m.vm.routing_table(),
                 "msix_gsis": [dev.msix.irqfd(v) and dev.msix.irqfd(v).gsi for v in range(4)],
                 "msi_gsi": dev.msi._irqfd.gsi if dev.msi._irqfd else None,
                 "raised_later": dev.raised_later}
    finally:
        m.close()
    state["out"] = out.read_text(errors="replace")
    assert state["code"] == 1, (state["reason"], state["out"])
    assert "irqfd done" in state["out"], state["out"]
    return state


@requires_kvm
@pytest.mark.kvm
def test_interrupt_from_a_device_thread_reaches_the_guest(irqfd_run):
    out = irqfd_run["out"]
    assert "thread msix vector 0x40 received" in out, out
    assert "thread msi vector 0x42 received" in out, out
    assert "second msix vector 0x45 received" in out, out
    # through irqfds: nothing went through KVM_SIGNAL_MSI, and the GSIs are ours
    assert irqfd_run["signalled"] == []
    g0, g1 = irqfd_run["msix_gsis"][:2]
    assert g0 >= FIRST_MSI_GSI and g1 >= FIRST_MSI_GSI and g0 != g1
    assert irqfd_run["msi_gsi"] is not None and irqfd_run["msi_gsi"] >= FIRST_MSI_GSI
    assert irqfd_run["raised_later"] == 7   # steps (a)-(e), (f) and (g)


@requires_kvm
@pytest.mark.kvm
def test_reprogrammed_entry_interrupts_at_the_new_vector(irqfd_run):
    out = irqfd_run["out"]
    assert "reprogrammed msix vector 0x43 received" in out, out
    assert "unmasked-reprogrammed msix vector 0x44 received" in out, out
    m = re.search(r"counts 40:(\d+) 41:(\d+) 42:(\d+) 43:(\d+) 44:(\d+) 45:(\d+) spurious:(\d+)",
                  out)
    assert m, out
    c40, c41, c42, c43, c44, c45, spurious = map(int, m.groups())
    assert (c40, c42, c43, c44, c45) == (1, 1, 1, 2, 1)   # nothing at an old vector
    # the route is the guest's last programming of entry 0
    g0 = irqfd_run["msix_gsis"][0]
    assert ("msi", g0, 0xFEE00000, 0x44) in irqfd_run["table"]


@requires_kvm
@pytest.mark.kvm
def test_masked_vector_is_held_pending_and_delivered_on_unmask(irqfd_run):
    out = irqfd_run["out"]
    assert "masked msix pending 1 delivered 0" in out, out
    assert "unmasked pending msix vector 0x44 received" in out, out
    assert "pending after unmask 0" in out, out


@requires_kvm
@pytest.mark.kvm
def test_intx_default_routes_survive_msi_routes(irqfd_run):
    out = irqfd_run["out"]
    assert "intx gsi 19 intx vector 0x41 received" in out, out
    assert "thread intx gsi 19 intx vector 0x41 received" in out, out
    table = irqfd_run["table"]
    assert table[:len(default_irqchip_routes())] == [("irqchip", g, c, p) for g, c, p in default_irqchip_routes()]
    assert len([r for r in table if r[0] == "msi"]) >= 3
