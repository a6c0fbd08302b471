#!/usr/bin/env bash
# Build the minimal Linux 6.1 test kernel described in scripts/linux/README.md.
#
# Source: Debian's linux-source-6.1 package (tarball in /usr/src).
# Config: scripts/linux/tiny-6.1.config (in the repository, beside this script), or --config PATH.
# Two one-line changes are applied with sed (INT3 and FWAIT cannot be emulated by the
# nested KVM of our hosts): the int3_selftest() call is skipped and the fwait in
# fpu__drop() becomes a nop.  The result, an ELF vmlinux with a PVH entry note, is
# copied to <cache>/vmlinux-6.1-hvframe-<hash>; <hash> covers the config, the patches,
# the recipe and the source package version.  If that file exists the script prints its
# path and exits at once.  The path is always the last line on stdout; everything else
# (progress, apt and make output) goes to stderr.
#
# Usage: scripts/build-test-kernel.sh [--config PATH] [--cache-dir DIR] [-j N]
# Environment: HVFRAME_CACHE (default ~/.cache/hvframe; the kernel cache is $HVFRAME_CACHE/linux)
set -euo pipefail

PROG=$(basename "$0")
die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
}

SRC_PKG=linux-source-6.1
TARBALL=/usr/src/linux-source-6.1.tar.xz
TREE_NAME=linux-source-6.1          # top-level directory inside the tarball
# Bump when the build procedure changes in a way that changes the output.
RECIPE="hvframe-test-kernel recipe 1: make olddefconfig && make vmlinux (x86_64)"

# --- the two source changes: file, exact original line (regex), sed expression, expected result (regex)
P1_FILE=arch/x86/kernel/alternative.c
P1_OLD='^	int3_selftest();$'
P1_SED='s|^	int3_selftest();$|	/* int3_selftest(); -- hvframe: INT3 cannot be emulated by nested KVM */|'
P1_NEW='^	/\* int3_selftest(); -- hvframe: INT3 cannot be emulated by nested KVM \*/$'

P2_FILE=arch/x86/kernel/fpu/core.c
P2_OLD='asm volatile("1: fwait\\n"'
P2_SED='s|asm volatile("1: fwait\\n"|asm volatile("1: nop\\n" /* hvframe: was fwait */|'
P2_NEW='asm volatile("1: nop\\n" /\* hvframe: was fwait \*/'

# --- arguments
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config=""
cache="${HVFRAME_CACHE:-$HOME/.cache/hvframe}/linux"
jobs=$(nproc 2>/dev/null || echo 2)
while [ $# -gt 0 ]; do
    case "$1" in
        --config) [ $# -ge 2 ] || die "--config needs a path"; config=$2; shift 2 ;;
        --config=*) config=${1#--config=}; shift ;;
        --cache-dir) [ $# -ge 2 ] || die "--cache-dir needs a path"; cache=$2; shift 2 ;;
        --cache-dir=*) cache=${1#--cache-dir=}; shift ;;
        -j) [ $# -ge 2 ] || die "-j needs a number"; jobs=$2; shift 2 ;;
        -j*) jobs=${1#-j}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "-j wants a positive number, got '$jobs'"

if [ -z "$config" ]; then
    config="$script_dir/linux/tiny-6.1.config"
fi
[ -f "$config" ] || die "kernel config not found: $config (pass --config PATH)"
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")

# --- package helpers
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
fi
apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
            || die "apt-get update failed (need root or passwordless sudo)"
        apt_updated=1
    fi
}
apt_install() {
    apt_update_once
    log "apt-get install $*"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
        || die "apt-get install $* failed (need root or passwordless sudo)"
}
pkg_installed_version() {
    # dpkg-query fails for a package it has never seen: that is "not installed", not an error.
    { dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null || true; } \
        | awk '$1=="ii"{print $2}'
}

# --- source version: the installed package, else apt's candidate (so a cache hit needs no install)
command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script needs a Debian-based host"
src_version=$(pkg_installed_version "$SRC_PKG")
if [ -z "$src_version" ]; then
    src_version=$(apt-cache policy "$SRC_PKG" 2>/dev/null | awk '/Candidate:/{print $2}')
    if [ -z "$src_version" ] || [ "$src_version" = "(none)" ]; then
        apt_update_once
        src_version=$(apt-cache policy "$SRC_PKG" 2>/dev/null | awk '/Candidate:/{print $2}')
    fi
    [ -n "$src_version" ] && [ "$src_version" != "(none)" ] \
        || die "package $SRC_PKG is not installed and apt has no candidate for it"
fi

