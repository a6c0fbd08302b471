"""Real guests on /dev/kvm through the `hvframe run` command line."""
import os
import re

import pytest

from conftest import requires_kvm, run_hvframe

pytestmark = [requires_kvm, pytest.mark.kvm]


def test_demo_guest_boots_by_default_prints_its_machine_and_powers_off():
    p = run_hvframe(["run"], input="")
    assert p.returncode == 1, p.stderr
    assert p.stdout.startswith("hvframe demo guest")
    assert "memory: 256 MiB RAM" in p.stdout
    assert "CPUs: 1 online" in p.stdout
    assert "port 0x3f8 uart: yes" in p.stdout and "port 0x2f8 uart: no" in p.stdout
    assert p.stdout.rstrip().endswith("hvframe demo guest: powering off")


def test_demo_guest_sees_memory_size_cpus_and_extra_com_ports():
    p = run_hvframe(["run", "-c", "2", "-m", "96M", "-l", "com1,stdio", "-l", "com2,null",
                     "--cmdline", "hello=world"], input="")
    assert p.returncode == 1, p.stderr
    assert "memory: 96 MiB RAM" in p.stdout
    assert "CPUs: 2 online (2 expected)" in p.stdout
    assert "port 0x2f8 uart: yes" in p.stdout
    assert 'cmdline: "hello=world"' in p.stdout


def test_pvh_guest_console_on_stdout_and_cmdline(guest_dir):
    p = run_hvframe(["run", "-m", "64M", "-l", "com1,stdio", "--kernel", guest_dir["hello"],
                     "-a", "console=ttyS0 marker=42"], input="")
    assert p.returncode == 1, p.stderr
    assert "hello from pvh guest" in p.stdout
    assert "console=ttyS0 marker=42" in p.stdout


def test_triple_fault_exits_3(guest_dir):
    p = run_hvframe(["run", "-m", "64M", "-l", "com1,stdio", "--kernel", guest_dir["triple_fault"]], input="")
    assert "about to triple fault" in p.stdout
    assert p.returncode == 3
    assert "triple fault" in p.stderr


def test_reset_exits_0(guest_dir):
    p = run_hvframe(["run", "-m", "64M", "-l", "com1,stdio", "--kernel", guest_dir["reset"]], input="")
    assert "resetting via 0xcf9" in p.stdout
    assert p.returncode == 0


def test_guest_echoes_input_from_stdin(guest_dir):
    p = run_hvframe(["run", "-m", "64M", "-l", "com1,stdio", "--kernel", guest_dir["echo"]],
                    input="ping 123 through the uart\x04")
    assert p.returncode == 1, p.stderr
    assert "echo ready" in p.stdout
    assert "ping 123 through the uart" in p.stdout
    assert p.stdout.rstrip().endswith("bye")


def test_long_input_is_not_lost(guest_dir):
    """More input than the 16-byte FIFO holds, arriving all at once, comes back whole."""
    text = "".join(f"{i:04d}," for i in range(400))  # 2000 bytes
    p = run_hvframe(["run", "-m", "64M", "-l", "com1,stdio", "--kernel", guest_dir["echo"]],
                    input=text + "\x04")
    assert p.returncode == 1, p.stderr
    assert text in p.stdout


def test_guest_console_over_file_backend(guest_dir, tmp_path):
    out = tmp_path / "console.txt"
    p = run_hvframe(["run", "-m", "64M", "-l", f"com1,file={out}", "--kernel", guest_dir["hello"]])
    assert p.returncode == 1, p.stderr
    assert "hello from pvh guest" in out.read_text()
    assert p.stdout == ""


def test_portloop_guest_exits_reach_a_python_device(guest_dir):
    """Every one of N port writes of a real guest reaches the Python handler."""
    from hvframe.exitbench import hvframe_run
    dt, exits, writes = hvframe_run(guest_dir["portloop"], 5000)
    assert writes == 5000
    assert exits >= 5000


def test_guest_enumerates_the_host_bridge_through_port_cf8():
    p = run_hvframe(["run", "-s", "0,hostbridge"], input="")
    assert p.returncode == 1, p.stderr
    assert "port 0xcf8 pci: yes (00:00.0 8086:1237)" in p.stdout
    p = run_hvframe(["run", "-s", "0,hostbridge,vendor=0x8086,devid=0x29c0"], input="")
    assert "port 0xcf8 pci: yes (00:00.0 8086:29c0)" in p.stdout


@pytest.mark.skipif(not os.path.exists("/sys/module/kvm_pvm"),
                    reason="only KVM's instruction emulator (nested kvm_pvm host) fails on INT3; "
                           "hardware KVM delivers it as an exception")
