//! The virtio-mmio block device: DMA recorded and replayed exactly, the user's image never written
//! (except by `run --disk-writeback`), replay from the trace's own copy of the image, checkpoints that
//! carry the overlay, and clear answers to bad images and to a guest that programs the device wrongly.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;

const SECTOR: usize = 512;
const IMAGE_BYTES: usize = 64 * 1024;
const TEXT: &[u8] = b"retrovisor test disk, sector 0\n";

/// The test image: 64 KiB of a known pattern, with a line of text at the start.
fn image_bytes() -> Vec<u8> {
    let mut b: Vec<u8> = (0..IMAGE_BYTES)
        .map(|i| (i * 7 + (i >> 9) * 13) as u8)
        .collect();
    b[..TEXT.len()].copy_from_slice(TEXT);
    b
}

/// A fresh scratch directory `name` holding the test image as `disk.img`: (directory, image).
fn scratch_with_image(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    let img = dir.join("disk.img");
    std::fs::write(&img, image_bytes()).unwrap();
    (dir, img)
}

/// Records disk.elf with the test image (and `extra` arguments) in a fresh scratch directory `name`, and
/// checks that it ended with `expected` status: (image, trace, recording).
fn record_disk(name: &str, extra: &[&str], expected: i32) -> (PathBuf, PathBuf, Output) {
    let (dir, img) = scratch_with_image(name);
    let mut args = vec!["--disk", s(&img)];
    args.extend_from_slice(extra);
    let (trace, rec) = record(&dir, "disk", &args);
    assert_eq!(
        status(&rec),
        expected,
        "{}\n{}",
        text(&rec.stderr),
        text(&rec.stdout)
    );
    (img, trace, rec)
}

/// `retrovisor run` of disk.elf with `args`.
fn run_disk(args: &[&str]) -> Output {
    let kernel = guest("disk");
    let mut all = vec!["run", "--kernel", s(&kernel)];
    all.extend_from_slice(args);
    rv(&all)
}

/// What disk.elf writes: sectors 5 and 6, byte j of sector s = (j * 3 + s) ^ 0xA5.
fn after_guest_writes(mut b: Vec<u8>) -> Vec<u8> {
    for s in [5usize, 6] {
        for j in 0..SECTOR {
            b[s * SECTOR + j] = ((j * 3 + s) ^ 0xA5) as u8;
        }
    }
    b
}

/// The guest's checksum: FNV-1a over little-endian 32-bit words.
fn checksum(b: &[u8]) -> String {
    let mut h: u32 = 2_166_136_261;
    for w in b.chunks_exact(4) {
        h ^= u32::from_le_bytes(w.try_into().unwrap());
        h = h.wrapping_mul(16_777_619);
    }
    format!("{h:#010x}")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The output disk.elf must print for the test image.
fn assert_normal_output(out: &str) {
    let before = checksum(&image_bytes());
    let after = checksum(&after_guest_writes(image_bytes()));
    for line in [
        "disk: slot 0: virtio-mmio version 2 device 2 capacity 128 sectors".to_string(),
        "disk: id retrovisor-disk0".to_string(),
        format!("disk: read 128 sectors, checksum {before}"),
        "disk: sector 0 says: retrovisor test disk, sector 0".to_string(),
        "disk: wrote sectors 5-6: status 0".to_string(),
        "disk: flush: status 0".to_string(),
        "disk: read back ok".to_string(),
        "disk: interrupts 4, interrupt status seen 0x00000001".to_string(),
        format!("disk: checksum after writes {after}"),
        "disk: done".to_string(),
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?} in output:\n{out}"
        );
    }
}

