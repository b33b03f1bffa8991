//! End-to-end tests of the trace format: real files in a temporary directory, written with
//! `TraceWriter`, damaged the ways crashes and hostile inputs damage them, read with `TraceReader`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use traces::{
    checkpoint_file_name, sha256_hex, written_file_name, Checkpoint, ClockKind, Event, EventKind,
    Header, HostInsn, MachineConfig, ReadError, StopReason, Summary, TimeMode, TraceReader,
    TraceWriter, WriteError, CHUNK_HEADER_LEN, CHUNK_MAGIC, EVENTS_FILE_HEADER_LEN, PAGE_SIZE,
};

/// A uniquely named directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let unique = format!(
            "retrovisor-traces-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(unique);
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// A path inside the temp dir for a trace (not created).
    fn trace(&self) -> PathBuf {
        self.0.join("t.rvt")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn header() -> Header {
    Header {
        format_version: traces::FORMAT_VERSION,
        tool_version: "0.1.0".into(),
        image_path: "/images/bug.elf".into(),
        image_sha256: sha256_hex(b"image"),
        image_size: 5,
        machine: MachineConfig {
            ram_bytes: 64 << 20,
            cmdline: "console=ttyS0".into(),
            memory_map: Vec::new(),
        },
        clock: "step".into(),
        time_mode: TimeMode::Host,
        checkpoint_every: 1_000_000,
        created_unix_secs: 1_700_000_000,
        disks: vec![],
        digest: Default::default(),
        host_traps: false,
        page_backing: false,
        cpu_model: "host".into(),
        recorded_on: None,
        cpus: 1,
        cold_checkpoints: false,
        branched_from: None,
        chaos_seed: None,
        vmm_cpuid: false,
        cpuid: Vec::new(),
        initrd: None,
    }
}

/// The summary of a recording that ended at `end_icount`, after `checkpoints` checkpoints, with
/// `events` (its stop event last): it counts them by kind, as the recorder does.
fn summary(end_icount: u64, checkpoints: u64, events: &[Event]) -> Summary {
    let mut events_by_kind = BTreeMap::new();
    for e in events {
        *events_by_kind.entry(e.kind.name().to_string()).or_default() += 1;
    }
    Summary {
        end: end_icount,
        stop: StopReason::GuestExit { status: 3 },
        events_by_kind,
        checkpoints,
        output_bytes: 12,
        output_sha256: sha256_hex(b"hello world\n"),
        wall_secs: 1.5,
    }
}

/// The stop event a finished recording ends with, at `icount` (the reason [`summary`] gives).
fn stop(icount: u64) -> Event {
    ev(
        icount,
        EventKind::Stop {
            reason: StopReason::GuestExit { status: 3 },
        },
    )
}

/// Ends a recording as the recorder does: its stop event at `end_icount`, then the summary, which
/// counts `pushed` (the events pushed before) and the stop. Returns the summary.
fn finish(mut w: TraceWriter, pushed: &[Event], end_icount: u64, checkpoints: u64) -> Summary {
    let mut events = pushed.to_vec();
    events.push(stop(end_icount));
    w.push(stop(end_icount)).unwrap();
    let summary = summary(end_icount, checkpoints, &events);
    w.finish(&summary).unwrap();
    summary
}

fn ev(icount: u64, kind: EventKind) -> Event {
    Event {
        at: icount,
        rip: 0x10_0000 + icount,
        kind,
    }
}

fn irq(icount: u64) -> Event {
    ev(icount, EventKind::Irq { line: 0 })
}

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PAGE_SIZE]
}

fn checkpoint(icount: u64, full: bool, pages: Vec<(u64, Vec<u8>)>) -> Checkpoint {
    Checkpoint {
        at: icount,
        rip: 0x2000 + icount,
        full,
        digest: [icount as u8; 32],
        state: vec![1, 2, 3, icount as u8],
        pages,
    }
}

/// Byte offsets of every complete frame in an events file.
fn frame_offsets(events_bin: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = EVENTS_FILE_HEADER_LEN;
    while at + CHUNK_HEADER_LEN <= events_bin.len() {
        let clen = u32::from_le_bytes(events_bin[at + 4..at + 8].try_into().unwrap()) as usize;
        offsets.push(at);
        at += CHUNK_HEADER_LEN + clen;
    }
    offsets
}

/// Writes a cut-off trace with three chunks (upto 100, 200, 300) and returns its events.
fn three_chunks(dir: &Path) -> Vec<Event> {
    let mut w = TraceWriter::create(dir, &header()).unwrap();
    let events = vec![irq(10), irq(50), irq(150), irq(150), irq(250), irq(299)];
    for e in &events[..2] {
        w.push(e.clone()).unwrap();
    }
    w.flush(100).unwrap();
    for e in &events[2..4] {
        w.push(e.clone()).unwrap();
    }
    w.flush(200).unwrap();
    for e in &events[4..] {
        w.push(e.clone()).unwrap();
    }
    w.flush(300).unwrap();
    events
}

fn err_text<T: std::fmt::Debug>(result: Result<T, ReadError>) -> String {
    result.expect_err("expected an error").to_string()
}

