"""`hvframe new-device`: each kind of template is written, pip-installed into this venv
(--no-deps, no build isolation: nothing is fetched), listed by `hvframe devices`, passes its
own tests unchanged, and is uninstalled again."""
import os
import re
import subprocess
import sys

import pytest

from conftest import run_hvframe

KINDS = ("port", "pci", "virtio")


def pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The three template packages, made and installed; uninstalled at the end."""
    where = tmp_path_factory.mktemp("new-device")
    made = {}
    for kind in KINDS:
        name = f"kit-test-{kind}"
        p = run_hvframe(["new-device", name, "--kind", kind, "--dir", str(where)])
        assert p.returncode == 0, p.stderr
        made[kind] = (name, where / f"hvframe-{name}")
    p = pip("install", "-q", "--no-deps", "--no-build-isolation", *(str(d) for _, d in made.values()))
    if p.returncode != 0:
        pytest.skip(f"pip cannot install here: {p.stderr.strip().splitlines()[-1:]}")
    try:
        yield made
    finally:
        pip("uninstall", "-q", "-y", *(f"hvframe-{n}" for n, _ in made.values()))


def test_templates_list_and_pass_their_own_tests(installed, tmp_path):
    p = run_hvframe(["devices"])
    for kind, (name, _) in installed.items():
        kind_shown = "lpc" if kind == "port" else "pci"
        assert f"{name}  [{kind_shown}]  -- hvframe-{name} 0.1.0" in p.stdout
    env = dict(os.environ)
    env.pop("HVFRAME_LOCK_CHECK", None)       # the packages' fixtures module turns it on
    # One pytest run over the three packages' tests and benchmarks (each once, untimed),
    # from a directory of its own: nothing of this repository's test set-up applies.
    dirs = [str(root / sub) for _, root in installed.values() for sub in ("tests", "benchmarks")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                        "--benchmark-disable", "--rootdir", str(tmp_path), *dirs],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for name, _ in installed.values():          # every package's tests and benchmarks ran
        module = name.replace("-", "_")
        assert re.search(rf"test_{module}\.py::.+ PASSED", r.stdout), r.stdout
        assert re.search(rf"test_{module}_bench\.py::.+ PASSED", r.stdout), r.stdout


def test_template_bench_runs(installed):
    name, _ = installed["port"]
    p = run_hvframe(["bench", name, "--rounds", "1", "--exits", "50"])
    assert p.returncode == 0, p.stderr
    assert "DATA write" in p.stdout and "STATUS read" in p.stdout


@pytest.mark.parametrize("args, words", [
    (["new-device", "Bad_Name", "--kind", "pci"], "lower-case"),
    (["new-device", "ok-name", "--kind", "usb"], "--kind"),
])
def test_bad_names_and_kinds_are_refused(tmp_path, args, words):
    p = run_hvframe([*args, "--dir", str(tmp_path)])
    assert p.returncode == 4 and words in p.stderr and p.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_left_alone(tmp_path):
    (tmp_path / "hvframe-mine").mkdir()
    (tmp_path / "hvframe-mine" / "keep").write_text("mine")
    p = run_hvframe(["new-device", "mine", "--kind", "port", "--dir", str(tmp_path)])
    assert p.returncode == 4 and "exists already" in p.stderr
    assert [f.name for f in (tmp_path / "hvframe-mine").iterdir()] == ["keep"]
