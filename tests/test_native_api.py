"""The native core knows no device; plugins build their own native modules against its API.

- hvframe/core_native has no file, symbol or word naming a device;
- a plugin outside the core (tests/native_plugin, built here the way a third party's build
  script would) compiles against hvframe_native.h and serves a virtqueue through the core;
- a plugin package's wheel carries its native module, and uninstalling the package removes it.
"""
import glob
import os
import re
import subprocess
import sys
import zipfile

import pytest

from hvframe.core_native import api, api_ffi, bind, lib as core
from hvframe.memory import GuestMemory
from hvframe.virtio.harness import DriverQueue
from hvframe.virtio.native import CYCLE_IDLE, CYCLE_PYTHON, queue_state
from hvframe.virtio.virtqueue import VirtQueue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = os.path.join(ROOT, "hvframe", "core_native")
# What the core must not name: the devices hvframe ships and their protocols.
DEVICE_WORDS = re.compile(r"(vblk|virtio_?blk|ahci|ncq|ata|atapi|uart|16550|serial|net|"
                          r"passthru|vfio|nvme|rtc|i8042|fw_?cfg)", re.I)


def test_the_core_has_no_file_or_symbol_named_after_a_device():
    files = [os.path.relpath(p, CORE) for p in glob.glob(os.path.join(CORE, "**", "*"),
                                                          recursive=True)]
    assert not [f for f in files if DEVICE_WORDS.search(os.path.basename(f).split(".")[0])]
    for name in dir(core) + dir(api):
        assert not any(DEVICE_WORDS.fullmatch(w) for w in name.lower().split("_")), name
    for path in glob.glob(os.path.join(CORE, "**", "*.[ch]"), recursive=True):
        with open(path) as f:
            words = re.findall(r"[A-Za-z0-9]+", f.read())
        assert not [w for w in words if DEVICE_WORDS.fullmatch(w)], path


# -- a plugin outside the core ------------------------------------------------------------

