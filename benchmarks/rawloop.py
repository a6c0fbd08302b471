"""Raw tap reads and writes in a C loop: the reference the network benchmarks compare with.

The device's data path is C (one read() or writev() per frame, no interpreter in between), so
the raw side it is measured against must be C too: a Python loop of os.write()/os.read()
adds the interpreter's call overhead (and os.read's allocation of a bytes object) to every
frame, which measured here 0.3-0.5 us a frame on 1.2-1.4 us of syscall: 25-40% more time on
the raw side, all of it in the device's favour (2026-12-02, benchmarks/test_virtio_net_datapath.py).

``loops()`` builds the two loops once per process with cffi (into a temporary directory; a C
compiler is needed, as for the plugins' native modules) and returns their ``lib``, or raises
pytest's skip with the reason when it cannot.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import tempfile

import pytest

_CDEF = """
long hv_raw_write_n(int fd, const unsigned char *buf, size_t len, int n);
long hv_raw_read_n(int fd, unsigned char *buf, size_t cap, int n);
"""

_SOURCE = r"""
#include <errno.h>
#include <poll.h>
#include <unistd.h>

/* n write()s of buf: n, or -errno of the first that failed. */
long hv_raw_write_n(int fd, const unsigned char *buf, size_t len, int n)
{
    for (int i = 0; i < n; i++) {
        ssize_t k = write(fd, buf, len);
        if (k < 0 && errno == EINTR) {
            i--;
            continue;
        }
        if (k < 0)
            return -errno;
    }
    return n;
}

/* n read()s into buf (cap bytes; each read is one frame of a tap), waiting for input if the
 * descriptor is non-blocking and empty (2 s at most): the bytes read, or -errno. */
long hv_raw_read_n(int fd, unsigned char *buf, size_t cap, int n)
{
    long total = 0;
    for (int i = 0; i < n; i++) {
        ssize_t k = read(fd, buf, cap);
        if (k < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd p = { .fd = fd, .events = POLLIN };
            if (errno == EAGAIN && poll(&p, 1, 2000) == 0)
                return -ETIMEDOUT;          /* a frame the round counted on never came */
            i--;
            continue;
        }
        if (k < 0)
            return -errno;
        total += k;
    }
    return total;
}
"""


@functools.lru_cache(maxsize=None)
def _build():
    try:
        from cffi import FFI
        ffi = FFI()
        ffi.cdef(_CDEF)
        ffi.set_source("_hv_rawloop", _SOURCE)
        out = tempfile.mkdtemp(prefix="hv-rawloop-")
        path = ffi.compile(tmpdir=out, verbose=False)
    except Exception as e:                      # no compiler, no headers
        return None, f"cannot build the C raw loop: {e}"
    spec = importlib.util.spec_from_file_location("_hv_rawloop", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules.setdefault("_hv_rawloop", mod)
    return mod, None


def loops():
    """(ffi, lib) of the C loops; skips the calling test when they cannot be built."""
    mod, why = _build()
    if mod is None:
        pytest.skip(why)
    return mod.ffi, mod.lib


def write_n(fd: int, data: bytes, n: int) -> None:
    """n write()s of data to fd, in C."""
    _, lib = loops()
    rc = lib.hv_raw_write_n(fd, data, len(data), n)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))


class Reader:
    """n read()s from fd into one buffer of cap bytes, in C; returns the bytes read."""

    def __init__(self, cap: int = 70000):
        ffi, self._lib = loops()
        self._buf = ffi.new("unsigned char[]", cap)
        self._cap = cap

    def read_n(self, fd: int, n: int) -> int:
        rc = self._lib.hv_raw_read_n(fd, self._buf, self._cap, n)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        return rc
