//! `retrovisor timeline`: the picture of a real recording holds every event of the trace in its lane, the
//! guest's output lines and a divergence where replay finds one, and it renders.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

/// An element of the SVG: its name, attributes and the index of the element it is in.
struct Element {
    name: String,
    attrs: BTreeMap<String, String>,
    parent: Option<usize>,
    text: String,
}

/// Parses the SVG strictly enough to catch what would make it invalid XML (unbalanced or unquoted
/// markup, a raw `<` or `&` in text) and returns its elements in document order.
fn parse(xml: &str) -> Vec<Element> {
    let mut elements: Vec<Element> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let body = xml
        .strip_prefix(r#"<?xml version="1.0" encoding="UTF-8"?>"#)
        .expect("an XML declaration first");
    let mut rest = body;
    while let Some(lt) = rest.find('<') {
        let text = &rest[..lt];
        check_text(text);
        if let Some(&i) = open.last() {
            elements[i].text.push_str(text);
        }
        let gt = rest[lt..].find('>').expect("a tag that never closes") + lt;
        let tag = &rest[lt + 1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let i = open.pop().expect("a closing tag with nothing open");
            assert_eq!(
                elements[i].name, name,
                "</{name}> closes <{}>",
                elements[i].name
            );
            continue;
        }
        let empty = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let (name, mut attrs_text) = tag.split_once(char::is_whitespace).unwrap_or((tag, ""));
        let mut attrs = BTreeMap::new();
        loop {
            attrs_text = attrs_text.trim_start();
            if attrs_text.is_empty() {
                break;
            }
            let (key, after) = attrs_text.split_once("=\"").expect("attribute=\"value\"");
            let (value, after) = after.split_once('"').expect("a closing quote");
            check_text(value);
            assert!(
                attrs
                    .insert(key.trim().to_string(), value.to_string())
                    .is_none(),
                "attribute {key} twice in <{name}>"
            );
            attrs_text = after;
        }
        elements.push(Element {
            name: name.to_string(),
            attrs,
            parent: open.last().copied(),
            text: String::new(),
        });
        if !empty {
            open.push(elements.len() - 1);
        }
    }
    check_text(rest);
    assert!(rest.trim().is_empty(), "text after the root element");
    assert!(open.is_empty(), "unclosed elements");
    assert_eq!(elements[0].name, "svg");
    elements
}

/// Character data may hold entities but no raw markup.
fn check_text(text: &str) {
    assert!(
        !text.contains('<') && !text.contains('>'),
        "raw markup in {text:?}"
    );
    for (i, _) in text.match_indices('&') {
        let entity = &text[i..text[i..].find(';').map_or(text.len(), |e| i + e + 1)];
        assert!(
            ["&amp;", "&lt;", "&gt;", "&quot;"].contains(&entity),
            "bad entity {entity:?}"
        );
    }
}

/// Counts per lane of the picture, keyed by (kind, key): the lane's own `data-events` and the events its
/// marks and bins account for.
fn lanes(svg: &[Element]) -> BTreeMap<(String, String), (u64, u64)> {
    let mut lanes = BTreeMap::new();
    for (i, e) in svg.iter().enumerate() {
        if e.attrs.get("class").map(String::as_str) != Some("lane") {
            continue;
        }
        let drawn: u64 = svg
            .iter()
            .filter(|m| m.parent == Some(i))
            .map(|m| match m.attrs.get("class").map(String::as_str) {
                Some("mark") => 1,
                Some("bin") => m.attrs["data-events"].parse().unwrap(),
                _ => 0,
            })
            .sum();
        let key = (
            e.attrs["data-kind"].clone(),
            e.attrs.get("data-key").cloned().unwrap_or_default(),
        );
        lanes.insert(key, (e.attrs["data-events"].parse().unwrap(), drawn));
    }
    lanes
}

/// What `retrovisor events` lists, counted the way the picture has lanes: interrupts by vector, IRQ edges
/// by line, everything else by kind (the stop is the end of the axis, not a lane).
fn listed(trace: &Path) -> BTreeMap<(String, String), (u64, u64)> {
    let o = rv(&["events", trace.to_str().unwrap()]);
    assert_eq!(status(&o), 0, "{}", text(&o.stderr));
    let mut counts = BTreeMap::new();
    for line in text(&o.stdout).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // <unit> <position> rip <rip> <kind> <value...>
        let kind = fields[4];
        let key = match kind {
            "interrupt" => fields[6].to_string(),
            "irq" => fields[6].to_string(),
            "stop" => continue,
            _ => String::new(),
        };
        let n = counts.entry((kind.to_string(), key)).or_insert((0, 0));
        n.0 += 1;
        n.1 += 1;
    }
    counts
}

