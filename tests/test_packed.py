"""Compiled layouts (hvframe.packed): every layout a run builds or parses without construct
gives the bytes and values its construct declaration gives, and a run that finds its plans
cached never imports construct.

The comparison is property-based (hypothesis): values are drawn for each compiled layout,
built with construct, parsed back by both, and built again by the compiled layout; both
parses and both builds must agree.
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hvframe.packed import Declarations, PackedError
from hvframe.packed import _put as _set     # nested dicts and lists from item paths

DECLARING_MODULES = ["hvframe.acpi.tables", "hvframe.acpi.aml", "hvframe.acpi.mptable",
                     "hvframe.acpi.smbios", "hvframe.loader.elf", "hvframe.loader.pvh",
                     "hvframe.loader.bzimage", "hvframe.pci.config_space",
                     "hvframe.snapshot.state", "hvframe.snapshot.pci", "hvframe_uart.uart16550",
                     "hvframe.virtio.virtqueue", "hvframe.virtio.pci", "hvframe_virtio_blk.layout",
                     "hvframe_ahci.regs"]


def declarations(modname: str) -> Declarations:
    return importlib.import_module(modname).LAYOUTS


def compiled_layouts():
    out = []
    for modname in DECLARING_MODULES:
        d = declarations(modname)
        for name in d._load_plans():
            out.append(pytest.param(modname, name, id=f"{modname.rsplit('.', 1)[1]}.{name}"))
    return out


# -- values for a plan ---------------------------------------------------------------------------

_INT_CODES = {"B": (0, 0xFF), "H": (0, 0xFFFF), "L": (0, 0xFFFFFFFF), "I": (0, 0xFFFFFFFF),
              "Q": (0, (1 << 64) - 1), "b": (-128, 127), "h": (-32768, 32767),
              "l": (-(1 << 31), (1 << 31) - 1), "q": (-(1 << 63), (1 << 63) - 1)}


def _codes(fmt: str) -> list[str]:
    """struct codes of a plan's format, one per item ('x' padding dropped)."""
    out, count = [], ""
    for ch in fmt[1:]:
        if ch.isdigit():
            count += ch
            continue
        if ch == "s":
            out.append("s")
        elif ch != "x":
            out.extend(ch * int(count or 1))
        count = ""
    return out


def _value(code: str, kind: str, arg):
    if kind == "c":
        return st.just(arg)
    if kind == "s":
        return st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=arg)
    if kind == "b":
        return st.binary(min_size=arg, max_size=arg)
    if kind == "f" or code == "?":
        return st.booleans()
    if code == "d":
        return st.floats(allow_nan=False)
    lo, hi = _INT_CODES[code]
    return st.integers(lo, hi)


@st.composite
def values_for(draw, plan):
    """A dict construct can build for a struct plan."""
    _, fmt, items, tail, _ = plan
    obj: dict = {}
    switch_key = tail[2] if tail and tail[0] == "W" else None
    for (path, kind, arg), code in zip(items, _codes(fmt)):
        if path == (switch_key,):
            value = draw(st.sampled_from(sorted(tail[3])))
        else:
            value = draw(_value(code, kind, arg))
        _set(obj, path, value)
    if tail is not None:
        if tail[0] == "R":
            elem = tail[2]
            if elem[0] == "N":
                lo, hi = _INT_CODES[elem[1][1:]]
                obj[tail[1]] = draw(st.lists(st.integers(lo, hi), max_size=4))
            else:
                obj[tail[1]] = draw(st.lists(values_for(elem), max_size=4))
        elif tail[0] == "G":
            obj[tail[1]] = draw(st.binary(max_size=40))
        else:
            obj[tail[1]] = draw(values_for(tail[3][obj[switch_key]]))
    return obj