#[test]
fn round_trip_of_header_events_checkpoints_and_summary() {
    let tmp = TempDir::new("round-trip");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    let events = [
        ev(
            0,
            EventKind::Clock {
                kind: ClockKind::Wall,
                ns: 1_700_000_000_000_000_000,
            },
        ),
        ev(
            5,
            EventKind::SerialRx {
                bytes: b"ls\n".to_vec(),
            },
        ),
        ev(
            5,
            EventKind::HostValue {
                insn: HostInsn::Rdtscp,
                value: 123_456_789,
                aux: 7,
            },
        ),
        ev(90, EventKind::Irq { line: 0 }),
        ev(91, EventKind::Interrupt { vector: 0x20 }),
        ev(
            150,
            EventKind::HostValue {
                insn: HostInsn::Rdrand,
                value: u64::MAX,
                aux: 0,
            },
        ),
        ev(
            150,
            EventKind::Clock {
                kind: ClockKind::Monotonic,
                ns: 42,
            },
        ),
        stop(400),
    ];
    for e in &events[..5] {
        w.push(e.clone()).unwrap();
    }
    // The all-zero page 9 is dropped from a full checkpoint: it is implied.
    let full = checkpoint(
        100,
        true,
        vec![(3, page(0xaa)), (9, page(0)), (1, page(0x11))],
    );
    let full_size = w.write_checkpoint(&full).unwrap();
    for e in &events[5..7] {
        w.push(e.clone()).unwrap();
    }
    let incr = checkpoint(200, false, vec![(3, page(0)), (4, page(0x44))]);
    let incr_size = w.write_checkpoint(&incr).unwrap();
    w.push(events[7].clone()).unwrap();
    let (event_bytes, checkpoint_bytes) = w.bytes_written();
    assert_eq!(checkpoint_bytes, full_size + incr_size);
    assert_eq!(
        fs::metadata(dir.join("events.bin")).unwrap().len(),
        event_bytes
    );
    w.finish(&summary(400, 2, &events)).unwrap();

    let r = TraceReader::open(&dir).unwrap();
    assert_eq!(r.header(), &header());
    assert_eq!(r.events(), &events[..]);
    assert_eq!(r.summary(), Some(&summary(400, 2, &events)));
    assert_eq!(r.complete_upto(), 400);
    assert!(!r.cut_off());
    assert!(!r.truncated_tail());
    assert_eq!(r.cut_off_description(), None);
    // finish() appended the final chunk.
    let events_size = fs::metadata(dir.join("events.bin")).unwrap().len();
    assert!(events_size > event_bytes);
    assert_eq!(r.sizes(), (events_size, checkpoint_bytes));

    let infos = r.checkpoints();
    assert_eq!(infos.len(), 2);
    assert_eq!(
        (infos[0].at, infos[0].rip, infos[0].full),
        (100, 0x2064, true)
    );
    assert_eq!(
        (infos[1].at, infos[1].full, infos[1].digest),
        (200, false, [200; 32])
    );
    assert_eq!(infos[0].bytes_on_disk, full_size);
    assert_eq!(
        infos[1].path,
        dir.join("checkpoints").join(checkpoint_file_name(200))
    );
    assert!(infos[1]
        .path
        .ends_with("checkpoints/00000000000000000200.ckpt"));

    let back = r.read_checkpoint(0).unwrap();
    let expected = Checkpoint {
        pages: vec![(1, page(0x11)), (3, page(0xaa))],
        ..full
    };
    assert_eq!(back, expected);
    // An incremental checkpoint keeps its zeroed page, and comes back page-sized.
    let back = r.read_checkpoint(1).unwrap();
    assert_eq!(
        back,
        Checkpoint {
            pages: vec![(3, page(0)), (4, page(0x44))],
            ..incr
        }
    );
    assert!(matches!(
        r.read_checkpoint(2),
        Err(ReadError::NoSuchCheckpoint { index: 2, count: 2 })
    ));

    // No temporary files are left behind.
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["checkpoints", "events.bin", "header.json", "summary.json"]
    );
    assert_eq!(fs::read_dir(dir.join("checkpoints")).unwrap().count(), 2);
}

#[test]
fn writer_dropped_without_finish_reads_as_a_cut_off_prefix() {
    let tmp = TempDir::new("dropped");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    w.push(irq(10)).unwrap();
    w.flush(100).unwrap();
    w.write_checkpoint(&checkpoint(150, true, vec![(1, page(1))]))
        .unwrap();
    w.push(irq(160)).unwrap();
    w.flush(200).unwrap();
    // Never flushed: lost, as with kill -9.
    w.push(irq(250)).unwrap();
    drop(w);

    let r = TraceReader::open(&dir).unwrap();
    assert!(r.cut_off());
    assert!(!r.truncated_tail());
    assert_eq!(r.summary(), None);
    assert_eq!(r.complete_upto(), 200);
    assert_eq!(r.events(), &[irq(10), irq(160)]);
    assert_eq!(r.checkpoints().len(), 1);
    let text = r.cut_off_description().unwrap();
    assert!(text.contains("complete up to icount 200"), "{text}");
}

#[test]
fn torn_final_frame_is_dropped() {
    let tmp = TempDir::new("torn");
    let dir = tmp.trace();
    let events = three_chunks(&dir);
    let path = dir.join("events.bin");
    let full = fs::read(&path).unwrap();
    let offsets = frame_offsets(&full);
    assert_eq!(offsets.len(), 3);

    // Cut in the middle of the last frame's payload, then in the middle of its header.
    for cut in [full.len() - 3, offsets[2] + 10] {
        fs::write(&path, &full[..cut]).unwrap();
        let r = TraceReader::open(&dir).unwrap();
        assert!(r.cut_off());
        assert!(r.truncated_tail());
        assert_eq!(r.complete_upto(), 200);
        assert_eq!(r.events(), &events[..4]);
        let torn = r.torn_tail().unwrap();
        assert_eq!(
            (torn.offset, torn.bytes),
            (offsets[2] as u64, (cut - offsets[2]) as u64)
        );
        assert!(r
            .cut_off_description()
            .unwrap()
            .contains("incomplete final chunk"));
    }
}

#[test]
fn every_truncation_of_the_event_file_opens_as_a_prefix() {
    // A kill can stop the writer between any two bytes; every such file must open.
    let tmp = TempDir::new("every-cut");
    let dir = tmp.trace();
    let events = three_chunks(&dir);
    let path = dir.join("events.bin");
    let full = fs::read(&path).unwrap();
    let offsets = frame_offsets(&full);
    let uptos = [100, 200, 300];
    let counts = [2, 4, 6];
    for cut in 0..=full.len() {
        fs::write(&path, &full[..cut]).unwrap();
        let r = TraceReader::open(&dir).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        // Frames wholly inside the cut survive.
        let ends: Vec<usize> = offsets[1..].iter().copied().chain([full.len()]).collect();
        let whole = ends.iter().filter(|&&end| end <= cut).count();
        let (upto, count) = if whole == 0 {
            (0, 0)
        } else {
            (uptos[whole - 1], counts[whole - 1])
        };
        assert_eq!(r.complete_upto(), upto, "cut at {cut}");
        assert_eq!(r.events(), &events[..count], "cut at {cut}");
        let clean_end = cut == full.len() || offsets.contains(&cut);
        assert_eq!(r.truncated_tail(), !clean_end, "cut at {cut}");
    }
}

#[test]
fn zero_filled_tail_after_a_system_crash_is_torn() {
    let tmp = TempDir::new("zero-tail");
    let dir = tmp.trace();
    let events = three_chunks(&dir);
    let path = dir.join("events.bin");
    let mut bytes = fs::read(&path).unwrap();
    let offsets = frame_offsets(&bytes);
    // The last frame's blocks never reached the disk: the file is the right size but zeros there.
    for b in &mut bytes[offsets[2]..] {
        *b = 0;
    }
    bytes.extend_from_slice(&[0; 100]);
    fs::write(&path, &bytes).unwrap();
    let r = TraceReader::open(&dir).unwrap();
    assert!(r.truncated_tail());
    assert_eq!(r.events(), &events[..4]);
    assert_eq!(r.complete_upto(), 200);
}

#[test]
fn flipped_byte_in_a_middle_chunk_is_an_error_naming_the_chunk() {
    let tmp = TempDir::new("flip-chunk");
    let dir = tmp.trace();
    three_chunks(&dir);
    let path = dir.join("events.bin");
    let good = fs::read(&path).unwrap();
    let offsets = frame_offsets(&good);

    // A byte in the payload, in the flush point (header CRC), and in the magic.
    for at in [
        offsets[1] + CHUNK_HEADER_LEN + 2,
        offsets[1] + 17,
        offsets[1],
    ] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        fs::write(&path, &bad).unwrap();
        let text = err_text(TraceReader::open(&dir));
        assert!(text.contains("chunk 1"), "{text}");
        assert!(text.contains(&format!("offset {}", offsets[1])), "{text}");
        assert!(text.contains("events.bin"), "{text}");
    }
    // A byte in the payload's CRC field.
    let mut bad = good.clone();
    bad[offsets[1] + 12] ^= 1;
    fs::write(&path, &bad).unwrap();
    assert!(err_text(TraceReader::open(&dir)).contains("crc32 mismatch"));
}

