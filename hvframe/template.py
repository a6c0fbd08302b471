"""`hvframe new-device NAME --kind port|pci|virtio [--dir DIR]`: a device plugin package to
start from, written from the templates in hvframe/templates:

    DIR/hvframe-NAME/pyproject.toml        the entry point in group hvframe.devices
    DIR/hvframe-NAME/hvframe_NAME/         the model (NAME.py) and its device type (plugin.py,
                                           with the benchmarks `hvframe bench NAME` runs)
    DIR/hvframe-NAME/tests/                its tests, on the synthetic machine, with the
                                           fixtures of hvframe's pytest plugin
    DIR/hvframe-NAME/benchmarks/           pytest-benchmark benchmarks of its register exits

It installs (`pip install -e DIR/hvframe-NAME`), lists in `hvframe devices` and passes its
own tests as written; then it is yours to change. plugins/virtio_rng and plugins/pci_counter
in hvframe's repository were made this way.
"""
from __future__ import annotations

import os
import re
from importlib import resources
from string import Template

from .errors import ConfigError

KINDS = {"port": ("lpc", "an LPC port device"),
         "pci": ("pci", "a PCI device with a memory BAR and MSI-X"),
         "virtio": ("pci", "a virtio-pci device")}
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def _values(name: str, kind: str) -> dict[str, str]:
    words = name.split("-")
    module_file = "_".join(words)
    return {
        "name": name, "kind": kind, "kind_label": KINDS[kind][1],
        "entry_kind": KINDS[kind][0],
        "dist": f"hvframe-{name}", "module": f"hvframe_{module_file}",
        "module_file": module_file, "Class": "".join(w.capitalize() for w in words),
        "factory": f"{module_file}_factory",
        "bench_extra": " and its data path" if kind == "virtio" else "",
    }


def new_device(name: str, kind: str, directory: str = ".") -> str:
    """Write the package; returns what was made and what to do next. ConfigError on a bad
    name or kind, or a directory that exists already."""
    if not _NAME.match(name) or len(name) > 40:
        raise ConfigError(f"new-device {name!r}: use lower-case letters, digits and single "
                          "dashes, starting with a letter (e.g. my-dev)")
    if kind not in KINDS:
        raise ConfigError(f"new-device: --kind {kind}: one of {', '.join(KINDS)}")
    v = _values(name, kind)
    root = os.path.join(directory, v["dist"])
    if os.path.exists(root):
        raise ConfigError(f"new-device: {root} exists already")
    files = {
        "pyproject.toml": ("common", "pyproject.toml"),
        "README.md": ("common", "README.md"),
        f"{v['module']}/__init__.py": ("common", "__init__.py"),
        f"{v['module']}/plugin.py": (kind, "plugin.py"),
        f"{v['module']}/{v['module_file']}.py": (kind, "model.py"),
        f"tests/test_{v['module_file']}.py": (kind, "test.py"),
        f"benchmarks/test_{v['module_file']}_bench.py": ("common", "bench.py"),
    }
    templates = resources.files("hvframe") / "templates"
    try:
        os.makedirs(os.path.join(root, v["module"]))
        os.makedirs(os.path.join(root, "tests"))
        os.makedirs(os.path.join(root, "benchmarks"))
    except OSError as e:
        raise ConfigError(f"new-device: {root}: {e.strerror}") from None
    for target, (group, source) in files.items():
        text = (templates / group / f"{source}.tmpl").read_text()
        with open(os.path.join(root, target), "w") as f:
            f.write(Template(text).substitute(v))
    return (f"made {root} ({KINDS[kind][1]}): {len(files)} files\n"
            f"  pip install -e {root}\n"
            f"  hvframe devices {name}\n"
            f"  python -m pytest {os.path.join(root, 'tests')}\n"
            f"  hvframe bench {name}")