def _plain(v):
    """construct's Containers and ListContainers as plain dicts and lists (its `_io` entries
    dropped), to compare with a Record."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items() if k != "_io"}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@pytest.mark.parametrize("modname,name", compiled_layouts())
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_compiled_layout_builds_and_parses_as_its_declaration(modname, name, data):
    d = declarations(modname)
    con = d.constructs()[name]
    compiled = getattr(d, name)
    obj = data.draw(values_for(d._load_plans()[name]))
    raw = con.build(obj)
    parsed = con.parse(raw)
    # Values construct computes itself (Rebuild: a count, a length) are read back from its
    # parse, which is what a caller of the compiled layout must supply.
    assert compiled.parse(raw) == _plain(parsed)
    assert compiled.build(_plain(parsed)) == raw
    if not d._load_plans()[name][3]:
        assert compiled.sizeof() == con.sizeof() == len(raw)
        assert compiled.fields == {k: v for k, v in _fields(con).items()}


def _fields(con):
    from hvframe.layout import fields_of
    return fields_of(con)


# Declarations only a checkpoint reads (through construct, which a checkpoint imports anyway).
CHECKPOINT_ONLY = {"hvframe_uart.uart16550": {"UART_STATE"},
                   "hvframe.snapshot.pci": {"PCI_FUNCTION_STATE"}}


def test_every_run_path_declaration_compiles():
    # A Struct the compiler cannot say would silently send the run back to construct.
    from construct import Struct
    for modname in DECLARING_MODULES:
        d = declarations(modname)
        plans = d._load_plans()
        structs = {n for n, c in d.constructs().items() if isinstance(c, Struct)}
        assert structs - CHECKPOINT_ONLY.get(modname, set()) == set(plans), modname


def test_bad_data_is_a_packed_error_not_a_crash():
    from hvframe.loader import elf
    with pytest.raises(PackedError):
        elf.LAYOUTS.ElfIdent.parse(b"\x7fELX" + bytes(12))     # the magic is a Const
    with pytest.raises(PackedError):
        elf.LAYOUTS.Elf64_Ehdr.parse(bytes(10))                # too short
    from hvframe.acpi import tables
    with pytest.raises(PackedError):
        tables.LAYOUTS.SdtHeader.build(dict(signature="TOOLONG"))


# -- the cache -----------------------------------------------------------------------------------

MODULE = textwrap.dedent('''
    from hvframe.packed import Declarations

    def _declare():
        from construct import Int8ul, Int16ul, Struct
        Thing = Struct("a" / Int8ul, "b" / Int16ul)
        return locals()

    LAYOUTS = Declarations(__name__, __file__, _declare)
    __getattr__ = LAYOUTS.module_getattr
''')

PROBE = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    import probe_layouts
    out = probe_layouts.LAYOUTS.Thing.build(dict(a=1, b=0x203))
    print(out.hex(), "construct" in sys.modules)
''')


def _probe(tmp_path, cache):
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True,
                       text=True, env=env, check=True)
    return r.stdout.split()


def test_plans_are_cached_and_a_cached_run_imports_no_construct(tmp_path):
    (tmp_path / "probe_layouts.py").write_text(MODULE)
    cache = tmp_path / "cache"
    assert _probe(tmp_path, cache) == ["010302", "True"]       # compiled: construct imported
    assert _probe(tmp_path, cache) == ["010302", "False"]      # cached: not imported


def test_a_changed_declaration_is_compiled_again(tmp_path):
    src = tmp_path / "probe_layouts.py"
    src.write_text(MODULE)
    cache = tmp_path / "cache"
    _probe(tmp_path, cache)
    src.write_text(MODULE.replace('"b" / Int16ul', '"b" / Int16ul, "c" / Int8ul'))
    os.utime(src, ns=(1, 1))       # a different stamp even within the clock's resolution
    with pytest.raises(subprocess.CalledProcessError) as e:      # "c" is now required
        _probe(tmp_path, cache)
    assert "no value for 'c'" in e.value.stderr


@pytest.mark.parametrize("damage", ["garbage", "empty", "unwritable"])
def test_a_bad_or_unwritable_cache_only_costs_a_compile(tmp_path, damage):
    (tmp_path / "probe_layouts.py").write_text(MODULE)
    cache = tmp_path / "cache"
    _probe(tmp_path, cache)
    [plans] = (cache / "hvframe" / "layouts").iterdir()
    if damage == "garbage":
        plans.write_bytes(b"\x00not marshal at all")
    elif damage == "empty":
        plans.write_bytes(b"")
    else:       # a cache home that is a file: nothing can be made under it, even by root
        cache = tmp_path / "a-file"
        cache.write_text("")
    assert _probe(tmp_path, cache) == ["010302", "True"]
    if damage != "unwritable":      # and the next run finds the plans written again
        assert _probe(tmp_path, cache) == ["010302", "False"]


def test_the_run_path_imports_no_construct(tmp_path):
    """What `hvframe run --kernel` does before the guest starts, minus KVM: the platform's
    tables, the MP table, a PVH kernel's ELF headers and start info, COM1's register block."""
    code = textwrap.dedent('''
        import sys
        from hvframe.acpi.build import build_acpi
        from hvframe.acpi.mptable import build_mptable
        from hvframe.loader.elf import ElfFile
        from hvframe.loader import pvh, bzimage
        from hvframe.platform import acpi_pm, reset_control
        from hvframe.lpc import i8042, rtc, bootrom, fw_cfg
        from hvframe.acpi import smbios
        from hvframe.pci import config_space, hostbridge
        from hvframe_uart import uart16550
        build_acpi(ncpus=2)
        build_mptable(0x9FC00, 2, [3])
        smbios.build(2, [(0, 64 << 20)], __import__("uuid").uuid4())
        ElfFile(open(sys.argv[1], "rb").read())
        print("construct" in sys.modules)
    ''')
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    run = [sys.executable, "-c", code, os.path.realpath(sys.executable)]   # any ELF will do
    subprocess.run(run, env=env, check=True, capture_output=True)      # fills the cache
    r = subprocess.run(run, env=env, check=True, capture_output=True, text=True)
    assert r.stdout.strip() == "False"


def test_two_installs_with_equal_stamps_do_not_share_plans(tmp_path):
    """Two checkouts (worktrees, venvs, an rsync -a copy, a reproducible build's fixed mtimes)
    of a declaring module with the same name, size and mtime but different declarations:
    each run builds with its own declarations, whichever ran first."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "probe_layouts.py").write_text(MODULE)
    swapped = MODULE.replace('"a" / Int8ul, "b" / Int16ul', '"b" / Int16ul, "a" / Int8ul')
    assert len(swapped) == len(MODULE) and swapped != MODULE
    (two / "probe_layouts.py").write_text(swapped)
    for d in (one, two):
        os.utime(d / "probe_layouts.py", ns=(10**18, 10**18))
    cache = tmp_path / "cache"
    assert _probe(one, cache)[0] == "010302"
    assert _probe(two, cache)[0] == "030201"
    assert _probe(one, cache) == ["010302", "False"]     # each keeps its own plans cached
    assert _probe(two, cache) == ["030201", "False"]


@pytest.mark.parametrize("xdg", [None, "relative/cache"])
def test_no_home_directory_means_no_cache_not_one_in_the_working_directory(
        tmp_path, monkeypatch, xdg):
    """A uid with no passwd entry and no HOME (a container run as an arbitrary uid):
    expanduser("~") stays "~". The plans must not then be written under ./~/.cache of
    whatever directory the run was started in (nor under a relative XDG_CACHE_HOME, which
    the XDG spec says to ignore); the run compiles them and goes on."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HOME", raising=False)
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)
    (tmp_path / "probe_layouts.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "probe_layouts", raising=False)
    mod = importlib.import_module("probe_layouts")
    assert mod.LAYOUTS.Thing.build(dict(a=1, b=0x203)).hex() == "010302"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe_layouts.py"]


def test_a_module_whose_source_is_gone_is_compiled_not_cached(tmp_path):
    """An install without its .py files (or one removed under a running program): the
    layouts still work, through construct, and nothing is written to the cache."""
    (tmp_path / "probe_layouts.py").write_text(MODULE)
    cache = tmp_path / "cache"
    code = textwrap.dedent('''
        import os, sys
        sys.path.insert(0, sys.argv[1])
        import probe_layouts
        os.unlink(probe_layouts.__file__)
        print(probe_layouts.LAYOUTS.Thing.build(dict(a=1, b=0x203)).hex())
    ''')
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["010302"]
    assert not (cache / "hvframe" / "layouts").exists() or \
        not any((cache / "hvframe" / "layouts").iterdir())