#[test]
fn events_out_of_order_on_disk_are_corruption() {
    // Chunk 1 declares upto 50 after chunk 0's 100; a hand-built file, as a buggy or hostile
    // writer would leave it.
    let tmp = TempDir::new("order");
    let dir = tmp.trace();
    drop(TraceWriter::create(&dir, &header()).unwrap());
    let mut bytes = fs::read(dir.join("events.bin")).unwrap();
    bytes.extend(frame(100, &[irq(10)]));
    bytes.extend(frame(50, &[]));
    fs::write(dir.join("events.bin"), &bytes).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("chunk 1") && text.contains("upto_icount 50"),
        "{text}"
    );

    // An event before the previous flush point.
    bytes.truncate(EVENTS_FILE_HEADER_LEN);
    bytes.extend(frame(100, &[irq(10)]));
    bytes.extend(frame(200, &[irq(99)]));
    fs::write(dir.join("events.bin"), &bytes).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("chunk 1") && text.contains("icount 99"),
        "{text}"
    );

    // Events going backward inside a chunk.
    bytes.truncate(EVENTS_FILE_HEADER_LEN);
    bytes.extend(frame(100, &[irq(20), irq(10)]));
    fs::write(dir.join("events.bin"), &bytes).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("chunk 0") && text.contains("follows an event at icount 20"),
        "{text}"
    );
}

/// A frame as FORMAT.md describes it, built independently of the writer.
fn frame(upto: u64, events: &[Event]) -> Vec<u8> {
    let payload = postcard::to_stdvec(&events.to_vec()).unwrap();
    let compressed = zstd::bulk::compress(&payload, 3).unwrap();
    frame_with(
        compressed.len() as u32,
        payload.len() as u32,
        crc32fast::hash(&compressed),
        upto,
        events.len() as u32,
        &compressed,
    )
}

fn frame_with(clen: u32, ulen: u32, crc: u32, upto: u64, count: u32, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&CHUNK_MAGIC.to_le_bytes());
    h.extend_from_slice(&clen.to_le_bytes());
    h.extend_from_slice(&ulen.to_le_bytes());
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&upto.to_le_bytes());
    h.extend_from_slice(&count.to_le_bytes());
    let header_crc = crc32fast::hash(&h);
    h.extend_from_slice(&header_crc.to_le_bytes());
    h.extend_from_slice(payload);
    h
}

#[test]
fn hostile_lengths_are_rejected_without_allocating_them() {
    let tmp = TempDir::new("hostile");
    let dir = tmp.trace();
    drop(TraceWriter::create(&dir, &header()).unwrap());
    let events_path = dir.join("events.bin");
    let file_header = fs::read(&events_path).unwrap();
    let payload = postcard::to_stdvec(&vec![irq(1)]).unwrap();
    let small = zstd::bulk::compress(&payload, 3).unwrap();
    let crc = crc32fast::hash(&small);
    let n = small.len() as u32;
    let ulen = payload.len() as u32;

    let cases: [(Vec<u8>, &str); 5] = [
        // Lengths far past the caps, with valid header CRCs so only the caps stop them. The
        // payload is present in full, so these cannot pass for a torn tail.
        (
            frame_with(u32::MAX, ulen, crc, 1, 1, &small),
            "compressed payload length of 4294967295 exceeds",
        ),
        (
            frame_with(n, u32::MAX, crc, 1, 1, &small),
            "uncompressed payload length of 4294967295 exceeds",
        ),
        (
            frame_with(n, ulen, crc, 1, u32::MAX, &small),
            "event count of 4294967295 exceeds",
        ),
        // Within the caps, but lying: the payload decompresses to less, or holds fewer events.
        (
            frame_with(n, 60 << 20, crc, 1, 1, &small),
            "decompressed to",
        ),
        (
            frame_with(n, ulen, crc, 1, 1 << 20, &small),
            "declares 1048576",
        ),
    ];
    for (frame, expected) in cases {
        let mut bytes = file_header.clone();
        bytes.extend(&frame);
        fs::write(&events_path, &bytes).unwrap();
        let text = err_text(TraceReader::open(&dir));
        assert!(
            text.contains(expected) && text.contains("chunk 0"),
            "expected {expected:?} in {text}"
        );
    }

    // A postcard length prefix claiming u64::MAX serial bytes inside an otherwise valid frame.
    let mut lying = vec![1u8, 1, 1, 0]; // Vec len 1, icount 1, rip 1, variant SerialRx
    lying.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    let compressed = zstd::bulk::compress(&lying, 3).unwrap();
    let mut bytes = file_header.clone();
    bytes.extend(frame_with(
        compressed.len() as u32,
        lying.len() as u32,
        crc32fast::hash(&compressed),
        1,
        1,
        &compressed,
    ));
    fs::write(&events_path, &bytes).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("SerialRx of 18446744073709551615 bytes"),
        "{text}"
    );

    // A checkpoint header declaring u64::MAX bytes is refused at open.
    fs::write(&events_path, &file_header).unwrap();
    let mut ckpt = Vec::new();
    ckpt.extend_from_slice(&traces::CHECKPOINT_MAGIC);
    ckpt.extend_from_slice(&0u32.to_le_bytes());
    ckpt.extend_from_slice(&0u64.to_le_bytes());
    ckpt.extend_from_slice(&0u64.to_le_bytes());
    ckpt.push(1);
    ckpt.extend_from_slice(&[0; 32]);
    ckpt.extend_from_slice(&u64::MAX.to_le_bytes());
    ckpt.extend_from_slice(&u64::MAX.to_le_bytes());
    let ckpt_path = dir.join("checkpoints").join(checkpoint_file_name(0));
    fs::write(&ckpt_path, &ckpt).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("00000000000000000000.ckpt") && text.contains("exceeds"),
        "{text}"
    );
}

#[test]
fn flipped_byte_in_a_checkpoint_fails_read_checkpoint() {
    let tmp = TempDir::new("flip-ckpt");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    w.write_checkpoint(&checkpoint(100, true, vec![(1, page(7)), (2, page(8))]))
        .unwrap();
    drop(w);
    let path = dir.join("checkpoints").join(checkpoint_file_name(100));
    let good = fs::read(&path).unwrap();

    // One in the payload, one in the rip field of the header: open only reads the header's
    // shape, so both surface in read_checkpoint, which checks the CRC.
    for at in [good.len() - 5, 20] {
        let mut bad = good.clone();
        bad[at] ^= 0x08;
        fs::write(&path, &bad).unwrap();
        let r = TraceReader::open(&dir).unwrap();
        let text = err_text(r.read_checkpoint(0));
        assert!(
            text.contains("crc32 mismatch") && text.contains(&path.display().to_string()),
            "{text}"
        );
        assert!(r.restore_point(0).is_err());
    }

    // The icount in the header no longer matching the file name is caught at open.
    let mut bad = good.clone();
    bad[12] ^= 1;
    fs::write(&path, &bad).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(text.contains("file name says icount 100"), "{text}");

    // So is a truncated checkpoint file.
    fs::write(&path, &good[..good.len() - 1]).unwrap();
    assert!(err_text(TraceReader::open(&dir)).contains("declares"));
}

