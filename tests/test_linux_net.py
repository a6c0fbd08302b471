"""Linux's virtio_net driver on a real network: the test kernel (scripts/build-test-kernel.sh,
kernel only) with a static `ip=` (or `ip=dhcp`) and `root=` naming a disk that does not exist
(with `rootwait` the kernel stays up, answering ARP and ICMP by itself), on

- a tap inside a network namespace the test makes (hvframe/testing/netns.py): the namespace pings it;
- passt (Debian `passt`) over its Unix socket: a TCP connection from the host side to a port
  passt forwards is answered by the guest kernel's reset;
- the socket backend between two VMs: the second VM's IPv6 duplicate-address detection sees
  the first VM's answer (both have one MAC, so one link-local address);
- DHCP against dnsmasq in the namespace.

Each runs under QEMU (the reference, proving the fixtures) and under hvframe. (Until the
PIT's interrupt was routed to IOAPIC pin 2, as the MP table says, the kernel never woke from
a timed sleep under hvframe; these tests are what showed it.) The emulated kernel is slow here (about 80 s to its network): replies are
counted, not timed, and each test allows minutes. One VM boots at a time.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import pytest

from conftest import KVM_MISSING, hvframe_cmd, plugin_test_module
from linux_kernel import CMDLINE, built_kernel
from hvframe.testing.netns import DNSMASQ, Netns, netns_missing

KERNEL = built_kernel()
QEMU = shutil.which("qemu-system-x86_64")
PASST = shutil.which("passt")
BOOT_TIMEOUT = 1200         # reset to "IP-Config: Complete": about 100 s under QEMU on an idle host, 6-14 min on a busy one
GUEST_MAC = "52:54:00:12:34:56"
HOST_ADDR, GUEST_ADDR = "10.0.2.1", "10.0.2.15"

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(KVM_MISSING is not None, reason=f"needs KVM: {KVM_MISSING}"),
              pytest.mark.skipif(KERNEL is None, reason="the Linux test kernel is not built: run "
                                 "scripts/build-test-kernel.sh (about 5 minutes, cached)"),
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]



def hvframe_has_virtio_net() -> bool:
    return any(ep.name == "virtio-net"
               for ep in importlib.metadata.entry_points(group="hvframe.devices"))


VMMS = [pytest.param("qemu", marks=[
            pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed "
                               "(Debian: qemu-system-x86)"),
            # The reference run: minutes per boot, and its tap case answered 0 of 10 pings once
            # on 2026-12-01 after passing 10 of 10 before; out of the default run until that
            # is understood.
            pytest.mark.skipif(not os.environ.get("HVFRAME_SLOW_TESTS"),
                               reason="the QEMU reference boots take minutes each; set "
                               "HVFRAME_SLOW_TESTS=1 to run them")]),
        pytest.param("hvframe", marks=[
            pytest.mark.skipif(not hvframe_has_virtio_net(), reason="hvframe has no virtio-net "
                               "device yet (plugins/virtio_net registers none)")])]
# The hvframe tap case is in the default run: one boot (10-14 min to IP-Config on 2026-12-02
# with three other emulated kernels sharing the 2 cores; less on an idle host). Seen then, in
# two boots: 15 of 15 pings answered, then the test passed (8 or more of 10); no drop in the
# device counters. The 0-of-10 of 2026-12-01 (once under QEMU too) did not come back; the same exchange
# without Linux is tests/test_virtio_net.py::test_namespace_pings_a_linux_like_driver_on_a_tap.
# The other hvframe cases need a boot or two each and carry @SLOW.


def static_ip(addr: str, gw: str = HOST_ADDR) -> str:
    return f"ip={addr}::{gw}:255.255.255.0::eth0:off"


def kernel_cmdline(ip: str) -> str:
    # lapic=notscdeadline: see benchmarks/qemu.py (hvframe offers the TSC-deadline timer and
    # the kernel stalls on it here). /dev/vdz never appears: rootwait keeps the kernel up.
    return f"{CMDLINE} acpi=off lapic=notscdeadline {ip} root=/dev/vdz rootwait"


def net_args(vmm: str, backend: str, mac: str = GUEST_MAC) -> list[str]:
    """The virtio-net device in slot 3 on `backend`, in each VMM's syntax:
    tap:NAME, stream:PATH (connect), listen:PATH (socket server)."""
    kind, _, arg = backend.partition(":")
    if vmm == "qemu":
        netdev = {"tap": f"tap,id=n0,ifname={arg},script=no,downscript=no,vhost=off",
                  "stream": f"stream,id=n0,server=off,addr.type=unix,addr.path={arg}",
                  "listen": f"stream,id=n0,server=on,addr.type=unix,addr.path={arg}"}[kind]
        return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={mac},addr=3"]
    spec = {"tap": f"tap={arg}", "stream": f"stream=unix:{arg}",
            "listen": f"socket=listen:{arg}"}[kind]
    return ["-s", f"3,virtio-net,{spec},mac={mac}"]


def vmm_command(vmm: str, console: str, cmdline: str, net: list[str]) -> list[str]:
    if vmm == "qemu":
        return [QEMU, "-M", "pc", "-accel", "kvm", "-nodefaults", "-no-user-config",
                "-display", "none", "-cpu", "kvm64,vendor=GenuineIntel", "-m", "128M",
                "-serial", f"file:{console}", "-kernel", KERNEL, "-append", cmdline,
                "-no-reboot", *net]
    return [*hvframe_cmd(), "run", "-m", "128M", "-s", "0,hostbridge", *net,
            "-l", f"com1,file={console}", "--kernel", KERNEL, "-a", cmdline]


@dataclass
class Guest:
    """A VMM process with its console in a file."""
    proc: subprocess.Popen
    console: str
    stderr: str
    name: str = "guest"

    def text(self) -> str:
        try:
            with open(self.console, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stderr_text(self, tail: int = 2000) -> str:
        try:
            with open(self.stderr, errors="replace") as f:
                return f.read()[-tail:]
        except FileNotFoundError:
            return ""

    def wait_for(self, marker: str, timeout: float, context=None) -> str:
        """Wait for `marker` on the console; fails (with the console's tail, the VMM's
        stderr and `context()` if given) if the VMM exits first or the time runs out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = self.text()
            if marker in out:
                return out
            if self.proc.poll() is not None:
                break
            time.sleep(1)
        more = f"\n{context()}" if context is not None else ""
        pytest.fail(f"{self.name}: no {marker!r} on the console "
                    f"(exit {self.proc.poll()}):\n{self.text()[-3000:]}\n"
                    f"stderr:\n{self.stderr_text()}{more}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def start_guest(vmm: str, tmp_path, name: str, cmdline: str, net: list[str],
                ns: Optional[Netns] = None) -> Guest:
    console, stderr = str(tmp_path / f"{name}.console"), str(tmp_path / f"{name}.stderr")
    argv = vmm_command(vmm, console, cmdline, net)
    with open(stderr, "w") as err:
        if ns is not None:
            proc = ns.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        else:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
    return Guest(proc, console, stderr, name)


