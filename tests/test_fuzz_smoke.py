"""The fuzz targets under fuzz/ (see fuzz/README.md) run clean in-process: every target's
one_input() over its committed seed corpus, then 200 deterministic pseudo-random inputs
(random bytes and mutated seeds). No atheris engine is involved; a failure here is either a
bug the target's invariants caught (reproduce it with the input shown) or a target that no
longer matches hvframe."""
import os
import random
import sys

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install -r "
                    "requirements-dev.txt): the fuzz targets are meant to run under it")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(REPO, "fuzz")
TARGETS = ["virtqueue", "virtio_blk", "virtio_net", "ahci", "pci_config", "fw_cfg", "uart"]
RANDOM_INPUTS = 200

if FUZZ not in sys.path:
    sys.path.insert(0, FUZZ)

from fuzzlib.runner import load_target  # noqa: E402


def _seeds(name):
    d = os.path.join(FUZZ, "corpus", name)
    return [open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))]


def _mutate(rng, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(4)
        if kind == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1 and data:
            del data[rng.randrange(len(data)):]
        elif kind == 2:
            at = rng.randrange(len(data) + 1)
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def _run(target, data: bytes, what: str) -> None:
    try:
        target.one_input(data)
    except Exception as e:
        raise AssertionError(f"{what} fails: {type(e).__name__}: {e}\n"
                             f"reproduce: one_input(bytes.fromhex({data.hex()!r}))") from e


@pytest.mark.parametrize("name", TARGETS)
def test_fuzz_target_runs_clean(name):
    target = load_target(os.path.join(FUZZ, "targets", f"{name}.py"))
    seeds = _seeds(name)
    assert seeds, f"fuzz/corpus/{name} is empty: run python fuzz/make_corpus.py"
    for i, data in enumerate(seeds):
        _run(target, data, f"{name} seed {i}")
    rng = random.Random(f"hvframe-fuzz-smoke-{name}")
    for i in range(RANDOM_INPUTS):
        if i % 2:
            data = _mutate(rng, rng.choice(seeds))
        else:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 256)))
        _run(target, data, f"{name} random input {i}")


# -- the harness itself ------------------------------------------------------------------------

def test_observer_turns_a_swallowed_handler_exception_into_a_finding():
    from fuzzlib.machines import synthetic_machine, teardown
    from fuzzlib.observe import Finding, Observer

    class Broken:
        def read(self, offset, size):
            raise ValueError("broken handler")

        def write(self, offset, size, value):
            pass

    m = synthetic_machine(64 << 10)
    try:
        m.pio.register(0x80, 1, Broken(), name="broken")
        with Observer() as obs:
            assert m.io_read(0x80, 1) == 0xFF        # the dispatch core answered for it
            with pytest.raises(Finding, match="broken handler"):
                obs.check()
    finally:
        teardown(m)


@pytest.mark.parametrize("where", ["after the low region", "before RAM", "after RAM"])
def test_guard_pages_stop_a_native_access_outside_ram(where):
    import signal
    import subprocess
    probe = {"after the low region": "ram.low_host + ram.low",
             "before RAM": "ram.low_host - 1",
             "after RAM": "ram.high_host + ram.high"}[where]
    code = ("import ctypes, sys; sys.path.insert(0, sys.argv[1])\n"
            "from fuzzlib import guarded\n"
            "mem = guarded.fresh(4 << 12, 2 << 12); ram = mem.ram\n"
            "ctypes.memset(ram.low_host + ram.low - 1, 1, 1)\n"     # last byte of RAM: fine
            "ctypes.memset(ram.high_host, 1, ram.high)\n"
            "assert mem.read(ram.low - 1, 1) == b'\\x01'\n"
            "print('in bounds ok', flush=True)\n"
            f"ctypes.memset({probe}, 1, 1)\n"
            "print('not stopped', flush=True)\n")
    r = subprocess.run([sys.executable, "-c", code, FUZZ], capture_output=True, text=True,
                       timeout=60)
    assert "in bounds ok" in r.stdout, r.stderr
    assert "not stopped" not in r.stdout
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr)
