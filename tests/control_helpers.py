"""Running `hvframe run` in the background for the control-plane tests: its run directory
in the test's tmp_path (HVFRAME_RUN_DIR), its console in a file, and a stop on teardown."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import hvframe_cmd


class VmProcess:
    def __init__(self, tmp_path, args, *, name="vmtest", console=True, **popen):
        self.run_dir = tmp_path / "run"
        self.console = tmp_path / f"{name}-console.txt"
        self.name = name
        self.env = dict(os.environ, HVFRAME_RUN_DIR=str(self.run_dir))
        argv = list(args)
        if console:
            argv += ["-l", f"com1,file={self.console}"]
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        self.proc = subprocess.Popen(hvframe_cmd() + ["run", "-v"] + argv + [name],
                                     env=self.env, **popen)
        self.socket = self.run_dir / name / "qmp.sock"

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """Wait until the guest's console shows `text`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = self.console_text()
            if text in out:
                return out
            if self.proc.poll() is not None:
                raise AssertionError(f"hvframe exited {self.proc.returncode} before {text!r}: "
                                     f"{self.proc.stderr.read().decode(errors='replace')}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not on the console: {self.console_text()[-500:]!r}")

    def wait_socket(self, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        while not self.socket.exists():
            assert self.proc.poll() is None, self.proc.stderr.read().decode(errors="replace")
            assert time.monotonic() < end, "no control socket"
            time.sleep(0.02)
        return str(self.socket)

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ticks(self) -> int:
        return self.console_text().count("tick ")

    def finish(self, timeout: float = 30.0) -> tuple[int, str]:
        """Wait for the exit; (status, stderr). The lock-order checker's reports fail it."""
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        assert "lock order violation" not in err, err
        assert "Traceback" not in err, err
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def ctl(self, *args, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(hvframe_cmd() + ["ctl", "--vm", self.name, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