# Each boot of the emulated kernel to its network takes minutes here: the default run keeps
# one (the namespace pinging a guest on a tap); the two-VM, passt and DHCP cases (DHCP often
# ends in the guest client's own timeout) run with HVFRAME_SLOW_TESTS=1.
SLOW = pytest.mark.skipif(not os.environ.get("HVFRAME_SLOW_TESTS"),
                          reason="boots the emulated Linux kernel for minutes (two VMs, passt "
                                 "or DHCP); set HVFRAME_SLOW_TESTS=1 to run it")


def ping_replies(ns: Netns, addr: str, count: int = 10) -> int:
    """Pings from the namespace that `addr` answers, out of `count`, after a warm-up that
    waits (up to 2 minutes) for a first answer: the emulated kernel answers ARP slowly, and
    pings sent meanwhile may be lost with the unresolved neighbour's queue."""
    end = time.monotonic() + 120
    while ns.ping(addr, count=1, wait=10) == 0 and time.monotonic() < end:
        pass
    return ns.ping(addr, count=count, interval=1.0, wait=30)


@pytest.fixture
def guests():
    """Guests started by a test; all killed at its end, whatever happened."""
    started: list[Guest] = []
    yield started
    for g in started:
        g.stop()


@pytest.mark.parametrize("vmm", VMMS)
def test_namespace_pings_linux_guest_on_tap(vmm, tmp_path, guests):
    """Static ip= on a tap in a namespace: the driver brings the link up, IP-Config completes
    with the given address, and the namespace's pings are answered by the guest kernel."""
    with Netns() as ns:
        ns.add_tap("tap0", f"{HOST_ADDR}/24")
        with ns.capture("tap0") as frames:
            g = start_guest(vmm, tmp_path, "tap", kernel_cmdline(static_ip(GUEST_ADDR)),
                            net_args(vmm, "tap:tap0"), ns)
            guests.append(g)
            # The line after "IP-Config: Complete:", whole: the console may be read between
            # the two lines (a CI run failed that way once).
            out = g.wait_for(f"mask=255.255.255.0, gw={HOST_ADDR}", BOOT_TIMEOUT,
                             lambda: f"the frames on tap0:\n{frames.text()}")
            assert "IP-Config: Complete:" in out
            assert f"addr={GUEST_ADDR}, mask=255.255.255.0, gw={HOST_ADDR}" in out
            assert f"device=eth0, hwaddr={GUEST_MAC}" in out
            replies = ping_replies(ns, GUEST_ADDR)
            assert replies >= 8, (
                f"{replies} of 10 pings answered; the namespace's side:\n"
                f"{ns.ip('-s', 'link', 'show', 'tap0')}{ns.ip('neigh')}\n"
                f"the frames on tap0 (out: from the namespace):\n{frames.text()}\n"
                f"the console's end:\n{g.text()[-2000:]}\nthe VMM's stderr:\n{g.stderr_text()}")


