#!/usr/bin/env python3
"""Retrovisor benchmarks: prints ratios measured in one run on this machine.

For each bundled guest, with both clocks: plain free run, record and replay wall time (median of several
runs), record against the free run, replay against record, and trace bytes per million instructions (event
stream and checkpoints separately). A landmark trace counts no instructions: one replay of it with the step
clock counts them.

--long adds the long guest: ledger.elf fed bench/ledger-long.txt (about 68 million instructions of serial
commands, hashing, table updates and a 100 Hz timer), recorded and replayed with the landmark clock; its
instruction count comes from a replay with the step clock unless --long-no-count (about ten minutes here,
as recording it with the step clock would take).

--linux adds the Linux test guest (tests/linux/build.sh builds it once): a boot to /init and a short serial
session, with the landmark clock: free run, record and replay, and the size of full and incremental
checkpoints.

--search adds gdb's searches on the long guest's landmark recording (issue 11's targets), each timed inside
gdb: `continue` to check_guard (against the free run of the same instructions: the whole guest), then
`watch guard` + reverse-continue to the store, `monitor history` of guard (changed once) and of table[7]
(written three times), and 20 reverse-stepi.

Then, on a step recording of at least 5 million instructions: the raw KVM single-step rate of this machine
(the ceiling of the step clock), replay's share of it, and reverse-stepi and seek-back latency.

Usage: python3 bench/run.py [--runs N] [--guests timer,demo,long64,ledger,disk] [--long] [--linux]
                            [--search] [--long-instructions N]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "retrovisor")


def timed(args, **kw):
    start = time.perf_counter()
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, **kw)
    elapsed = time.perf_counter() - start
    if p.returncode in (2, 4):
        sys.exit(f"bench: {' '.join(args)} failed: {p.stderr.decode(errors='replace')}")
    return elapsed, p


def median_time(args, runs):
    return statistics.median(timed(args)[0] for _ in range(runs))


def info(trace):
    return subprocess.run([BIN, "info", trace], stdout=subprocess.PIPE, check=True).stdout.decode()


def trace_sizes(trace):
    out = info(trace)
    event_bytes = int(re.search(r"^event stream:\s+(\d+) bytes", out, re.M).group(1))
    m = re.search(r"^checkpoints:\s+(\d+) .*?, (\d+) bytes", out, re.M)
    kicks = re.search(r"^\s+kick\s+(\d+)", out, re.M)
    waypoints = re.search(r"^waypoints:\s+(\d+), (\d+) bytes", out, re.M)
    return (event_bytes, int(m.group(1)), int(m.group(2)), int(kicks.group(1)) if kicks else 0,
            (int(waypoints.group(1)), int(waypoints.group(2))) if waypoints else (0, 0))


def step_instructions(trace):
    return int(re.search(r"^instructions:\s+(\d+)", info(trace), re.M).group(1))


def stepped_instructions(trace):
    """A landmark trace's length in instructions: a replay with the step clock counts them."""
    out = subprocess.run([BIN, "replay", "--clock", "step", trace], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL).stderr.decode()
    return int(re.search(r"\((\d+) instructions, counted by stepping\)", out).group(1))


def guest_args(name, work):
    if name == "ledger":
        return ["--serial-input", os.path.join(ROOT, "tests", "guests", "ledger-short.txt")]
    if name == "ledger-long":
        return ["--serial-input", os.path.join(ROOT, "bench", "ledger-long.txt")]
    if name == "disk":
        path = os.path.join(work, "disk.img")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(bytes(range(256)) * 1024)
        return ["--disk", path]
    return []