@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    """The echo test plugin's native module, compiled against the core's API."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "native_plugin"))
    try:
        import build
        out = tmp_path_factory.mktemp("echo")
        build.build(str(out))
        sys.path.insert(0, str(out))
        import hvtest_echo_native as mod
    finally:
        sys.path.remove(os.path.join(ROOT, "tests", "native_plugin"))
    bind(mod.lib.echo_bind)
    return mod


RAM = 1 << 20
QBASE, DATA = 0x1000, 0x40000


def rig(echo, size=16, event_idx=False):
    mem = GuestMemory(RAM)
    drv = DriverQueue(mem, 0, size, QBASE, event_idx=event_idx)
    vq = VirtQueue(mem, size, drv.desc, drv.avail, drv.used, event_idx=event_idx, indirect=True)
    stats = echo.ffi.new("struct echo_stats *")
    return mem, drv, vq, stats


def post(mem, drv, payload: bytes, room: int, at: int, **kw) -> int:
    mem.write(at, payload)
    bufs = [(at, len(payload), False)] if payload else []
    bufs.append((at + 0x1000, room, True))
    return drv.add(bufs, **kw)


def test_a_plugin_built_outside_the_core_serves_a_queue(echo):
    mem, drv, vq, stats = rig(echo)
    messages = [bytes(range(i, i + 10 + i)) for i in range(5)]
    heads = [post(mem, drv, m, 64, DATA + i * 0x2000) for i, m in enumerate(messages)]
    # the last chain goes through an indirect table
    heads.append(post(mem, drv, b"indirect!", 64, DATA + 0x10000, indirect_at=DATA + 0x18000))
    drv.publish()
    served = queue_state(vq).serve(echo.ffi.addressof(echo.lib, "echo_serve_chain"), stats, 64)
    assert served == 6 and queue_state(vq).stop == "empty"
    used = dict(drv.reap())
    for i, m in enumerate(messages):
        assert used[heads[i]] == len(m)
        assert mem.read(DATA + i * 0x2000 + 0x1000, len(m)) == m[::-1]
    assert mem.read(DATA + 0x11000, 9) == b"!tceridni"
    assert (stats.chains, stats.bytes) == (6, sum(map(len, messages)) + 9)
    assert vq.last_avail_idx == vq.used_idx == 6     # Python's view carries on from C's


def test_a_declined_chain_is_left_to_python_untouched(echo):
    mem, drv, vq, stats = rig(echo)
    post(mem, drv, b"abc", 16, DATA)
    declined = post(mem, drv, b"", 16, DATA + 0x2000)      # nothing readable: declined
    drv.publish()
    fn = echo.ffi.addressof(echo.lib, "echo_serve_chain")
    assert queue_state(vq).serve(fn, stats, 64) == 1
    assert queue_state(vq).stop == "declined"
    chain = vq.pop()                                    # the Python path gets it next
    assert chain is not None and chain.head == declined
    vq.push(chain.head, 0)
    assert [h for h, _ in drv.reap()][-1] == declined


def test_the_service_cycle_runs_a_plugins_server(echo):
    mem, drv, vq, stats = rig(echo, event_idx=True)
    fn = echo.ffi.addressof(echo.lib, "echo_serve_chain")
    for i in range(40):                                  # wraps a 16-entry ring
        post(mem, drv, bytes([i]) * 3, 8, DATA + (i % 8) * 0x2000)
        drv.publish()
        assert queue_state(vq).cycle(fn, stats, api_ffi.NULL, poll_ns=0) in (CYCLE_IDLE, 2)
        assert [w for _, w in drv.reap()] == [3]
    assert stats.chains == 40
    post(mem, drv, b"", 8, DATA)
    drv.publish()
    assert queue_state(vq).cycle(fn, stats, api_ffi.NULL, poll_ns=0) == CYCLE_PYTHON


def test_the_service_cycle_runs_a_plugins_batch_server(echo):
    mem, drv, vq, stats = rig(echo, event_idx=True)
    fn = echo.ffi.addressof(echo.lib, "echo_serve_batch")
    nq = queue_state(vq)
    for round_ in range(8):                              # 64 chains: wraps the 16-entry ring
        msgs = [bytes([round_, i]) * (i + 1) for i in range(8)]
        for i, m in enumerate(msgs):
            post(mem, drv, m, 32, DATA + i * 0x2000)
        drv.publish()
        assert nq.cycle_batch(fn, stats, api_ffi.NULL, poll_ns=0) in (CYCLE_IDLE, 2)
        assert nq.served == 8
        assert [w for _, w in drv.reap()] == [len(m) for m in msgs]
        for i, m in enumerate(msgs):
            assert mem.read(DATA + i * 0x2000 + 0x1000, len(m)) == m[::-1]
    assert stats.chains == 64 and vq.last_avail_idx == vq.used_idx == 64
    # a limit, then a declined chain: left available for Python, as with a chain server
    for i in range(3):
        post(mem, drv, b"abc", 8, DATA + i * 0x2000)
    declined = post(mem, drv, b"", 8, DATA + 0x8000)
    drv.publish()
    assert nq.serve_batch(fn, stats, 2) == 2 and nq.stop == "max"
    assert nq.cycle_batch(fn, stats, api_ffi.NULL, poll_ns=0) == CYCLE_PYTHON
    assert nq.served == 1 and nq.stop == "declined"
    assert vq.pop().head == declined


@pytest.mark.parametrize("lie", [1, 2, 3])
def test_the_core_does_not_take_a_batch_servers_word(echo, lie):
    """A batch server claiming more chains than it was allowed, stopping with no stop
    code, or saying it stopped at the limit short of it (the cycle would call it again for
    ever), is a device bug: the core says "state" (the Python path takes the queue) and
    returns."""
    mem, drv, vq, stats = rig(echo)
    post(mem, drv, b"abc", 8, DATA)
    drv.publish()
    stats.lie = lie
    fn = echo.ffi.addressof(echo.lib, "echo_serve_batch")
    nq = queue_state(vq)
    assert nq.serve_batch(fn, stats, 4) == 0 and nq.stop == "state"
    assert nq.cycle_batch(fn, stats, api_ffi.NULL, poll_ns=0) == CYCLE_PYTHON
    assert nq.served == 0 and nq.stop == "state"
    assert nq.cycle_batch(api_ffi.NULL, stats, api_ffi.NULL, poll_ns=0) == CYCLE_PYTHON
    assert nq.stop == "state"
    assert vq.pop() is not None                         # still there for the Python path


def test_a_plugin_drives_the_ring_through_the_api_table(echo):
    mem, drv, vq, stats = rig(echo)
    for i in range(3):
        post(mem, drv, b"xyz", 8, DATA + i * 0x2000)
    drv.publish()
    nq = queue_state(vq)
    assert nq.call(echo.lib.echo_drain, stats) == 3
    assert [w for _, w in drv.reap()] == [3, 3, 3]


def test_an_invalid_chain_stops_the_plugin_and_python_raises(echo):
    from hvframe.virtio import VirtqueueError
    mem, drv, vq, stats = rig(echo)
    post(mem, drv, b"ok", 8, DATA)
    mem.write(drv.avail + 4 + 2, (99).to_bytes(2, "little"))   # a head past the table
    drv.avail_idx += 1
    drv.publish()
    fn = echo.ffi.addressof(echo.lib, "echo_serve_chain")
    assert queue_state(vq).serve(fn, stats, 64) == 1 and queue_state(vq).stop == "invalid"
    with pytest.raises(VirtqueueError):
        vq.pop()


def test_a_module_built_for_another_api_version_is_refused(echo):
    other = api_ffi.new("struct hv_api *", {"version": api.HV_API_VERSION + 1,
                                             "size": api_ffi.sizeof("struct hv_api")})
    assert echo.lib.echo_bind(other) == -1
    short = api_ffi.new("struct hv_api *", {"version": api.HV_API_VERSION, "size": 8})
    assert echo.lib.echo_bind(short) == -1
    with pytest.raises(ImportError, match="another hvframe native API"):
        bind(lambda table: -1)
    bind(echo.lib.echo_bind)


# -- packaging ------------------------------------------------------------------------------

@pytest.mark.parametrize("package, dist, module", [
    ("virtio_blk", "hvframe-virtio-blk", "hvframe_virtio_blk"),
    ("ahci", "hvframe-ahci", "hvframe_ahci"),
])
def test_uninstalling_a_plugin_removes_its_native_module(tmp_path, package, dist, module):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels),
                    os.path.join(ROOT, "plugins", package)], check=True)
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert [n for n in names if n.startswith(f"{module}/_native") and n.endswith(".so")]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    pip = [sys.executable, "-m", "pip", "--python", py] if _pip_has_python_option() else None
    if pip is None:
        pytest.skip("this pip has no --python option to manage another environment")
    subprocess.run(pip + ["install", "-q", "--no-deps", str(wheel)], check=True)
    installed = glob.glob(os.path.join(site, module, "_native*.so"))
    assert installed
    subprocess.run(pip + ["uninstall", "-q", "-y", dist], check=True)
    assert not any(os.path.exists(p) for p in installed)
    assert not os.path.exists(os.path.join(site, module))


def _pip_has_python_option() -> bool:
    out = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                         text=True).stdout.split()
    major, minor = (int(x) for x in out[1].split(".")[:2])
    return (major, minor) >= (22, 3)
