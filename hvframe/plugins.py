"""Plugin discovery: the `hvframe.devices` entry points, read as metadata, turned into a
name -> DeviceType registry whose plugins are imported only when one of their devices is
needed.

Entry points (in a plugin's pyproject.toml) come in two styles:

- One entry point per device name (this is how every plugin in this tree declares itself):

      [project.entry-points."hvframe.devices"]
      com1 = "hvframe_uart.plugin:lpc"
      uart = "hvframe_uart.plugin:pci"

  The name is the device name (`-s slot,NAME` / `-l NAME`; every alias needs one too), the
  value the plugin module, and after the colon the device's kind (pci, lpc or platform) --
  the kind, not an attribute: these entry points are read, never `.load()`ed. The module is
  imported when one of its devices is named on the command line or in the configuration
  tree, or when it offers a platform device (those are in every machine). Its
  `hvframe_device_types` hook must then offer exactly the names and kinds its entry points
  declare; a plugin whose metadata and hooks disagree is an error (one line, exit status 4).

- Any other entry point (old style: `name = "module"` or `name = "module:object"`, the name
  arbitrary) is a pluggy plugin imported eagerly, as before, and offers whatever its hook
  returns.

The built-in platform, PCI and LPC plugins are declared the first way in hvframe's own
pyproject.toml; they are registered directly when hvframe runs from a source tree whose entry
points are not installed.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections import namedtuple

from . import hookspecs
from .errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import pluggy

    from .device import DeviceType

ENTRY_POINT_GROUP = "hvframe.devices"
BUILTIN_PLUGINS = ("hvframe.platform.plugin", "hvframe.pci.plugin", "hvframe.lpc.plugin")
KINDS = ("pci", "lpc", "platform")      # hvframe.device.KINDS, without importing it


class PluginError(ConfigError):
    """A plugin that cannot be imported, or whose metadata and hooks disagree."""


class Entry(namedtuple("Entry", "name module attr kind package")):
    """One entry point of the group. kind is None for an old-style (eager) entry.
    name, module: str; attr, kind: str or None; package: str, e.g. "hvframe-uart 0.1.0"."""
    __slots__ = ()


# ---- reading the metadata -------------------------------------------------------------------

def _normalize(name: str) -> str:
    return name.replace("-", "_").replace(".", "_").lower()


def _dist_header(path: str, fallback: tuple[str, str]) -> tuple[str, str]:
    """Name and Version from a METADATA / PKG-INFO file's header (read by hand: the email
    parser importlib.metadata uses costs more than reading everything else here)."""
    name, version = fallback
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                if key == "Name":
                    name = value.strip()
                elif key == "Version":
                    version = value.strip()
    except OSError:
        pass
    return name, version


def _parse_group(text: str, group: str) -> list[tuple[str, str]]:
    """The `name = value` lines of one [section] of an entry_points.txt."""
    out, inside = [], False
    for line in text.splitlines():
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and s.endswith("]"):
            inside = s[1:-1].strip() == group
            continue
        if inside:
            name, eq, value = s.partition("=")
            if eq:
                out.append((name.strip(), value.strip()))
    return out


def _entry(name: str, value: str, package: str) -> Entry:
    value = value.split("[", 1)[0].strip()          # extras: deprecated, ignored
    module, colon, attr = (p.strip() for p in value.partition(":"))
    if colon and attr in KINDS:
        return Entry(name, module, None, attr, package)
    return Entry(name, module, attr or None, None, package)


def read_entry_points(group: str = ENTRY_POINT_GROUP, path: list[str] | None = None) -> list[Entry]:
    """Every entry point of `group` of the distributions on sys.path, without importing any
    plugin. The first distribution of a name on the path wins, as with importlib.metadata."""
    seen: set[str] = set()
    out: list[Entry] = []
    for base in (sys.path if path is None else path):
        base = base or "."
        if not os.path.isdir(base):
            if os.path.isfile(base):    # a zip on the path: let importlib.metadata read it
                out.extend(e for e in _read_with_importlib(group, base) if _normalize(
                    e.package.rsplit(" ", 1)[0]) not in seen)
            continue
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        for d in names:
            if d.endswith(".dist-info"):
                meta = "METADATA"
            elif d.endswith(".egg-info"):
                meta = "PKG-INFO"
            else:
                continue
            stem = d.rsplit(".", 1)[0]
            dname, _, dversion = stem.partition("-")
            key = _normalize(dname)
            if key in seen:
                continue
            seen.add(key)
            full = os.path.join(base, d)
            try:
                with open(os.path.join(full, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            items = _parse_group(text, group)
            if not items:
                continue
            name, version = _dist_header(os.path.join(full, meta), (dname, dversion.split("-")[0]))
            package = f"{name} {version}".strip()
            out.extend(_entry(n, v, package) for n, v in items)
    return out


def _read_with_importlib(group: str, base: str) -> list[Entry]:
    from importlib.metadata import distributions
    out = []
    for dist in distributions(path=[base]):
        package = f"{dist.metadata['Name']} {dist.version}"
        out.extend(_entry(ep.name, ep.value, package) for ep in dist.entry_points
                   if ep.group == group)
    return out


# ---- the plugin manager and the registry ----------------------------------------------------

def new_plugin_manager() -> pluggy.PluginManager:
    """pluggy's PluginManager for hvframe's hooks, which sees every function marked with
    hvframe.hookspecs.hookimpl (imports pluggy)."""
    import pluggy
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    hookspecs.add_hookspecs(pm)         # pluggy's markers on every hook marked so far, too
    return pm


def plugin_manager(entry_points: bool = True) -> pluggy.PluginManager:
    """A PluginManager with every plugin imported (the built-ins, and with entry_points every
    installed one): for tools that want them all. `Registry()` imports lazily instead."""
    pm = new_plugin_manager()
    modules = list(BUILTIN_PLUGINS)
    if entry_points:
        for e in read_entry_points():
            if e.module not in modules:
                modules.append(e.module)
    for modname in modules:
        if pm.get_plugin(modname) is None:
            pm.register(importlib.import_module(modname), name=modname)
    return pm


def _hook_functions(pm: pluggy.PluginManager, plugin) -> list:
    """The hvframe_device_types implementations a PluginManager holds for one plugin."""
    return [i.function for i in pm.hook.hvframe_device_types.get_hookimpls()
            if i.plugin is plugin]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Registry:
    """The installed device types, by name and alias. Plugins are imported when a device of
    theirs is looked up (`get`, `require`) or listed in full (`load_all`); those offering
    platform devices (unless platform=False), and old-style entry points, when the registry
    is made.

    Registry(pm) takes the devices of an existing PluginManager's plugins instead (all of them,
    at once), e.g. Registry(plugin_manager(entry_points=False)) for the built-ins alone."""

    def __init__(self, pm: pluggy.PluginManager | None = None,
                 entries: list[Entry] | None = None, *, platform: bool = True,
                 skip_broken: bool = False):
        # skip_broken (listings): a plugin that cannot be loaded is noted in `broken`
        # instead of stopping everything.
        self._skip_broken = skip_broken
        self.broken: list[str] = []
        self._by_name: dict[str, DeviceType] = {}
        self._types: list[DeviceType] = []
        self._declared: dict[str, Entry] = {}          # device name -> its entry point
        self._modules: dict[str, list[Entry]] = {}     # plugin module -> its entry points
        self._loaded: set[str] = set()
        self._pm = pm
        self._unregistered: list = []                  # (module name, module) loaded without pm
        if pm is not None:
            for plugin_name, plugin in pm.list_name_plugin():
                if plugin is not None:
                    self._add_plugin(plugin_name, _hook_functions(pm, plugin),
                                     "hvframe (built in)" if plugin_name in BUILTIN_PLUGINS
                                     else plugin_name, [])
            return
        if entries is None:
            entries = read_entry_points()
        eager: list[str] = []
        for e in entries:
            self._modules.setdefault(e.module, []).append(e)
            if e.kind is None or (platform and e.kind == "platform"):
                if e.module not in eager:
                    eager.append(e.module)
            if e.kind is None:
                continue
            other = self._declared.get(e.name)
            if other is not None and other.module != e.module:
                raise PluginError(f"device name {e.name!r} is offered by both {other.package} "
                                  f"({other.module}) and {e.package} ({e.module})")
            self._declared[e.name] = e
        # A source tree whose own entry points are not installed: the built-ins, directly.
        for modname in BUILTIN_PLUGINS:
            if modname not in self._modules:
                self._modules[modname] = []
                eager.append(modname)
        # platform=False (the `hvframe devices` listing): no machine is built, so plugins
        # offering platform devices are imported only if their devices are looked up.
        for modname in eager:
            self._load(modname)

    # -- importing a plugin ------------------------------------------------------------------

    @property
    def pm(self) -> pluggy.PluginManager:
        """The PluginManager the imported plugins are registered with (made on first use,
        with every plugin imported so far: a run that needs none never imports pluggy)."""
        if self._pm is None:
            self._pm = new_plugin_manager()
            for modname, mod in self._unregistered:
                self._register(modname, mod)
            self._unregistered = []
        return self._pm

    def _register(self, modname: str, mod) -> None:
        if self._pm.get_plugin(modname) is None and not self._pm.is_registered(mod):
            self._pm.register(mod, name=modname)

    def _package(self, modname: str) -> str:
        entries = self._modules.get(modname)
        return entries[0].package if entries else "hvframe (built in)"

    def _load(self, modname: str) -> None:
        if modname in self._loaded:
            return
        self._loaded.add(modname)
        entries = self._modules.get(modname, [])
        package = self._package(modname)
        label = f"plugin {modname} ({package})"
        try:
            mod = importlib.import_module(modname)
            old_style = False
            for e in entries:
                if e.kind is None and e.attr:      # old style, `module:object`
                    mod = getattr(mod, e.attr)
                    old_style = True
                    break
            # A module whose hook is a plain function marked with hvframe's hookimpl is
            # called as it is (no pluggy); anything else is registered with pluggy now.
            plain = None if old_style else \
                hookspecs.plain_implementation(mod, "hvframe_device_types")
            if plain is None:
                pm = self.pm
                self._register(modname, mod)
                functions = _hook_functions(pm, mod)
            else:
                functions = [plain]
                if self._pm is None:
                    self._unregistered.append((modname, mod))
                else:
                    self._register(modname, mod)
        except Exception as e:
            error = PluginError(f"{label} cannot be loaded: {_one_line(e)}")
            if not self._skip_broken:
                raise error from None
            self.broken.append(str(error))
            return
        try:
            self._add_plugin(modname, functions, package,
                             [e for e in entries if e.kind is not None])
        except PluginError as e:
            if not self._skip_broken:
                raise
            self.broken.append(str(e))

    def _add_plugin(self, modname: str, functions, package: str, declared: list[Entry]) -> None:
        label = f"plugin {modname} ({package})"
        types: list[DeviceType] = []
        for function in functions:
            try:
                types.extend(function() or ())
            except Exception as e:
                raise PluginError(f"{label}: hvframe_device_types failed: {_one_line(e)}") from None
        from .device import DeviceType
        offered: dict[str, str] = {}
        for dt in types:
            if not isinstance(dt, DeviceType):
                raise PluginError(f"{label} returned {dt!r}, not a DeviceType")
            for name in dt.names:
                offered[name] = dt.kind
        if declared:
            self._check_metadata(label, declared, offered)
        for dt in types:
            dt.package = package
            for name in dt.names:
                other = self._by_name.get(name)
                if other is not None and other is not dt:
                    raise PluginError(f"device name {name!r} is offered by both "
                                      f"{other.package} and {package}")
                self._by_name[name] = dt
            self._types.append(dt)
        self._types.sort(key=lambda t: (t.kind, t.name))

    @staticmethod
    def _check_metadata(label: str, declared: list[Entry], offered: dict[str, str]) -> None:
        named = {e.name: e.kind for e in declared}
        problems = []
        missing = sorted(n for n in named if n not in offered)
        if missing:
            problems.append(f"its entry points name {', '.join(missing)}, which its "
                            f"hvframe_device_types hook does not offer")
        extra = sorted(n for n in offered if n not in named)
        if extra:
            problems.append(f"its hook offers {', '.join(extra)}, which no entry point names")
        kinds = sorted(f"{n} is {offered[n]}, not {k}" for n, k in named.items()
                       if n in offered and offered[n] != k)
        if kinds:
            problems.append(f"kinds differ ({'; '.join(kinds)})")
        if problems:
            raise PluginError(f"{label}: metadata and hooks disagree: {'; '.join(problems)} "
                              f"(reinstall the package, or fix its [project.entry-points."
                              f"\"{ENTRY_POINT_GROUP}\"])")

    def load_all(self) -> None:
        """Import every plugin (for the full `hvframe devices -v` listing)."""
        for modname in list(self._modules):
            self._load(modname)

    # -- looking devices up ------------------------------------------------------------------

    @property
    def types(self) -> list[DeviceType]:
        """The device types of the plugins imported so far: every platform device, and the
        devices of the plugins that were looked up."""
        return list(self._types)

    def kind_of(self, name: str) -> str | None:
        dt = self._by_name.get(name)
        if dt is not None:
            return dt.kind
        e = self._declared.get(name)
        return e.kind if e is not None else None

    def get(self, name: str, kind: str | None = None) -> DeviceType | None:
        dt = self._by_name.get(name)
        if dt is None:
            e = self._declared.get(name)
            if e is None or (kind is not None and e.kind != kind):
                return None
            self._load(e.module)
            dt = self._by_name.get(name)
        if dt is not None and kind is not None and dt.kind != kind:
            return None
        return dt

    def names(self, kind: str | None = None) -> list[str]:
        found = {n: t.kind for n, t in self._by_name.items()}
        for n, e in self._declared.items():
            found.setdefault(n, e.kind)
        return sorted(n for n, k in found.items() if kind is None or k == kind)

    def require(self, name: str, kind: str, where: str) -> DeviceType:
        dt = self.get(name, kind)
        if dt is None:
            installed = ", ".join(self.names(kind)) or "none"
            hint = ""
            other = self.kind_of(name)
            if other is not None:
                hint = f" ({name} is a {other} device)"
            raise ConfigError(f"{where}: unknown {kind.upper() if kind != 'platform' else kind} "
                              f"device {name!r}{hint}; installed: {installed} (see `hvframe devices`)")
        return dt

    # -- listing -----------------------------------------------------------------------------

    def describe(self, verbose: bool = False, names: list[str] | None = None) -> str:
        """The `hvframe devices` listing. Plain: every device name with its kind and package,
        from the metadata (no plugin imported). verbose, or names given: summaries and options
        (importing the plugins concerned)."""
        if names:
            chosen = []
            for n in names:
                dt = self.get(n)
                if dt is None:
                    raise ConfigError(f"devices: unknown device {n!r}; installed: "
                                      f"{', '.join(self.names())}")
                if dt not in chosen:
                    chosen.append(dt)
            return self._describe_types(chosen)
        if verbose:
            self.load_all()
            return self._describe_types(self._types)
        rows = {}
        for n, e in self._declared.items():
            rows[n] = (e.kind, e.package)
        for t in self._types:
            for n in t.names:
                rows[n] = (t.kind, t.package)
        order = sorted(rows, key=lambda n: (rows[n][0], n))
        return "\n".join(f"{n}  [{rows[n][0]}]  -- {rows[n][1]}" for n in order)

    @staticmethod
    def _describe_types(types: list[DeviceType]) -> str:
        lines = []
        for t in types:
            alias = f" (aliases: {', '.join(t.aliases)})" if t.aliases else ""
            lines.append(f"{t.name}  [{t.kind}]  {t.summary}{alias}  -- {t.package}")
            for o in t.options:
                pos = " (positional)" if o.name in t.positional else ""
                lines.append(f"    {o.describe()}{pos}")
            for g in t.groups:
                top = f"0-{g.max_count - 1}" if g.max_count else "0, 1, ..."
                lines.append(f"    {g.name}.N.<option>  N = {top}"
                             f"{'  ' + g.help if g.help else ''}:")
                for o in g.options_class.options():
                    lines.append(f"        {o.describe()}")
            examples = t.example_lines()
            if examples:
                lines.append("    examples:")
                lines.extend(f"        {e}" for e in examples)
        return "\n".join(lines)