def measure(name, kernel, work, runs, clocks, count=True):
    """Free run, then record and replay with each clock; prints the figures."""
    extra = guest_args(name, work)
    free = median_time([BIN, "run", "--kernel", kernel] + extra, runs)
    print(f"== {name}: free run {free:.3f}s")
    for clock in clocks:
        rec_times, rep_times = [], []
        for i in range(runs):
            trace = os.path.join(work, f"{name}-{clock}-{i}.rvt")
            rec_times.append(timed([BIN, "record", "--clock", clock, "--kernel", kernel, "-o", trace] + extra)[0])
            rep_times.append(timed([BIN, "replay", trace])[0])
        rec, rep = statistics.median(rec_times), statistics.median(rep_times)
        ev, ncp, cpb, kicks, (nwp, wpb) = trace_sizes(trace)
        if clock == "step":
            icount = step_instructions(trace)
        elif count:
            icount = stepped_instructions(trace)
        else:
            icount = None
        print(f"  {clock:<8} record {rec:8.3f}s = {rec / free:5.2f}x free run   replay {rep:8.3f}s = {rep / rec:5.2f}x record"
              + (f"   {kicks} kicks, {nwp} with waypoints" if clock == "landmark" else ""))
        if icount:
            print(f"           {icount} instructions: events {ev * 1e6 / icount:9.1f} bytes/M instructions, "
                  f"checkpoints {cpb * 1e6 / icount:10.1f} bytes/M instructions ({ncp} checkpoints)"
                  + (f", waypoints {wpb * 1e6 / icount:10.1f} bytes/M instructions" if nwp else ""))
        else:
            print(f"           events {ev} bytes, checkpoints {cpb} bytes ({ncp} checkpoints)"
                  + (f", waypoints {wpb} bytes" if nwp else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="repetitions per measurement (median is reported)")
    ap.add_argument("--guests", default="timer,demo,long64,ledger,disk", help="comma-separated guest names")
    ap.add_argument("--long", action="store_true", help="also the ~68M-instruction ledger guest (landmark clock)")
    ap.add_argument("--long-no-count", action="store_true", help="skip counting the long guest's instructions by stepping")
    ap.add_argument("--linux", action="store_true", help="also the Linux test guest: boot and a serial session")
    ap.add_argument("--search", action="store_true", help="also gdb's searches on the long guest's recording")
    ap.add_argument("--smp", action="store_true",
                    help="also the 2-vCPU race guest: free run, record and replay, switches per second, and "
                         "how often plain and chaos recordings catch the lost update")
    ap.add_argument("--long-instructions", type=int, default=5_000_000,
                    help="length of the step recording for the reverse-execution figures (0 skips them)")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "--examples", "--workspace"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="retrovisor-bench-")
    guests = os.path.join(work, "guests")
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "tests", "guests"), f"OUT={guests}"], check=True)
    try:
        for name in filter(None, a.guests.split(",")):
            measure(name, os.path.join(guests, f"{name}.elf"), work, a.runs, ["landmark", "step"])
        if a.long:
            measure("ledger-long", os.path.join(guests, "ledger.elf"), work, 1, ["landmark"],
                    count=not a.long_no_count)
        if a.linux:
            linux(work, a.runs)
        if a.search:
            searches(work, os.path.join(guests, "ledger.elf"))
        if a.smp:
            smp(work, os.path.join(guests, "smprace.elf"), a.runs)
        if a.long_instructions:
            long_run(work, guests, a.long_instructions)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def smp(work, kernel, runs, hunts=10):
    """smprace.elf on 2 vCPUs (one host thread, the recorded scheduler): free run vs record vs replay,
    switches per second of recording; then the fraction of plain and of chaos recordings (seeds 1..hunts)
    in which the race lost an update, at a size where a plain slice usually outlasts the race."""
    base = [BIN, "record", "--kernel", kernel, "--cpus", "2"]
    free = median_time([BIN, "run", "--kernel", kernel, "--cpus", "2"], runs)
    rec_times, rep_times, switches = [], [], []
    for i in range(runs):
        trace = os.path.join(work, f"smprace-{i}.rvt")
        rec_times.append(timed(base + ["-o", trace])[0])
        rep_times.append(timed([BIN, "replay", trace])[0])
        switches.append(int(re.search(r"switch\s+(\d+)", info(trace)).group(1)))
    rec, rep = statistics.median(rec_times), statistics.median(rep_times)
    print(f"== smprace, 2 vCPUs, landmark clock: free run {free:.3f}s")
    print(f"  record {rec:.3f}s = {rec / free:.2f}x free run   replay {rep:.3f}s = {rep / rec:.2f}x record   "
          f"{statistics.median(switches) / rec:.0f} switches/s")
    for iters in (200, 500):
        for mode in ("plain", "chaos"):
            lost = 0
            for seed in range(1, hunts + 1):
                trace = os.path.join(work, f"hunt-{mode}-{iters}-{seed}.rvt")
                extra = ["--chaos", "--seed", str(seed)] if mode == "chaos" else []
                out = subprocess.run(base + ["--append", f"iters={iters}", "-o", trace] + extra,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL).stdout.decode()
                found = re.search(r"lost=(\d+)", out)
                lost += bool(found and int(found.group(1)) > 0)
                shutil.rmtree(trace, ignore_errors=True)
            print(f"  iters={iters:<4} {mode}: {lost}/{hunts} recordings lost an update")


