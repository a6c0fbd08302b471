"""Run a target under atheris: ``python fuzz/targets/NAME.py [libFuzzer flags] [corpus dirs]``.

hvframe and its plugins are imported inside ``atheris.instrument_imports`` so that their
Python code reports edges to libFuzzer (the cffi core is not compiled with coverage: its
bugs show up as crashes, which the guard pages make immediate). Nothing from hvframe may be
imported before ``run_target`` is called, hence the targets' ``if __name__ == "__main__"``
block at their very top.
"""
from __future__ import annotations

import importlib.util
import os
import sys

INSTRUMENTED = ["hvframe", "hvframe_virtio_blk", "hvframe_virtio_net", "hvframe_ahci", "hvframe_uart"]
FUZZ_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_target(path: str, instrument: bool = False):
    name = "hvframe_fuzz_target_" + os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules:
        return sys.modules[name]
    if FUZZ_DIR not in sys.path:
        sys.path.insert(0, FUZZ_DIR)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if instrument:
        import atheris
        with atheris.instrument_imports(include=INSTRUMENTED + ["fuzzlib"]):
            spec.loader.exec_module(module)
    else:
        spec.loader.exec_module(module)
    return module


def run_target(path: str) -> None:
    import atheris
    already = [m for m in INSTRUMENTED if m in sys.modules]
    if already:
        print(f"warning: {already} imported before instrumentation; coverage will miss them",
              file=sys.stderr)
    module = load_target(path, instrument=True)
    atheris.Setup(sys.argv, module.one_input)
    atheris.Fuzz()
