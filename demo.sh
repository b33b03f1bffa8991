#!/usr/bin/env bash
# The main job on the bundled demo guest: record it, replay it with gdb attached, and let a watchpoint and
# reverse-continue find the store that corrupted a variable long before the program noticed. See README.md.
set -euo pipefail
cd "$(dirname "$0")"
. gdb/serve-replay.sh
for tool in cargo make gcc ld gdb; do
    if ! command -v "$tool" >/dev/null; then
        echo "demo: $tool is needed (Debian: apt-get install build-essential gdb; Rust via rustup)" >&2
        exit 1
    fi
done
[ -e /dev/kvm ] || { echo "demo: /dev/kvm is missing: retrovisor needs KVM" >&2; exit 1; }

# The first build compiles about a hundred crates: say so, and let cargo show its progress, rather than
# sit silent for minutes. Later runs find everything built and cargo says only that it finished.
echo "demo: building retrovisor (cargo build --release; the first build takes a few minutes)" >&2
cargo build --release
work=$(mktemp -d /tmp/retrovisor-demo.XXXXXX)
echo "demo: building the demo guest (tests/guests, gcc and ld) into $work/guests" >&2
make -s -C tests/guests OUT="$work/guests"
rv=target/release/retrovisor
elf="$work/guests/demo.elf"
src=tests/guests/demo.c
check=$(grep -n 'if (guard != GUARD_VALUE)' "$src" | cut -d: -f1)

echo "== 1. record tests/guests/demo.c: it notices only at the very end that a variable was clobbered"
echo "      (--verify replays the recording at once and says whether it replays exactly)"
status=0
"$rv" record --kernel "$elf" -o "$work/demo.rvt" --verify || status=$?
if [ "$status" -eq 2 ] || [ "$status" -eq 4 ]; then
    echo "demo: the recording failed or did not verify (status $status); see the message above" >&2
    exit 1
fi

echo
echo "== 2. replay it under gdb: stop where the program checks 'guard', watch it, run backwards"
serve_replay "$rv" "$work/demo.rvt" "$work"
gdb -nx -q -batch "$elf" \
    -ex "target remote 127.0.0.1:$port" \
    -ex "break demo.c:$check" \
    -ex "continue" \
    -ex "print/x guard" \
    -ex "watch guard" \
    -ex "reverse-continue" \
    -ex "print i" \
    -ex "monitor when" \
    -ex "detach" 2>&1 | grep -v '^$'
wait "$server" || true
trap - EXIT

echo
echo "gdb stopped on the off-by-one store, line $(grep -n 'BUG: off-by-one' "$src" | cut -d: -f1) of $src."
echo "To do it yourself:"
echo "  $rv replay $work/demo.rvt --gdb 127.0.0.1:1234"
echo "  gdb $elf -ex 'target remote :1234'     # then: break demo.c:$check, continue, watch guard, reverse-continue"
echo "(the replay prints that gdb line with one more -ex 'source ...', which adds rv-seek, rv-when and rv-help)"