def linux(work, runs):
    """The Linux test guest: boot, a serial session that reads its virtio disk, power off."""
    subprocess.run(["bash", os.path.join(ROOT, "tests", "linux", "build.sh")], check=True)
    out = os.path.join(ROOT, "target", "linux")
    session = os.path.join(work, "session.txt")
    with open(session, "w") as f:
        f.write("echo hello\ncat /proc/version\nhead /dev/vda 24\npoweroff 0\n")
    disk = os.path.join(work, "linux-disk.img")
    with open(disk, "wb") as f:
        f.write(bytes(range(256)) * 4096)
    args = ["--kernel", os.path.join(out, "vmlinux"), "--initrd", os.path.join(out, "initramfs.cpio"),
            "--append", "console=ttyS0 panic=-1 noapic nolapic noxsave virtio_mmio.device=512@0xd0000000:5",
            "--ram", "64", "--disk", disk, "--serial-input", session, "--serial-input-after", "Run /init"]
    free = median_time([BIN, "run"] + args, runs)
    rec_times, rep_times = [], []
    for i in range(runs):
        trace = os.path.join(work, f"linux-{i}.rvt")
        rec_times.append(timed([BIN, "record", "-o", trace] + args)[0])
        rep_times.append(timed([BIN, "replay", trace])[0])
    rec, rep = statistics.median(rec_times), statistics.median(rep_times)
    ev, ncp, cpb, kicks, (nwp, wpb) = trace_sizes(trace)
    full, incremental = [], []
    cdir = os.path.join(trace, "checkpoints")
    for name in filter(lambda n: n.endswith(".ckpt"), os.listdir(cdir)):
        with open(os.path.join(cdir, name), "rb") as f:
            is_full = f.read(29)[28] == 1
        (full if is_full else incremental).append(os.path.getsize(os.path.join(cdir, name)))
    landmarks = int(re.search(r"^landmarks:\s+(\d+)", info(trace), re.M).group(1))
    print(f"== linux boot and session: free run {free:.1f}s, {landmarks} landmarks, {kicks} kicks")
    print(f"  landmark record {rec:6.1f}s = {rec / free:5.2f}x free run   replay {rep:6.1f}s = {rep / rec:5.2f}x record")
    print(f"           events {ev} bytes ({ev / landmarks:.1f} per landmark); {ncp} checkpoints: "
          f"{len(full)} full, {statistics.mean(full) / 1e6:.2f} MB each; {len(incremental)} incremental, "
          f"{statistics.mean(incremental) / 1e3:.1f} KB each; {nwp} waypoints, {wpb / 1e6:.2f} MB")


# Runs inside gdb: each command timed, between markers. (gdb prints where a run stopped itself, outside
# the captured output, so what a command printed is everything between its two markers.)
GDB_TIMER = """
import time
def rv_timed(label, command):
    print("RV-START %s" % label)
    start = time.time()
    out = gdb.execute(command, to_string=True)
    print(out)
    print("RV-TIME %s %.4f" % (label, time.time() - start))
"""


def between(out, label):
    """What gdb printed for the command timed as `label` (see GDB_TIMER)."""
    return out.split(f"RV-START {label}\n", 1)[-1].split(f"RV-TIME {label} ", 1)[0]


