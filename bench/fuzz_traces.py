#!/usr/bin/env python3
"""Feeds retrovisor hostile traces and checks that every answer is a clean one.

Records a few small guests (hello, timer, echo with serial input, disk with a small image), then runs N
mutations of those traces through `retrovisor info`, `info --verify` and `replay`, each under
`prlimit --as=LIMIT` and a timeout. Mutations: bit flips, truncations, duplicated, dropped and swapped
event chunks, huge lengths in frame and checkpoint headers (with their CRCs fixed up so only the caps
stop them), decompression bombs built by hand (a 64 MiB SerialRx per chunk, millions of events, a
checkpoint that inflates to gigabytes), JSON field changes, sparse files, FIFOs and devices in place of
files, and recordings killed with SIGKILL at random moments.

Every run is classified:
  refused   exit 2 with a one-line `retrovisor: error:` (after any `retrovisor: warning:` lines)
  diverged  exit 4 (replay noticed the trace does not match the guest)
  ok        any other exit the guest can cause; a replay's output must then be the recorded output
            or a prefix of it (a cut-off trace)
  BAD       a panic, a signal (SIGABRT from a failed allocation, SIGSEGV...), the memory limit hit, a
            timeout, an unclear error, or a replay that printed something the guest never printed

It prints the counts and exits 1 if anything was BAD (the cases are kept under --keep for a look).
Not part of `cargo test`: a few hundred cases take several minutes.

Usage: python3 bench/fuzz_traces.py [N] [--seed S] [--mem 4G] [--timeout 60] [--keep DIR] [--no-build]
                                    [--bin PATH]
"""
import argparse
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "retrovisor")

CHUNK_MAGIC = 0x4B4E4843
CHUNK_HEADER = 32
EVENTS_HEADER = 16
CKPT_HEADER = 77
BLOCK = 128 << 10  # zstd's largest block


# ---------------------------------------------------------------------------------------------------------
# Bytes, built independently of the Rust code (FORMAT.md).

def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def zstd_frame(parts):
    """A zstd frame of raw and RLE blocks (zstd's own compression is not in the standard library).
    `parts` is a list of bytes (stored raw) and (byte, count) pairs (stored as RLE blocks, a few bytes
    for 128 KiB), so a bomb of gigabytes is a few kilobytes here."""
    blocks = []
    for part in parts:
        if isinstance(part, tuple):
            byte, count = part
            while count > 0:
                n = min(count, BLOCK)
                blocks.append((1, n, bytes([byte])))
                count -= n
        else:
            for at in range(0, len(part), BLOCK):
                piece = part[at:at + BLOCK]
                blocks.append((0, len(piece), piece))
    if not blocks:
        blocks.append((0, 0, b""))
    # Frame header: no content size, no checksum, window 2^20 (Window_Descriptor exponent 10).
    out = bytearray(struct.pack("<I", 0xFD2FB528)) + bytes([0x00, 10 << 3])
    for i, (kind, size, body) in enumerate(blocks):
        last = 1 if i == len(blocks) - 1 else 0
        out += struct.pack("<I", last | (kind << 1) | (size << 3))[:3] + body
    return bytes(out)


def parts_len(parts):
    return sum(p[1] if isinstance(p, tuple) else len(p) for p in parts)


def chunk(upto, count, parts, clen=None, ulen=None, crc=None):
    """One events.bin frame whose payload decompresses to `parts`; lengths and CRC may be overridden
    (the header CRC is always right, so only the caps can stop a lie)."""
    payload = zstd_frame(parts)
    h = struct.pack("<IIIIQI", CHUNK_MAGIC,
                    len(payload) if clen is None else clen,
                    parts_len(parts) if ulen is None else ulen,
                    zlib.crc32(payload) if crc is None else crc,
                    upto, count)
    return h + struct.pack("<I", zlib.crc32(h)) + payload


