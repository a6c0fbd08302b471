"""Freestanding PVH guest kernels: the demo guest `hvframe run` boots by default, the test
guests, and the build kit that compiles them (see build.py)."""
from .build import (GuestBuildError, available_guests, build_all, build_guest, cached_guest,
                    resolve_sources)

__all__ = ["GuestBuildError", "available_guests", "build_all", "build_guest", "cached_guest",
           "resolve_sources"]
