# Sourced by demo.sh and demo-linux.sh: serve_replay RV TRACE WORK starts `RV replay TRACE --gdb` on a
# free port in the background (guest output in WORK/guest-output.txt, its messages in WORK/replay.log),
# waits until it listens, and sets $server (its pid, killed when the script exits) and $port.
serve_replay() {
    local rv=$1 trace=$2 work=$3
    "$rv" replay "$trace" --gdb 127.0.0.1:0 >"$work/guest-output.txt" 2>"$work/replay.log" &
    server=$!
    trap 'kill $server 2>/dev/null || true' EXIT
    port=""
    # Up to 30 s: a replay starts from its first checkpoint, which a long trace takes a moment to read.
    for _ in $(seq 600); do
        port=$(sed -n 's/.*waiting for gdb on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/replay.log" | head -n1)
        [ -n "$port" ] && return 0
        sleep 0.05
    done
    echo "the replay never started listening:" >&2
    cat "$work/replay.log" >&2
    exit 1
}