fn end_icount(trace: &Path) -> u64 {
    text(&rv(&["info", s(trace)]).stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("instructions:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap()
}

#[test]
fn disk_guest_records_and_replays_identically_and_the_image_is_untouched() {
    let (img, trace, rec) = record_disk("disk-rr", &[], 1);
    assert_normal_output(&text(&rec.stdout));
    assert_eq!(
        std::fs::read(&img).unwrap(),
        image_bytes(),
        "record wrote the image"
    );
    assert_replays(&trace, &rec);
    assert_eq!(
        std::fs::read(&img).unwrap(),
        image_bytes(),
        "replay wrote the image"
    );

    // The completion interrupts were logged like any other, and the header lists the disk.
    let reader = traces::TraceReader::open(&trace).unwrap();
    let interrupts = reader
        .events()
        .iter()
        .filter(|e| matches!(e.kind, traces::EventKind::Interrupt { vector: 0x25 }))
        .count();
    assert_eq!(interrupts, 4);
    let disks = &reader.header().disks;
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].size, IMAGE_BYTES as u64);
    assert_eq!(disks[0].sha256, traces::sha256_hex(&image_bytes()));
    assert_eq!(reader.read_disk(0).unwrap(), image_bytes());
    let info = text(&rv(&["info", s(&trace)]).stdout);
    assert!(
        info.contains("disk 0:") && info.contains("disk.img"),
        "{info}"
    );
}

#[test]
fn run_leaves_the_image_alone_unless_told_to_write_back() {
    let (dir, img) = scratch_with_image("disk-run");
    for clock in ["free", "step"] {
        let o = run_disk(&["--disk", s(&img), "--clock", clock]);
        assert_eq!(status(&o), 1, "{}", text(&o.stderr));
        assert_normal_output(&text(&o.stdout));
        assert_eq!(
            std::fs::read(&img).unwrap(),
            image_bytes(),
            "{clock} run wrote the image"
        );
    }
    let o = run_disk(&["--disk", s(&img), "--disk-writeback"]);
    assert_eq!(status(&o), 1, "{}", text(&o.stderr));
    assert_eq!(
        std::fs::read(&img).unwrap(),
        after_guest_writes(image_bytes()),
        "write-back should write exactly the guest's writes"
    );
    // record has no write-back.
    let o = rv(&[
        "record",
        "--kernel",
        s(&guest("disk")),
        "--disk",
        s(&img),
        "--disk-writeback",
        "-o",
        s(&dir.join("t.rvt")),
    ]);
    assert_eq!(status(&o), 2);
}

#[test]
fn replay_needs_only_the_trace_even_after_the_image_is_gone() {
    let (img, trace, rec) = record_disk("disk-gone", &[], 1);
    std::fs::remove_file(&img).unwrap();
    assert_replays(&trace, &rec);
    // A different file at the old path does not matter either.
    std::fs::write(&img, vec![0u8; IMAGE_BYTES]).unwrap();
    assert_replays(&trace, &rec);
}

#[test]
fn replay_from_middle_checkpoints_restores_the_overlay() {
    let (_, trace, rec) = record_disk("disk-middle", &["--checkpoint-every", "10000"], 1);
    let end = end_icount(&trace);
    // The final whole-disk read takes the last ~70k instructions: a checkpoint 20k before the end
    // lies after the writes, so the checksum it prints depends on the overlay in the checkpoint.
    for from in [end / 2, end - 20_000] {
        let mid = replay(&trace, &["--from", &from.to_string()]);
        assert_eq!(status(&mid), status(&rec), "{}", text(&mid.stderr));
        assert!(
            !mid.stdout.is_empty() && rec.stdout.ends_with(&mid.stdout),
            "from {from}: {}",
            text(&mid.stdout)
        );
    }
    let late = text(&replay(&trace, &["--from", &(end - 20_000).to_string()]).stdout);
    assert!(
        late.contains(&format!(
            "disk: checksum after writes {}",
            checksum(&after_guest_writes(image_bytes()))
        )),
        "{late}"
    );
}

