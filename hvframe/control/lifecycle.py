"""The life of one `hvframe run` process: the VM's name and run directory, its QMP monitor,
signals, the terminal, and the machine itself (built again when QMP's system_reset asks).

Signals (bhyve's, plus what a terminal needs):
  SIGTERM, SIGHUP  press the ACPI power button (the guest shuts down if it handles it); a
                   second one, or `grace` seconds without the guest powering off, stops the
                   VM (exit status 4, saying so). SIGHUP left ignored (nohup) stays ignored.
  SIGINT           stops the VM at once (exit status 4, "interrupted").
Whatever ends the run, the terminal is given back as it was found.

Threads, all owned here and stopped in run()'s `finally`: the QMP control thread
(hvframe.control.qmp) and the signal thread, which takes what the signal handlers queue (a
SimpleQueue: safe in a handler) and runs the grace timer, so no handler ever takes a lock
the interrupted main thread might hold. The control thread uses the machine only inside
`using_machine()`, which the main thread waits out before closing the machine.
"""
from __future__ import annotations

import os
import queue
import signal
import sys
import termios
import time
from contextlib import contextmanager

from .. import concurrency
from ..machine import EXIT_ERROR, EXIT_POWEROFF, EXIT_REBOOT, Machine
from ..platform.acpi_pm import AcpiPm
from . import CONSOLE_QUIT
from .qmp import QmpError, QmpServer
from .rundir import RunDir

DEFAULT_GRACE = 30.0
USER_DEADLINE = 10.0       # how long closing waits for a QMP command using the machine


