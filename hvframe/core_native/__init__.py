"""The compiled exit-dispatch core (built by `pip install`; see build_core.py)."""
try:
    from ._hvcore import ffi, lib  # noqa: F401
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "hvframe's native core is not built: install hvframe with pip "
        "(`pip install -e .`), which compiles hvframe/core_native with cffi") from e
