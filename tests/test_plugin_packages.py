"""Device plugins are separate packages: uninstalling one removes its devices."""
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_hvframe


def pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, timeout=300)


def installed(dist):
    return pip("show", dist).returncode == 0


@pytest.mark.skipif(not installed("hvframe-uart"), reason="hvframe-uart is not installed in this environment")
def test_uninstalling_the_uart_package_removes_its_devices():
    try:
        assert pip("uninstall", "-y", "hvframe-uart").returncode == 0
        p = run_hvframe(["devices"])
        assert p.returncode == 0
        assert "com1" not in p.stdout and "hvframe-uart" not in p.stdout
        assert "acpi-pm" in p.stdout  # the rest is still there
        p = run_hvframe(["run", "-l", "com1,stdio"], input="")
        assert p.returncode == 4
        assert len(p.stderr.strip().splitlines()) == 1
        assert p.stderr.startswith("hvframe: -l com1,stdio: unknown LPC device 'com1'; installed: ")
        assert "com2" not in p.stderr
    finally:
        r = pip("install", "--no-deps", "--no-build-isolation", "-e", os.path.join(REPO, "plugins", "uart"))
        assert r.returncode == 0, r.stderr
    p = run_hvframe(["devices"])
    assert "com1  [lpc]" in p.stdout and "hvframe-uart" in p.stdout
