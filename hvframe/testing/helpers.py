"""Small helpers device tests share: the command line as a user runs it, a process's
resident memory, and checking a C struct against its construct declaration."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from ..kvm import kvm_available

# Why /dev/kvm cannot be used here (None if it can): tests that run guests skip with it.
KVM_MISSING = kvm_available()
requires_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"needs KVM: {KVM_MISSING}")


def hvframe_cmd() -> list[str]:
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
    from ..layout import fields_of
    if ffi is None:
        from ..core_native import api_ffi as ffi
    assert ffi.sizeof(cname) == declaration.sizeof(), cname
    c_fields = dict(ffi.typeof(cname).fields)
    for name, (off, size) in fields_of(declaration).items():
        assert ffi.offsetof(cname, name) == off, (cname, name)
        assert ffi.sizeof(c_fields[name].type) == size, (cname, name)
