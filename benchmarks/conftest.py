import pytest

from hvframe.kvm import kvm_available

KVM_MISSING = kvm_available()
requires_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"needs KVM: {KVM_MISSING}")


def pytest_terminal_summary(terminalreporter):
    """Modules that keep a SUMMARY list of table rows (test_vs_qemu.py) get it printed."""
    import sys
    for name in ("test_vs_qemu",):
        rows = getattr(sys.modules.get(name), "SUMMARY", None)
        if rows:
            terminalreporter.write_sep("-", f"{name}: hvframe against QEMU")
            terminalreporter.write_line("| metric | hvframe | QEMU | ratio | aim | met? |")
            terminalreporter.write_line("| --- | --- | --- | --- | --- | --- |")
            for line in rows:
                terminalreporter.write_line(line)
