"""hvframe's threading and locking model: read this before writing a device that has threads.

Threads, and who owns them
--------------------------
* **vCPU threads**, one per vCPU (owned by the Machine). They run device register handlers
  (``read``/``write`` on a bus range) for the exits KVM hands to user space. A handler must
  return promptly: it never waits for another thread's progress (see rule 2).
* **Device threads**, each a ``DeviceThread`` owned by the device that started it: virtio
  queue workers (one per queue), the block layer's worker pool (per disk), backend readers
  and writers (UART sockets, the capacity watcher). The owner stops and joins them in its
  ``close()``, which ``Machine.close()`` calls; a thread that dies of an exception is logged
  and its owner told (``on_error``), never a silently dead queue.
* **Plugins' native threads**, for work that never touches Python: virtio-blk's read
  partner (hvframe_virtio_blk/vblk.c), one per queue that batches reads, takes half of a
  large batch from the queue's worker. It is owned by the queue's batch state and stopped
  and joined when that is freed; it takes no lock, and the join waits for no work (the
  worker waits for every half it hands over before it lets go of the batch state).
* **The coalesced-drain thread** (owned by the Machine; started by ``run()`` when a device
  asked for ``coalesce_writes()``, stopped and joined by ``close()``) hands on guest writes
  KVM buffered when no vCPU exit has done so for a couple of milliseconds.
* **The main thread** builds the machine, waits for it and closes it.
* **The VM set-up thread** (hvframe.kvm.VmSetup, owned by `hvframe run`'s main()): makes the
  VM with KVM's ioctls while the main thread loads plugins, then ends; the first machine
  joins it when it takes the VM, and main() joins it (closing a VM nobody took) on the way
  out. It takes no lock but the new VM's own.
* **Control-plane threads** (hvframe.control), owned by the run's Lifecycle: the QMP control
  thread (commands, events) and the signal thread (signals, the SIGTERM grace timer). A
  pause parks vCPU threads at the machine's PauseGate, outside any device code and lock.
  A checkpoint or migration (hvframe.snapshot) runs on the QMP control thread with the
  vCPUs paused and no lock held: each device's quiesce() waits for its own threads there
  (the virtio transport claims each queue lock in turn, as a reset does), then the state
  is read under each device's own locks, one device at a time.

Locks, outermost first
----------------------
Every lock a device or the framework shares between threads is made with ``lock(rank,
name)``. A thread may take a lock only while every lock it already holds has a lower rank;
two locks of one rank (two devices' register locks, say) are never held together. Re-taking
a re-entrant lock the thread already holds is fine.

=============  ==============================================================================
rank           what it guards
=============  ==============================================================================
RESET          a device reset in progress (it waits for the device's queues: outermost)
QUEUE          a virtqueue being served (its worker's, for a batch or across a native sleep)
PCI_BUS        PCI configuration accesses and the BAR remapping they cause
DEVICE_OUTER   a device lock held around its own register lock (the 16550's transmit order)
DEVICE         a device's register and state lock (virtio transport, AHCI HBA, 16550, ...)
DEVICE_INNER   a part of one device taken under its DEVICE lock (virtio's ISR)
PCI_FUNCTION   one PCI function's INTx pin and the status bit that mirrors it
MSI            MSI and MSI-X capability state
MACHINE        interrupt sources and irqfds, the dispatch buses' range tables
KVM            the VM's own state: GSI routes, interrupt line levels (ioctls only)
               and a coalesced range's (un)registration (CoalescedWrites, under the device)
LEAF           calls nothing while held: queues' condition variables, tables, counters
=============  ==============================================================================

Above every rank: the core's lock on the VM's ring of buffered writes (``hv_coalesced``;
Machine.coalesce_writes). A vCPU takes it before it handles an exit, and the drain thread,
``Machine.pause()`` and ``close()`` take it too, and it is held while the buffered writes
reach their handlers: so ``drain_coalesced()`` is only ever called with no lock held (it
says so to the checker with ``may_block``).

Below every rank: the C mutex of a native register block (hvframe.regblock), held inside
the core for a few instructions per access or call, never across a call into Python. Its
calls may be made with any of the locks above held. Plugins' native register files follow
the same rule: AHCI's (hvframe_ahci/abar.c) is taken by a vCPU's ABAR exits without the GIL
or any Python lock, and by Python only under the HBA lock (DEVICE); while held, nothing is
called but a non-blocking eventfd write (an MSI irqfd, the port worker's wake-up) and, when
an exit serves NCQ reads itself, reads of the page cache (RWF_NOWAIT: no disk is waited for;
at most 256 KiB and 256 PRD entries a command): no other thread of hvframe is waited for,
though the kernel may still sleep in a page fault on guest RAM.

Rules
-----
1. Locks are taken in rank order, as above.
2. No thread waits (for a queue with room, a join, an event, another thread's lock such as a
   queue lock a worker holds for a batch) while holding a lock another thread needs. Work
   that has to wait for a device's threads -- a reset, a queue disabled, a port stopped --
   is asked for with ``defer(fn)``: it runs when the thread leaves its outermost
   ``deferring()`` scope, which whoever holds a lock around device code opens first (the PCI
   bus around configuration accesses, the virtio transport around its registers).
   One bounded exception: a passthrough function's MSI-X gate listener (hvframe_passthru)
   makes one DEVICE_SET_IRQS round trip under the MSI-X lock, so the device stops using a
   guest irqfd before a mask or retarget takes effect; the server answers it from its own
   state without calling back into the client. The exchange is over within the short
   IRQ_REPLY_DEADLINE however the server paces it (one deadline for the whole exchange); a
   wait for the socket behind another command lasts while that command is within its own
   deadline (it then times out itself and the device is lost), so the lock is held at most
   REPLY_DEADLINE + 2 * IRQ_REPLY_DEADLINE.
   A virtqueue worker that sleeps in C between kicks (VirtioDevice.serve_sleeping) holds
   its queue's lock while asleep, where the checker cannot see it wait: any other thread
   takes that lock only as a claim -- claims += 1 (and claiming() around it), then the
   worker's wake-up -- and the worker does not go to sleep in C while a claim is counted.
   A change the sleeping loop must see (the queue's MSI-X vector, say) wakes it too.
3. Nothing a guest controls grows without a bound checked before the work is done; a full
   queue refuses (the device answers with its error status) instead of blocking.

The checker
-----------
With ``HVFRAME_LOCK_CHECK=1`` in the environment when hvframe is imported (the test suite
sets it), ``lock()`` returns checking locks: every acquisition is compared with the locks the
thread holds, and ``may_block(what)`` (called by every wait the framework does) with any lock
held at all. A violation is recorded with both stacks; ``take_violations()`` hands them to
the test suite, which fails the test that caused them. Without the variable, ``lock()``
returns plain ``threading`` locks: no cost on the exit path.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from .logs import logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable

log = logger(__name__)      # logging is imported only when something is logged

RESET = 5
QUEUE = 10
PCI_BUS = 20
DEVICE_OUTER = 25
DEVICE = 30
DEVICE_INNER = 40
PCI_FUNCTION = 50
MSI = 60
MACHINE = 70
KVM = 80
LEAF = 90

RANK_NAMES = {RESET: "RESET", QUEUE: "QUEUE", PCI_BUS: "PCI_BUS", DEVICE_OUTER: "DEVICE_OUTER",
              DEVICE: "DEVICE", DEVICE_INNER: "DEVICE_INNER", PCI_FUNCTION: "PCI_FUNCTION",
              MSI: "MSI", MACHINE: "MACHINE", KVM: "KVM", LEAF: "LEAF"}

CHECKING = os.environ.get("HVFRAME_LOCK_CHECK", "") not in ("", "0")

_tls = threading.local()
_violations: list[str] = []
MAX_VIOLATIONS = 1000
_violations_lock = threading.Lock()


def _held() -> list:
    try:
        return _tls.held
    except AttributeError:
        _tls.held = []
        return _tls.held


def _report(message: str) -> None:
    import traceback
    where = "".join(traceback.format_stack(limit=12)[:-2])
    text = f"{message} (thread {threading.current_thread().name})\n{where}"
    log.error("lock order violation: %s", message)
    with _violations_lock:
        if len(_violations) < MAX_VIOLATIONS:   # a long checked run must not grow forever
            _violations.append(text)


def take_violations() -> list[str]:
    """The violations recorded since the last call (and forget them)."""
    with _violations_lock:
        out = list(_violations)
        _violations.clear()
    return out


def held_locks() -> list[str]:
    """Names of the checking locks the calling thread holds, outermost first."""
    return [lk.name for lk in _held()]


def may_block(what: str) -> None:
    """The calling thread is about to wait for `what`: a violation if it holds any lock."""
    if CHECKING:
        held = _held()
        if held:
            _report(f"waits for {what} while holding {', '.join(lk.name for lk in held)}")


class CheckedLock:
    """A lock that checks the rank order on every blocking acquisition (test suite only)."""

    def __init__(self, rank: int, name: str, reentrant: bool):
        self._inner = threading.RLock() if reentrant else threading.Lock()
        self.rank, self.name, self.reentrant = rank, name, reentrant
        self._holder: list | None = None    # the held list of the thread that has it

    def _check(self) -> None:
        held = _held()
        if self in held:
            if not self.reentrant:
                _report(f"re-acquires {self.name}, which is not re-entrant")
            return
        for other in held:
            if other.rank > self.rank or (other.rank == self.rank and other is not self):
                _report(f"acquires {self.name} ({RANK_NAMES.get(self.rank, self.rank)}) "
                        f"while holding {other.name} ({RANK_NAMES.get(other.rank, other.rank)})")
                return

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking:
            self._check()
        ok = self._inner.acquire(blocking, timeout)
        if ok:
            held = _held()
            held.append(self)
            self._holder = held
        return ok

    def release(self) -> None:
        # A plain lock may be released by another thread than the one that took it: its
        # entry goes from the taker's list.
        held = _held() if self.reentrant or self._holder is None else self._holder
        for i in range(len(held) - 1, -1, -1):
            if held[i] is self:
                del held[i]
                break
        self._inner.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()

    def locked(self) -> bool:
        if self.reentrant:          # as threading.RLock: no locked() to ask
            raise AttributeError("a re-entrant lock has no locked()")
        return self._inner.locked()

    # What threading.Condition uses to release a (re-entrant) lock completely while waiting.
    def _is_owned(self) -> bool:
        return self in _held()

    def _release_save(self):
        held = _held()
        count = sum(1 for lk in held if lk is self)
        held[:] = [lk for lk in held if lk is not self]
        if self.reentrant:
            state = self._inner._release_save()
        else:
            self._inner.release()
            state = None
        return (state, count)

    def _acquire_restore(self, saved) -> None:
        state, count = saved
        if self.reentrant:
            self._inner._acquire_restore(state)
        else:
            self._inner.acquire()
        held = _held()
        held.extend([self] * count)
        self._holder = held

    def __repr__(self) -> str:
        return f"<CheckedLock {self.name} {RANK_NAMES.get(self.rank, self.rank)}>"


def lock(rank: int, name: str, *, reentrant: bool = False):
    """A lock of `rank` (see the table above); `name` says whose it is in reports."""
    if CHECKING:
        return CheckedLock(rank, name, reentrant)
    return threading.RLock() if reentrant else threading.Lock()


def condition(lk) -> threading.Condition:
    """A condition variable on a lock made by lock()."""
    return threading.Condition(lk)


# -- deferred work ----------------------------------------------------------------------------

class _DeferringScope:
    # A plain context manager, not a @contextmanager generator: every PCI configuration
    # access and virtio register access opens one, and a generator costs several times more.
    __slots__ = ()

    def __enter__(self) -> None:
        depth = getattr(_tls, "depth", 0)
        if depth == 0:
            _tls.pending = []
        _tls.depth = depth + 1

    def __exit__(self, *exc) -> bool:
        depth = _tls.depth - 1
        _tls.depth = depth
        if depth == 0:
            _run_pending()
        return False


_DEFERRING = _DeferringScope()     # the state is per thread (_tls): one object serves all


def deferring() -> _DeferringScope:
    """A scope around code that holds locks while calling device code: what that code
    defer()s runs when the outermost scope of this thread ends, with those locks released."""
    return _DEFERRING


def _run_pending() -> None:
    pending = _tls.pending
    while pending:
        fn = pending.pop(0)
        try:
            fn()
        except Exception:   # a device bug must not escape into the exit loop
            log.exception("deferred %r failed", fn)


def defer(fn: Callable[[], None]) -> None:
    """Run fn() now if this thread is in no deferring() scope, else when it leaves them."""
    if getattr(_tls, "depth", 0):
        _tls.pending.append(fn)
        return
    fn()


# -- device threads ---------------------------------------------------------------------------

_live_threads: "weakref.WeakSet[DeviceThread]" = weakref.WeakSet()
JOIN_DEADLINE = 5.0


class DeviceThread:
    """A thread owned by a device, with a stop path.

    ``target(thread)`` runs on the new thread and returns when ``thread.stopping`` is set
    (check it after every wait); ``wake()`` (given by the owner) interrupts its wait, e.g. by
    writing an eventfd. ``stop()`` sets ``stopping``, wakes it and joins with a deadline; a
    thread still running then is reported, not waited for forever. An exception that escapes
    ``target`` is logged with the thread's name, kept in ``error``, and passed to
    ``on_error`` so the owner can fail its requests (a device error status) instead of
    leaving a queue nobody serves. ``pause()`` asks the thread to park at its next
    ``checkpoint()`` and waits until it does (or its deadline); ``resume()`` releases it.
    """

    def __init__(self, name: str, target: Callable[["DeviceThread"], None], *,
                 wake: Callable[[], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None):
        self.name = name
        self._target = target
        self._wake = wake
        self._on_error = on_error
        self.stopping = False
        self.error: BaseException | None = None
        self._paused = threading.Event()         # the thread is parked
        self._run_allowed = threading.Event()
        self._run_allowed.set()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> "DeviceThread":
        _live_threads.add(self)
        self._thread.start()
        return self

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def is_current(self) -> bool:
        return self._thread is threading.current_thread()

    def _main(self) -> None:
        try:
            self._target(self)
        except BaseException as e:     # noqa: BLE001 - reported, then the owner decides
            import traceback
            self.error = e
            log.error("%s: thread failed: %s", self.name,
                      "".join(traceback.format_exception(type(e), e, e.__traceback__)))
            if self._on_error is not None:
                try:
                    self._on_error(e)
                except Exception:
                    log.exception("%s: on_error failed", self.name)

    def wake(self) -> None:
        if self._wake is not None:
            self._wake()

    def checkpoint(self) -> None:
        """(on the thread) Park here while paused."""
        if not self._run_allowed.is_set():
            self._paused.set()
            while not self._run_allowed.wait(0.1):
                if self.stopping:
                    break
            self._paused.clear()

    def pause(self, deadline: float = JOIN_DEADLINE) -> bool:
        """Ask the thread to park at its next checkpoint; True once it has (or it is not
        running). False if it did not park by the deadline: it is then let run again."""
        if not self._thread.is_alive():
            return True
        may_block(f"{self.name} to pause")
        self._paused.clear()
        self._run_allowed.clear()
        self.wake()
        end = time.monotonic() + deadline
        while not self._paused.wait(0.05):
            if not self._thread.is_alive():
                return True
            if time.monotonic() > end:
                self._run_allowed.set()
                return False
        return True

    def resume(self) -> None:
        self._run_allowed.set()

    def stop(self, deadline: float = JOIN_DEADLINE) -> bool:
        """Stop and join; False (and an error logged) if it did not end by the deadline."""
        self.stopping = True
        self._run_allowed.set()
        self.wake()
        if self.is_current() or self._thread.ident is None:
            return True
        may_block(f"{self.name} to stop")
        self._thread.join(deadline)
        if self._thread.is_alive():
            log.error("%s: thread did not stop within %.1f s", self.name, deadline)
            return False
        return True


def live_threads() -> list[DeviceThread]:
    """Device threads started and still running (for leak checks)."""
    return [t for t in list(_live_threads) if t.is_alive()]


__all__ = ["RESET", "QUEUE", "PCI_BUS", "DEVICE_OUTER", "DEVICE", "DEVICE_INNER", "PCI_FUNCTION",
           "MSI", "MACHINE", "KVM", "LEAF", "CHECKING", "CheckedLock", "DeviceThread", "condition",
           "defer", "deferring", "held_locks", "live_threads", "lock", "may_block",
           "take_violations"]
