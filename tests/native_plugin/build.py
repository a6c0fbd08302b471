"""Build the echo test plugin's native module the way a third party's build script does:
hvframe.native_build.plugin_ffi, with its structs generated from construct."""
import os

from construct import Int64ul, Struct

from hvframe.native_build import plugin_ffi

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = "hvtest_echo_native"
# lie: makes the batch server misbehave, for the core's checks (see echo.c)
EchoStats = Struct("chains" / Int64ul, "bytes" / Int64ul, "lie" / Int64ul)
ECHO_MAX = 4096


def build(tmpdir: str) -> str:
    """Compile into tmpdir; returns the path of the extension module."""
    ffi = plugin_ffi(MODULE, HERE, ["echo.c"], cdef="""
        int echo_bind(const struct hv_api *api);
        int64_t echo_serve_chain(void *ctx, struct hv_vq *q, struct hv_chain *ch);
        int echo_drain(struct hv_vq *q, struct echo_stats *st);
        int echo_serve_batch(void *ctx, struct hv_vq *q, int max);
    """, structs={"echo_stats": EchoStats}, constants={"ECHO_MAX": ECHO_MAX})
    return ffi.compile(tmpdir=tmpdir)
