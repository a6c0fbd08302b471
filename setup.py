"""Build steps pyproject.toml cannot express: the cffi native core, the demo guest, and the
bytecode of an editable install."""
import compileall
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithDemoGuest(build_py):
    """Compile the embedded demo guest into the package, so `hvframe run` needs no compiler."""

    def run(self):
        super().run()
        sys.path.insert(0, HERE)
        try:
            from hvframe.guests.build import GuestBuildError, build_guest
            targets = [os.path.join(HERE, "hvframe", "guests", "demo.elf")]
            if not self.editable_mode:
                targets.append(os.path.join(self.build_lib, "hvframe", "guests", "demo.elf"))
            for out in targets:
                try:
                    build_guest("demo", out)
                except GuestBuildError as e:  # hvframe run builds it on first use instead
                    print(f"warning: demo guest not built at install: {e}", file=sys.stderr)
        finally:
            sys.path.remove(HERE)
        if self.editable_mode:
            # pip compiles a wheel's modules at install, but not an editable tree's: without
            # this every `hvframe run` compiles its imports from source (where the
            # environment sets PYTHONDONTWRITEBYTECODE, on every start).
            for tree in [os.path.join(HERE, "hvframe")] + glob.glob(
                    os.path.join(HERE, "plugins", "*", "hvframe_*")):
                compileall.compile_dir(tree, quiet=1)


setup(
    cffi_modules=["hvframe/core_native/build_core.py:ffibuilder",
                  "hvframe/core_native/build_api.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithDemoGuest},
)