class Lifecycle:
    def __init__(self, cfg, registry, *, name: str, qmp_paths=(), verbose: bool = False,
                 timeout: float | None = None, grace: float | None = DEFAULT_GRACE,
                 notes=(), restore: str | None = None, incoming: str | None = None,
                 vm_setup=None, uuid_given: bool = False):
        from ..runner import build_machine
        self.cfg, self.registry, self.name = cfg, registry, name
        self.uuid_given = uuid_given        # -U: a checkpoint's system UUID does not replace it
        self.qmp_paths = list(qmp_paths)
        self.verbose, self.timeout, self.grace = verbose, timeout, grace
        self.notes = list(notes)
        self._build = build_machine
        self._vm_setup = vm_setup      # a VM made ahead (hvframe.kvm.VmSetup) for the first machine
        self._cond = concurrency.condition(concurrency.lock(concurrency.LEAF, "lifecycle"))
        self._machine: Machine | None = None
        self._users = 0
        self.status = "prelaunch"
        self._want_paused = False
        self._reset_pending = False
        self._host_stop: tuple[int, str, str] | None = None   # code, reason, QMP reason
        self._signals: queue.SimpleQueue = queue.SimpleQueue()
        self._deadline: float | None = None                  # grace timer
        self.qmp: QmpServer | None = None
        self.rundir: RunDir | None = None
        # A checkpoint to start from (--restore FILE), or a migration to receive (--incoming).
        self.restore_path, self.incoming_uri = restore, incoming
        self._snapshot = None          # (file, Reader) until the first machine has it
        self._incoming = None
        self.migration_status = "none"
        self._released_images: list = []   # image locks handed to a migration's destination

    # -- the machine, for the control thread ----------------------------------------------
    @contextmanager
    def using_machine(self):
        """The running machine, kept from being closed meanwhile; QmpError if there is none
        (the VM is starting, being reset or shutting down)."""
        with self._cond:
            m = self._machine
            if m is None:
                raise QmpError(f"VM {self.name} is not running right now (status {self.status})")
            self._users += 1
        try:
            yield m
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    @contextmanager
    def paused_machine(self):
        """The machine with every vCPU out of KVM_RUN (paused for the moment if it was
        running; no STOP/RESUME events for that)."""
        with self.using_machine() as m:
            was_running = not m.pause_gate.closed
            if not m.pause():
                if was_running:
                    m.resume()
                raise QmpError("the vCPUs did not stop in time")
            try:
                yield m
            finally:
                if was_running and not self._want_paused:
                    m.resume()

    def _attach(self, m: Machine) -> None:
        with self._cond:
            self._machine = m
            self.status = "paused" if self._want_paused else "running"

    def _detach(self, status: str) -> None:
        with self._cond:
            self._machine = None
            self.status = status
            self._cond.wait_for(lambda: self._users == 0, USER_DEADLINE)

    # -- what commands and signals ask for --------------------------------------------------
    def emit(self, event: str, data: dict | None = None) -> None:
        if self.qmp is not None:
            self.qmp.emit(event, data)

    def stop(self) -> None:
        with self.using_machine() as m:
            if not m.pause():
                m.resume()
                raise QmpError("the vCPUs did not stop in time")
            changed = not self._want_paused
            self._want_paused = True
            self.status = "paused"
        if changed:
            self.emit("STOP")

    def cont(self) -> None:
        from ..errors import HvError
        with self.using_machine() as m:
            for b in self._released_images:     # after a migration: the images again
                try:
                    b.take_lock()
                except HvError as e:
                    raise QmpError(f"cannot run on: {e}") from None
            self._released_images = []
            changed = self._want_paused
            self._want_paused = False
            m.resume()
            self.status = "running"
        if changed:
            self.emit("RESUME")

    def power_button(self) -> bool:
        """Press the ACPI power button; False if the machine has none (or is not running)."""
        with self._cond:
            m = self._machine
        pm = None if m is None else next((d for d in m.devices if isinstance(d, AcpiPm)), None)
        if pm is None:
            return False
        pm.press_power_button()
        self.emit("POWERDOWN")
        return True

    def reset(self) -> None:
        """QMP system_reset: the machine is closed and built again from the same
        configuration in this process (devices, RAM and vCPUs as at start), keeping the run
        directory, the monitor and its clients; RESET is sent once it runs again."""
        with self.using_machine() as m:
            self._reset_pending = True
            m.request_exit(EXIT_REBOOT, "reset by QMP system_reset")

    def quit(self, reason: str = "stopped by QMP quit", qmp_reason: str = "host-qmp-quit",
             code: int = EXIT_POWEROFF) -> None:
        with self._cond:
            if self._host_stop is None:
                self._host_stop = (code, reason, qmp_reason)
            m = self._machine
        if m is not None:
            m.request_exit(code, reason)

    def migrate(self, uri: str) -> None:
        """QMP migrate: the VM's checkpoint to `file:PATH`, or streamed to another hvframe
        (`unix:PATH`, `tcp:HOST:PORT`, see hvframe.snapshot.migrate). Stop-and-copy, and
        synchronous: the reply comes once it is over. The VM is left paused, as QEMU's
        ("postmigrate"): `cont` runs it on here, `quit` ends it."""
        from ..block.backend import open_backends
        from ..errors import HvError
        from ..snapshot import checkpoint
        from ..snapshot.migrate import DONE, GO, READY, connect, expect
        kind, _, rest = uri.partition(":")
        if kind not in ("file", "unix", "tcp") or not rest or "\0" in rest:
            raise QmpError(f"uri {uri!r}: use file:PATH, unix:PATH or tcp:HOST:PORT")
        with self.using_machine() as m:
            try:
                checkpoint.check_supported(m)
            except HvError as e:
                raise QmpError(str(e)) from None
            was_running = not self._want_paused
            if not m.pause():
                if was_running:
                    m.resume()
                raise QmpError("the vCPUs did not stop in time")
            self._migration_event("setup")
            released = []
            try:
                meta = checkpoint.describe(m, dict(self.cfg.items()), self.name)
                self._migration_event("active")
                if kind == "file":
                    _save_file(m, rest, meta)
                else:
                    sock = connect(uri)
                    try:
                        with sock.makefile("wb") as out:
                            checkpoint.save(m, out, meta)
                        expect(sock, READY, "migrate")
                        for b in open_backends():
                            b.release_lock()
                            released.append(b)
                        sock.sendall(GO)
                        expect(sock, DONE, "migrate")
                    finally:
                        sock.close()
            except (HvError, OSError) as e:
                for b in released:
                    try:
                        b.take_lock()
                    except HvError:
                        pass
                self._migration_event("failed")
                if was_running:
                    m.resume()
                msg = str(e) if isinstance(e, HvError) else (e.strerror or str(e))
                raise QmpError(f"migration failed: {msg}") from None
            self._released_images = released
            self._want_paused = True
            self.status = "postmigrate"
            self._migration_event("completed")
        if was_running:
            self.emit("STOP")

    def _migration_event(self, status: str) -> None:
        self.migration_status = status
        self.emit("MIGRATION", {"status": status})

    # -- signals ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._signals.put(signum)         # the signal thread does the rest

    def _signal_loop(self, thread: concurrency.DeviceThread) -> None:
        terms = 0
        while not thread.stopping:
            timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            concurrency.may_block("signals")
            try:
                signum = self._signals.get(timeout=timeout)
            except queue.Empty:
                self._deadline = None
                self.quit(f"the guest did not power off within {self.grace:g} s of SIGTERM",
                          "host-signal", EXIT_ERROR)
                continue
            if signum is None:
                continue
            if signum == signal.SIGINT:
                self.quit("interrupted (SIGINT)", "host-signal", EXIT_ERROR)
            elif terms == 0:
                terms = 1
                name = signal.Signals(signum).name
                if self.power_button():
                    if self.grace is not None:
                        self._deadline = time.monotonic() + self.grace
                else:
                    self.quit(f"{name}, and the machine has no power button to press",
                              "host-signal", EXIT_ERROR)
            else:
                self.quit(f"stopped by a second {signal.Signals(signum).name}", "host-signal",
                          EXIT_ERROR)

    def _install_signals(self) -> dict:
        old = {}
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            prev = signal.getsignal(sig)
            if sig == signal.SIGHUP and prev == signal.SIG_IGN:
                continue                  # nohup: hang-ups stay ignored
            old[sig] = prev
            signal.signal(sig, self._on_signal)
        return old

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> int:
        from .monitor import monitor_commands, qmp_version
        from ..errors import HvError
        term = _save_terminal()
        old_signals = {}
        sig_thread = None
        try:
            self.rundir = RunDir(self.name)
            self.qmp = QmpServer(monitor_commands(self), qmp_version(), name=f"qmp-{self.name}")
            self.qmp.listen(self.rundir.socket)
            for path in self.qmp_paths:
                self.qmp.listen(path)
            if self.verbose:
                for note in self.notes:
                    print(f"hvframe: {note}", file=sys.stderr)
                print(f"hvframe: VM {self.name}: run directory {self.rundir.path}",
                      file=sys.stderr)
            if self.restore_path:
                from ..snapshot.format import open_snapshot
                self._snapshot = open_snapshot(self.restore_path)   # refused before building
            if self.incoming_uri:
                from ..snapshot.migrate import Incoming
                self._incoming = Incoming(self.incoming_uri)
                self.status = "inmigrate"
            old_signals = self._install_signals()
            sig_thread = concurrency.DeviceThread("lifecycle-signals", self._signal_loop,
                                                  wake=lambda: self._signals.put(None)).start()
            self.qmp.start()
            if self._incoming is not None:
                from ..runner import plan
                # RAM plus what vCPUs and devices can hold (their records are small).
                limit = plan(self.cfg).memory_size + (64 << 20)
                try:
                    self._snapshot = self._incoming.receive(
                        limit, stopping=lambda: self._host_stop is not None)
                except HvError:
                    if self._host_stop is None:
                        raise
            if self._snapshot is None and self._incoming is not None:
                code, reason = self._host_stop[0], self._host_stop[1]     # quit while waiting
            else:
                code, reason = self._run_machines()
        except MemoryError:
            raise HvError("out of memory while building the machine (try a smaller -m)") from None
        finally:
            for sig, prev in old_signals.items():
                signal.signal(sig, prev)
            if sig_thread is not None:
                sig_thread.stop()
            if self.qmp is not None:
                self.qmp.stop()
            if self.rundir is not None:
                self.rundir.close()
            if self._snapshot is not None:
                self._snapshot[0].close()
            if self._incoming is not None:
                self._incoming.close()
            _restore_terminal(term)
        if code not in (0, 1) or self.verbose:
            print(f"hvframe: {reason} (exit {code})", file=sys.stderr)
        return code

    def _run_machines(self) -> tuple[int, str]:
        resetting = False
        while True:
            with self._cond:
                stop = self._host_stop
            if stop is not None:       # quit while the machine was being reset
                return stop[0], stop[1]
            vm_setup, self._vm_setup = self._vm_setup, None
            if self._snapshot is not None and not self.uuid_given:
                from ..runner import adopt_snapshot_uuid
                adopt_snapshot_uuid(self.cfg, self._snapshot[1].meta)
            m, _ = self._build(self.cfg, self.registry, vm_setup=vm_setup)
            try:
                if self._snapshot is not None:       # the first machine starts from it
                    from ..snapshot.checkpoint import restore
                    f, reader = self._snapshot
                    try:
                        restore(m, reader)
                    finally:
                        self._snapshot = None
                        f.close()
                    if self._incoming is not None:
                        self._incoming.done()
                if self._want_paused:
                    m.pause()          # armed: the vCPUs park as soon as they start
                self._attach(m)
                m.start_devices()
                if resetting:      # QEMU sends RESET once the machine is reset
                    self.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
                    resetting = False
                code = m.run(timeout=self.timeout)
                if code is None:
                    code = EXIT_ERROR
                reason = m.exit_reason
            finally:
                self._detach("shutdown")
                m.close()
            with self._cond:
                stop = self._host_stop
                reset, self._reset_pending = self._reset_pending, False
            if stop is not None:
                code, reason = stop[0], stop[1]
                self.emit("SHUTDOWN", {"guest": False, "reason": stop[2]})
                return code, reason
            if reset and code == EXIT_REBOOT:
                resetting = True
                with self._cond:
                    self.status = "prelaunch"
                continue
            self.emit("SHUTDOWN", {"guest": code != EXIT_ERROR, "reason": _shutdown_reason(code, reason)})
            return code, reason


def _save_file(m, path: str, meta: dict) -> None:
    """A checkpoint to `path`, written beside it first: a failed one leaves no part behind."""
    from ..snapshot import checkpoint
    tmp = f"{path}.part{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            checkpoint.save(m, out, meta)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _shutdown_reason(code: int, reason: str) -> str:
    if reason == CONSOLE_QUIT:
        return "host-ui"
    return {0: "guest-reset", 1: "guest-shutdown", 2: "guest-shutdown",
            3: "guest-reset"}.get(code, "host-error")


def _save_terminal():
    try:
        if os.isatty(0):
            return termios.tcgetattr(0)
    except (OSError, termios.error):
        pass
    return None


def _restore_terminal(saved) -> None:
    if saved is not None:
        try:
            termios.tcsetattr(0, termios.TCSANOW, saved)
        except (OSError, termios.error):
            pass
