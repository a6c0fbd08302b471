"""What `hvframe serve-device` may still do once its device is built and its socket listens.

A device model that a guest drives is the part most likely to have a bug a guest can use;
the server process is therefore restricted, before it accepts its first client, to what
serving needs:

* Landlock (filesystem): opening files for writing, creating, removing or renaming anything
  anywhere, is refused; reading is allowed only beneath the directories Python and the
  libraries already mapped into the process come from (so a late import still works); the
  device's own files (the regular files it holds open, its disk images) may be reopened for
  reading and writing. Where the kernel's Landlock ABI has them, TCP bind and connect are
  refused and abstract Unix sockets and signals are scoped to the process. Files opened
  before (the image, the listening socket) keep working, as do file descriptors the client
  passes (guest RAM, eventfds).
* seccomp (libseccomp, through pyseccomp): a deny list answered with EPERM: executing
  programs, new processes (clone without CLONE_THREAD, fork, vfork; clone3 answers ENOSYS so
  that the C library falls back to clone, where the flags can be checked), new sockets,
  connecting and binding, tracing and reading other processes' memory, mounting, namespaces,
  kernel modules, BPF, keyrings, io_uring, perf and userfaultfd. A deny list, not an allow
  list: the Python interpreter's own needs (allocation, threads, imports) are wide and change
  between versions, and the dangerous calls are few and stable.

Either layer is applied only if the kernel has it; confine() says what was applied.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import sysconfig

from cffi import FFI
from construct import Int32sl, Int64ul, Struct

try:            # loaded now: finding libseccomp may need a temporary file, refused later
    import pyseccomp as seccomp
except (ImportError, OSError):
    seccomp = None

# -- Landlock (linux/landlock.h) -------------------------------------------------------------
SYS_LANDLOCK_CREATE_RULESET = 444          # x86-64, as every architecture since 5.13
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

RulesetAttr = Struct("handled_access_fs" / Int64ul,       # ABI 1
                     "handled_access_net" / Int64ul,      # ABI 4
                     "scoped" / Int64ul)                  # ABI 6
PathBeneathAttr = Struct("allowed_access" / Int64ul,      # packed in the kernel's header
                         "parent_fd" / Int32sl)

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_TRUNCATE = 1 << 14
FS_IOCTL_DEV = 1 << 15
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1


def _fs_rights(abi: int) -> int:
    """Every filesystem right the ABI knows (all are handled, so all are denied by default)."""
    rights = (1 << 13) - 1                     # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= 1 << 13                      # REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


_ffi = FFI()
_ffi.cdef("long syscall(long number, ...); int prctl(int option, ...);")
_libc = _ffi.dlopen(None)


def _syscall(number: int, *args) -> int:
    ret = _libc.syscall(_ffi.cast("long", number), *args)
    if ret < 0:
        err = _ffi.errno
        raise OSError(err, os.strerror(err))
    return ret


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 if it has none (or it is disabled)."""
    try:
        return _syscall(SYS_LANDLOCK_CREATE_RULESET, _ffi.NULL, _ffi.cast("size_t", 0),
                        _ffi.cast("uint32_t", CREATE_RULESET_VERSION))
    except OSError:
        return 0


def _read_roots() -> set[str]:
    """Where Python may still read from: its library directories, the packages already
    imported, the directories of every file mapped into the process (shared libraries)."""
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None) if name != "__main__" else None
        if f:
            path = os.path.dirname(os.path.abspath(f))
            roots.add(os.path.dirname(path) if os.path.basename(f).startswith("__init__.")
                      else path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                roots.add(os.path.dirname(parts[5].strip()))
    return {r for r in roots if os.path.isdir(r)}


def held_files() -> list[str]:
    """The regular files (and block devices) this process holds open, standard streams
    aside: a device's images."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) <= 2:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            st = os.stat(target)
        except OSError:
            continue
        if target.startswith("/") and (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            out.append(target)
    return sorted(set(out))


def apply_landlock(files: list[str]) -> int:
    """Restrict this process (all its threads to come) as the module says; returns the ABI
    applied, 0 where the kernel has no Landlock."""
    abi = landlock_abi()
    if abi < 1:
        return 0
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    handled = _fs_rights(abi)
    attr = RulesetAttr.build(dict(
        handled_access_fs=handled,
        handled_access_net=NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
        scoped=SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0))[:size]
    abuf = _ffi.from_buffer(attr)
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, _ffi.cast("void *", abuf),
                       _ffi.cast("size_t", size), _ffi.cast("uint32_t", 0))
    try:
        rules = [(r, FS_READ_FILE | FS_READ_DIR) for r in sorted(_read_roots())]
        file_rw = FS_READ_FILE | FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)
        for f in files:
            blk = stat.S_ISBLK(os.stat(f).st_mode)
            rules.append((f, file_rw | (FS_IOCTL_DEV if blk and abi >= 5 else 0)))
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = PathBeneathAttr.build(dict(allowed_access=access & handled,
                                                  parent_fd=fd))
                _syscall(SYS_LANDLOCK_ADD_RULE, _ffi.cast("int", ruleset),
                         _ffi.cast("int", RULE_PATH_BENEATH),
                         _ffi.cast("void *", _ffi.from_buffer(rule)), _ffi.cast("uint32_t", 0))
            finally:
                os.close(fd)
        if _libc.prctl(_ffi.cast("int", PR_SET_NO_NEW_PRIVS), _ffi.cast("unsigned long", 1),
                       _ffi.cast("unsigned long", 0), _ffi.cast("unsigned long", 0),
                       _ffi.cast("unsigned long", 0)) != 0:
            raise OSError(_ffi.errno, "PR_SET_NO_NEW_PRIVS")
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, _ffi.cast("int", ruleset), _ffi.cast("uint32_t", 0))
    finally:
        os.close(ruleset)
    return abi


# -- seccomp -----------------------------------------------------------------------------------
CLONE_THREAD = 0x00010000
DENIED_SYSCALLS = (
    "execve", "execveat", "fork", "vfork",
    "socket", "socketpair", "connect", "bind",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "unshare", "setns",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "userfaultfd", "open_by_handle_at",
    "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)


def apply_seccomp() -> bool:
    """Load the deny list; False where libseccomp cannot be loaded."""
    if seccomp is None:
        return False
    f = seccomp.SyscallFilter(seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        try:
            f.add_rule(deny, name)
        except (OSError, RuntimeError, ValueError):
            pass                               # a call this kernel/architecture lacks
    f.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    f.load()
    return True


def confine(files: list[str] | None = None) -> list[str]:
    """Apply both layers (files: what may be reopened read-write; by default the regular
    files the process holds open). Returns what was applied, for the server to say."""
    if files is None:
        files = held_files()
    applied = []
    abi = apply_landlock(files)
    if abi:
        applied.append(f"landlock ABI {abi}")
    if apply_seccomp():
        applied.append("seccomp")
    return applied
