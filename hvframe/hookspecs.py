"""The hooks device plugins implement, and the marker they implement them with.

Plugins are pluggy plugins found through the entry-point group `hvframe.devices`; pluggy is
used for discovery and construction only, never per exit. A plugin marks its hook with
`@hookimpl` from here (pluggy's HookimplMarker options, e.g. `@hookimpl(tryfirst=True)`, are
accepted). The marker notes the function under its module's name and applies pluggy's own
marker (HookimplMarker("hvframe")) once pluggy is loaded: when `hvframe.plugins` makes a
PluginManager, or at once if pluggy is already imported. So `hvframe run`, which only needs
the device types of the plugins its command line names, calls those plain functions and never
imports pluggy, nor the `inspect` pluggy imports (about a seventh of a start-up here).

A PluginManager made by other code sees these markers once `apply_pluggy_markers()` has run
(hvframe.plugins.new_plugin_manager() runs it).
"""
import sys

PROJECT = "hvframe"

# module name -> [(function, pluggy HookimplMarker options)], in definition order
_marked: dict = {}
_applied: set = set()       # the functions pluggy's marker has been applied to
_pluggy_hookimpl = None     # pluggy.HookimplMarker(PROJECT), once pluggy is loaded


def hookimpl(function=None, **options):
    """Mark a hook implementation: `@hookimpl` or `@hookimpl(**pluggy options)`."""
    def mark(f):
        _marked.setdefault(f.__module__, []).append((f, options))
        if _pluggy_hookimpl is not None or "pluggy" in sys.modules:
            _apply(f, options)
        return f
    return mark if function is None else mark(function)


def _apply(f, options) -> None:
    global _pluggy_hookimpl
    if _pluggy_hookimpl is None:
        import pluggy
        _pluggy_hookimpl = pluggy.HookimplMarker(PROJECT)
    if f not in _applied:
        _pluggy_hookimpl(**options)(f)      # a bad option is pluggy's TypeError, as before
        _applied.add(f)


def apply_pluggy_markers() -> None:
    """Put pluggy's marker on every function marked so far (and from now on at once)."""
    for functions in list(_marked.values()):
        for f, options in functions:
            _apply(f, options)


def plain_implementations(module_name: str, hook: str):
    """The functions `module_name` marks as implementing `hook`, when every one of them can
    be called as it is: no pluggy options (a wrapper, a specname, an order) that only a
    PluginManager would honour. None when there is none, or one needs pluggy."""
    marked = _marked.get(module_name)
    if not marked or any(options for _, options in marked):
        return None
    found = [f for f, _ in marked if f.__name__ == hook]
    return found or None


def hvframe_device_types():
    """Return a list of hvframe.device.DeviceType this plugin offers."""


def add_hookspecs(pm) -> None:
    """Declare these hooks to a PluginManager (pluggy's HookspecMarker applied here, so that
    importing this module needs no pluggy)."""
    import pluggy
    pluggy.HookspecMarker(PROJECT)(hvframe_device_types)
    pm.add_hookspecs(sys.modules[__name__])