@SLOW
def test_linux_guest_with_two_queue_pairs_on_a_multi_queue_tap(tmp_path, guests):
    """queues=2 on a multi-queue tap: Linux's driver takes MQ, so its control queue is the
    fifth (after both pairs) and it sets the pairs it uses there; a control command left
    unanswered would hang its probe (it waits for the ack), so the pings prove both."""
    with Netns() as ns:
        ns.add_tap("tap0", f"{HOST_ADDR}/24", multi_queue=True)
        g = start_guest("hvframe", tmp_path, "mq", kernel_cmdline(static_ip(GUEST_ADDR)),
                        ["-s", f"3,virtio-net,tap=tap0,mac={GUEST_MAC},queues=2"], ns)
        guests.append(g)
        out = g.wait_for(f"mask=255.255.255.0, gw={HOST_ADDR}", BOOT_TIMEOUT)
        assert f"device=eth0, hwaddr={GUEST_MAC}" in out
        replies = ping_replies(ns, GUEST_ADDR)
        assert replies >= 8, (f"{replies} of 10 pings answered; the console's end:\n"
                              f"{g.text()[-2000:]}\nthe VMM's stderr:\n{g.stderr_text()}")


# ---- two VMs on the socket backend -----------------------------------------------------------

LINK_LOCAL = "fe80::5054:ff:fe12:3456"
# What the second VM's kernel says when a Neighbor Advertisement for its own link-local address
# arrives: while the address is still tentative (its duplicate-address probe running), or
# after (the emulated kernels are slow enough for the answer to come after the probe's 1 s).
NA_SEEN = (f"IPv6 duplicate address {LINK_LOCAL} used by {GUEST_MAC} detected!",
           f"ICMPv6: NA: {GUEST_MAC} advertised our address {LINK_LOCAL} on eth0!")