def frames(events_bin):
    """(offset, length) of every complete frame."""
    out, at = [], EVENTS_HEADER
    while at + CHUNK_HEADER <= len(events_bin):
        clen = struct.unpack_from("<I", events_bin, at + 4)[0]
        if at + CHUNK_HEADER + clen > len(events_bin):
            break
        out.append((at, CHUNK_HEADER + clen))
        at += CHUNK_HEADER + clen
    return out


def fix_chunk_header_crc(b, at):
    b[at + 28:at + 32] = struct.pack("<I", zlib.crc32(bytes(b[at:at + 28])))


def checkpoint_file(icount, full, parts, ulen=None):
    payload = zstd_frame(parts)
    body = struct.pack("<QQB", icount, 0x100000, 1 if full else 0) + bytes(32)
    body += struct.pack("<QQ", len(payload), parts_len(parts) if ulen is None else ulen) + payload
    return b"RVTCKP01" + struct.pack("<I", zlib.crc32(body)) + body


def fix_checkpoint_crc(b):
    b[8:12] = struct.pack("<I", zlib.crc32(bytes(b[12:])))


# ---------------------------------------------------------------------------------------------------------
# Mutations: each changes the trace in `t` and returns a short description.

def files_in(t):
    """The trace's regular files of a size a mutation may read (an earlier mutation may have left a
    FIFO, which would block us, or a huge sparse file)."""
    out = []
    for dirpath, _, names in os.walk(t):
        for n in names:
            path = os.path.join(dirpath, n)
            st = os.lstat(path)
            if not n.startswith(".") and stat.S_ISREG(st.st_mode) and st.st_size < 256 << 20:
                out.append(path)
    return sorted(out)


def readable(path):
    return path in files_in(os.path.dirname(path))


def checkpoints(t):
    d = os.path.join(t, "checkpoints")
    if not os.path.isdir(d):
        return []
    return [p for p in files_in(d) if p.endswith(".ckpt")]


def rel(t, path):
    return os.path.relpath(path, t)


def m_flip(t, rng):
    if not files_in(t):
        return "flip: no files"
    path = rng.choice(files_in(t))
    b = bytearray(open(path, "rb").read())
    if not b:
        return f"flip: {rel(t, path)} is empty"
    for _ in range(rng.choice([1, 1, 2, 8])):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    open(path, "wb").write(b)
    return f"flip bits in {rel(t, path)}"


def m_truncate(t, rng):
    if not files_in(t):
        return "truncate: no files"
    path = rng.choice(files_in(t))
    size = os.path.getsize(path)
    n = rng.randrange(size + 1) if size else 0
    os.truncate(path, n)
    return f"truncate {rel(t, path)} to {n} of {size}"


def m_chunks(t, rng):
    path = os.path.join(t, "events.bin")
    if not readable(path):
        return "chunks: events.bin is not a small regular file"
    b = open(path, "rb").read()
    fs = frames(b)
    if not fs:
        return "chunks: none"
    what = rng.choice(["duplicate", "drop", "swap", "append-copy"])
    pieces = [b[o:o + n] for o, n in fs]
    i = rng.randrange(len(pieces))
    if what == "duplicate":
        pieces.insert(i, pieces[i])
    elif what == "drop":
        del pieces[i]
    elif what == "swap" and len(pieces) > 1:
        j = rng.randrange(len(pieces))
        pieces[i], pieces[j] = pieces[j], pieces[i]
    else:
        pieces.append(pieces[i])
    open(path, "wb").write(b[:EVENTS_HEADER] + b"".join(pieces))
    return f"{what} event chunk {i} of {len(fs)}"


