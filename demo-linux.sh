#!/usr/bin/env bash
# The Linux demo: boot a small Linux kernel with a planted bug, record a scripted shell session that
# triggers it, then replay the recording with gdb attached to the kernel and let a watchpoint and
# reverse-continue find the kernel source line that did the damage. See README.md, "Linux guests".
set -euo pipefail
cd "$(dirname "$0")"
. gdb/serve-replay.sh
for tool in cargo gcc gdb; do
    if ! command -v "$tool" >/dev/null; then
        echo "demo-linux: $tool is needed (Debian: apt-get install build-essential gdb; Rust via rustup)" >&2
        exit 1
    fi
done
[ -e /dev/kvm ] || { echo "demo-linux: /dev/kvm is missing: retrovisor needs KVM" >&2; exit 1; }

echo "demo-linux: building retrovisor (cargo build --release; the first build takes a few minutes)" >&2
cargo build --release
# The kernel: Debian's linux-source-6.1 with tests/linux/tiny.config and the patches in tests/linux/patches
# (0002 plants the bug), built once and cached in target/linux. It says what to install if anything is missing.
echo "demo-linux: building the Linux guest (tests/linux/build.sh; the first build takes about 5 minutes)" >&2
bash tests/linux/build.sh
rv=target/release/retrovisor
vmlinux=target/linux/vmlinux
work=$(mktemp -d /tmp/retrovisor-demo-linux.XXXXXX)
cat >"$work/session.txt" <<'SESSION'
echo naming the demo device
write /proc/rv_demo retrovisor-demo-overrun
echo doing other things for a while
cat /proc/version
cat /proc/rv_demo
poweroff 0
SESSION

echo "== 1. record a Linux boot and a shell session; the session writes a name to /proc/rv_demo, and only"
echo "      the later read notices that the kernel's rv_demo.budget was clobbered (--verify then replays"
echo "      the recording once and says whether it replays exactly)"
"$rv" record --kernel "$vmlinux" --initrd target/linux/initramfs.cpio \
    --append "console=ttyS0 panic=-1 noapic nolapic" --ram 64 \
    --serial-input "$work/session.txt" --serial-input-after "Run /init" \
    -o "$work/linux.rvt" --verify > "$work/linux-output.txt" || status=$?
grep -E 'rv_demo|^init:|Linux version' "$work/linux-output.txt" || true
if [ "${status:-0}" -eq 2 ] || [ "${status:-0}" -eq 4 ]; then
    echo "demo: the recording failed or did not verify (status $status); see the message above" >&2
    exit 1
fi

echo
echo "== 2. replay it under gdb: stop where the kernel reads rv_demo, watch the budget, run backwards"
serve_replay "$rv" "$work/linux.rvt" "$work"
gdb -nx -q -batch "$vmlinux" \
    -ex "target remote 127.0.0.1:$port" \
    -ex "break rv_demo_show" \
    -ex "continue" \
    -ex "print/x rv_demo.budget" \
    -ex "watch rv_demo.budget" \
    -ex "reverse-continue" \
    -ex "bt 3" \
    -ex "monitor when" \
    -ex "detach" 2>&1 | grep -v '^$'
wait "$server" || true
trap - EXIT

line=$(grep -n 'rv_demo.name\[i\] = scratch\[i\]' target/linux/src/fs/proc/version.c | cut -d: -f1)
echo
echo "gdb stopped in rv_demo_write, on the store of line $line of fs/proc/version.c (target/linux/src):"
echo "the name is bounded by the scratch buffer's 32 bytes, not the name's 16."
echo "To do it yourself:"
echo "  $rv replay $work/linux.rvt --gdb 127.0.0.1:1234"
echo "  gdb $vmlinux -ex 'target remote :1234'   # then: break rv_demo_show, continue, watch rv_demo.budget, reverse-continue"
