"""One configuration tree for a machine, addressed by dotted paths as in bhyve's -o:
`cpus`, `memory.size`, `pci.0.2.0.device`, `lpc.com1.backend`, `boot.kernel`, `cpu.policy`.

Values are kept as given (strings from the command line); the consumer converts and
validates them, so that a bad value is reported with the option it belongs to.
"""
from __future__ import annotations

from .errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator


class Config:
    def __init__(self):
        self._root: dict[str, Any] = {}

    def set(self, path: str, value: Any) -> None:
        parts = path.split(".")
        if not path or any(not p for p in parts):
            raise ConfigError(f"-o {path}={value}: bad configuration path {path!r}")
        node = self._root
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"-o {path}: {p!r} is a value, not a group")
            node = nxt
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"-o {path}: is a group, not a value")
        node[parts[-1]] = value

    def get(self, path: str, default: Any = None) -> Any:
        node: Any = self._root
        for p in path.split("."):
            if not isinstance(node, dict) or p not in node:
                return default
            node = node[p]
        return node

    def group(self, path: str) -> dict[str, Any]:
        g = self.get(path, {})
        return g if isinstance(g, dict) else {}

    def has(self, path: str) -> bool:
        return self.get(path, _MISSING) is not _MISSING

    def items(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        def walk(node, path):
            for k, v in node.items():
                p = f"{path}.{k}" if path else k
                if isinstance(v, dict):
                    yield from walk(v, p)
                else:
                    yield p, v
        yield from walk(self.group(prefix) if prefix else self._root, prefix)


_MISSING = object()