#[test]
fn future_format_version_asks_for_an_upgrade() {
    let tmp = TempDir::new("future");
    let dir = tmp.trace();
    three_chunks(&dir);
    // A future header may look nothing like ours apart from the version.
    fs::write(
        dir.join("header.json"),
        r#"{"format_version": 3, "something_new": [1, 2]}"#,
    )
    .unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains(
            "trace format version 3 is newer than this retrovisor supports (2); upgrade retrovisor"
        ),
        "{text}"
    );
    fs::write(dir.join("header.json"), r#"{"format_version": 0}"#).unwrap();
    assert!(err_text(TraceReader::open(&dir)).contains("version 0 is not supported"));
}

#[test]
fn restore_point_merges_full_and_incremental_checkpoints() {
    let tmp = TempDir::new("restore");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    w.write_checkpoint(&checkpoint(
        100,
        true,
        vec![(1, page(1)), (2, page(2)), (3, page(3)), (4, page(0))],
    ))
    .unwrap();
    // Page 2 changes, page 3 is cleared.
    w.write_checkpoint(&checkpoint(200, false, vec![(2, page(0x22)), (3, page(0))]))
        .unwrap();
    // Page 5 appears, page 2 changes again.
    w.write_checkpoint(&checkpoint(300, false, vec![(5, page(5)), (2, page(0x23))]))
        .unwrap();
    // A new full checkpoint starts over.
    w.write_checkpoint(&checkpoint(400, true, vec![(6, page(6))]))
        .unwrap();
    w.write_checkpoint(&checkpoint(500, false, vec![(6, page(0))]))
        .unwrap();
    finish(w, &[], 600, 5);

    let r = TraceReader::open(&dir).unwrap();
    let pages = |index| {
        let (cp, memory) = r.restore_point(index).unwrap();
        assert_eq!(cp.at, r.checkpoints()[index].at);
        assert_eq!(cp.state, vec![1, 2, 3, cp.at as u8]);
        memory
    };
    assert_eq!(
        pages(0),
        BTreeMap::from([(1, page(1)), (2, page(2)), (3, page(3))])
    );
    assert_eq!(
        pages(1),
        BTreeMap::from([(1, page(1)), (2, page(0x22)), (3, page(0))])
    );
    assert_eq!(
        pages(2),
        BTreeMap::from([(1, page(1)), (2, page(0x23)), (3, page(0)), (5, page(5))])
    );
    assert_eq!(pages(3), BTreeMap::from([(6, page(6))]));
    assert_eq!(pages(4), BTreeMap::from([(6, page(0))]));
    assert!(matches!(
        r.restore_point(5),
        Err(ReadError::NoSuchCheckpoint { .. })
    ));
}

#[test]
fn create_refuses_to_overwrite() {
    let tmp = TempDir::new("overwrite");
    let dir = tmp.trace();
    three_chunks(&dir);
    let before = fs::read(dir.join("events.bin")).unwrap();
    let err = TraceWriter::create(&dir, &header()).unwrap_err();
    assert!(matches!(err, WriteError::NotEmpty { .. }), "{err}");
    assert!(err.to_string().contains("refusing to overwrite"));
    assert_eq!(fs::read(dir.join("events.bin")).unwrap(), before);

    // Any non-empty directory, trace or not.
    let other = tmp.0.join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("notes.txt"), "keep me").unwrap();
    assert!(matches!(
        TraceWriter::create(&other, &header()),
        Err(WriteError::NotEmpty { .. })
    ));

    // An empty directory is refused too (a trace gets a new directory of its own), and left alone;
    // a missing path is created, parents included; a plain file is refused.
    let empty = tmp.0.join("empty");
    fs::create_dir(&empty).unwrap();
    let err = TraceWriter::create(&empty, &header()).unwrap_err();
    assert!(matches!(err, WriteError::Exists { .. }), "{err}");
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(fs::read_dir(&empty).unwrap().count(), 0);
    TraceWriter::create(&tmp.0.join("new/parents/t.rvt"), &header()).unwrap();
    let file = tmp.0.join("file");
    fs::write(&file, "x").unwrap();
    assert!(matches!(
        TraceWriter::create(&file, &header()),
        Err(WriteError::NotADirectory { .. })
    ));
}

#[test]
fn writer_refuses_out_of_order_input() {
    let tmp = TempDir::new("writer-order");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    w.push(irq(10)).unwrap();
    w.push(irq(10)).unwrap();
    assert!(matches!(
        w.push(irq(9)),
        Err(WriteError::EventOutOfOrder {
            icount: 9,
            previous: 10
        })
    ));
    w.flush(50).unwrap();
    assert!(matches!(
        w.push(irq(20)),
        Err(WriteError::EventBeforeFlushPoint {
            icount: 20,
            upto: 50
        })
    ));
    assert!(matches!(
        w.flush(40),
        Err(WriteError::FlushBackward {
            upto: 40,
            previous: 50
        })
    ));

    assert!(matches!(
        w.write_checkpoint(&checkpoint(60, false, vec![])),
        Err(WriteError::NoFullCheckpoint { icount: 60 })
    ));
    assert!(matches!(
        w.write_checkpoint(&checkpoint(60, true, vec![(1, vec![1; 100])])),
        Err(WriteError::BadPageSize {
            pfn: 1,
            len: 100,
            ..
        })
    ));
    assert!(matches!(
        w.write_checkpoint(&checkpoint(60, true, vec![(1, page(1)), (1, page(2))])),
        Err(WriteError::DuplicatePage { pfn: 1, .. })
    ));
    assert!(matches!(
        w.write_checkpoint(&checkpoint(60, true, vec![(1 << 20, page(1))])),
        Err(WriteError::PageOutsideRam { .. })
    ));
    w.write_checkpoint(&checkpoint(60, true, vec![])).unwrap();
    assert!(matches!(
        w.write_checkpoint(&checkpoint(60, false, vec![])),
        Err(WriteError::CheckpointOutOfOrder {
            icount: 60,
            previous: 60
        })
    ));
    assert!(matches!(
        w.finish(&summary(70, 2, &[])),
        Err(WriteError::SummaryMismatch { .. })
    ));

    // Nothing refused reached the disk.
    let r = TraceReader::open(&dir).unwrap();
    assert_eq!(r.events(), &[irq(10), irq(10)]);
    assert_eq!(r.complete_upto(), 60);
}