patch_spec=$(printf '%s\n' "$P1_FILE" "$P1_OLD" "$P1_SED" "$P1_NEW" "$P2_FILE" "$P2_OLD" "$P2_SED" "$P2_NEW")
cache_path() {
    local hash
    hash=$( { printf 'recipe: %s\nsource: %s %s\npatches:\n%s\nconfig:\n' \
                "$RECIPE" "$SRC_PKG" "$src_version" "$patch_spec"; cat "$config"; } \
            | sha256sum | cut -c1-16)
    echo "$cache/vmlinux-6.1-hvframe-$hash"
}
# Sets $out; if that kernel is cached, prints its path and ends the script.
take_cached() {
    out=$(cache_path)
    if [ -f "$out" ]; then
        echo "$out"
        exit 0
    fi
}
take_cached

# --- not cached: build.  One build at a time per cache dir.
mkdir -p "$cache" || die "cannot create cache dir $cache"
exec 9>"$cache/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9 || die "cannot lock $cache/.lock"
fi
take_cached               # built by a concurrent run while we waited

# Build dependencies: command (or header) -> Debian package.
need=()
[ -n "$(pkg_installed_version "$SRC_PKG")" ] || need+=("$SRC_PKG")
for pair in make:make gcc:gcc ld:binutils bc:bc bison:bison flex:flex xz:xz-utils perl:perl; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
[ -f /usr/include/gelf.h ] || need+=(libelf-dev)          # objtool (CONFIG_OBJTOOL=y)
[ -f /usr/include/stdio.h ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
    apt_install "${need[@]}"
fi
[ -f "$TARBALL" ] || die "$TARBALL missing although $SRC_PKG is installed"
installed=$(pkg_installed_version "$SRC_PKG")
[ -n "$installed" ] || die "$SRC_PKG is not installed after apt-get install"
if [ "$installed" != "$src_version" ]; then
    # apt's lists were stale (a fresh machine): the install brought a newer source than the
    # candidate the cache name was taken from.  The kernel is built from what is installed.
    log "$SRC_PKG $installed installed (apt's candidate was $src_version)"
    src_version=$installed
    take_cached
fi

# --- source tree: unpack fresh unless the stamp says it is this version with these patches
tree="$cache/$TREE_NAME"
stamp_want=$(printf '%s %s\n%s\n' "$SRC_PKG" "$src_version" "$patch_spec" | sha256sum | cut -c1-16)
if [ ! -f "$tree/.hvframe-tree" ] || [ "$(cat "$tree/.hvframe-tree")" != "$stamp_want" ]; then
    log "unpacking $TARBALL into $tree"
    rm -rf "$tree" "$cache/.unpack"
    mkdir -p "$cache/.unpack"
    tar -C "$cache/.unpack" -xJf "$TARBALL" || die "unpacking $TARBALL failed"
    [ -d "$cache/.unpack/$TREE_NAME" ] || die "$TARBALL has no top-level $TREE_NAME/"
    mv "$cache/.unpack/$TREE_NAME" "$tree"
    rmdir "$cache/.unpack"

    apply() {   # file old-regex sed-expr new-regex
        local f="$tree/$1" n
        [ -f "$f" ] || die "patch target missing: $1"
        n=$(grep -c -- "$2" "$f" || true)
        [ "$n" = 1 ] || die "$1: expected exactly 1 line matching '$2', found $n"
        sed -i -- "$3" "$f"
        n=$(grep -c -- "$2" "$f" || true)
        [ "$n" = 0 ] || die "$1: change did not apply ('$2' still present)"
        n=$(grep -c -- "$4" "$f" || true)
        [ "$n" = 1 ] || die "$1: expected exactly 1 changed line matching '$4', found $n"
        log "patched $1"
    }
    apply "$P1_FILE" "$P1_OLD" "$P1_SED" "$P1_NEW"
    apply "$P2_FILE" "$P2_OLD" "$P2_SED" "$P2_NEW"
    echo "$stamp_want" > "$tree/.hvframe-tree"
fi

# --- configure and build
cp "$config" "$tree/.config"
log "building vmlinux ($SRC_PKG $src_version, config $config, -j$jobs)"
start=$(date +%s)
export KBUILD_BUILD_USER=hvframe KBUILD_BUILD_HOST=hvframe
make -C "$tree" -s olddefconfig >&2 || die "make olddefconfig failed"
make -C "$tree" -j"$jobs" vmlinux >&2 || die "make vmlinux failed (see output above)"
[ -f "$tree/vmlinux" ] || die "build finished but $tree/vmlinux is missing"
[ "$(head -c4 "$tree/vmlinux" | tail -c3)" = ELF ] || die "$tree/vmlinux is not an ELF file"
if command -v readelf >/dev/null 2>&1; then
    notes=$(readelf -n "$tree/vmlinux") || die "readelf -n $tree/vmlinux failed"
    grep -q 'Xen' <<<"$notes" \
        || die "$tree/vmlinux has no Xen ELF note (PVH entry); is CONFIG_PVH=y in $config?"
fi
log "built in $(( $(date +%s) - start )) s"

cp "$tree/vmlinux" "$out.tmp.$$"
mv "$out.tmp.$$" "$out"
echo "$out"
