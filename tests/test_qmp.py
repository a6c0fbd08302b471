"""QMP: the framing and checks without a guest; qemu.qmp against a real PVH guest; a fuzzer
throwing malformed JSON and wrong argument types at the socket of a running guest."""
import asyncio
import json
import socket
import time

import pytest

from conftest import requires_kvm
from control_helpers import VmProcess
from hvframe.control.qmp import FramingError, JsonStream


# -- framing (no guest) ---------------------------------------------------------------------

def test_values_split_anywhere_or_packed_together_are_framed_whole():
    msgs = [{"execute": "query-status", "id": 1},
            {"execute": "x", "arguments": {"s": "a } ] { [ \" \\\\ \\u00e9"}, "id": [1, {"a": 2}]},
            {"execute": "é"}]
    data = b"".join(json.dumps(m, ensure_ascii=False).encode() + b" \n" for m in msgs)
    for cut in range(len(data) + 1):
        s = JsonStream()
        got = s.feed(data[:cut]) + s.feed(data[cut:])
        assert got == [(True, m) for m in msgs], cut


def test_non_json_and_scalars_are_reported_and_the_stream_goes_on():
    s = JsonStream()
    got = s.feed(b'{"a": } 42 ] {"execute": "ok"}\n')
    assert got[0][0] is False and "JSON parse error" in got[0][1]
    assert got[1] == (True, 42)                  # the server says: must be an object
    assert got[2][0] is False
    assert got[3] == (True, {"execute": "ok"})


def test_endless_value_and_deep_nesting_are_refused_not_buffered():
    s = JsonStream(limit=4096)
    s.feed(b'{"a": "')
    with pytest.raises(FramingError):
        for _ in range(100):
            s.feed(b"x" * 100)
    with pytest.raises(FramingError):
        JsonStream().feed(b"[" * 100)


# -- against a real guest ---------------------------------------------------------------------

@pytest.fixture
def vm(tmp_path, guest_dir):
    v = VmProcess(tmp_path, ["-m", "64M", "--kernel", guest_dir["acpi_power_button"],
                             "--cmdline", "spin=20000",
                             "--qmp", f"unix:{tmp_path / 'extra.sock'}"])
    yield v
    v.kill()


def _raw(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(path))
    f = s.makefile("rb")
    greeting = json.loads(f.readline())
    return s, f, greeting


def _reply(f):
    while True:
        msg = json.loads(f.readline())
        if "event" not in msg:
            return msg


@requires_kvm
@pytest.mark.kvm
def test_qemu_qmp_client_runs_a_guest_through_stop_cont_reset_and_quit(vm, tmp_path):
    from qemu.qmp import QMPClient
    vm.wait_socket()
    vm.wait_for("tick 2")

    async def session():
        qmp = QMPClient("hvframe-test")
        await qmp.connect(str(tmp_path / "extra.sock"))      # --qmp unix:PATH
        assert qmp.greeting.QMP.version["package"] == "hvframe"
        events = []

        async def collect():
            async for ev in qmp.events:
                events.append(ev)
        listener = asyncio.create_task(collect())
        assert (await qmp.execute("query-status"))["status"] == "running"
        assert await qmp.execute("query-name") == {"name": "vmtest"}
        # No firmware, no -U: the guest has no SMBIOS and so no UUID (QEMU's answer then);
        # tests/test_seabios.py shows the one a firmware run gives.
        assert await qmp.execute("query-uuid") == {"UUID": "00000000-0000-0000-0000-000000000000"}
        await qmp.execute("stop")
        assert await qmp.execute("query-status") == {"running": False, "singlestep": False,
                                                     "status": "paused"}
        before = vm.ticks()
        await asyncio.sleep(1.0)
        paused_ticks = vm.ticks() - before
        await qmp.execute("cont")
        assert (await qmp.execute("query-status"))["status"] == "running"
        await asyncio.get_running_loop().run_in_executor(
            None, vm.wait_for, f"tick {vm.ticks() + 2}")
        ticks_before_reset = vm.ticks()
        await qmp.execute("system_reset")
        for _ in range(200):              # rebuilt: the console file starts again
            if any(e["event"] == "RESET" for e in events):
                break
            await asyncio.sleep(0.05)
        assert (await qmp.execute("query-status"))["status"] == "running"
        for _ in range(400):              # the guest started again (its console file too)
            text = vm.console_text()
            if text.startswith("power button armed") and vm.ticks() < ticks_before_reset:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no restart after system_reset: {text[-300:]!r}")
        await qmp.execute("quit")
        for _ in range(100):
            if any(e["event"] == "SHUTDOWN" for e in events):
                break
            await asyncio.sleep(0.05)
        listener.cancel()
        try:
            await qmp.disconnect()
        except EOFError:          # the server went away after quit, as QEMU's does
            pass
        return events, paused_ticks

    events, paused_ticks = asyncio.run(asyncio.wait_for(session(), 90))
    assert paused_ticks <= 1          # at most the line being printed when it stopped
    names = [e["event"] for e in events]
    assert names == ["STOP", "RESUME", "RESET", "SHUTDOWN"], names
    assert events[2]["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    assert events[3]["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in events)
    code, err = vm.finish()
    assert code == 1, err
    assert "stopped by QMP quit" in err
    assert not (tmp_path / "run" / "vmtest").exists()            # run directory cleaned up