#[test]
fn missing_or_broken_files_are_named() {
    let tmp = TempDir::new("missing");
    let dir = tmp.trace();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("header.json") && text.contains("missing"),
        "{text}"
    );

    three_chunks(&dir);
    fs::write(dir.join("header.json"), "{ not json").unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains(&dir.join("header.json").display().to_string()),
        "{text}"
    );

    fs::write(
        dir.join("header.json"),
        serde_json::to_vec(&header()).unwrap(),
    )
    .unwrap();
    fs::remove_file(dir.join("events.bin")).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("events.bin") && text.contains("missing"),
        "{text}"
    );

    // Something other than a file under a trace file's name is refused without opening it.
    fs::create_dir(dir.join("events.bin")).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("events.bin: it is a directory, not a regular file"),
        "{text}"
    );
    fs::remove_dir(dir.join("events.bin")).unwrap();

    fs::write(dir.join("events.bin"), b"NOTATRACEFILE!!!").unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("events.bin") && text.contains("bad magic"),
        "{text}"
    );
}

#[test]
fn summary_must_agree_with_the_event_stream() {
    let tmp = TempDir::new("summary");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    w.push(irq(5)).unwrap();
    let events = [irq(5), stop(10)];
    finish(w, &events[..1], 10, 0);
    TraceReader::open(&dir).unwrap();

    fs::write(
        dir.join("summary.json"),
        serde_json::to_vec(&summary(11, 0, &events)).unwrap(),
    )
    .unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("summary.json") && text.contains("end_icount is 11"),
        "{text}"
    );

    fs::write(
        dir.join("summary.json"),
        serde_json::to_vec(&summary(10, 3, &events)).unwrap(),
    )
    .unwrap();
    assert!(err_text(TraceReader::open(&dir)).contains("summary counts 3 checkpoints"));
}

