"""Plugin discovery: a pluggy PluginManager named `hvframe` over the `hvframe.devices`
entry points, turned into a name -> DeviceType registry."""
from __future__ import annotations

import importlib

import pluggy

from . import hookspecs
from .device import DeviceType
from .errors import ConfigError

ENTRY_POINT_GROUP = "hvframe.devices"
BUILTIN_PLUGINS = ("hvframe.platform.plugin", "hvframe.pci.plugin", "hvframe.lpc.plugin")


def plugin_manager(entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("hvframe")
    pm.add_hookspecs(hookspecs)
    if entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    # Built-in platform devices are plugins too; registered directly when hvframe runs from a
    # source tree whose entry points are not installed.
    for modname in BUILTIN_PLUGINS:
        mod = importlib.import_module(modname)
        if not pm.is_registered(mod):
            pm.register(mod, name=modname)
    return pm


class Registry:
    """All installed device types, by name and alias."""

    def __init__(self, pm: pluggy.PluginManager | None = None):
        self.pm = pm or plugin_manager()
        packages = {id(plugin): f"{dist.project_name} {dist.version}"
                    for plugin, dist in self.pm.list_plugin_distinfo()}
        self.types: list[DeviceType] = []
        self._by_name: dict[str, DeviceType] = {}
        for impl in self.pm.hook.hvframe_device_types.get_hookimpls():
            package = packages.get(id(impl.plugin), "hvframe (built in)")
            for dt in impl.function() or ():
                if not isinstance(dt, DeviceType):
                    raise ConfigError(f"plugin {impl.plugin_name} returned {dt!r}, not a DeviceType")
                dt.package = package
                for name in dt.names:
                    if name in self._by_name:
                        other = self._by_name[name]
                        raise ConfigError(f"device name {name!r} is offered by both "
                                          f"{other.package} and {package}")
                    self._by_name[name] = dt
                self.types.append(dt)
        self.types.sort(key=lambda t: (t.kind, t.name))

    def get(self, name: str, kind: str | None = None) -> DeviceType | None:
        dt = self._by_name.get(name)
        if dt is not None and kind is not None and dt.kind != kind:
            return None
        return dt

    def names(self, kind: str | None = None) -> list[str]:
        return sorted(n for n, t in self._by_name.items() if kind is None or t.kind == kind)

    def require(self, name: str, kind: str, where: str) -> DeviceType:
        dt = self.get(name, kind)
        if dt is None:
            installed = ", ".join(self.names(kind)) or "none"
            hint = ""
            other = self.get(name)
            if other is not None:
                hint = f" ({name} is a {other.kind} device)"
            raise ConfigError(f"{where}: unknown {kind.upper() if kind != 'platform' else kind} "
                              f"device {name!r}{hint}; installed: {installed} (see `hvframe devices`)")
        return dt

    def describe(self) -> str:
        """The `hvframe devices` listing."""
        lines = []
        for t in self.types:
            alias = f" (aliases: {', '.join(t.aliases)})" if t.aliases else ""
            lines.append(f"{t.name}  [{t.kind}]  {t.summary}{alias}  -- {t.package}")
            for o in t.options:
                pos = " (positional)" if o.name in t.positional else ""
                lines.append(f"    {o.describe()}{pos}")
        return "\n".join(lines)
