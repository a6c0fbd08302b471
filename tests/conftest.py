import os
import shutil
import subprocess
import sys

import pytest

from hvframe.kvm import kvm_available

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KVM_MISSING = kvm_available()

requires_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"needs KVM: {KVM_MISSING}")


def hvframe_cmd():
    exe = shutil.which("hvframe")
    return [exe] if exe else [sys.executable, "-m", "hvframe"]


def run_hvframe(args, *, input=None, timeout=120):
    """Run the installed command line as a user would; returns CompletedProcess (text)."""
    return subprocess.run(hvframe_cmd() + list(args), input=input, capture_output=True,
                          timeout=timeout, text=isinstance(input, str) or input is None)


@pytest.fixture(scope="session")
def guest_dir(tmp_path_factory):
    from hvframe.guests.build import build_all
    out = tmp_path_factory.mktemp("guests")
    return build_all(out)


def assert_c_struct_matches(cname, declaration):
    """A C struct of the native core has the size, field offsets and field sizes of its
    construct declaration (the source of truth); padding fields have no C counterpart."""
    from hvframe.core_native import ffi
    from hvframe.layout import fields_of
    assert ffi.sizeof(cname) == declaration.sizeof(), cname
    c_fields = dict(ffi.typeof(cname).fields)
    for name, (off, size) in fields_of(declaration).items():
        assert ffi.offsetof(cname, name) == off, (cname, name)
        assert ffi.sizeof(c_fields[name].type) == size, (cname, name)