#[test]
fn large_bursts_are_split_into_chunks_the_reader_accepts() {
    let tmp = TempDir::new("split");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    // 20 MiB of the longest serial events there are, hard to compress.
    let len = traces::UART_RX_FIFO_BYTES as u64;
    let events: Vec<Event> = (0..(20 << 20) / len)
        .map(|i| {
            let bytes = (0..len)
                .map(|j| ((i * len + j).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
                .collect();
            ev(1000 + i / 4, EventKind::SerialRx { bytes })
        })
        .collect();
    for e in &events {
        w.push(e.clone()).unwrap();
    }
    w.flush(1_000_000).unwrap();
    drop(w);

    let bin = fs::read(dir.join("events.bin")).unwrap();
    assert!(
        frame_offsets(&bin).len() >= 2,
        "20 MiB of events must not fit in one chunk"
    );
    let r = TraceReader::open(&dir).unwrap();
    assert_eq!(r.events(), &events[..]);
    assert_eq!(r.complete_upto(), 1_000_000);
}

/// The payload size a checkpoint file declares (its uncompressed_len header field).
fn uncompressed_len(path: &Path) -> u64 {
    let b = fs::read(path).unwrap();
    u64::from_le_bytes(b[69..77].try_into().unwrap())
}

#[test]
fn identical_pages_are_stored_once_and_read_back_whole() {
    let tmp = TempDir::new("dedup");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    // Pages 1 and 3 hold the same content; page 2 differs.
    w.write_checkpoint(&checkpoint(
        100,
        true,
        vec![(1, page(7)), (2, page(8)), (3, page(7))],
    ))
    .unwrap();
    // Page 5 gets content already stored in the full checkpoint; page 6 gets new content.
    w.write_checkpoint(&checkpoint(200, false, vec![(5, page(8)), (6, page(9))]))
        .unwrap();
    finish(w, &[], 200, 2);

    let r = TraceReader::open(&dir).unwrap();
    // Two distinct pages of data in the full checkpoint, one in the incremental: references are 16 bytes.
    let full = uncompressed_len(&r.checkpoints()[0].path);
    let incremental = uncompressed_len(&r.checkpoints()[1].path);
    assert!(
        full < 2 * PAGE_SIZE as u64 + 100,
        "full checkpoint payload {full} bytes stores page 7 twice"
    );
    assert!(
        incremental < PAGE_SIZE as u64 + 100,
        "incremental payload {incremental} bytes stores page 8 again"
    );

    let (_, memory) = r.restore_point(1).unwrap();
    let expected: BTreeMap<u64, Vec<u8>> = [
        (1, page(7)),
        (2, page(8)),
        (3, page(7)),
        (5, page(8)),
        (6, page(9)),
    ]
    .into_iter()
    .collect();
    assert_eq!(memory, expected);
    assert_eq!(
        r.read_checkpoint(1).unwrap().pages,
        vec![(5, page(8)), (6, page(9))]
    );
}

#[test]
fn a_page_reference_to_content_stored_nowhere_is_an_error() {
    let tmp = TempDir::new("dangling");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    w.write_checkpoint(&checkpoint(100, true, vec![(1, page(7))]))
        .unwrap();
    w.write_checkpoint(&checkpoint(200, false, vec![(2, page(7))]))
        .unwrap();
    finish(w, &[], 200, 2);
    // Replace the full checkpoint with one that never stored page 7's content.
    let other = tmp.0.join("other.rvt");
    let mut w = TraceWriter::create(&other, &header()).unwrap();
    w.write_checkpoint(&checkpoint(100, true, vec![(1, page(6))]))
        .unwrap();
    drop(w);
    let name = fs::read_dir(other.join("checkpoints"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    fs::copy(
        other.join("checkpoints").join(&name),
        dir.join("checkpoints").join(&name),
    )
    .unwrap();
    let r = TraceReader::open(&dir).unwrap();
    let e = err_text(r.restore_point(1));
    assert!(e.contains("refers to content no earlier page"), "{e}");
}

#[test]
fn a_checkpoint_past_the_complete_event_stream_is_ignored() {
    let tmp = TempDir::new("ckpt-past-end");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    w.write_checkpoint(&checkpoint(100, true, vec![(1, page(1))]))
        .unwrap();
    w.push(irq(150)).unwrap();
    w.write_checkpoint(&checkpoint(200, false, vec![(2, page(2))]))
        .unwrap();
    drop(w);
    // The frame written for the checkpoint at 200 is lost (as when a system crash loses event data
    // that the checkpoint's own fsync outran): nothing proves the events complete up to 200.
    let path = dir.join("events.bin");
    let bytes = fs::read(&path).unwrap();
    let offsets = frame_offsets(&bytes);
    fs::write(&path, &bytes[..offsets[1]]).unwrap();

    let r = TraceReader::open(&dir).unwrap();
    assert_eq!(r.complete_upto(), 100);
    assert_eq!(r.replayable_upto(), Some(100));
    assert_eq!(r.checkpoints().len(), 1);
    assert_eq!(r.ignored_checkpoints(), 1);
    assert!(r.verify().is_empty());
}

#[test]
fn a_failed_checkpoint_write_stops_the_writer_and_leaves_no_temporary_file() {
    let tmp = TempDir::new("ckpt-write-fails");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    w.write_checkpoint(&checkpoint(100, true, vec![(1, page(1))]))
        .unwrap();
    // A file where the temporary checkpoint goes makes its creation fail (root ignores modes).
    let blocker = dir
        .join("checkpoints")
        .join(".00000000000000000200.ckpt.tmp");
    fs::create_dir(&blocker).unwrap();
    let err = w
        .write_checkpoint(&checkpoint(200, false, vec![(2, page(2))]))
        .unwrap_err();
    assert!(matches!(err, WriteError::Io { .. }), "{err}");
    assert_eq!(err.out_of_space(), None);
    fs::remove_dir(&blocker).unwrap();
    // Page 2 changed before the lost checkpoint: an incremental one after it would leave that out.
    assert!(matches!(
        w.write_checkpoint(&checkpoint(300, false, vec![(3, page(3))])),
        Err(WriteError::Failed { .. })
    ));
    assert!(matches!(w.push(irq(300)), Err(WriteError::Failed { .. })));
    assert!(matches!(w.flush(300), Err(WriteError::Failed { .. })));
    assert_eq!(w.replayable_upto(), Some(200));
    drop(w);
    let r = TraceReader::open(&dir).unwrap();
    assert_eq!(r.replayable_upto(), Some(200));
    assert_eq!(r.checkpoints().len(), 1);
    assert_eq!(fs::read_dir(dir.join("checkpoints")).unwrap().count(), 1);
}

#[test]
fn a_trace_without_checkpoints_says_nothing_is_replayable() {
    let tmp = TempDir::new("no-checkpoints");
    let dir = tmp.trace();
    // A recording killed before its first checkpoint: a header and an empty event stream.
    drop(TraceWriter::create(&dir, &header()).unwrap());
    let r = TraceReader::open(&dir).unwrap();
    assert_eq!(r.replayable_upto(), None);
    let text = err_text(r.restore_point(0));
    assert!(
        text.contains("holds nothing replayable") && text.contains("no checkpoint"),
        "{text}"
    );
    // Killed even earlier: events.bin exists, the header does not yet.
    fs::remove_file(dir.join("header.json")).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("header.json is missing") && text.contains("nothing was recorded"),
        "{text}"
    );
}

/// A trace with a full checkpoint and `n - 1` incremental ones after it, each changing two pages
/// and repeating content stored earlier (so the chain has page references), and a summary.
fn checkpoint_chain(dir: &Path, n: u64) {
    let mut w = TraceWriter::create(dir, &header()).unwrap();
    w.write_checkpoint(&checkpoint(0, true, vec![(1, page(1)), (2, page(2))]))
        .unwrap();
    for i in 1..n {
        let pages = vec![(3, page(i as u8 + 10)), (4, page(1))];
        w.write_checkpoint(&checkpoint(i * 100, false, pages))
            .unwrap();
    }
    finish(w, &[], n * 100, n);
}

#[test]
fn verify_finds_a_flipped_byte_in_a_later_checkpoint_and_names_the_broken_link() {
    let tmp = TempDir::new("verify");
    let dir = tmp.trace();
    checkpoint_chain(&dir, 8);
    let r = TraceReader::open(&dir).unwrap();
    assert!(r.verify().is_empty(), "{:?}", r.verify());

    let path = r.checkpoints()[4].path.clone();
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    fs::write(&path, &bytes).unwrap();

    // Opening reads only checkpoint headers: it still succeeds, and so do checkpoints before it.
    let r = TraceReader::open(&dir).unwrap();
    assert!(r.restore_point(3).is_ok());
    let problems: Vec<String> = r.verify().iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].contains(&path.display().to_string()) && problems[0].contains("crc32"),
        "{problems:#?}"
    );
    // The three after it build on it.
    assert!(
        problems[1].contains("and the 2 after it cannot be restored")
            && problems[1].contains(&r.checkpoints()[5].path.display().to_string()),
        "{problems:#?}"
    );
    // Restoring any of them says which link of the chain failed, for a caller to fall back.
    for index in 4..8 {
        let err = r.restore_chain(index).unwrap_err();
        assert_eq!(err.failed, 4, "{err}");
        assert!(err.to_string().contains("crc32"), "{err}");
    }
}

#[test]
fn verify_checks_disk_copies() {
    let tmp = TempDir::new("verify-disks");
    let dir = tmp.trace();
    let image = vec![5u8; 4096];
    let mut h = header();
    h.disks = vec![traces::DiskInfo {
        path: "d.img".into(),
        size: image.len() as u64,
        sha256: sha256_hex(&image),
    }];
    let mut w = TraceWriter::create(&dir, &h).unwrap();
    w.write_disk(0, &image).unwrap();
    w.write_checkpoint(&checkpoint(0, true, vec![])).unwrap();
    finish(w, &[], 100, 1);
    assert!(TraceReader::open(&dir).unwrap().verify().is_empty());

    let copy = dir.join("disks/0.img.zst");
    fs::write(&copy, zstd::bulk::compress(&[6u8; 4096], 3).unwrap()).unwrap();
    let problems = TraceReader::open(&dir).unwrap().verify();
    assert_eq!(problems.len(), 1);
    let text = problems[0].to_string();
    assert!(
        text.contains("0.img.zst") && text.contains("sha256"),
        "{text}"
    );
}

#[test]
fn a_64_mib_serial_rx_is_refused_before_it_is_decoded() {
    let tmp = TempDir::new("huge-rx");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    let long = ev(
        5,
        EventKind::SerialRx {
            bytes: vec![b'a'; traces::UART_RX_FIFO_BYTES + 1],
        },
    );
    assert!(matches!(
        w.push(long),
        Err(WriteError::SerialRxTooLong { len: 65, .. })
    ));
    drop(w);

    // What a hostile trace holds: one event of 60 MiB per chunk, a few hundred bytes compressed.
    let huge = ev(
        5,
        EventKind::SerialRx {
            bytes: vec![0; 60 << 20],
        },
    );
    let mut bytes = fs::read(dir.join("events.bin")).unwrap();
    let frame = frame(10, &[huge]);
    assert!(frame.len() < 64 << 10, "{}", frame.len());
    bytes.extend(&frame);
    fs::write(dir.join("events.bin"), &bytes).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("chunk 0") && text.contains("SerialRx of 62914560 bytes"),
        "{text}"
    );
}

#[test]
fn checkpoint_sizes_are_bounded_by_the_machine_they_describe() {
    let tmp = TempDir::new("ckpt-bound");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    w.write_checkpoint(&checkpoint(0, true, vec![(1, page(1))]))
        .unwrap();
    drop(w);
    let path = dir.join("checkpoints").join(checkpoint_file_name(0));
    let good = fs::read(&path).unwrap();
    // 4 GiB uncompressed is within the format's absolute cap, but 64 MiB of RAM and a machine
    // state of at most MAX_MACHINE_STATE cannot need it. The CRC is fixed up: only the bound stops it.
    let mut bad = good.clone();
    bad[69..77].copy_from_slice(&(4u64 << 30).to_le_bytes());
    let crc = crc32fast::hash(&bad[12..]);
    bad[8..12].copy_from_slice(&crc.to_le_bytes());
    fs::write(&path, &bad).unwrap();
    let text = err_text(TraceReader::open(&dir));
    let limit = header().max_checkpoint_payload();
    assert!(
        text.contains("00000000000000000000.ckpt")
            && text.contains(&format!("4294967296 exceeds the limit of {limit}")),
        "{text}"
    );
    assert!(limit < (64 << 20) + (2 << 20), "{limit}");
}