@SLOW
@pytest.mark.parametrize("vmm", VMMS)
def test_two_linux_guests_on_one_socket_answer_each_other(vmm, tmp_path, guests):
    """Two VMs on the socket backend, no host network at all. Both have one MAC, hence one
    IPv6 link-local address. The first (listening) VM is up before the second boots; the
    second's duplicate-address probe (a Neighbor Solicitation) reaches the first, whose
    kernel answers with a Neighbor Advertisement (Linux sends none unasked), and the second
    reports it: a frame each way, each handled by a guest kernel."""
    sock_dir = tempfile.mkdtemp(prefix="hvft-", dir="/tmp")
    path = os.path.join(sock_dir, "vms.sock")
    try:
        if vmm == "hvframe":
            stream_tests = plugin_test_module("virtio_net", "test_virtio_net_stream")
            device_attaches_late_peers = stream_tests.device_attaches_late_peers
            if not device_attaches_late_peers(sock_dir):
                pytest.skip("hvframe's virtio-net does not bring its link up for a first peer "
                            "that connects after it started (its link watcher starts only "
                            "after a link loss)")
        # hvframe's listening socket has no carrier until a peer connects, and IP-Config
        # would wait 120 s for one (seen 2026-12-02): the listener does not wait.
        first = start_guest(vmm, tmp_path, "listener",
                            kernel_cmdline(static_ip("10.0.3.1", "10.0.3.254"))
                            + " carrier_timeout=2", net_args(vmm, f"listen:{path}"))
        guests.append(first)
        first.wait_for("IP-Config: Complete:", BOOT_TIMEOUT)
        assert os.path.exists(path)
        second = start_guest(vmm, tmp_path, "connector",
                             kernel_cmdline(static_ip("10.0.3.2", "10.0.3.254")),
                             net_args(vmm, f"stream:{path}"))
        guests.append(second)
        second.wait_for("IP-Config: Complete:", BOOT_TIMEOUT)
        end = time.monotonic() + 300
        while not any(m in second.text() for m in NA_SEEN):
            assert time.monotonic() < end and second.proc.poll() is None, \
                f"no Neighbor Advertisement from the first VM:\n{second.text()[-2000:]}"
            time.sleep(2)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


# ---- passt ---------------------------------------------------------------------------------

PASST_PORT = 5555          # forwarded by passt from its namespace to the guest's closed port


def pcap_frames(path: str) -> list[bytes]:
    """The frames of a pcap file (classic format, as passt --pcap writes it)."""
    with open(path, "rb") as f:
        data = f.read()
    frames, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        frames.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return frames


def tcp_resets_from(frames: list[bytes], addr: str, port: int) -> int:
    """TCP segments with RST from addr:port (IPv4 over Ethernet)."""
    src = socket.inet_aton(addr)
    n = 0
    for f in frames:
        if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6 or f[26:30] != src:
            continue
        tcp = f[14 + (f[14] & 0x0F) * 4:]
        if len(tcp) >= 14 and struct.unpack("!H", tcp[:2])[0] == port and tcp[13] & 0x04:
            n += 1
    return n


