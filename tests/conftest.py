import os
import sys

import pytest

# The lock-order checker (hvframe.concurrency) is on for the whole test run, and for the
# hvframe processes tests start; it must be set before hvframe makes its first lock.
os.environ.setdefault("HVFRAME_LOCK_CHECK", "1")

# Shared with the plugins' tests (plugins/*/tests), which import them from hvframe.testing.
from hvframe.testing.helpers import (KVM_MISSING, assert_c_struct_matches,  # noqa: E402,F401
                                     hvframe_cmd, requires_kvm, rss_kib, run_hvframe)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Every test fails if a thread took locks out of the written order or waited while holding
# one, and if an exception escaped a device handler: hvframe's pytest plugin
# (hvframe.testing.plugin, entry point pytest11) does both.


@pytest.fixture(scope="session")
def guest_dir(tmp_path_factory):
    from hvframe.guests.build import build_all
    out = tmp_path_factory.mktemp("guests")
    return build_all(out)


# sockdir (a short directory for Unix sockets) comes from hvframe's pytest plugin.


def plugin_test_module(plugin: str, name: str):
    """A module of a plugin's own tests (plugins/PLUGIN/tests), by name, for a test here that
    reuses its rig."""
    import importlib
    where = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "plugins", plugin, "tests")
    if where not in sys.path:
        sys.path.insert(0, where)
    return importlib.import_module(name)
