"""The hooks device plugins implement, and the marker they implement them with.

Plugins are pluggy plugins found through the entry-point group `hvframe.devices`; pluggy is
used for discovery and construction only, never per exit. A plugin marks its hook with
`@hookimpl` from here (pluggy's HookimplMarker options, e.g. `@hookimpl(tryfirst=True)`, are
accepted). The marker notes the function and its options and applies pluggy's own marker
(HookimplMarker("hvframe")) once pluggy is loaded: at once if it already is, else when
`hvframe.plugins.new_plugin_manager()` makes a PluginManager. So `hvframe run`, which only
needs the device types of the plugins its command line names, calls those plain functions
and never imports pluggy, nor the `inspect` pluggy imports (about a seventh of a start-up
here).

A PluginManager made by other code (`pm.add_hookspecs(hvframe.hookspecs)`) sees the hooks
when pluggy was imported before this module and the plugins, or after
`apply_pluggy_markers()`.
"""
import sys
import weakref

PROJECT = "hvframe"

# The keyword options of pluggy's HookimplMarker; checked here, so that a bad one is the
# marking module's error when it is imported, not a later PluginManager's.
PLUGGY_OPTIONS = frozenset(("hookwrapper", "optionalhook", "tryfirst", "trylast", "specname",
                            "wrapper"))

# function -> its pluggy options; weak, so a module reloaded leaves no stale hook behind
_options: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_applied: "weakref.WeakSet" = weakref.WeakSet()   # functions pluggy's marker is on
_pluggy_loaded = False


def hookimpl(function=None, **options):
    """Mark a hook implementation: `@hookimpl` or `@hookimpl(**pluggy options)`."""
    unknown = sorted(set(options) - PLUGGY_OPTIONS)
    if unknown:
        raise TypeError(f"hookimpl() got unexpected keyword arguments: {', '.join(unknown)}")

    def mark(f):
        _options[f] = options
        if "pluggy" in sys.modules:
            _apply(f, options)
        return f
    return mark if function is None else mark(function)


def _load_pluggy():
    global _pluggy_loaded
    import pluggy
    if not _pluggy_loaded:
        _pluggy_loaded = True
        pluggy.HookspecMarker(PROJECT)(hvframe_device_types)
    return pluggy


def _apply(f, options) -> None:
    pluggy = _load_pluggy()
    if f not in _applied:
        pluggy.HookimplMarker(PROJECT)(**options)(f)
        _applied.add(f)


def apply_pluggy_markers() -> None:
    """Put pluggy's markers on the hook specification and on every function marked so far
    (and from now on at once)."""
    _load_pluggy()
    for f, options in list(_options.items()):
        _apply(f, options)


def plain_implementation(module, hook: str):
    """The function `module` offers as `hook` when it can be called as it is: marked here,
    bound at the module's top level under the hook's name, with no pluggy options (a
    wrapper, a specname, an order) that only a PluginManager would honour. Else None."""
    try:
        f = vars(module).get(hook)
        options = _options.get(f)
    except TypeError:           # no __dict__, or not weakly referenceable: none of ours
        return None
    return f if options == {} else None


def hvframe_device_types():
    """Return a list of hvframe.device.DeviceType this plugin offers."""


if "pluggy" in sys.modules:     # a PluginManager made by other code finds the specification
    apply_pluggy_markers()


def add_hookspecs(pm) -> None:
    """Declare these hooks to a PluginManager."""
    apply_pluggy_markers()
    pm.add_hookspecs(sys.modules[__name__])
