"""Build freestanding 32-bit PVH guest kernels with the system C compiler.

A guest is one or more C/assembly sources linked with the shared runtime in src/rt (PVH note,
entry, stack, COM1, printf, power-off, IDT with counting handlers, PCI config access) at
1 MiB into an ELF32 i386 executable:

    build_guest("demo", "/tmp/demo.elf")                        # a guest known by name
    build_guest(["tests/guests/echo.c"], "/tmp/echo.elf")       # any sources, anywhere
    build_all("/tmp/guests")                                    # every known guest
    cached_guest("demo")                                        # built once into a cache

Guests known by name are the `*.c` files of src/ (the demo) and of the repository's
tests/guests/ when it exists. The compiler is $HVFRAME_GUEST_CC, else `gcc`.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, Union

from ..errors import HvError

PKG_DIR = Path(__file__).resolve().parent
SRC_DIR = PKG_DIR / "src"
RT_DIR = SRC_DIR / "rt"
RT_SOURCES = (RT_DIR / "start.S", *sorted(RT_DIR.glob("*.c")))
LINKER_SCRIPT = RT_DIR / "guest.ld"
REPO_ROOT = PKG_DIR.parent.parent
TEST_GUEST_DIR = REPO_ROOT / "tests" / "guests"

# Guests run at CPL0, i.e. inside KVM's instruction emulator on a nested host: integer-only
# code (no SSE/x87, which the emulator or an unset CR4 would refuse), no stack protector
# (no TLS), no unwind tables, and no memset-loop-to-memset-call rewriting inside memset itself.
CFLAGS = (
    "-m32", "-march=i686", "-std=gnu11",
    "-ffreestanding", "-fno-pic", "-fno-pie", "-nostdlib", "-static", "-O2",
    "-mgeneral-regs-only", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables", "-fno-tree-loop-distribute-patterns", "-fno-common",
    "-Wall",
)
LDFLAGS = ("-no-pie", "-Wl,--build-id=none", "-Wl,-z,noexecstack")

Sources = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]
Defines = Union[Mapping[str, object], Iterable[str], None]


class GuestBuildError(HvError, RuntimeError):
    """A guest could not be built: missing tool, unknown guest or source, or a compile error."""


def compiler() -> str:
    return os.environ.get("HVFRAME_GUEST_CC") or "gcc"


def guest_dirs() -> list[Path]:
    """Where guests known by name live, searched in this order."""
    return [d for d in (SRC_DIR, TEST_GUEST_DIR) if d.is_dir()]


def available_guests() -> dict[str, Path]:
    """name -> main source of every guest known by name (first directory wins)."""
    found: dict[str, Path] = {}
    for d in guest_dirs():
        for src in sorted(d.glob("*.c")):
            found.setdefault(src.stem, src)
    return found


def _resolve_path(p: Union[str, os.PathLike]) -> Path:
    path = Path(p)
    if path.is_file():
        return path.resolve()
    alt = REPO_ROOT / path       # "tests/guests/x.c" works from any working directory
    if not path.is_absolute() and alt.is_file():
        return alt.resolve()
    raise GuestBuildError(f"guest source not found: {p}")


def resolve_sources(name_or_sources: Sources) -> list[Path]:
    """A guest name ("demo"), one source path, or a list of source paths -> source paths."""
    if isinstance(name_or_sources, (str, os.PathLike)):
        s = os.fspath(name_or_sources)
        if os.sep not in s and "/" not in s and not s.endswith((".c", ".S", ".s")):
            guests = available_guests()
            if s not in guests:
                raise GuestBuildError(f"unknown guest {s!r}; known: {', '.join(sorted(guests))}")
            return [guests[s]]
        return [_resolve_path(s)]
    srcs = [_resolve_path(p) for p in name_or_sources]
    if not srcs:
        raise GuestBuildError("no guest sources given")
    return srcs


def _define_flags(defines: Defines) -> list[str]:
    if defines is None:
        return []
    if isinstance(defines, Mapping):
        out = []
        for k, v in defines.items():
            if v is None or v is True:
                out.append(f"-D{k}")
            elif v is not False:
                out.append(f"-D{k}={v}")
        return out
    if isinstance(defines, str):
        defines = [defines]
    return [f"-D{d}" for d in defines]


def _command(cc: str, sources: list[Path], out: str, defines: Defines) -> list[str]:
    includes = {str(RT_DIR)} | {str(s.parent) for s in sources}
    return [cc, *CFLAGS, *(f"-I{i}" for i in sorted(includes)), *_define_flags(defines),
            *LDFLAGS, f"-Wl,-T,{LINKER_SCRIPT}", "-o", out,
            *(str(s) for s in RT_SOURCES), *(str(s) for s in sources)]


_MISSING_TOOL = re.compile(r"(?:exec|execute|find|run) '?([\w.+-]+)'?|'([\w.+-]+)': No such file")


@functools.lru_cache(maxsize=None)
def _check_toolchain(cc: str) -> None:
    """Prove `cc` can compile, assemble and link freestanding 32-bit x86 (cached per compiler)."""
    if shutil.which(cc) is None:
        raise GuestBuildError(f"C compiler {cc!r} not found: building hvframe guests needs gcc "
                              "with 32-bit x86 support (Debian: apt-get install gcc)")
    with tempfile.TemporaryDirectory(prefix="hvframe-cc-") as tmp:
        src = Path(tmp, "probe.c")
        src.write_text("void _start(void) { for (;;) __asm__ volatile(\"hlt\"); }\n")
        cmd = [cc, "-m32", "-ffreestanding", "-fno-pic", "-nostdlib", "-static", "-no-pie",
               "-o", str(Path(tmp, "probe")), str(src)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except OSError as e:
            raise GuestBuildError(f"C compiler {cc!r} cannot be run: {e}") from None
    if r.returncode != 0:
        err = r.stderr.strip()
        m = _MISSING_TOOL.search(err)
        what = f" (missing tool: {m.group(1) or m.group(2)})" if m else ""
        raise GuestBuildError(f"{cc} cannot build 32-bit x86 code with -m32{what}; it needs "
                              f"gcc and binutils with i386 support. {cc} said: "
                              + " | ".join(err.splitlines()[-3:]))


def build_guest(name_or_sources: Sources, out_path: Union[str, os.PathLike], *,
                defines: Defines = None) -> str:
    """Compile a guest (a name from available_guests(), a source path or a list of them) with
    the runtime into the ELF `out_path`; returns out_path as a string. `defines` is a mapping
    (NAME -> value, None/True for a bare -DNAME) or an iterable of "NAME[=value]" strings."""
    cc = compiler()
    _check_toolchain(cc)
    sources = resolve_sources(name_or_sources)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Link to a temporary name and rename: a reader never sees a half-written ELF.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run(_command(cc, sources, tmp, defines), capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise GuestBuildError(f"building guest {out.name} from "
                                  f"{', '.join(s.name for s in sources)} failed:\n{r.stderr.strip()}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(out)


def build_all(outdir: Union[str, os.PathLike]) -> dict[str, str]:
    """Build every guest known by name into `outdir` as <name>.elf, in parallel;
    returns {name: path}."""
    guests = available_guests()
    _check_toolchain(compiler())
    outdir = Path(outdir)
    with ThreadPoolExecutor(max_workers=max(1, min(len(guests), os.cpu_count() or 2))) as pool:
        futures = {name: pool.submit(build_guest, [src], outdir / f"{name}.elf")
                   for name, src in guests.items()}
        return {name: f.result() for name, f in futures.items()}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hvframe" / "guests"


def cached_guest(name_or_sources: Sources = "demo", cache_dir: Union[str, os.PathLike, None] = None,
                 *, defines: Defines = None) -> str:
    """Path of a built guest in a cache directory, building it only when the sources, the
    headers beside them (shared guest headers such as tests/guests/virtio_pci.h), runtime,
    flags or compiler changed (the key is a hash of all of them). Used by `hvframe run` for
    its default demo guest."""
    sources = resolve_sources(name_or_sources)
    cc = compiler()
    h = hashlib.sha256()
    h.update(repr((cc, CFLAGS, LDFLAGS, _define_flags(defines))).encode())
    inputs = [*RT_SOURCES, LINKER_SCRIPT, *sorted(RT_DIR.glob("*.h")), *sources]
    for d in {s.parent for s in sources}:
        inputs += sorted(d.glob("*.h"))
    for p in inputs:
        h.update(str(p.name).encode() + b"\0" + p.read_bytes())
    stem = sources[0].stem
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = out / f"{stem}-{h.hexdigest()[:16]}.elf"
    if not path.exists():
        build_guest(sources, path, defines=defines)
    return str(path)
