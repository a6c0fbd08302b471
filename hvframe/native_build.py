"""Build a device plugin's native module against hvframe's core, with cffi, at install time.

A plugin's build script (named in its setup.py's ``cffi_modules``) calls ``plugin_ffi``::

    ffibuilder = plugin_ffi("hvframe_mydev._native", HERE, ["mydev.c"],
                            cdef="int mydev_bind(const struct hv_api *api); ...",
                            structs={"mydev_hdr": MyDevHeader}, constants={"MYDEV_OK": OK})

- The module's C files include ``hvframe_native.h`` (on the include path) and reach the core
  through ``struct hv_api`` (HV_PLUGIN_API in the header defines the table pointer and the
  bind function; call ``hvframe.core_native.bind(lib.mydev_bind)`` once at import).
- The FFI includes the core's (``ffi.include``), so the core's types (``struct hv_vq``,
  ``struct hv_ram``, ``hv_chain_fn``...) are shared: a queue set up by hvframe.virtio.native
  can be handed to the plugin's functions and the plugin's chain servers to the core's.
- A native bus handler of the plugin (``hv_native_fn``, registered with
  ``Bus.register_native``) passes what it does not serve to a Python handler with
  ``hv->py_call(handle, offset, size, value, is_write)``, ``handle`` being a
  ``hvframe.dispatch.PythonHandle``'s; never with a lock held that the handler may take.
- ``structs`` and ``constants`` are generated into C (and into the cdef) from the plugin's
  construct declarations: the layout is declared once, in Python (hvframe.layout.c_layouts).

A plugin published on its own lists ``hvframe`` in its ``[build-system] requires``, so that
this module can be imported at build time.
"""
from __future__ import annotations

import importlib.util
import os

from cffi import FFI

from .layout import c_layouts

CORE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core_native")
INCLUDE_DIR = os.path.join(CORE_DIR, "include")

_build_api = None


def _api_builder():
    """hvframe/core_native/build_api.py, loaded once."""
    global _build_api
    if _build_api is None:
        spec = importlib.util.spec_from_file_location(
            "_hvframe_build_api", os.path.join(CORE_DIR, "build_api.py"))
        _build_api = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_build_api)
    return _build_api


def core_ffi() -> FFI:
    """The FFI builder of the core's native API (build_api.py), to include."""
    return _api_builder().ffibuilder


def plugin_ffi(module: str, source_dir: str, sources: list[str], *, cdef: str,
               structs: dict | None = None, constants: dict | None = None,
               libraries: list[str] | None = None,
               define_macros: list[tuple[str, str | None]] | None = None) -> FFI:
    """An FFI builder for the plugin module ``module`` (dotted, e.g. ``hvframe_x._native``)
    compiled from ``sources`` (C files in ``source_dir``, one translation unit), linked
    with ``libraries`` and compiled with ``define_macros``."""
    decls, checks = c_layouts(structs or {}, constants or {})
    ffi = FFI()
    ffi.include(core_ffi())
    ffi.cdef(decls + cdef)
    # The API's own generated layouts (the vring structs) come first, as in the core.
    ring_decls = _api_builder().ring_layouts()[0]
    ffi.set_source(
        module,
        "#include <stdint.h>\n" + ring_decls + '#include "hvframe_native.h"\n' + decls + checks
        + "".join(f'#include "{s}"\n' for s in sources),
        include_dirs=[INCLUDE_DIR, source_dir],
        depends=[os.path.join(source_dir, s) for s in sources]
        + [os.path.join(INCLUDE_DIR, "hvframe_native.h")],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
        libraries=list(libraries or ()),
        define_macros=list(define_macros or ()),
    )
    return ffi


def can_link(header: str, library: str, call: str) -> bool:
    """Whether this build can compile ``#include <header>`` and link ``call`` (a C
    statement) against ``-l<library>``: for an optional backend of a plugin (the module is
    built without it when the development files are missing)."""
    import shutil
    import subprocess
    import sysconfig
    import tempfile
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if not shutil.which(cc[0]):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(f"#include <{header}>\nint main(void) {{ {call} return 0; }}\n")
        try:
            # The flags a setuptools build would pass too (a library in another prefix).
            flags = os.environ.get("CFLAGS", "").split() + os.environ.get("LDFLAGS", "").split()
            r = subprocess.run([*cc, *flags, src, "-o", os.path.join(tmp, "probe"),
                                f"-l{library}"], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return r.returncode == 0