class Passt:
    """passt in a namespace of its own (an uplink with a default route is all it needs to see),
    its socket in a world-writable directory (it drops to nobody before binding), forwarding
    TCP port PASST_PORT of that namespace to the guest, frames logged to a pcap file. Not with
    --debug: Debian 12's passt then dies of SIGSEGV as it sends its first SYN to the guest
    (seen 2026-12-01; without --debug the same exchange works)."""

    def __init__(self, ns: Netns, guest_ip: Optional[str]):
        self.dir = tempfile.mkdtemp(prefix="hvft-passt-", dir="/tmp")
        os.chmod(self.dir, 0o1777)
        self.socket = os.path.join(self.dir, "passt.sock")
        self.pcap = os.path.join(self.dir, "frames.pcap")
        self.log = os.path.join(self.dir, "passt.log")
        ns.add_uplink("up0", "10.0.2.2/24", gateway="10.0.2.1")
        addr = ["--address", guest_ip, "--netmask", "24"] if guest_ip else []
        with open(self.log, "w") as log:
            self.proc = ns.popen([PASST, "--foreground", "--stderr", "--one-off",
                                  "--socket", self.socket, "--pcap", self.pcap, *addr,
                                  "--gateway", "10.0.2.2", "--tcp-ports", str(PASST_PORT)],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        end = time.monotonic() + 20
        # Its socket file appears at bind(), before listen(); this line comes after both.
        while "You can now start" not in self.text():
            assert self.proc.poll() is None and time.monotonic() < end, self.text()
            time.sleep(0.1)

    def text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def cleanup(self, keep_in: Optional[str] = None) -> None:
        """Remove its directory; its log and capture are copied to keep_in first."""
        if keep_in:
            for name in ("passt.log", "frames.pcap"):
                if os.path.exists(os.path.join(self.dir, name)):
                    shutil.copy(os.path.join(self.dir, name), keep_in)
        shutil.rmtree(self.dir, ignore_errors=True)


@SLOW
@pytest.mark.skipif(PASST is None, reason="passt is not installed (Debian: passt)")
@pytest.mark.parametrize("vmm", VMMS)
def test_host_connection_through_passt_is_reset_by_the_guest_kernel(vmm, tmp_path, guests):
    """passt forwards a TCP port to the guest: a connection to it from passt's side reaches
    the guest kernel as a SYN to a closed port, and the kernel's RST comes back through
    passt (seen in passt's capture, and as the host connection being closed)."""
    with Netns() as ns:
        passt = Passt(ns, GUEST_ADDR)
        try:
            g = start_guest(vmm, tmp_path, "passt",
                            kernel_cmdline(static_ip(GUEST_ADDR, "10.0.2.2")),
                            net_args(vmm, f"stream:{passt.socket}"))
            guests.append(g)
            g.wait_for("IP-Config: Complete:", BOOT_TIMEOUT)
            outcomes, resets = [], 0
            for attempt in range(5):
                c = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
                c.settimeout(60)
                try:
                    c.connect(("127.0.0.1", PASST_PORT))
                    outcomes.append("closed" if c.recv(1) == b"" else "data")
                except OSError as e:
                    outcomes.append(type(e).__name__)
                finally:
                    c.close()
                resets = tcp_resets_from(pcap_frames(passt.pcap), GUEST_ADDR, PASST_PORT)
                if resets:
                    break
                time.sleep(5)
            assert resets >= 1, (f"no RST from the guest in passt's capture; connections: "
                                 f"{outcomes}; passt {'running' if passt.proc.poll() is None else 'exited ' + str(passt.proc.poll())}"
                                 f"\n{passt.text()[-3000:]}")
            assert outcomes[-1] in ("closed", "ConnectionResetError"), outcomes
        finally:
            passt.cleanup(str(tmp_path))


# ---- DHCP ----------------------------------------------------------------------------------

DHCP_DONE, DHCP_FAILED = "IP-Config: Complete:", "IP-Config: Auto-configuration of network failed"


def wait_for_either(g: Guest, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end and g.proc.poll() is None:
        out = g.text()
        if DHCP_DONE in out or DHCP_FAILED in out:
            return out
        time.sleep(2)
    return g.wait_for(DHCP_DONE, 1)          # fails with the console


@SLOW
@pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq is not installed (Debian: dnsmasq-base)")
@pytest.mark.parametrize("vmm", VMMS)
def test_linux_guest_dhcp_from_dnsmasq(vmm, tmp_path, guests):
    """ip=dhcp against dnsmasq in the namespace: the exchange must reach dnsmasq and be
    answered (DISCOVER and OFFER for the guest's MAC in its log); when the guest kernel's
    client finishes in time, it has the leased address and answers pings there. The emulated
    kernel is often too slow for its own DHCP timeouts: that outcome is a skip, saying so."""
    with Netns() as ns:
        ns.add_tap("tap0", f"{HOST_ADDR}/24")
        log = str(tmp_path / "dnsmasq.log")
        ns.dnsmasq("tap0", "10.0.2.50", "10.0.2.59", log)
        g = start_guest(vmm, tmp_path, "dhcp", kernel_cmdline("ip=dhcp"),
                        net_args(vmm, "tap:tap0"), ns)
        guests.append(g)
        out = wait_for_either(g, BOOT_TIMEOUT + 300)
        with open(log, errors="replace") as f:
            dhcp_log = f.read()
        assert f"DHCPDISCOVER(tap0) {GUEST_MAC}" in dhcp_log, dhcp_log[-2000:]
        assert re.search(rf"DHCPOFFER\(tap0\) 10\.0\.2\.5\d {GUEST_MAC}", dhcp_log), dhcp_log[-2000:]
        if DHCP_FAILED in out:
            pytest.skip("dnsmasq offered a lease but the guest kernel's DHCP client timed out "
                        "first (the emulated kernel is too slow here)")
        m = re.search(r"IP-Config: Got DHCP answer from [\d.]+, my address is (10\.0\.2\.5\d)", out)
        assert m, out[-2000:]
        assert re.search(rf"DHCPACK\(tap0\) {re.escape(m.group(1))} {GUEST_MAC}", dhcp_log)
        cap = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        cap.bind(("tap0", 0))
        cap.setblocking(False)
        replies = ping_replies(ns, m.group(1))
        from_guest = []
        while True:
            try:
                f = cap.recv(65536)
            except BlockingIOError:
                break
            if f[6:12] == bytes.fromhex(GUEST_MAC.replace(":", "")):
                from_guest.append(f[12:14].hex() + (f"/{f[23]}" if f[12:14] == b"\x08\x00" else ""))
        cap.close()
        assert replies >= 8, (f"{replies} of 10 pings to the leased address answered; frames "
                              f"from the guest meanwhile (ethertype/proto): {from_guest}")


@SLOW
@pytest.mark.skipif(PASST is None, reason="passt is not installed (Debian: passt)")
@pytest.mark.parametrize("vmm", VMMS)
def test_linux_guest_dhcp_from_passt(vmm, tmp_path, guests):
    """ip=dhcp through passt, whose DHCP server hands out the address of its namespace's
    uplink (10.0.2.2 here). The request must reach passt (its capture has the guest's
    DISCOVER and passt's answer); a completed lease is checked by the guest kernel's reset
    through a forwarded port. A client timeout of the slow emulated kernel is a skip."""
    with Netns() as ns:
        passt = Passt(ns, None)
        try:
            g = start_guest(vmm, tmp_path, "passt-dhcp", kernel_cmdline("ip=dhcp"),
                            net_args(vmm, f"stream:{passt.socket}"))
            guests.append(g)
            out = wait_for_either(g, BOOT_TIMEOUT + 300)
            frames = pcap_frames(passt.pcap)
            guest_mac = bytes(int(x, 16) for x in GUEST_MAC.split(":"))
            dhcp = [f for f in frames if len(f) > 42 and f[12:14] == b"\x08\x00" and f[23] == 17
                    and f[34:38] in (b"\x00\x44\x00\x43", b"\x00\x43\x00\x44")]
            assert any(f[6:12] == guest_mac and f[34:36] == b"\x00\x44" for f in dhcp), \
                "no DHCP request from the guest in passt's capture"
            assert any(f[0:6] == guest_mac and f[34:36] == b"\x00\x43" for f in dhcp), \
                f"passt did not answer the guest's DHCP request\n{passt.text()[-2000:]}"
            if DHCP_FAILED in out:
                pytest.skip("passt answered the DHCP request but the guest kernel's DHCP client "
                            "timed out first (the emulated kernel is too slow here)")
            assert "my address is 10.0.2.2" in out, out[-2000:]
        finally:
            passt.cleanup(str(tmp_path))


# ---- the test as the guest's peer on a socket ----------------------------------------------

TEST_MAC = "02:00:00:00:00:77"


@SLOW
@pytest.mark.parametrize("vmm", VMMS)
def test_socket_peer_pings_linux_guest_frame_by_frame(vmm, tmp_path, guests):
    """The VM connects to a socket the test listens on (hvframe: socket=connect:, QEMU:
    -netdev stream); the test speaks the 4-byte-length framing itself: it asks for the guest's
    MAC by ARP, answers the guest's own ARP requests for it as a real peer would, sends ICMP
    echo requests and counts the guest kernel's replies. (On 2026-12-01, on a host where the
    kernel ran eight times slower, QEMU's guest answered 1 of 10 and this was skipped; an
    unanswered neighbour goes to PROBE after 5 s and then FAILED, which holds the replies
    back. On 2026-12-03 both VMMs passed, and QEMU's did without the ARP answers too.)"""
    from hvframe.testing.netframes import (StreamReader, arp_reply, arp_request, be32_frame,
                                           icmp_echo, mac, parse_arp_reply, parse_arp_request,
                                           parse_icmp_echo_reply, write_all)
    sock_dir = tempfile.mkdtemp(prefix="hvft-", dir="/tmp")
    path = os.path.join(sock_dir, "peer.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        g = start_guest(vmm, tmp_path, "socket-peer", kernel_cmdline(static_ip(GUEST_ADDR)),
                        net_args(vmm, f"stream:{path}"))
        guests.append(g)
        server.settimeout(60)
        conn, _ = server.accept()
        conn.setblocking(False)
        fd = conn.fileno()
        g.wait_for("IP-Config: Complete:", BOOT_TIMEOUT)
        reader = StreamReader(fd)
        ours = mac(TEST_MAC)

        def frames_until(deadline):
            while time.monotonic() < deadline:
                f = reader.read_frame(max(0.0, deadline - time.monotonic()))
                if f is None:
                    return
                asked = parse_arp_request(f)
                if asked and asked.target_ip == socket.inet_aton(HOST_ADDR):
                    write_all(fd, be32_frame(arp_reply(ours, HOST_ADDR, asked.sender_mac,
                                                       asked.sender_ip)))
                    continue
                yield f

        guest_mac = None
        for _ in range(10):
            write_all(fd, be32_frame(arp_request(ours, HOST_ADDR, GUEST_ADDR)))
            for f in frames_until(time.monotonic() + 10):
                reply = parse_arp_reply(f)
                if reply and reply.sender_ip == socket.inet_aton(GUEST_ADDR):
                    guest_mac = reply.sender_mac
                    break
            if guest_mac:
                break
        assert guest_mac == mac(GUEST_MAC), "no ARP reply from the guest"
        answered = set()
        payload = b"hvframe-socket-peer"
        for seq in range(10):
            write_all(fd, be32_frame(icmp_echo(guest_mac, ours, HOST_ADDR, GUEST_ADDR, 0x4856,
                                               seq, payload)))
            for f in frames_until(time.monotonic() + 1.0):
                r = parse_icmp_echo_reply(f)
                if r and r[0] == socket.inet_aton(GUEST_ADDR) and r[1] == 0x4856 and r[3] == payload:
                    answered.add(r[2])
        for f in frames_until(time.monotonic() + 20):
            r = parse_icmp_echo_reply(f)
            if r and r[1] == 0x4856 and r[3] == payload:
                answered.add(r[2])
            if len(answered) == 10:
                break
        assert len(answered) >= 8, f"{len(answered)} of 10 echo requests answered"
        conn.close()
    finally:
        server.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