def searches(work, kernel):
    """gdb's searches on a landmark recording of the long guest, timed inside gdb (issue 11's targets)."""
    extra = guest_args("ledger-long", work)
    trace = os.path.join(work, "search.rvt")
    free, _ = timed([BIN, "run", "--kernel", kernel] + extra)
    rec, _ = timed([BIN, "record", "--kernel", kernel, "-o", trace] + extra)
    server = subprocess.Popen([BIN, "replay", trace, "--gdb", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in server.stderr:
            m = re.search(r"waiting for gdb on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = m.group(1)
                break
        if port is None:
            sys.exit("bench: the replay never listened for gdb")
        script = os.path.join(work, "timer.py")
        with open(script, "w") as f:
            f.write(GDB_TIMER)
        commands = ["set pagination off", f"source {script}", f"target remote 127.0.0.1:{port}",
                    "break check_guard", "python rv_timed('continue', 'continue')", "delete",
                    "watch guard", "python rv_timed('reverse-continue', 'reverse-continue')", "delete",
                    "python rv_timed('history', 'monitor history &guard 4')",
                    "python rv_timed('history-table', 'monitor history %d 4' % int(gdb.parse_and_eval('&table[7]')))"]
        commands += ["python rv_timed('reverse-stepi', 'reverse-stepi')"] * 20
        commands += ["detach"]
        args = ["gdb", "-nx", "-q", "-batch", kernel]
        for c in commands:
            args += ["-ex", c]
        out = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800).stdout
    finally:
        server.kill()
        server.wait()
    times = {}
    for label, secs in re.findall(r"RV-TIME (\S+) ([\d.]+)", out):
        times.setdefault(label, []).append(float(secs))
    if len(times) < 5:
        sys.exit("bench: gdb's session did not finish:\n" + out)
    stepi = sorted(times["reverse-stepi"])
    found = re.search(r"ledger\.c:(\d+)", between(out, "reverse-continue"))
    changes = {label: re.search(r"(\d+) change\(s\)", between(out, label)) for label in ("history", "history-table")}
    print(f"== gdb searches on the long guest (landmark recording {rec:.1f}s; free run {free:.1f}s)")
    print(f"  continue to check_guard    {times['continue'][0]:7.2f}s = {times['continue'][0] / free:5.2f}x free run (target 1.2x)")
    print(f"  watch + reverse-continue   {times['reverse-continue'][0]:7.2f}s (target 2 s), stopped at "
          f"ledger.c:{found.group(1) if found else '?'}")
    for label, what in (("history", "&guard 4"), ("history-table", "&table[7] 4")):
        n = changes[label].group(1) if changes[label] else "?"
        print(f"  monitor history {what:<11}{times[label][0]:7.2f}s (target 2 s), {n} changes")
    print(f"  reverse-stepi              median {1e3 * statistics.median(stepi):.1f} ms, "
          f"max {1e3 * stepi[-1]:.1f} ms of {len(stepi)} (targets 20 ms, 150 ms p99)")


def long_run(work, guests, n):
    """Reverse-execution figures on a long step recording of the spin guest."""
    raw = subprocess.run([os.path.join(ROOT, "target", "release", "examples", "raw_step_rate"), "3"],
                         stdout=subprocess.PIPE, check=True).stdout.decode()
    raw_rate = float(re.search(r"(\d+) steps/s", raw).group(1))
    trace = os.path.join(work, "long.rvt")
    kernel = os.path.join(guests, "spin.elf")
    rec, _ = timed([BIN, "record", "--clock", "step", "--kernel", kernel, "-o", trace, "--max-instructions", str(n)])
    step, _ = timed([BIN, "run", "--clock", "step", "--max-instructions", str(n), "--kernel", kernel])
    rep, _ = timed([BIN, "replay", trace])
    icount = step_instructions(trace)
    _, ncp, cpb, _, _ = trace_sizes(trace)
    print(f"== long step recording: {icount} instructions of spin.elf, {ncp} checkpoints")
    print(f"  raw KVM single-step rate   {raw_rate / 1e3:8.1f} k steps/s (examples/raw_step_rate.rs: the ceiling)")
    print(f"  record / stepped run       {rec / step:6.2f}x   (recorder's own cost: {100 * (rec / step - 1):+.1f}%)")
    print(f"  replay rate                {icount / rep / 1e3:8.1f} k instructions/s = {100 * icount / rep / raw_rate:.0f}% of raw")
    print(f"  checkpoints                {cpb * 1e6 / icount:8.1f} bytes per million instructions, "
          f"{100 * cpb / max(ncp, 1) / (32 << 20):.3f}% of guest RAM each")
    out = subprocess.run([os.path.join(ROOT, "target", "release", "examples", "reverse_latency"), trace, "200"],
                         stdout=subprocess.PIPE, check=True).stdout.decode()
    for line in out.splitlines():
        print("  " + line)


if __name__ == "__main__":
    main()