def m_chunk_lengths(t, rng):
    path = os.path.join(t, "events.bin")
    if not readable(path):
        return "chunk lengths: events.bin is not a small regular file"
    b = bytearray(open(path, "rb").read())
    fs = frames(b)
    if not fs:
        return "chunk lengths: none"
    at = rng.choice(fs)[0]
    field = rng.choice([(4, "compressed_len"), (8, "uncompressed_len"), (24, "event_count"), (16, "upto_icount")])
    value = rng.choice([0, 1, 64 << 20, (64 << 20) + 1, 0x7FFFFFFF, 0xFFFFFFFF])
    if field[0] == 16:
        b[at + 16:at + 24] = struct.pack("<Q", rng.choice([0, 1 << 40, (1 << 64) - 1]))
    else:
        b[at + field[0]:at + field[0] + 4] = struct.pack("<I", value)
    fix_chunk_header_crc(b, at)
    open(path, "wb").write(b)
    return f"set {field[1]} of the chunk at {at} (header CRC fixed)"


def events_file(chunks):
    return b"RVTEVT01" + struct.pack("<II", 1, 0) + b"".join(chunks)


def m_serial_bomb(t, rng):
    # The 176 KB trace of issue 9: chunk after chunk, each one SerialRx event of almost 64 MiB.
    n = rng.choice([3, 20, 100])
    size = (64 << 20) - 64
    head = varint(1) + varint(5) + varint(0x100000) + varint(0) + varint(size)
    ck = chunk(5, 1, [head, (0x61, size)])
    open(os.path.join(t, "events.bin"), "wb").write(events_file([ck] * n))
    return f"{n} chunks of one {size}-byte SerialRx each"


def m_event_flood(t, rng):
    # Irq{line 2} at icount 2, rip 2 encodes as 02 02 02 02: a chunk of 2^20 of them is a handful of RLE blocks.
    n = rng.choice([20, 70])
    count = 1 << 20
    ck = chunk(2, count, [varint(count), (0x02, 4 * count)])
    open(os.path.join(t, "events.bin"), "wb").write(events_file([ck] * n))
    return f"{n} chunks of {count} events each"


def m_checkpoint_bomb(t, rng):
    cps = checkpoints(t)
    if not cps:
        return "checkpoint bomb: no checkpoints"
    path = rng.choice(cps)
    b = bytearray(open(path, "rb").read())
    if len(b) < CKPT_HEADER:
        return f"checkpoint bomb: {rel(t, path)} is truncated"
    icount, full = struct.unpack_from("<Q", b, 12)[0], b[28] == 1
    what = rng.choice(["declared", "state", "zero-pages", "inflate"])
    if what == "declared":
        # Only the declared sizes lie; the CRC is fixed so the caps must stop it.
        b[61:69] = struct.pack("<Q", rng.choice([len(b) - CKPT_HEADER, 4 << 30]))
        b[69:77] = struct.pack("<Q", rng.choice([4 << 30, (4 << 30) - 1, 3 << 30, (1 << 64) - 1]))
        fix_checkpoint_crc(b)
        data = bytes(b)
    elif what == "state":
        size = 3 << 30
        data = checkpoint_file(icount, full, [varint(size), (0, size), varint(0)])
    elif what == "zero-pages":
        pages = 32 << 20 >> 12
        body = varint(0) + varint(pages) + b"".join(varint(p) + varint(0) for p in range(pages))
        data = checkpoint_file(icount, full, [body])
    else:
        size = 1 << 32
        data = checkpoint_file(icount, full, [(0, size)], ulen=size)
    open(path, "wb").write(data)
    return f"checkpoint {rel(t, path)}: {what} bomb"