#[test]
fn a_guest_that_programs_the_device_wrongly_gets_errors_and_the_vmm_keeps_running() {
    let (img, trace, rec) = record_disk("disk-bad", &["--cmdline", "bad"], 1);
    let out = text(&rec.stdout);
    for line in [
        "bad: read into a buffer outside RAM: status 1",
        "bad: write from a buffer outside RAM: status 1",
        "bad: read past the end: status 1",
        "bad: write across the end: status 1",
        "bad: read into a device-readable buffer: status 1",
        "bad: write of a partial sector: status 1",
        "bad: unknown request type: status 2",
        "bad: looping chain not used",
        "bad: looping chain: device needs reset, interrupt status 0x00000002",
        "bad: request while the device needs reset: status 255",
        "bad: after reset, a good read: status 0",
        "bad: head index past the table: device needs reset, interrupt status 0x00000002",
        "bad: next index past the table: device needs reset, interrupt status 0x00000002",
        "bad: available index jump: device needs reset, interrupt status 0x00000002",
        "bad: queue size 6 refused",
        "bad: queue size 512 refused",
        "disk: done",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?}:\n{out}");
    }
    // None of it reached the disk.
    let sum = checksum(&image_bytes());
    assert!(
        out.contains(&format!("bad: checksum after all that {sum}")),
        "{out}"
    );
    assert_eq!(std::fs::read(&img).unwrap(), image_bytes());
    assert_replays(&trace, &rec);
}

#[test]
fn bad_disk_images_are_refused_before_the_guest_starts() {
    let (dir, img) = scratch_with_image("disk-badimg");
    let empty = dir.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let missing = dir.join("missing.img");
    let fifo = dir.join("fifo.img");
    mkfifo(&fifo);
    let kernel = guest("disk");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--disk", s(&missing)], "cannot read disk image"),
        (vec!["--disk", s(&empty)], "is empty"),
        (vec!["--disk", s(&dir)], "is a directory"),
        // Neither may block or read without end.
        (vec!["--disk", s(&fifo)], "is a FIFO, not an image file"),
        (
            vec!["--disk", "/dev/zero"],
            "is a device, not an image file",
        ),
        (
            vec![
                "--disk",
                s(&img),
                "--disk",
                s(&img),
                "--disk",
                s(&img),
                "--disk",
                s(&img),
                "--disk",
                s(&img),
            ],
            "at most 4 disks",
        ),
    ];
    for (args, needle) in cases {
        for cmd in ["run", "record"] {
            let trace = dir.join(format!("{cmd}.rvt"));
            let mut all = vec![cmd, "--kernel", s(&kernel)];
            if cmd == "record" {
                all.extend(["-o", s(&trace)]);
            }
            all.extend(&args);
            let o = rv_within(60, &all);
            let err = text(&o.stderr);
            assert_eq!(status(&o), 2, "{cmd} {args:?}: {err}");
            assert!(
                err.starts_with("retrovisor: error: ") && err.contains(needle),
                "{cmd} {args:?}: {err:?} lacks {needle:?}"
            );
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(o.stdout.is_empty(), "the guest ran: {}", text(&o.stdout));
            assert!(!trace.exists(), "a trace was started");
        }
    }
}

#[test]
fn a_tampered_disk_copy_is_refused() {
    let (_, trace, _) = record_disk("disk-tamper", &["--max-instructions", "20000"], 8);
    let copy = trace.join("disks").join("0.img.zst");
    let mut other = image_bytes();
    other[1000] ^= 1;
    std::fs::write(&copy, zstd_frame_of(&other)).unwrap();
    let o = replay(&trace, &[]);
    let err = text(&o.stderr);
    assert_eq!(status(&o), 2, "{err}");
    assert!(err.contains("disk copy") && err.contains("sha256"), "{err}");
    std::fs::remove_file(&copy).unwrap();
    let o = replay(&trace, &[]);
    assert_eq!(status(&o), 2);
    assert!(text(&o.stderr).contains("0.img.zst"), "{}", text(&o.stderr));
}

/// A zstd frame holding `data` in raw blocks, built by hand (the test crate does not link zstd).
fn zstd_frame_of(data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x28, 0xB5, 0x2F, 0xFD];
    // Frame header descriptor: single segment, 4-byte content size, no checksum, no dictionary.
    f.push(0b1010_0000);
    f.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let chunks: Vec<&[u8]> = data.chunks(32 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = u32::from(i + 1 == chunks.len());
        let header = last | ((chunk.len() as u32) << 3); // block type 0: raw
        f.extend_from_slice(&header.to_le_bytes()[..3]);
        f.extend_from_slice(chunk);
    }
    f
}

