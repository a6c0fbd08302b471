"""The example plugins (plugins/virtio_rng, plugins/pci_counter) under a real guest on
/dev/kvm: tests/guests/virtio_rng.c reads entropy with Linux-style virtio-rng requests,
tests/guests/pci_counter.c takes the counter's MSI-X interrupts."""
import re
import time

import pytest

from conftest import requires_kvm, run_hvframe

pytestmark = [requires_kvm, pytest.mark.kvm]


def build(tmp_path_factory, name):
    from hvframe.guests.build import build_guest
    return build_guest([f"tests/guests/{name}.c"], tmp_path_factory.mktemp(name) / f"{name}.elf")


def run(elf, *device_args):
    p = run_hvframe(["run", "-m", "64M", "-s", "0,hostbridge", *device_args,
                     "-l", "com1,stdio", "--kernel", elf], input="", timeout=180)
    assert p.returncode == 1, (p.stdout, p.stderr)
    return p.stdout


@pytest.fixture(scope="module")
def rng_guest(tmp_path_factory):
    return build(tmp_path_factory, "virtio_rng")


def entropy(out):
    assert "vrng done" in out, out
    m = re.search(r"^vrng got (\d+) bytes distinct (\d+)$", out, re.M)
    assert m, out
    return int(m.group(1)), int(m.group(2)), [int(n) for n in re.findall(r"len (\d+)", out)]


def test_guest_reads_entropy_through_virtio_rng(rng_guest):
    out = run(rng_guest, "-s", "3,virtio-rng")
    assert "vrng pci 00:03.0 id 1af4:1005" in out
    got, distinct, lens = entropy(out)
    assert got == 512 and lens == [64] * 8
    assert distinct > 100                    # 512 random bytes show ~222 values; a fill shows 1
    assert "vrng bytes not all the same" in out
    assert int(re.search(r"vrng irqs (\d+)", out).group(1)) >= 8


def test_guest_is_held_to_the_rate_limit(rng_guest):
    start = time.monotonic()
    out = run(rng_guest, "-s", "3,virtio-rng,max-bytes=100,period=200")
    elapsed = time.monotonic() - start
    got, distinct, lens = entropy(out)
    assert got == 512 and 36 in lens             # 64 + 36, then the rest in the next period
    assert elapsed >= 0.8                        # 512 bytes at 100 per 200 ms: 5 periods


def test_guest_takes_pci_counter_msix_interrupts(tmp_path_factory):
    out = run(build(tmp_path_factory, "pci_counter"), "-s", "4,pci-counter")
    assert "pcicnt done" in out, out
    assert re.search(r"pcicnt bar0 [0-9a-f]+ magic 544e5443", out)
    assert "pcicnt vector 0 irq 0x40 received" in out
    assert "pcicnt vector 1 irq 0x41 received" in out
    assert "pcicnt count 7 interrupts 2 status 0" in out
    assert "pcicnt irq counts 1 1" in out