def m_json(t, rng):
    name = rng.choice(["header.json", "header.json", "summary.json"])
    path = os.path.join(t, name)
    if not readable(path):
        return f"json: no {name}"
    try:
        j = json.load(open(path))
    except ValueError:
        return f"json: {name} does not parse"
    if not isinstance(j, dict) or not isinstance(j.get("machine", {}), dict):
        return f"json: {name} is not an object"
    if name == "header.json":
        key, value = rng.choice([
            ("format_version", rng.choice([0, 2, -1, "1"])),
            ("ram_bytes", rng.choice([0, 1, 4095, 3 << 30, (3 << 30) + 1, 1 << 40, 1 << 63, -5, "big"])),
            ("image_path", rng.choice(["/dev/zero", "/dev/urandom", "/", "/nonexistent", "FIFO", ""])),
            ("image_size", rng.choice([0, 1 << 40, -1])),
            ("image_sha256", rng.choice(["", "x" * 64, "0" * 64])),
            ("checkpoint_every", rng.choice([0, 1, 1 << 63])),
            ("disks", rng.choice([[], [{"path": "d", "size": 1 << 40, "sha256": "0" * 64}],
                                  [{"path": "d", "size": 512, "sha256": "0" * 64}] * 5])),
            ("time_mode", rng.choice(["virtual", "host", "none"])),
            ("cmdline", "x" * rng.choice([0, 1000])),
        ])
        if key == "ram_bytes" or key == "cmdline":
            j.setdefault("machine", {})[key] = value
        elif key == "image_path" and value == "FIFO":
            fifo = os.path.join(os.path.dirname(t), "image.fifo")
            if not os.path.exists(fifo):
                os.mkfifo(fifo)
            j[key] = fifo
        else:
            j[key] = value
    else:
        key, value = rng.choice([
            ("end_icount", rng.choice([0, 1, 1 << 62])),
            ("checkpoints", rng.choice([0, 1 << 40])),
            ("stop", rng.choice(["Halted", "UserStop", {"GuestExit": {"status": 7}}, "Nope"])),
            ("output_sha256", "0" * 64),
            ("wall_secs", rng.choice([-1, 1e308])),
        ])
        j[key] = value
    open(path, "w").write(json.dumps(j, indent=2))
    return f"{name}: {key} = {str(value)[:60]}"


def m_sparse(t, rng):
    disks = os.path.join(t, "disks")
    candidates = [p for p in [os.path.join(t, "events.bin")] if readable(p)] + checkpoints(t)[-1:]
    if os.path.isdir(disks):
        candidates += files_in(disks)
    if not candidates:
        return "sparse: no files"
    path = rng.choice(candidates)
    size = rng.choice([20 << 30, 4 << 30, 1 << 40])
    os.truncate(path, size)
    if rng.random() < 0.3:
        with open(path, "r+b") as f:
            f.seek(size - 1)
            f.write(b"\x01")
    return f"sparse: {rel(t, path)} extended to {size}"


def m_fifo(t, rng):
    if not files_in(t):
        return "fifo: no files"
    path = rng.choice(files_in(t))
    os.remove(path)
    if rng.random() < 0.8:
        os.mkfifo(path)
        return f"FIFO in place of {rel(t, path)}"
    os.symlink(rng.choice(["/dev/zero", "/dev/urandom", "/dev/null"]), path)
    return f"device in place of {rel(t, path)}"


def m_stray_checkpoint(t, rng):
    cps = checkpoints(t)
    last = open(cps[-1], "rb").read() if cps else b""
    icount = struct.unpack_from("<Q", last, 12)[0] + 1 if len(last) >= 20 else rng.choice([0, 1, 10 ** 15])
    path = os.path.join(t, "checkpoints", "%020d.ckpt" % icount)
    if rng.random() < 0.5:
        data = bytes(rng.randrange(256) for _ in range(rng.choice([0, 10, 77, 500])))
    else:
        data = checkpoint_file(icount, rng.random() < 0.5, [varint(3) + b"abc" + varint(1) + varint(0) + varint(16) + bytes(16)])
    open(path, "wb").write(data)
    return f"stray checkpoint {rel(t, path)}"


MUTATIONS = [
    (m_flip, 8), (m_truncate, 5), (m_chunks, 4), (m_chunk_lengths, 3), (m_serial_bomb, 2),
    (m_event_flood, 1), (m_checkpoint_bomb, 3), (m_json, 6), (m_sparse, 2), (m_fifo, 2),
    (m_stray_checkpoint, 2),
]