def test_emulation_failure_is_reported_with_rip_and_instruction_bytes(tmp_path):
    from hvframe.guests.build import build_guest
    guest = build_guest(["tests/guests/emulation_failure.c"], tmp_path / "emu.elf")
    p = run_hvframe(["run", "-m", "64M", "-l", "com1,stdio", "--kernel", str(guest)], input="")
    assert "about to run int3" in p.stdout
    assert p.returncode == 4
    msg = p.stderr.strip()
    assert "KVM internal error on vCPU 0" in msg and "instruction emulation failed" in msg
    assert re.search(r"at RIP 0x[0-9a-f]+", msg)
    assert "instruction bytes cc " in msg  # INT3 is the faulting instruction


def test_ram_above_4g_for_large_memory():
    p = run_hvframe(["run", "-m", "5G"], input="")
    assert p.returncode == 1, p.stderr
    assert "memory: 5120 MiB RAM" in p.stdout
    assert "0000000100000000-000000017fffffff RAM" in p.stdout   # 2 GiB above 4 GiB
    assert "0000000000100000-00000000bfffffff RAM" in p.stdout   # the rest below the PCI hole


def test_bzimage_through_the_32bit_boot_protocol(tmp_path):
    """A guest packed as a bzImage (real setup header, protected-mode payload at 1 MiB) sees
    boot_params through %esi: header copy, command line, e820 and initrd."""
    import subprocess
    from hvframe.guests.build import build_guest
    from test_loader import make_bzimage
    elf = build_guest(["tests/guests/bzimage.c"], tmp_path / "bz.elf")
    flat = tmp_path / "bz.bin"
    subprocess.run(["objcopy", "-O", "binary", "--remove-section=.note.Xen", str(elf), str(flat)], check=True)
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage(flat.read_bytes(), setup_sects=4))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x5a" * 12345)
    p = run_hvframe(["run", "-m", "64M", "-l", "com1,stdio", "--kernel", str(kernel),
                     "--initrd", str(initrd), "--cmdline", "console=ttyS0 root=/dev/vda"], input="")
    assert p.returncode == 1, p.stderr + p.stdout
    assert "start_info none, boot_params at 0x7000" in p.stdout
    assert "header HdrS version 0x20f loader 0xff" in p.stdout
    assert 'cmdline: "console=ttyS0 root=/dev/vda"' in p.stdout
    assert "e820: 6 entries" in p.stdout
    assert "e820 0000000000100000 +0000000003f00000 type 1" in p.stdout
    assert "e820 00000000000e0000 +0000000000010000 type 3" in p.stdout  # ACPI tables
    assert "e820 00000000e0000000 +0000000010000000 type 2" in p.stdout  # ECAM window
    assert "acpi rsdp at 0xe0000" in p.stdout
    assert re.search(r"initrd at 0x[0-9a-f]+ size 12345", p.stdout)


def test_busy_guest_is_kicked_out_of_kvm_run_on_stop(guest_dir):
    """echo with no input polls its UART forever on both vCPUs' watch: the runner's stop must
    kick every vCPU out of KVM_RUN (immediate_exit plus a signal) and end the run."""
    import time
    t0 = time.monotonic()
    p = run_hvframe(["run", "-c", "2", "-m", "64M", "-l", "com1,null", "--kernel", guest_dir["echo"],
                     "--timeout", "1.5"], timeout=30)
    assert p.returncode == 4
    assert "timed out after 1.5 s" in p.stderr
    assert time.monotonic() - t0 < 15


def test_pit_drops_the_ticks_a_guest_could_not_take(guest_dir):
    """A guest that kept interrupts off for 100 tick periods gets one tick when it turns them
    on again, then ticks at the PIT's rate: about 20 in the next 20 periods. KVM's PIT by
    default reinjects every missed tick back to back (about 120 here), and a slow emulated
    Linux, always behind, took no interrupt below the timer's vector for seconds: its AHCI
    disk commands timed out though the HBA had completed them at once."""
    p = run_hvframe(["run", "-m", "64M", "-l", "com1,stdio", "--kernel", guest_dir["pit_ticks"]],
                    input="")
    assert p.returncode == 1, p.stderr
    m = re.search(r"pit: (\d+) ticks in 20 periods after 100 with interrupts off", p.stdout)
    assert m, p.stdout
    assert 5 <= int(m.group(1)) <= 40, p.stdout


def test_fw_cfg_answers_with_its_signature_when_configured():
    p = run_hvframe(["run", "-l", "fwcfg,qemu"], input="")
    assert p.returncode == 1, p.stderr
    assert "port 0x510 fw_cfg: yes" in p.stdout
    assert "port 0x70 cmos: yes" in p.stdout  # the RTC is in every machine
