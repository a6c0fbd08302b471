import os
import shutil
import subprocess
import tempfile
import sys

import pytest

pytest_plugins = ["pytester"]      # tests of the pytest plugin run pytest in a subprocess

# The lock-order checker (hvframe.concurrency) is on for the whole test run, and for the
# hvframe processes tests start; it must be set before hvframe makes its first lock.
os.environ.setdefault("HVFRAME_LOCK_CHECK", "1")

from hvframe import concurrency  # noqa: E402
from hvframe.kvm import kvm_available  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KVM_MISSING = kvm_available()

requires_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"needs KVM: {KVM_MISSING}")


def hvframe_cmd():
    exe = shutil.which("hvframe")
    return [exe] if exe else [sys.executable, "-m", "hvframe"]


def run_hvframe(args, *, input=None, timeout=120):
    """Run the installed command line as a user would; returns CompletedProcess (text).
    The process runs with the lock-order checker on too: a violation it logs fails the test."""
    r = subprocess.run(hvframe_cmd() + list(args), input=input, capture_output=True,
                       timeout=timeout, text=isinstance(input, str) or input is None)
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors="replace")
    assert "lock order violation" not in err, err
    return r


# Every test fails if a thread took locks out of the written order or waited while holding
# one, and if an exception escaped a device handler: hvframe's pytest plugin
# (hvframe.testing.plugin, entry point pytest11) does both.


@pytest.fixture(scope="session")
def guest_dir(tmp_path_factory):
    from hvframe.guests.build import build_all
    out = tmp_path_factory.mktemp("guests")
    return build_all(out)


def rss_kib() -> int:
    """This process's resident memory in KiB (memory-bound tests)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def assert_c_struct_matches(cname, declaration, ffi=None):
    """A C struct of a native module (the core's API by default) has the size, field offsets
    and field sizes of its construct declaration (the source of truth, which the C is
    generated from); padding fields have no C counterpart."""
    from hvframe.layout import fields_of
    if ffi is None:
        from hvframe.core_native import api_ffi as ffi
    assert ffi.sizeof(cname) == declaration.sizeof(), cname
    c_fields = dict(ffi.typeof(cname).fields)
    for name, (off, size) in fields_of(declaration).items():
        assert ffi.offsetof(cname, name) == off, (cname, name)
        assert ffi.sizeof(c_fields[name].type) == size, (cname, name)


@pytest.fixture
def sockdir():
    """A short directory for Unix sockets (paths must stay under 108 bytes, which pytest's
    tmp_path can exceed); removed afterwards."""
    d = tempfile.mkdtemp(prefix="hvft-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)
