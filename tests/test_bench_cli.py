"""`hvframe bench DEVICE[,options]` as a user runs it: the table, --json, a baseline that
passes and one that fails, and the errors (exit 4, one line)."""
import json
import re

import pytest

from conftest import run_hvframe

QUICK = ["--rounds", "1", "--exits", "200"]


def rows(out):
    """scenario -> (kind, time/op in ns) from the table."""
    found = {}
    for line in out.splitlines()[2:]:
        m = re.match(r"(.+?)\s+(exit|data)\s+([\d.]+) (ns|us)", line)
        assert m, line
        found[m.group(1)] = (m.group(2), float(m.group(3)) * (1000 if m.group(4) == "us" else 1))
    return found


def test_uart_table_has_every_register():
    p = run_hvframe(["bench", "uart", *QUICK])
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("hvframe bench uart:")
    found = rows(p.stdout)
    assert found["(floor: an empty Python handler's read)"][1] > 0    # the row to read against
    for reg in ("RBR", "IER", "IIR", "LCR", "MCR", "LSR", "MSR", "SCR"):
        kind, ns = found[f"{reg} read"]
        assert kind == "exit" and ns > 0
    assert found["THR write"][1] > 0


def test_virtio_blk_table_has_registers_and_its_data_path():
    p = run_hvframe(["bench", "virtio-blk", *QUICK])
    assert p.returncode == 0, p.stderr
    found = rows(p.stdout)
    assert found["isr read"][0] == "exit"
    kind, ns = found["read 4 KiB, depth 32"]
    assert kind == "data" and ns > 0
    assert re.search(r"read 4 KiB, depth 32 .* \d+(\.\d+)?$", p.stdout, re.M)   # MB/s shown


def test_json_is_a_baseline_and_a_slower_run_fails_it(tmp_path):
    p = run_hvframe(["bench", "com1", "--json", *QUICK])
    assert p.returncode == 0, p.stderr
    run = json.loads(p.stdout)
    assert run["device"] == "com1"
    names = {r["name"]: r for r in run["results"]}
    assert names["LSR read"]["kind"] == "exit" and names["LSR read"]["ns_per_op"] > 0

    generous = tmp_path / "generous.json"      # every scenario took a second per op then
    generous.write_text(json.dumps({"device": "com1", "results": [
        dict(r, ns_per_op=1e9) for r in run["results"]]}))
    p = run_hvframe(["bench", "com1", "--baseline", str(generous), *QUICK])
    assert p.returncode == 0, p.stderr
    assert "vs baseline" in p.stdout and "regression" not in p.stderr
    assert "the floor moved" in p.stderr          # a second per exit: the host "got faster"

    strict = tmp_path / "strict.json"          # ... and a thousandth of a nanosecond
    strict.write_text(json.dumps({"device": "com1", "results": [
        dict(r, ns_per_op=0.001) for r in run["results"]]}))
    p = run_hvframe(["bench", "com1", "--baseline", str(strict), *QUICK])
    assert p.returncode == 1
    assert re.search(r"^hvframe: bench: regression: LSR read: \+\d+% \(threshold 20%\)$",
                     p.stderr, re.M), p.stderr


def test_threshold_decides(tmp_path):
    p = run_hvframe(["bench", "com1", "--json", *QUICK])
    run = json.loads(p.stdout)
    half = tmp_path / "half.json"              # the baseline was twice as fast
    half.write_text(json.dumps({"results": [dict(r, ns_per_op=r["ns_per_op"] / 2)
                                            for r in run["results"]]}))
    p = run_hvframe(["bench", "com1", "--baseline", str(half), "--threshold", "100000", *QUICK])
    assert p.returncode == 0, p.stderr


def test_device_without_declared_benchmarks_gets_a_read_of_each_range():
    p = run_hvframe(["bench", "pci-testdev", *QUICK])
    assert p.returncode == 0, p.stderr
    found = rows(p.stdout)
    assert any("BAR0" in name for name in found) and any("BAR1" in name for name in found)
    assert not any(name.startswith("pci-config") for name in found)   # the bus is not the device


@pytest.mark.parametrize("args, words", [
    (["bench", "no-such-device"], "no device 'no-such-device'"),
    (["bench", "virtio-rng,speed=9"], "unexpected option 'speed=9'"),
    (["bench", "com1", "--baseline", "/nonexistent/base.json"], "--baseline"),
    (["bench", "com1", "--rounds", "0"], "--rounds"),
])
def test_bad_input_is_one_line_and_exit_4(args, words):
    p = run_hvframe(args)
    assert p.returncode == 4
    assert p.stderr.count("\n") == 1 and words in p.stderr, p.stderr


def test_a_file_that_is_not_a_saved_run_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": [{"name": "x"}]}')
    p = run_hvframe(["bench", "com1", "--baseline", str(bad)])
    assert p.returncode == 4 and "not a saved `hvframe bench --json` run" in p.stderr