/// Runs `retrovisor timeline` on `trace` into `svg` with extra args; returns its stderr.
fn timeline(trace: &Path, svg: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "timeline",
        trace.to_str().unwrap(),
        "-o",
        svg.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = rv(&args);
    assert_eq!(status(&o), 0, "{}", text(&o.stderr));
    text(&o.stderr)
}

/// All the text of the elements named `name`, one string per element.
fn texts<'a>(svg: &'a [Element], name: &str) -> Vec<&'a str> {
    svg.iter()
        .filter(|e| e.name == name)
        .map(|e| e.text.as_str())
        .collect()
}

#[test]
fn every_event_of_a_step_recording_is_in_its_lane_and_every_output_line_is_placed() {
    let dir = scratch("timeline-step");
    let (trace, rec) = record(&dir, "timer", &["--checkpoint-every", "20000"]);
    let out = dir.join("timer.svg");
    let said = timeline(&trace, &out, &[]);
    assert!(said.contains("the replay matched the recording"), "{said}");
    let svg = parse(&std::fs::read_to_string(&out).unwrap());

    let mut expected = listed(&trace);
    let printed = text(&rec.stdout).lines().count() as u64;
    expected.insert(("output".into(), String::new()), (printed, printed));
    assert!(expected.contains_key(&("interrupt".into(), "0x20".into())));
    assert!(expected.contains_key(&("irq".into(), "0".into())));
    assert_eq!(lanes(&svg), expected);

    let words = texts(&svg, "text").join("\n");
    for needle in [
        "timer.rvt: guest timer.elf",
        "clock step · time host · ",
        " instructions · ",
        "guest exited with status 1",
        "it matched the recording",
        "icount (instructions retired since boot",
        "vectors injected into the vCPU",
        "timer: done",
    ] {
        assert!(
            words.contains(needle),
            "no {needle:?} in the picture's text:\n{words}"
        );
    }
    assert!(svg
        .iter()
        .all(|e| e.attrs.get("class").map(String::as_str) != Some("divergence")));
}

#[test]
fn a_landmark_recording_shows_its_kicks_over_landmarks() {
    let dir = scratch("timeline-landmark");
    let (trace, _) = record(&dir, "timer", &["--clock", "landmark"]);
    let out = dir.join("timer.svg");
    timeline(&trace, &out, &[]);
    let svg = parse(&std::fs::read_to_string(&out).unwrap());
    let lanes = lanes(&svg);
    let kicks = lanes.get(&("kick".to_string(), String::new()));
    assert!(
        matches!(kicks, Some((n, m)) if n == m && *n > 0),
        "{lanes:?}"
    );
    let expected = listed(&trace);
    let without_output: BTreeMap<_, _> =
        lanes.into_iter().filter(|(k, _)| k.0 != "output").collect();
    assert_eq!(without_output, expected);
    let words = texts(&svg, "text").join("\n");
    assert!(words.contains(" landmarks · "), "{words}");
    assert!(
        words.contains("landmark (exits the guest caused since boot"),
        "{words}"
    );
    assert!(!words.contains(" instructions · "), "{words}");
}