#[test]
fn several_disks_appear_at_their_windows() {
    let (dir, img) = scratch_with_image("disk-many");
    let small = dir.join("small.img");
    std::fs::write(&small, vec![0x5a; 3 * SECTOR + 100]).unwrap();
    let o = run_disk(&["--disk", s(&img), "--disk", s(&small), "--disk", s(&small)]);
    let out = text(&o.stdout);
    assert_eq!(status(&o), 1, "{}", text(&o.stderr));
    assert!(
        out.contains("disk: slot 1: virtio-mmio version 2 device 2 capacity 3 sectors"),
        "{out}"
    );
    assert!(
        out.contains("disk: slot 2: virtio-mmio version 2 device 2 capacity 3 sectors"),
        "{out}"
    );
    assert!(
        out.contains("disk: slot 3: empty (magic 0xffffffff)"),
        "{out}"
    );
    assert_normal_output(&out);
}

#[test]
fn the_guest_sees_the_same_data_as_with_qemus_virtio_blk() {
    // QEMU's PC machine has no virtio-mmio; its microvm machine does (at other addresses, which
    // disk.elf uses with `qemu` on its command line, polling instead of waiting for interrupts).
    let (_, img) = scratch_with_image("disk-qemu");
    let kernel = guest("disk");
    let q = std::process::Command::new("qemu-system-x86_64")
        .args(["-M", "microvm", "-global", "virtio-mmio.force-legacy=false"])
        .args(["-kernel", s(&kernel), "-append", "qemu", "-m", "32"])
        .args([
            "-serial",
            "stdio",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-accel",
            "tcg",
        ])
        .args([
            "-drive",
            &format!("id=d0,file={},format=raw,if=none,snapshot=on", s(&img)),
        ])
        .args(["-device", "virtio-blk-device,drive=d0"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("qemu-system-x86_64 is needed for this test (Debian package qemu-system-x86)");
    let theirs = text(&q.stdout);
    assert_eq!(status(&q), 1, "{theirs}{}", text(&q.stderr));
    let ours = text(&run_disk(&["--disk", s(&img)]).stdout);
    let checksums = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.contains("checksum") || l.contains("says") || l.contains("read back"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(checksums(&ours).len(), 4, "{ours}");
    assert_eq!(
        checksums(&ours),
        checksums(&theirs),
        "ours:\n{ours}\nQEMU:\n{theirs}"
    );
    assert_eq!(std::fs::read(&img).unwrap(), image_bytes());
}

#[test]
fn a_watchpoint_on_a_dma_buffer_stops_where_the_device_filled_it() {
    // With the step clock every step is checked; with the landmark clock gdb's continue runs free and
    // compares the buffer at every landmark (the notify is one), then steps to the store.
    for clock in ["step", "landmark"] {
        watch_dma(clock);
    }
}

fn watch_dma(clock: &str) {
    let (_, trace, _) = record_disk(&format!("disk-watch-{clock}"), &["--clock", clock], 1);
    let mut server = GdbServer::start(&trace, &[]);
    // The guest zeroes buf first (no change: it is zero already); the first change is the device's GET_ID
    // reply, which DMA writes during the store to QueueNotify (register 0x50 = 80, in the inlined `wr`).
    let out = gdb_batch(
        server.port,
        &guest("disk"),
        &[
            "watch buf[0]",
            "continue",
            "info line *$pc",
            "reverse-stepi",
            "print buf[0]",
            "kill",
        ],
    );
    assert!(
        out.contains("Old value = 0 '\\000'") && out.contains("New value = 114 'r'"),
        "{out}"
    );
    assert!(
        out.contains("in wr (v=0, reg=80)") && out.contains("<submit+"),
        "the stop is not at the notify:\n{out}"
    );
    // One instruction back, before the notify, the buffer is zero again: the device filled it in that step.
    assert!(
        out.contains("Old value = 114 'r'") && out.contains("$1 = 0 '\\000'"),
        "{out}"
    );
    assert_eq!(server.wait_exit(10), Some(0));
}
