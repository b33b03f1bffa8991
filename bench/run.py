#!/usr/bin/env python3
"""Retrovisor benchmarks: prints ratios measured in one run on this machine.

For each bundled guest: plain free run, plain single-stepped run, record and replay wall time (median of
several runs), the record and replay instruction rates, trace bytes per million instructions (event stream
and checkpoints separately) and checkpoint bytes against guest RAM.

Then, on a recording of at least 5 million instructions: the raw KVM single-step rate of this machine (the
ceiling of the step clock), replay's share of it, and reverse-stepi and seek-back latency.

Usage: python3 bench/run.py [--runs N] [--guests timer,demo,long64] [--long-instructions N]
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


def info_fields(trace):
    out = subprocess.run([BIN, "info", trace], stdout=subprocess.PIPE, check=True).stdout.decode()
    icount = int(re.search(r"^instructions:\s+(\d+)", out, re.M).group(1))
    event_bytes = int(re.search(r"^event stream:\s+(\d+) bytes", out, re.M).group(1))
    m = re.search(r"^checkpoints:\s+(\d+) .*?, (\d+) bytes", out, re.M)
    return icount, event_bytes, int(m.group(1)), int(m.group(2)), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="repetitions per measurement (median is reported)")
    ap.add_argument("--guests", default="timer,demo,long64", help="comma-separated guest names")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint interval passed to record")
    ap.add_argument("--long-instructions", type=int, default=5_000_000,
                    help="length of the long recording for the reverse-execution figures (0 skips them)")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "--examples", "--workspace"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="retrovisor-bench-")
    guests = os.path.join(work, "guests")
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "tests", "guests"), f"OUT={guests}"], check=True)
    try:
        for name in a.guests.split(","):
            kernel = os.path.join(guests, f"{name}.elf")
            free = median_time([BIN, "run", "--kernel", kernel], a.runs)
            step = median_time([BIN, "run", "--clock", "step", "--kernel", kernel], a.runs)
            rec_times, rep_times = [], []
            for i in range(a.runs):
                trace = os.path.join(work, f"{name}-{i}.rvt")
                extra = ["--checkpoint-every", str(a.checkpoint_every)] if a.checkpoint_every else []
                rec_times.append(timed([BIN, "record", "--kernel", kernel, "-o", trace] + extra)[0])
                rep_times.append(timed([BIN, "replay", trace])[0])
            rec, rep = statistics.median(rec_times), statistics.median(rep_times)
            icount, ev, ncp, cpb, _ = info_fields(trace)
            ram = 32 << 20
            print(f"== {name}: {icount} instructions, {ncp} checkpoints")
            print(f"  wall: free run {free:.3f}s, stepped run {step:.3f}s, record {rec:.3f}s, replay {rep:.3f}s")
            print(f"  record / free run      {rec / free:6.2f}x")
            print(f"  record / stepped run   {rec / step:6.2f}x   (recorder's own cost: {100 * (rec / step - 1):+.1f}%)")
            print(f"  replay / record        {rep / rec:6.2f}x")
            print(f"  record rate            {icount / rec / 1e3:8.1f} k instructions/s")
            print(f"  replay rate            {icount / rep / 1e3:8.1f} k instructions/s")
            print(f"  event stream           {ev * 1e6 / icount:8.1f} bytes per million instructions ({ev} bytes)")
            print(f"  checkpoints            {cpb * 1e6 / icount:8.1f} bytes per million instructions ({cpb} bytes)")
            print(f"  checkpoint vs RAM      {100 * cpb / max(ncp, 1) / ram:8.3f}% of guest RAM per checkpoint on average")
        if a.long_instructions:
            long_run(work, guests, a.long_instructions)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def long_run(work, guests, n):
    """Reverse-execution figures on a long recording of the spin guest."""
    raw = subprocess.run([os.path.join(ROOT, "target", "release", "examples", "raw_step_rate"), "3"],
                         stdout=subprocess.PIPE, check=True).stdout.decode()
    raw_rate = float(re.search(r"(\d+) steps/s", raw).group(1))
    trace = os.path.join(work, "long.rvt")
    kernel = os.path.join(guests, "spin.elf")
    rec, _ = timed([BIN, "record", "--kernel", kernel, "-o", trace, "--max-instructions", str(n)])
    step, _ = timed([BIN, "run", "--clock", "step", "--max-instructions", str(n), "--kernel", kernel])
    rep, _ = timed([BIN, "replay", trace])
    icount, ev, ncp, cpb, _ = info_fields(trace)
    print(f"== long recording: {icount} instructions of spin.elf, {ncp} checkpoints")
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
