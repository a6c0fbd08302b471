"""The Linux test kernel (scripts/build-test-kernel.sh) and what booting it needs."""
import glob
import os

CACHE = os.path.join(os.environ.get("HVFRAME_CACHE", os.path.expanduser("~/.cache/hvframe")), "linux")
# From scripts/linux/README.md: what the kernel must be told on hosts whose KVM emulates
# kernel-mode guest code.
CMDLINE = ("console=ttyS0 panic=-1 lpj=2000 noxsave i8042.noaux i8042.nokbd "
           "clearcpuid=smap,smep,umip,pku,xsave,popcnt,avx,avx2,bmi1,bmi2,movbe,erms,fsrm,rdrand,"
           "rdseed,aes,pclmulqdq,fma,f16c,xsaveopt,clflushopt,clwb,invpcid,pcid,fsgsbase,rdpid,"
           "avx512f,sha_ni,adx,gfni,vaes")


def built_kernel():
    """Path of the newest built test kernel, or None."""
    found = sorted(glob.glob(os.path.join(CACHE, "vmlinux-6.1-hvframe-*")), key=os.path.getmtime)
    return found[-1] if found else None


def newc_cpio(files: dict[str, tuple[int, bytes]]) -> bytes:
    """An initramfs archive (cpio "newc"): {path: (mode, data)}, plus the trailer."""
    out = bytearray()

    def entry(ino, name, mode, data):
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        out.extend(b"070701" + b"".join(b"%08x" % f for f in fields) + nb)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, (mode, data)) in enumerate(files.items(), start=1):
        entry(ino, name, mode, data)
    entry(0, "TRAILER!!!", 0, b"")
    return bytes(out)
