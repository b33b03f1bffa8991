#!/usr/bin/env bash
# Builds the Linux test guest from source: a tinyconfig kernel (vmlinux, booted through its PVH entry) and
# an initramfs holding a static /init.
#
#   tests/linux/build.sh [OUT]        (default OUT: target/linux in the repository)
#
# Inputs: Debian's linux-source-6.1 package (/usr/src/linux-source-6.1.tar.xz), tiny.config (applied on
# top of `make tinyconfig`), the patches in patches/ (applied in name order; each says why it is there),
# init.c. Outputs, in OUT:
#   vmlinux                the kernel ELF (with the PVH note XEN_ELFNOTE_PHYS32_ENTRY), with symbols for gdb
#   initramfs.cpio         /init, /dev/console, /proc; not compressed: gunzip in the guest's ring 0 costs
#                          seconds on a PVM host, where ring-0 code is emulated
#   init                   the static /init, stripped
#   src/vmlinux-gdb.py     the kernel's gdb scripts (lx-dmesg, lx-ps, ...), in the source tree they need
# The outputs are cached: OUT/key holds a hash of every input (this script included), and a build whose
# key matches does nothing. Building takes about 4 CPU-minutes (2-3 minutes on two cores) plus ~30 s to
# unpack the source. Concurrent callers wait for each other (flock on OUT/.lock).
#
# Needs: linux-source-6.1 gcc make bc bison flex libelf-dev libssl-dev xz-utils patch (Debian packages).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$repo/target/linux}"
tarball="${LINUX_SOURCE_TARBALL:-/usr/src/linux-source-6.1.tar.xz}"

die() {
    echo "tests/linux/build.sh: $*" >&2
    exit 1
}

[ -r "$tarball" ] || die "$tarball is missing: install Debian's linux-source-6.1 package (apt-get install linux-source-6.1)"
for tool in gcc make bc bison flex xz flock sha256sum patch; do
    command -v "$tool" >/dev/null || die "$tool is missing (Debian: gcc make bc bison flex xz-utils util-linux coreutils patch)"
done
[ -e /usr/include/gelf.h ] || die "libelf headers are missing (Debian: libelf-dev)"
[ -e /usr/include/openssl/ssl.h ] || die "OpenSSL headers are missing (Debian: libssl-dev)"

mkdir -p "$out"
exec 9>"$out/.lock"
flock 9

# Two keys, so that changing /init does not rebuild the kernel: the kernel's (its sources, config and
# patches, and this script) and the initramfs's (init.c, this script, and the kernel key: the cpio is
# packed by the kernel tree's gen_init_cpio).
kernel_key="$({
    sha256sum <"$tarball"
    cat "$here/build.sh" "$here/tiny.config"
    cat "$here"/patches/*.patch 2>/dev/null || true
} | sha256sum | cut -d' ' -f1)"
initramfs_key="$(cat "$here/build.sh" "$here/init.c" <(echo "$kernel_key") | sha256sum | cut -d' ' -f1)"
kernel_ok() { [ -f "$out/key.kernel" ] && [ "$(cat "$out/key.kernel")" = "$kernel_key" ] && [ -f "$out/vmlinux" ]; }
initramfs_ok() { [ -f "$out/key.initramfs" ] && [ "$(cat "$out/key.initramfs")" = "$initramfs_key" ] && [ -f "$out/initramfs.cpio" ]; }
if kernel_ok && initramfs_ok; then
    exit 0
fi

jobs="$(nproc)"
src="$out/src"
started=$(date +%s)

if ! kernel_ok; then
    rm -f "$out/key.kernel" "$out/key.initramfs"
    echo "tests/linux/build.sh: building the Linux test guest in $out (about 5 CPU-minutes, $jobs jobs)" >&2
    # A fresh tree every time an input changes: patches apply to pristine sources.
    rm -rf "$src"
    mkdir -p "$src"
    tar -xJf "$tarball" -C "$src" --strip-components=1
    for p in "$here"/patches/*.patch; do
        [ -e "$p" ] || continue
        echo "tests/linux/build.sh: applying $(basename "$p")" >&2
        patch -d "$src" -p1 --quiet <"$p"
    done

    make -C "$src" -s tinyconfig >/dev/null
    "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/tiny.config" >/dev/null
    make -C "$src" -s olddefconfig >/dev/null
    # Every option of the fragment must have survived olddefconfig (a missing dependency drops one silently).
    while read -r line; do
        case "$line" in
        CONFIG_*=*) grep -qx "$line" "$src/.config" || die "$line did not survive olddefconfig" ;;
        "# CONFIG_"*" is not set") grep -qx "$line" "$src/.config" || die "'$line' did not survive olddefconfig" ;;
        esac
    done <"$here/tiny.config"
    # Reproducible: no build host, user or time in the image.
    export KBUILD_BUILD_USER=retrovisor KBUILD_BUILD_HOST=retrovisor KBUILD_BUILD_TIMESTAMP='2026-01-01'
    # vmlinux builds usr/gen_init_cpio too (for the built-in initramfs), which packs ours below.
    make -C "$src" -s -j"$jobs" vmlinux
    [ -x "$src/usr/gen_init_cpio" ] || die "the kernel build did not produce usr/gen_init_cpio"
    # The kernel's gdb scripts: vmlinux-gdb.py and scripts/gdb/linux/constants.py, in the tree.
    make -C "$src" -s scripts_gdb
    [ -e "$src/vmlinux-gdb.py" ] || die "make scripts_gdb did not produce vmlinux-gdb.py"

    cp "$src/vmlinux" "$out/vmlinux.tmp"
    mv "$out/vmlinux.tmp" "$out/vmlinux"
    echo "$kernel_key" >"$out/key.kernel"
fi

[ -x "$src/usr/gen_init_cpio" ] || die "$src/usr/gen_init_cpio is missing: remove $out and build again"
# Stripped: every byte of the initramfs is copied by the guest's ring 0 at boot.
gcc -static -Os -s -Wall -Wextra -Werror -o "$out/init" "$here/init.c"
cat >"$out/initramfs.list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0555 0 0
file /init $out/init 0755 0 0
EOF
"$src/usr/gen_init_cpio" -t 0 "$out/initramfs.list" >"$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
echo "$initramfs_key" >"$out/key.initramfs"
echo "tests/linux/build.sh: built $out/vmlinux and $out/initramfs.cpio in $(($(date +%s) - started)) s" >&2