#[test]
fn headers_beyond_what_a_machine_can_be_are_refused() {
    let tmp = TempDir::new("header-bounds");
    let dir = tmp.trace();
    drop(TraceWriter::create(&dir, &header()).unwrap());
    let path = dir.join("header.json");
    let good = fs::read_to_string(&path).unwrap();
    for (from, to, expected) in [
        (
            "\"ram_bytes\":67108864",
            "\"ram_bytes\":1099511627776",
            "machine.ram_bytes is 1099511627776; it must be between 1 and 3221225472",
        ),
        (
            "\"image_size\":5",
            "\"image_size\":68719476736",
            "image_size is 68719476736",
        ),
    ] {
        assert!(good.contains(from), "{good}");
        fs::write(&path, good.replace(from, to)).unwrap();
        let text = err_text(TraceReader::open(&dir));
        assert!(
            text.contains("header.json") && text.contains(expected),
            "{text}"
        );
    }
}

#[test]
fn a_sparse_20_gib_event_file_is_judged_in_moments() {
    let tmp = TempDir::new("sparse");
    let dir = tmp.trace();
    let events = three_chunks(&dir);
    let path = dir.join("events.bin");
    let len = fs::metadata(&path).unwrap().len();
    // A crash can leave zeros where data never landed; a hostile file can leave 20 GiB of them.
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(20 << 30).unwrap();
    let started = std::time::Instant::now();
    let r = TraceReader::open(&dir).unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(r.truncated_tail());
    assert_eq!(r.events(), &events[..]);
    assert_eq!(r.torn_tail().unwrap().offset, len);

    // A single non-zero byte near the end makes it corruption, found just as fast.
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[1], (20 << 30) - 2).unwrap();
    let started = std::time::Instant::now();
    let text = err_text(TraceReader::open(&dir));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(text.contains("chunk 3"), "{text}");
}

/// Runs `f` on another thread and fails the test if it does not return within 20 s (a FIFO that
/// is opened or read blocks forever: failing beats hanging the suite).
fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("blocked on a non-regular file")
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_fifo_in_place_of_a_disk_copy_is_refused_without_blocking() {
    let tmp = TempDir::new("fifo-disk");
    let dir = tmp.trace();
    let image = vec![5u8; 4096];
    let mut h = header();
    h.disks = vec![traces::DiskInfo {
        path: "d.img".into(),
        size: image.len() as u64,
        sha256: sha256_hex(&image),
    }];
    let mut w = TraceWriter::create(&dir, &h).unwrap();
    w.write_disk(0, &image).unwrap();
    drop(w);
    let copy = dir.join("disks/0.img.zst");
    fs::remove_file(&copy).unwrap();
    mkfifo(&copy);
    let text = within_20s(move || err_text(TraceReader::open(&dir).unwrap().read_disk(0)));
    assert!(
        text.contains("0.img.zst") && text.contains("a FIFO"),
        "{text}"
    );
}

#[test]
fn a_full_checkpoint_says_which_pages_were_written_before_it() {
    let tmp = TempDir::new("written");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    w.write_checkpoint(&checkpoint(100, true, vec![(1, page(1)), (2, page(2))]))
        .unwrap();
    w.write_checkpoint(&checkpoint(200, false, vec![(2, page(3))]))
        .unwrap();
    let stored = vec![(1, page(1)), (2, page(3)), (5, page(5)), (6, page(6))];
    w.write_checkpoint(&checkpoint(300, true, stored.clone()))
        .unwrap();
    w.write_pages_written(300, &[5, 6]).unwrap();
    w.write_checkpoint(&checkpoint(400, true, stored)).unwrap();
    drop(w);

    let r = TraceReader::open(&dir).unwrap();
    assert_eq!(r.checkpoints().len(), 4, "the list is no checkpoint");
    assert_eq!(r.pages_written_before(1).unwrap(), vec![2]);
    // A full checkpoint stores every page; its list says which the interval wrote.
    assert_eq!(r.pages_written_before(2).unwrap(), vec![5, 6]);
    // Without a list (an older trace), every page it stores counts as written.
    assert_eq!(r.pages_written_before(3).unwrap(), vec![1, 2, 5, 6]);
    // A damaged list is not trusted either.
    let list = dir.join("checkpoints").join(written_file_name(300));
    fs::write(&list, [1, 2, 3]).unwrap();
    assert_eq!(r.pages_written_before(2).unwrap(), vec![1, 2, 5, 6]);
}

#[test]
fn events_the_machine_cannot_produce_are_refused_with_their_position() {
    // IRQ lines 255 and 33, as a hostile run of mutated traces (CRCs fixed up) wrote them: the PIC
    // pair has 16 lines.
    for line in [255, 33, 16] {
        let tmp = TempDir::new("irq-line");
        let dir = tmp.trace();
        let mut w = TraceWriter::create(&dir, &header()).unwrap();
        w.write_checkpoint(&checkpoint(0, true, vec![])).unwrap();
        let bad = ev(20, EventKind::Irq { line });
        for e in [irq(10), bad.clone()] {
            w.push(e).unwrap();
        }
        finish(w, &[irq(10), bad], 30, 1);
        let text = err_text(TraceReader::open(&dir));
        assert!(
            text.contains("events.bin: event 1 (irq at icount 20, in chunk 1 at byte offset ")
                && text.contains(&format!(
                    "cannot have been recorded: IRQ line {line} does not exist: the PIC pair has \
                     lines 0 to 15"
                )),
            "{text}"
        );
    }

    // In a landmark trace, positions are landmarks.
    let tmp = TempDir::new("kick-rflags");
    let dir = tmp.trace();
    let mut h = header();
    h.clock = "landmark".into();
    let mut w = TraceWriter::create(&dir, &h).unwrap();
    let kick = ev(
        5,
        EventKind::Kick {
            fingerprint: traces::Fingerprint {
                rip: 0x10_0000,
                rsp: 0x9000,
                rflags: 0x10246,
                regs: 1,
                memory: 2,
            },
        },
    );
    w.push(kick).unwrap();
    w.flush(5).unwrap();
    drop(w);
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("event 0 (kick at landmark 5, in chunk 0") && text.contains("rflags 0x10246"),
        "{text}"
    );
}

/// Writes a finished recording into `dir`: `events` and then `summary`, whatever they say.
fn finished(dir: &Path, events: &[Event], summary: &Summary) {
    let mut w = TraceWriter::create(dir, &header()).unwrap();
    w.write_checkpoint(&checkpoint(0, true, vec![])).unwrap();
    for e in events {
        w.push(e.clone()).unwrap();
    }
    w.finish(summary).unwrap();
}