@requires_kvm
@pytest.mark.kvm
def test_qmp_errors_ids_and_queries_on_the_control_socket(vm):
    s, f, greeting = _raw(vm.wait_socket())
    assert greeting["QMP"]["capabilities"] == []
    s.sendall(b'{"execute": "query-status", "id": "early"}')
    r = _reply(f)
    assert r["error"]["class"] == "CommandNotFound" and r["id"] == "early"
    # Split across writes, and two in one write.
    s.sendall(b'{"execute": "qmp_cap')
    time.sleep(0.1)
    s.sendall(b'abilities"}{"execute": "query-version", "id": {"n": [1]}}')
    assert _reply(f) == {"return": {}}
    r = _reply(f)
    assert r["id"] == {"n": [1]} and r["return"]["package"] == "hvframe"
    cases = [
        (b'{"execute": "no-such-command"}', "CommandNotFound", "has not been found"),
        (b'{"execute": "qmp_capabilities"}', "CommandNotFound", "already complete"),
        (b'{"execute": 42}', "GenericError", "must be a string"),
        (b'{"execute": "stop", "arguments": []}', "GenericError", "must be an object"),
        (b'{"execute": "stop", "arguments": {"x": 1}}', "GenericError", "'x' is unexpected"),
        (b'{"execute": "human-monitor-command"}', "GenericError", "'command-line' is missing"),
        (b'{"execute": "human-monitor-command", "arguments": {"command-line": 5}}',
         "GenericError", "expected: string"),
        (b'{"execute": "query-status", "bogus": 1}', "GenericError", "'bogus' is unexpected"),
        (b'[1, 2]', "GenericError", "must be a JSON object"),
        (b'{"execute": "query-status",}', "GenericError", "JSON parse error"),
    ]
    for data, cls, text in cases:
        s.sendall(data)
        r = _reply(f)
        assert r["error"]["class"] == cls and text in r["error"]["desc"], (data, r)
    for cmd in ("query-commands", "query-cpus-fast", "query-pci", "query-block"):
        s.sendall(json.dumps({"execute": cmd}).encode())
        assert "return" in _reply(f), cmd
    s.sendall(b'{"execute": "query-commands"}')
    names = {c["name"] for c in _reply(f)["return"]}
    assert {"query-status", "stop", "cont", "system_powerdown", "system_reset", "quit",
            "human-monitor-command", "qmp_capabilities"} <= names
    s.sendall(b'{"execute": "human-monitor-command", "arguments": {"command-line": "info registers"}}')
    text = _reply(f)["return"]
    assert text.startswith("CPU#0\nRAX=") and "RIP=" in text and "CR0=" in text
    s.sendall(b'{"execute": "query-cpus-fast"}')
    cpus = _reply(f)["return"]
    assert [c["cpu-index"] for c in cpus] == [0] and cpus[0]["thread-id"] > 0
    s.close()
    assert vm.proc.poll() is None


@requires_kvm
@pytest.mark.kvm
def test_system_powerdown_presses_the_guests_power_button(vm):
    s, f, _ = _raw(vm.wait_socket())
    vm.wait_for("power button armed")
    s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "system_powerdown"}')
    assert _reply(f) == {"return": {}}
    assert _reply(f) == {"return": {}}
    code, err = vm.finish()
    assert code == 1, err
    assert "power button pressed" in vm.console_text()
    assert "guest powered off (ACPI S5)" in err


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@requires_kvm
@pytest.mark.kvm
def test_fuzzed_input_never_stops_the_guest(vm):
    from hypothesis import HealthCheck, given, settings, strategies as st

    path = vm.wait_socket()
    vm.wait_for("tick 1")
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
        max_leaves=12)
    commands = st.sampled_from(["qmp_capabilities", "query-status", "human-monitor-command",
                                "query-pci", "query-block", "query-cpus-fast", "nope", "x-query-registers"])
    wrong_types = st.builds(lambda c, a, i: {"execute": c, "arguments": a, "id": i},
                            commands, st.dictionaries(st.sampled_from(["command-line", "cpu-index", "enable", "x"]),
                                                      json_values, max_size=3), json_values)
    garbage = st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()) | \
        wrong_types.map(lambda m: json.dumps(m).encode())

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(garbage, min_size=1, max_size=5), st.booleans())
    def throw(chunks, negotiate):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        try:
            if negotiate:
                s.sendall(b'{"execute": "qmp_capabilities"}')
            for c in chunks:
                s.sendall(c)
        except OSError:
            pass                          # the server may hang up on a client it refuses
        s.close()

    rss0 = _rss_kib(vm.proc.pid)
    throw()
    # An endless string: the server answers and hangs up instead of buffering it.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    try:
        s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "x", "arguments": {"s": "')
        for _ in range(64):
            s.sendall(b"y" * 65536)
    except OSError:
        pass
    s.close()
    # Still running, still answering, the guest still counting.
    s, f, _ = _raw(path)
    s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-status"}')
    _reply(f)
    assert _reply(f)["return"]["status"] == "running"
    before = vm.ticks()
    vm.wait_for(f"tick {before + 1}", timeout=30)
    assert vm.proc.poll() is None
    assert _rss_kib(vm.proc.pid) - rss0 < 32 * 1024
    s.close()


def test_query_uuid_answers_the_uuid_firmware_gives_else_none():
    """query-uuid: the system UUID fixed in the configuration when the run began (a firmware
    run's, or the one -U gave); a run with neither has no UUID the guest could see, and gets
    QEMU's answer for a VM without one."""
    from types import SimpleNamespace
    from hvframe.config import Config
    from hvframe.control.monitor import monitor_commands
    cfg = Config()
    cfg.set("name", "vm1")
    query = monitor_commands(SimpleNamespace(cfg=cfg, name="vm1"))["query-uuid"].handler
    assert query() == {"UUID": "00000000-0000-0000-0000-000000000000"}
    cfg.set("uuid", "6ba7b810-9dad-11d1-80b4-00c04fd430c8")
    assert query() == {"UUID": "6ba7b810-9dad-11d1-80b4-00c04fd430c8"}