# ---------------------------------------------------------------------------------------------------------
# Running retrovisor and judging what it did.

def size_bytes(text):
    """Bytes in "4G", "512M", "4096" (prlimit itself takes plain numbers only)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def run(args, mem, timeout):
    """(class, detail, stdout) for one run of retrovisor under the memory limit and timeout."""
    cmd = ["prlimit", f"--as={size_bytes(mem)}", "--", BIN] + args
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return "BAD", f"timeout after {timeout}s", b""
    err = err.decode(errors="replace")
    lines = err.strip().splitlines()
    rc = p.returncode
    if "panicked" in err or rc == 101:
        return "BAD", "panic: " + err.strip()[-300:], out
    if "memory allocation of" in err:
        return "BAD", "allocation failed: " + err.strip()[-200:], out
    if rc < 0:
        return "BAD", f"killed by signal {signal.Signals(-rc).name}: {err.strip()[-200:]}", out
    if rc == 2:
        if (lines and lines[-1].startswith("retrovisor: error: ")
                and all(l.startswith("retrovisor: warning: ") for l in lines[:-1])):
            return "refused", lines[-1][len("retrovisor: error: "):], out
        return "BAD", "unclear error: " + err.strip()[-300:], out
    if rc == 4:
        return "diverged", lines[-1] if lines else "", out
    return "ok", f"exit {rc}", out


def judge_replay(result, recorded_output):
    cls, detail, out = result
    if cls == "ok" and not recorded_output.startswith(out):
        return "BAD", "replay printed output the guest never printed: " + out[:120].decode(errors="replace"), out
    return result


def build(args):
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    if not os.path.exists(BIN):
        sys.exit(f"fuzz: {BIN} is missing; run cargo build --release")


def record_bases(work):
    """Records the guests the mutations start from: {name: (trace, recorded stdout)}."""
    guests = os.path.join(work, "guests")
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "tests", "guests"), f"OUT={guests}"], check=True)
    serial = os.path.join(work, "input.txt")
    open(serial, "w").write("first line\nsecond\nquit\n")
    disk = os.path.join(work, "disk.img")
    image = bytearray((i * 7 + (i >> 9) * 13) & 0xFF for i in range(64 * 1024))
    text = b"retrovisor test disk, sector 0\n"
    image[:len(text)] = text
    open(disk, "wb").write(image)
    bases = {}
    # The step clock: the mutations name positions by instruction, and --checkpoint-every needs it.
    for name, extra in [("hello", []), ("timer", ["--checkpoint-every", "5000"]),
                        ("echo", ["--serial-input", serial]), ("disk", ["--disk", disk, "--checkpoint-every", "5000"])]:
        trace = os.path.join(work, "base", name + ".rvt")
        p = subprocess.run([BIN, "record", "--clock", "step", "--kernel", os.path.join(guests, name + ".elf"), "-o", trace] + extra,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if p.returncode in (2, 4) or p.returncode < 0:
            sys.exit(f"fuzz: recording {name} failed: {p.stderr.decode(errors='replace')}")
        bases[name] = (trace, p.stdout)
    return guests, bases


def killed_recording(case, guests, rng):
    """A recording killed with SIGKILL at a random moment: the trace it leaves."""
    name = rng.choice(["timer", "spin", "hello"])
    trace = os.path.join(case, name + ".rvt")
    p = subprocess.Popen([BIN, "record", "--kernel", os.path.join(guests, name + ".elf"), "-o", trace],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    delay = rng.choice([0, 0.002, 0.01, 0.02, 0.05]) if rng.random() < 0.5 else rng.uniform(0, 1.5)
    time.sleep(delay)
    p.kill()
    out, _ = p.communicate()
    return trace, out, f"{name} recording killed after {delay * 1000:.0f} ms"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="?", type=int, default=300, help="number of mutated traces (default 300)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    ap.add_argument("--mem", default="4G", help="address-space limit for every run (prlimit --as), default 4G")
    ap.add_argument("--timeout", type=float, default=60, help="seconds a run may take, default 60")
    ap.add_argument("--keep", default=None, help="directory to copy BAD cases into (default: a temp dir)")
    ap.add_argument("--no-build", action="store_true", help="use target/release/retrovisor as it is")
    ap.add_argument("--bin", default=None, help="fuzz this retrovisor binary instead (implies --no-build)")
    args = ap.parse_args()
    if args.bin:
        global BIN
        BIN, args.no_build = os.path.abspath(args.bin), True
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    build(args)
    work = tempfile.mkdtemp(prefix="rv-fuzz-")
    keep = args.keep or tempfile.mkdtemp(prefix="rv-fuzz-bad-")
    print(f"fuzz: seed {seed}, {args.cases} cases, memory limit {args.mem}, timeout {args.timeout:.0f}s, work in {work}")
    guests, bases = record_bases(work)
    counts = {}
    bad = []
    kinds = {}
    started = time.time()
    try:
        for n in range(args.cases):
            case = os.path.join(work, f"case{n}")
            os.makedirs(case)
            if rng.random() < 0.08:
                trace, recorded, what = killed_recording(case, guests, rng)
                kind = "kill"
            else:
                base = rng.choice(sorted(bases))
                trace = os.path.join(case, base + ".rvt")
                shutil.copytree(bases[base][0], trace)
                recorded = bases[base][1]
                fn = rng.choices([m for m, _ in MUTATIONS], weights=[w for _, w in MUTATIONS])[0]
                what = f"{base}: " + fn(trace, rng)
                kind = fn.__name__[2:]
                # Sometimes a second one on top (it copes with whatever the first left).
                if rng.random() < 0.15:
                    fn = rng.choices([m for m, _ in MUTATIONS], weights=[w for _, w in MUTATIONS])[0]
                    what += "; " + fn(trace, rng)
            kinds[kind] = kinds.get(kind, 0) + 1
            for label, cmd in [("info", ["info", trace]), ("info --verify", ["info", "--verify", trace]),
                               ("replay", ["replay", trace])]:
                result = run(cmd, args.mem, args.timeout)
                if label == "replay":
                    result = judge_replay(result, recorded)
                cls, detail, _ = result
                counts[(label, cls)] = counts.get((label, cls), 0) + 1
                if cls == "BAD":
                    bad.append((n, what, label, detail))
                    dest = os.path.join(keep, f"case{n}")
                    if not os.path.exists(dest):
                        shutil.copytree(case, dest, symlinks=True, ignore_dangling_symlinks=True,
                                        copy_function=copy_regular)
            shutil.rmtree(case)
            if (n + 1) % 50 == 0:
                print(f"fuzz: {n + 1} cases in {time.time() - started:.0f}s, {len(bad)} BAD", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nfuzz: {args.cases} cases (seed {seed}) in {time.time() - started:.0f}s; mutations: "
          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    classes = ["refused", "diverged", "ok", "BAD"]
    print(f"{'':16}" + "".join(f"{c:>10}" for c in classes))
    for label in ["info", "info --verify", "replay"]:
        print(f"{label:16}" + "".join(f"{counts.get((label, c), 0):>10}" for c in classes))
    for n, what, label, detail in bad:
        print(f"BAD case {n} ({what}) {label}: {detail}")
    if bad:
        print(f"fuzz: BAD cases kept in {keep}")
        sys.exit(1)
    shutil.rmtree(keep, ignore_errors=True)


def copy_regular(src, dst):
    """Copies a file for a kept case, leaving out FIFOs and devices (copying them would block or never
    end) and huge sparse files (copying would write every hole)."""
    if os.path.isfile(src) and not os.path.islink(src) and os.path.getsize(src) < 256 << 20:
        shutil.copy2(src, dst)


if __name__ == "__main__":
    main()