#[test]
fn a_finished_recording_ends_with_the_stop_its_summary_names() {
    let recorded = [irq(5), stop(10)];
    let summary = summary(10, 1, &recorded);
    let halted = ev(
        10,
        EventKind::Stop {
            reason: StopReason::Halted,
        },
    );
    let cases = [
        (
            vec![irq(5), irq(10)],
            "its last event must be its stop event, but the last (event 1, at icount 10) is an \
             event of kind irq",
        ),
        (
            vec![irq(5), halted],
            "the stop event (event 1) says the guest ended by Halted, the summary by GuestExit",
        ),
        (
            vec![irq(5), stop(8)],
            "the stop event (event 1) lies at icount 8, but end_icount is 10",
        ),
        (vec![], "holds no event, not even its stop"),
        // A stop ends the recording, finished or cut off.
        (
            vec![stop(5), irq(10)],
            "event 1 (irq at icount 10, in chunk 1 at byte offset ",
        ),
        (
            vec![stop(5), irq(10)],
            ") cannot have been recorded: it follows the stop event (event 0)",
        ),
    ];
    for (events, needle) in cases {
        let tmp = TempDir::new("stop");
        let dir = tmp.trace();
        finished(&dir, &events, &summary);
        let text = err_text(TraceReader::open(&dir));
        assert!(text.contains(needle), "{events:?}: {text}");
    }
    let tmp = TempDir::new("stop-ok");
    finished(&tmp.trace(), &recorded, &summary);
    TraceReader::open(&tmp.trace()).unwrap();
}

#[test]
fn the_summary_counts_what_the_stream_holds() {
    let recorded = [irq(5), irq(7), stop(10)];
    let counted = summary(10, 1, &recorded);
    let mut bogus = counted.clone();
    bogus.events_by_kind.insert("bogus".into(), 1);
    let cases = [
        // Duplicated and deleted events.
        (
            vec![irq(5), irq(5), irq(7), stop(10)],
            &counted,
            "events_by_kind counts 2 irq events, but events.bin holds 3",
        ),
        (
            vec![irq(5), stop(10)],
            &counted,
            "events_by_kind counts 2 irq events, but events.bin holds 1",
        ),
        (
            vec![
                irq(5),
                irq(7),
                ev(7, EventKind::Interrupt { vector: 0x20 }),
                stop(10),
            ],
            &counted,
            "counts 0 interrupt events, but events.bin holds 1",
        ),
        (
            recorded.to_vec(),
            &bogus,
            "events_by_kind counts events of kind \"bogus\", which does not exist (the kinds are \
             serial_rx, clock, irq, interrupt, host_value, stop, kick, switch, apic_timer)",
        ),
    ];
    for (events, summary, needle) in cases {
        let tmp = TempDir::new("counts");
        let dir = tmp.trace();
        finished(&dir, &events, summary);
        let text = err_text(TraceReader::open(&dir));
        assert!(
            text.contains("summary.json") && text.contains(needle),
            "{events:?}: {text}"
        );
    }
}

/// Sets the `upto_icount` of the frame at `at` in an events file, fixing up its header CRC as an
/// attacker would.
fn set_upto(events_bin: &mut [u8], at: usize, upto: u64) {
    events_bin[at + 16..at + 24].copy_from_slice(&upto.to_le_bytes());
    let crc = crc32fast::hash(&events_bin[at..at + 28]);
    events_bin[at + 28..at + 32].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn chunk_bounds_agree_with_their_events_and_the_checkpoints() {
    let tmp = TempDir::new("bounds");
    let dir = tmp.trace();
    let mut w = TraceWriter::create(&dir, &header()).unwrap();
    w.write_checkpoint(&checkpoint(0, true, vec![(1, page(1))]))
        .unwrap();
    w.push(irq(50)).unwrap();
    w.write_checkpoint(&checkpoint(100, false, vec![(1, page(2))]))
        .unwrap();
    w.push(irq(150)).unwrap();
    finish(w, &[irq(50), irq(150)], 200, 2);
    TraceReader::open(&dir).unwrap();
    let path = dir.join("events.bin");
    let good = fs::read(&path).unwrap();
    // Chunks: up to 0 (the first checkpoint), up to 100 with irq(50), up to 200 with the rest.
    let offsets = frame_offsets(&good);
    assert_eq!(offsets.len(), 3);

    // Lowered below an event of its own.
    let mut bytes = good.clone();
    set_upto(&mut bytes, offsets[1], 40);
    fs::write(&path, &bytes).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("event chunk 1")
            && text.contains("event 0 at icount 50 lies past the chunk's own upto_icount 40"),
        "{text}"
    );

    // Lowered, still above its events, but below the checkpoint the writer ended it at.
    let mut bytes = good.clone();
    set_upto(&mut bytes, offsets[1], 60);
    fs::write(&path, &bytes).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains(
            "events.bin: no chunk ends at icount 100, where checkpoint \
                       00000000000000000100.ckpt lies"
        ),
        "{text}"
    );

    // The last chunk's bound is the end of a finished recording.
    let mut bytes = good;
    set_upto(&mut bytes, offsets[2], 190);
    fs::write(&path, &bytes).unwrap();
    let text = err_text(TraceReader::open(&dir));
    assert!(
        text.contains("icount 200 lies past the chunk's own upto_icount 190"),
        "{text}"
    );
}

#[test]
fn checkpoints_read_in_order_resolve_their_references_and_say_what_restoring_gives() {
    let tmp = TempDir::new("cursor");
    let dir = tmp.trace();
    // Checkpoint i > 0 gives page 3 new content and page 4 page 1's, as a reference.
    checkpoint_chain(&dir, 4);
    let r = TraceReader::open(&dir).unwrap();
    let mut cursor = r.chain_cursor(0);
    for i in 0..4 {
        assert_eq!(
            r.read_next(&mut cursor).unwrap(),
            r.read_checkpoint(i).unwrap()
        );
        assert_eq!(cursor.next(), i + 1);
    }
    let hash = |p: Vec<u8>| Some(traces::page_hash(&p));
    assert_eq!(cursor.restored_hash(2), hash(page(2)));
    assert_eq!(cursor.restored_hash(3), hash(page(13)));
    assert_eq!(cursor.restored_hash(4), hash(page(1)));
    assert_eq!(cursor.restored_hash(5), None);
    assert!(matches!(
        r.read_next(&mut cursor),
        Err(ReadError::NoSuchCheckpoint { index: 4, .. })
    ));

    // A cursor for checkpoint 2 starts at its chain's full checkpoint.
    let mut cursor = r.chain_cursor(2);
    assert_eq!(cursor.next(), 0);
    assert_eq!(
        r.read_next(&mut cursor).unwrap(),
        r.read_checkpoint(0).unwrap()
    );

    // A restore's cursor reads on from the checkpoint it restored.
    let mut cursor = r.restore_chain(1).unwrap().cursor;
    assert_eq!(cursor.next(), 2);
    assert_eq!(cursor.restored_hash(3), hash(page(11)));
    assert_eq!(
        r.read_next(&mut cursor).unwrap(),
        r.read_checkpoint(2).unwrap()
    );

    // Past a checkpoint that cannot be read, the ones building on it cannot be either.
    let path = r.checkpoints()[2].path.clone();
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let mut cursor = r.restore_chain(1).unwrap().cursor;
    assert!(err_text(r.read_next(&mut cursor)).contains("crc32"));
    let text = err_text(r.read_next(&mut cursor));
    assert!(
        text.contains("cannot be restored: it builds on")
            && text.contains(&*path.to_string_lossy()),
        "{text}"
    );
}
