#!/usr/bin/env bash
# The main job on the bundled demo guest: build, record, replay. See README.md.
set -euo pipefail
cd "$(dirname "$0")"
for tool in cargo make gcc ld; do
    command -v "$tool" >/dev/null || { echo "demo: $tool is needed (apt-get install build-essential; Rust via rustup)" >&2; exit 1; }
done
[ -e /dev/kvm ] || { echo "demo: /dev/kvm is missing: retrovisor needs KVM" >&2; exit 1; }

cargo build --release -q
work=$(mktemp -d /tmp/retrovisor-demo.XXXXXX)
make -s -C tests/guests OUT="$work/guests"
rv=target/release/retrovisor
elf="$work/guests/demo.elf"

echo "== recording tests/guests/demo.c (it notices at the very end that a variable was clobbered)"
"$rv" record --kernel "$elf" -o "$work/demo.rvt" || true
echo
echo "== replaying the recording: the same output, instruction for instruction"
"$rv" replay "$work/demo.rvt" || true
echo
"$rv" info "$work/demo.rvt"
echo
echo "trace and guests are in $work"
