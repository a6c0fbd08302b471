"""The guest build kit: every guest builds into an ELF32 PVH kernel the loader can enter.

The ELF is parsed here with struct, independently of hvframe.loader, so a bug in either
shows up as a disagreement."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hvframe.guests import GuestBuildError, available_guests, build_all, build_guest, cached_guest
from hvframe.guests.build import REPO_ROOT, SRC_DIR

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build guests")

EXPECTED = {"demo", "hello", "echo", "portloop", "reset", "triple_fault"}
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W = 1, 2


def parse_elf32(data: bytes) -> dict:
    assert data[:4] == b"\x7fELF", "not an ELF"
    assert data[4] == 1, "not ELFCLASS32"
    assert data[5] == 1, "not little-endian"
    (e_type, e_machine, _ver, e_entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize,
     e_phnum) = struct.unpack_from("<HHIIIIIHHH", data, 16)
    phdrs = []
    for i in range(e_phnum):
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align = \
            struct.unpack_from("<8I", data, e_phoff + i * e_phentsize)
        phdrs.append(dict(type=p_type, offset=p_offset, vaddr=p_vaddr, paddr=p_paddr,
                          filesz=p_filesz, memsz=p_memsz, flags=p_flags))
    return dict(type=e_type, machine=e_machine, entry=e_entry, phdrs=phdrs)


def notes(data: bytes, ph: dict):
    off, end = ph["offset"], ph["offset"] + ph["filesz"]
    while off + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        off += 12
        name = data[off:off + namesz].rstrip(b"\0")
        off += (namesz + 3) & ~3
        desc = data[off:off + descsz]
        off += (descsz + 3) & ~3
        yield name, ntype, desc


def pvh_entry(data: bytes, elf: dict) -> int:
    found = [desc for ph in elf["phdrs"] if ph["type"] == PT_NOTE
             for name, ntype, desc in notes(data, ph) if name == b"Xen" and ntype == 18]
    assert len(found) == 1, f"expected one XEN_ELFNOTE_PHYS32_ENTRY note, found {len(found)}"
    assert len(found[0]) == 4
    return struct.unpack("<I", found[0])[0]


def loaded_bytes(data: bytes, elf: dict) -> bytes:
    return b"".join(data[p["offset"]:p["offset"] + p["filesz"]]
                    for p in elf["phdrs"] if p["type"] == PT_LOAD)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("guests")
    return build_all(out), None


def test_build_all_builds_every_guest(built):
    # How long it takes is no test's business (a busy CI host took 26 s once): only that
    # every guest is built.
    paths, _ = built
    assert EXPECTED <= set(paths)
    for name, path in paths.items():
        assert Path(path).name == f"{name}.elf" and Path(path).stat().st_size > 0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_guest_is_pvh_elf32_entered_inside_its_text(built, name):
    data = Path(built[0][name]).read_bytes()
    elf = parse_elf32(data)
    assert elf["type"] == 2 and elf["machine"] == 3      # ET_EXEC, EM_386
    entry = pvh_entry(data, elf)
    assert entry == elf["entry"] == 0x100000

    loads = [p for p in elf["phdrs"] if p["type"] == PT_LOAD]
    assert loads
    for p in loads:
        assert p["paddr"] >= 0x100000, "nothing may load below 1 MiB (boot structures live there)"
        assert p["filesz"] <= p["memsz"]
        assert not (p["flags"] & PF_W and p["flags"] & PF_X), "RWX segment"
    text = [p for p in loads if p["paddr"] <= entry < p["paddr"] + p["filesz"]]
    assert len(text) == 1, "PVH entry is not inside exactly one loaded segment"
    assert text[0]["flags"] & PF_X
    # start.S begins with cli: the entry really is the runtime's _start, not padding.
    assert data[text[0]["offset"] + entry - text[0]["paddr"]] == 0xFA
    # The 16 KiB boot stack is .bss in a writable segment.
    assert sum(p["memsz"] - p["filesz"] for p in loads if p["flags"] & PF_W) >= 16384
    spans = sorted((p["paddr"], p["paddr"] + p["memsz"]) for p in loads)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "segments overlap"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_project_loader_finds_the_same_entry(built, name):
    from hvframe.loader import find_pvh_entry
    data = Path(built[0][name]).read_bytes()
    assert find_pvh_entry(data) == pvh_entry(data, parse_elf32(data))


def test_demo_banner_from_source_is_in_the_binary(built):
    src = (SRC_DIR / "demo.c").read_text()
    literals = re.findall(r'"(hvframe demo guest[^"]*)"', src)
    assert any(lit.startswith("hvframe demo guest (") for lit in literals), literals
    assert "hvframe demo guest: powering off\\n" in literals
    data = Path(built[0]["demo"]).read_bytes()
    image = loaded_bytes(data, parse_elf32(data))
    for lit in literals:
        assert lit.replace("\\n", "\n").encode() in image, lit


@pytest.mark.parametrize("name, text", [
    ("hello", b"hello from pvh guest"), ("triple_fault", b"about to triple fault"),
    ("echo", b"bye"), ("portloop", b"portloop start"), ("portloop", b"portloop done"),
    ("reset", b"resetting via 0xcf9"), ("demo", b"CPUs: %u online"),
])
def test_guest_messages_are_loaded(built, name, text):
    data = Path(built[0][name]).read_bytes()
    assert text in loaded_bytes(data, parse_elf32(data))


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_no_instructions_kvms_emulator_cannot_run(built):
    """CPL0 guest code is emulated on nested KVM: no SSE/x87/MMX, no int3, no xsave.
    (emulation_failure runs int3 on purpose, to test the VMM's report of exactly that.)"""
    bad = re.compile(r"%xmm|%ymm|%mm\d|%st\b|%st\(|\bint3\b|\bxsave|\bxrstor|\bfxsave|\bfld|\bfst")
    for name, path in built[0].items():
        if name == "emulation_failure":
            continue
        asm = subprocess.run(["objdump", "-d", path], capture_output=True, text=True,
                             check=True).stdout
        assert "00100000 <" in asm and "<main>:" in asm
        hits = [line for line in asm.splitlines() if bad.search(line)]
        assert not hits, f"{name}: {hits[:5]}"


def test_demo_ap_trampoline_is_short_real_mode_code(built):
    """The AP trampoline runs in real mode (emulated on nested KVM), so it is these 16-bit
    instructions and nothing more: cli; xor %ax,%ax; mov %ax,%ds; lock incl 0x8ff0; cli; hlt;
    jmp back to the cli."""
    tramp = bytes.fromhex("fa" "31c0" "8ed8" "66f0ff06f08f" "fa" "f4" "ebfc")
    data = Path(built[0]["demo"]).read_bytes()
    assert loaded_bytes(data, parse_elf32(data)).count(tramp) == 1


def test_build_guest_from_sources_outside_the_package(tmp_path):
    # Relative to the repository root, whatever the working directory.
    out = build_guest(["tests/guests/echo.c"], tmp_path / "sub" / "echo.elf")
    assert Path(out).is_file() and Path(out).parent.name == "sub"
    src = tmp_path / "mine.c"
    src.write_text('#include "rt.h"\nint main(const struct hvm_start_info *si)\n'
                   '{ (void)si; printf("%s %d\\n", GREETING, ANSWER); return 0; }\n')
    out = build_guest(src, tmp_path / "mine.elf",
                      defines={"GREETING": '"greeting-from-define"', "ANSWER": 42})
    data = Path(out).read_bytes()
    assert b"greeting-from-define" in loaded_bytes(data, parse_elf32(data))
    out2 = build_guest([src], tmp_path / "mine2.elf", defines=['GREETING="other"', "ANSWER=1"])
    assert b"other" in Path(out2).read_bytes()


def test_known_guest_names():
    guests = available_guests()
    assert EXPECTED <= set(guests)
    assert guests["demo"] == SRC_DIR / "demo.c"
    assert guests["echo"] == REPO_ROOT / "tests" / "guests" / "echo.c"


def test_build_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(GuestBuildError, match="unknown guest 'nope'"):
        build_guest("nope", tmp_path / "x.elf")
    with pytest.raises(GuestBuildError, match="not found"):
        build_guest([tmp_path / "missing.c"], tmp_path / "x.elf")
    bad = tmp_path / "bad.c"
    bad.write_text("int main(void) { return undefined_symbol; }\n")
    with pytest.raises(GuestBuildError, match="undefined_symbol"):
        build_guest(bad, tmp_path / "bad.elf")
    assert not (tmp_path / "bad.elf").exists()
    assert not list(tmp_path.glob(".bad.elf.*")), "temporary output left behind"
    monkeypatch.setenv("HVFRAME_GUEST_CC", "no-such-gcc-xyz")
    with pytest.raises(GuestBuildError, match="no-such-gcc-xyz"):
        build_guest("hello", tmp_path / "hello.elf")
    with pytest.raises(RuntimeError):       # GuestBuildError is a RuntimeError
        build_guest("hello", tmp_path / "hello.elf")


def test_cached_guest_builds_once_per_input(tmp_path):
    first = cached_guest("demo", tmp_path)
    mtime = Path(first).stat().st_mtime_ns
    assert cached_guest("demo", tmp_path) == first
    assert Path(first).stat().st_mtime_ns == mtime, "rebuilt although nothing changed"
    other = cached_guest("demo", tmp_path, defines={"UNUSED_FLAG": 1})
    assert other != first and Path(other).is_file()


def test_cached_guest_rebuilds_when_a_header_beside_its_sources_changes(tmp_path):
    """The shared guest headers (tests/guests/virtio_pci.h, ahci.h) sit beside the guests that
    include them: a change to one must not leave a stale cached ELF behind."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    header = src_dir / "shared.h"
    header.write_text("#define SHARED_WORD 1234\n")
    src = src_dir / "uses_header.c"
    src.write_text('#include "rt.h"\n#include "shared.h"\n'
                   "volatile unsigned shared_word = SHARED_WORD;\n"
                   "int main(const struct hvm_start_info *si) { (void)si; return 0; }\n")
    cache = tmp_path / "cache"
    first = cached_guest([src], cache)
    assert cached_guest([src], cache) == first
    header.write_text("#define SHARED_WORD 5678\n")
    second = cached_guest([src], cache)
    assert second != first, "a changed header reused the old build"
    assert Path(first).read_bytes() != Path(second).read_bytes()
    assert (5678).to_bytes(4, "little") in Path(second).read_bytes()