#[test]
fn a_divergence_is_marked_where_replay_reports_it_with_its_message() {
    let dir = scratch("timeline-diverged");
    let (trace, _) = record(&dir, "timer", &[]);
    // The first interrupt injected one instruction later than recorded, as in bad_input.rs.
    let reader = traces::TraceReader::open(&trace).unwrap();
    let mut events = reader.events().to_vec();
    let first = events
        .iter()
        .position(|e| matches!(e.kind, traces::EventKind::Interrupt { .. }))
        .expect("no interrupt recorded");
    events[first].at += 1;
    let tampered = dir.join("tampered.rvt");
    rewrite(&reader, events, &tampered);
    let replayed = text(&replay(&tampered, &[]).stderr);
    let at = replayed
        .split("diverged from the recording at icount ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("replay did not diverge: {replayed}"));

    let out = dir.join("tampered.svg");
    let said = timeline(&tampered, &out, &[]);
    assert!(said.contains(&format!("diverged at icount {at}")), "{said}");
    let svg = parse(&std::fs::read_to_string(&out).unwrap());
    let marks: Vec<&Element> = svg
        .iter()
        .filter(|e| e.attrs.get("class").map(String::as_str) == Some("divergence"))
        .collect();
    assert_eq!(marks.len(), 1);
    assert_eq!(marks[0].attrs["data-position"], at);
    let i = svg.iter().position(|e| std::ptr::eq(e, marks[0])).unwrap();
    let inside: Vec<&Element> = svg.iter().filter(|e| e.parent == Some(i)).collect();
    assert!(
        inside
            .iter()
            .any(|e| e.name == "line" && e.attrs["stroke"] == "#d00000"),
        "the divergence is not a red line"
    );
    assert!(
        inside
            .iter()
            .any(|e| e.name == "title" && e.text.contains("diverged")),
        "the divergence carries no message"
    );
    let words = texts(&svg, "text").join("\n");
    assert!(
        words.contains("✘ replay diverged from the recording at icount"),
        "{words}"
    );
    assert!(
        words.contains(&format!("diverged at icount {at}")),
        "{words}"
    );
}

#[test]
fn without_replay_the_picture_has_no_output_lane_and_says_why() {
    let dir = scratch("timeline-no-replay");
    let (trace, _) = record(&dir, "hello", &[]);
    let out = dir.join("hello.svg");
    let said = timeline(&trace, &out, &["--no-replay"]);
    assert!(said.contains("not replayed (--no-replay)"), "{said}");
    let svg = parse(&std::fs::read_to_string(&out).unwrap());
    assert!(!lanes(&svg).keys().any(|k| k.0 == "output"));
    assert!(texts(&svg, "text")
        .join("\n")
        .contains("not replayed (--no-replay)"));
    // A missing output directory is a clear error.
    let o = rv(&[
        "timeline",
        trace.to_str().unwrap(),
        "-o",
        dir.join("no/such/dir.svg").to_str().unwrap(),
    ]);
    assert_eq!(status(&o), 2);
    assert!(text(&o.stderr).starts_with("retrovisor: error: cannot write the timeline to "));
}

/// Width and height of a PNG, from its IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn the_picture_renders() {
    let dir = scratch("timeline-render");
    let (trace, _) = record(&dir, "timer", &[]);
    let out = dir.join("timer.svg");
    timeline(&trace, &out, &[]);
    let png = dir.join("timer.png");
    let o = std::process::Command::new("rsvg-convert")
        .arg(&out)
        .arg("-o")
        .arg(&png)
        .output()
        .expect("rsvg-convert is needed for this test (Debian package librsvg2-bin; .ci/run installs it)");
    assert!(
        o.status.success(),
        "rsvg-convert failed: {}",
        text(&o.stderr)
    );
    assert!(
        o.stderr.is_empty(),
        "rsvg-convert complained: {}",
        text(&o.stderr)
    );
    let svg = parse(&std::fs::read_to_string(&out).unwrap());
    let size = |a: &str| svg[0].attrs[a].parse::<u32>().unwrap();
    assert_eq!(
        png_size(&std::fs::read(&png).unwrap()),
        (size("width"), size("height"))
    );
}
