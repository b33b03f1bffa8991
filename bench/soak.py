#!/usr/bin/env python3
"""Retrovisor soak: record and replay small guests many times on an overloaded machine and count
recordings that do not replay. Every replay of an unmodified trace must match: a divergence here is a
bug, in the recording (it logged what replay cannot reproduce) or in the replay.

CPU hogs (twice as many as cores, by default, plus a process that keeps forking) run from the first
recording to the last replay: recordings are made on the loaded machine, as users make them on a busy
CI runner, and replayed there. The vCPU thread is preempted, migrated and signalled at every moment.

Usage: python3 bench/soak.py [--rounds N] [--hogs N] [--guests timer,tickrace,echo,disk,ledger]

Prints one line per divergence (with retrovisor's message, which names the field or page that differed)
and the totals: recordings made, recordings that do not replay, replays that diverged. Exits 1 if any
replay diverged or failed.
"""
import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "retrovisor")


def hog(stop):
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def forker(stop):
    while not stop.is_set():
        subprocess.run(["true"])


def guest_args(name, guests, work):
    """Extra arguments for recording guest `name`."""
    if name == "echo":
        path = os.path.join(work, "echo-input.txt")
        with open(path, "w") as f:
            f.write("abc\nhello world\n" * 3 + "quit\n")
        return ["--serial-input", path]
    if name == "ledger":
        return ["--serial-input", os.path.join(ROOT, "tests", "guests", "ledger-short.txt")]
    if name == "disk":
        path = os.path.join(work, "disk.img")
        with open(path, "wb") as f:
            f.write(bytes(range(256)) * 256)
        return ["--disk", path]
    return []


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50, help="recordings per guest (each replayed --replays times)")
    ap.add_argument("--replays", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=2 * os.cpu_count())
    ap.add_argument("--guests", default="timer,tickrace,echo,disk,ledger")
    ap.add_argument("--checkpoint-every", type=int, default=2000)
    ap.add_argument("--clocks", default="step,landmark", help="clocks to record with")
    ap.add_argument("--bin", default=None, help="retrovisor binary (default: build target/release/retrovisor)")
    a = ap.parse_args()
    global BIN
    if a.bin:
        BIN = a.bin
    else:
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="retrovisor-soak-")
    guests = os.path.join(work, "guests")
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "tests", "guests"), f"OUT={guests}"], check=True)
    stop = multiprocessing.Event()
    workers = [multiprocessing.Process(target=hog, args=(stop,)) for _ in range(a.hogs)]
    workers.append(multiprocessing.Process(target=forker, args=(stop,)))
    for w in workers:
        w.start()
    replays = divergences = failures = recordings = unreplayable = 0
    started = time.time()
    try:
        for rnd in range(a.rounds):
            for name, clock in [(g, c) for g in a.guests.split(",") for c in a.clocks.split(",")]:
                trace = os.path.join(work, f"{name}.rvt")
                shutil.rmtree(trace, ignore_errors=True)
                every = ["--checkpoint-every", str(a.checkpoint_every)] if clock == "step" else ["--checkpoint-ms", "5"]
                rec = subprocess.run(
                    [BIN, "record", "--clock", clock, "--kernel", os.path.join(guests, f"{name}.elf"), "-o", trace]
                    + every + guest_args(name, guests, work),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
                if rec.returncode in (2, 4):
                    failures += 1
                    print(f"record {name} failed: {rec.stderr.decode(errors='replace').strip()}", flush=True)
                    continue
                recordings += 1
                replayed = True
                for _ in range(a.replays):
                    rep = subprocess.run([BIN, "replay", trace], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         stdin=subprocess.DEVNULL)
                    replays += 1
                    err = rep.stderr.decode(errors="replace").strip()
                    if rep.returncode == 4:
                        divergences += 1
                        replayed = False
                        print(f"DIVERGENCE {name} ({clock}) round {rnd}: {err}", flush=True)
                        shutil.copytree(trace, os.path.join(ROOT, "target", f"soak-diverged-{name}-{rnd}.rvt"),
                                        dirs_exist_ok=True)
                    elif rep.returncode != rec.returncode or rep.stdout != rec.stdout:
                        failures += 1
                        replayed = False
                        print(f"MISMATCH {name} ({clock}) round {rnd}: status {rep.returncode} vs {rec.returncode}: {err}",
                              flush=True)
                unreplayable += 0 if replayed else 1
            print(f"round {rnd + 1}/{a.rounds}: {recordings} recordings ({unreplayable} do not replay), {replays} replays, {divergences} divergences, {failures} failures, "
                  f"load {os.getloadavg()[0]:.1f}, {time.time() - started:.0f}s", flush=True)
    finally:
        stop.set()
        for w in workers:
            w.join()
        shutil.rmtree(work, ignore_errors=True)
    print(f"soak: {recordings} recordings made under load, {unreplayable} do not replay; {replays} replays: "
          f"{divergences} divergences, {failures} failures")
    sys.exit(1 if divergences or failures else 0)


if __name__ == "__main__":
    main()
