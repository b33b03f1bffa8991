//! Draws a [`Picture`] as a hand-written SVG: title and verdict, one lane per row with a mark per event,
//! an axis in the trace's unit, a legend that says what each colour means, and the guest's output lines.
//!
//! Every lane is a `<g class="lane" data-kind=".." data-events="N">` and every event in it one element of
//! class `mark` (or, in a lane too dense to draw event by event, a `bin` with `data-events`), so what the
//! picture claims can be checked against the trace.

use super::replay::Verdict;
use super::{shorten, Lane, Picture};
use crate::words;
use std::fmt::Write as _;

/// Width of the whole picture.
const WIDTH: f64 = 1200.0;
/// Left edge of the plot: room for the lane labels.
const LEFT: f64 = 210.0;
/// Width of the plot.
const PLOT_WIDTH: f64 = WIDTH - LEFT - 40.0;
/// Space inside the plot's frame on either side, so that marks at the first and last position show.
const PAD: f64 = 6.0;
/// Height of a lane.
const LANE: f64 = 28.0;
/// Lines of text in the header, the legend and the output listing.
const LINE: f64 = 19.0;
/// A lane with more events than this is drawn as one bar per pixel column, shaded by how many events
/// fall there: beyond a few per pixel, single marks only make the file larger, not the picture clearer.
const MAX_MARKS: usize = 4000;
/// Output lines listed under the legend: the first and last half of this many.
const LISTED_LINES: usize = 16;
/// Longest verdict message line, in characters, before it wraps (and at most this many lines of it).
const WRAP: usize = 150;
const MAX_VERDICT_LINES: usize = 4;

const FONT: &str = "DejaVu Sans, Verdana, Arial, sans-serif";
const MONO: &str = "DejaVu Sans Mono, Menlo, Consolas, monospace";
const RED: &str = "#d00000";

/// The colour of a lane's marks (Okabe-Ito colours, which stay apart for colour-blind readers).
fn colour(kind: &str) -> &'static str {
    match kind {
        "output" => "#0072b2",
        "serial_rx" => "#009e73",
        "interrupt" => "#e69f00",
        "irq" => "#56b4e9",
        "clock" => "#cc79a7",
        "host_value" => "#8c564b",
        "kick" => "#7f7f00",
        "checkpoint" => "#444444",
        _ => "#999999",
    }
}

/// What a lane's colour means, for the legend.
fn meaning(kind: &str) -> String {
    match kind {
        "output" => {
            "lines the guest printed, each where its last byte was written (found by replaying the trace)"
                .into()
        }
        "checkpoint" => format!(
            "{}; tall: full, short: only what changed since the previous one",
            words::event_meaning(kind)
        ),
        _ => words::event_meaning(kind).into(),
    }
}

/// The SVG document.
pub fn render(p: &Picture) -> String {
    let mut out = String::new();
    let header = header_lines(p);
    // Room above the plot for the divergence's label.
    let top = 36.0 + LINE * header.len() as f64 + 34.0;
    let axis_y = top + LANE * p.lanes.len() as f64;
    let kinds = legend_kinds(p);
    let legend_y = axis_y + 72.0;
    let listing = listed_output(p);
    let legend_rows = kinds.len() + usize::from(p.verdict_diverged());
    let listing_y = legend_y + LINE * legend_rows as f64 + 24.0;
    let height = listing_y
        + if listing.is_empty() {
            0.0
        } else {
            LINE * (listing.len() + 1) as f64 + 10.0
        };
    let _ = writeln!(
        out,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="{FONT}">
<rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="20" y="32" font-size="20" font-weight="bold">{}</text>"#,
        esc(&format!("{}: guest {}", p.trace_name, p.guest_name))
    );
    for (i, (text, fill)) in header.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="20" y="{:.0}" font-size="13" fill="{fill}">{}</text>"#,
            36.0 + LINE * (i + 1) as f64,
            esc(text)
        );
    }
    let x = |position: u64| {
        LEFT + PAD + (PLOT_WIDTH - 2.0 * PAD) * position.min(p.end) as f64 / p.end.max(1) as f64
    };
    draw_grid(&mut out, p, top, axis_y, &x);
    for (i, lane) in p.lanes.iter().enumerate() {
        draw_lane(&mut out, lane, top + LANE * i as f64, i, &x);
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{top:.1}" width="{PLOT_WIDTH}" height="{:.1}" fill="none" stroke="#999"/>"##,
        axis_y - top
    );
    if let Verdict::Diverged { position, message } = &p.verdict {
        let xd = x(*position);
        let _ = writeln!(
            out,
            r#"<g class="divergence" data-position="{position}"><title>{}</title>
<line x1="{xd:.1}" y1="{:.1}" x2="{xd:.1}" y2="{:.1}" stroke="{RED}" stroke-width="2.5"/>
<text x="{xd:.1}" y="{:.1}" font-size="12" font-weight="bold" fill="{RED}" text-anchor="{}">diverged at {} {position}</text></g>"#,
            esc(message),
            top - 8.0,
            axis_y,
            top - 11.0,
            if xd > LEFT + PLOT_WIDTH * 0.8 {
                "end"
            } else {
                "middle"
            },
            p.unit
        );
    }
    draw_legend(&mut out, &kinds, legend_y, p.verdict_diverged());
    if !listing.is_empty() {
        let _ = writeln!(
            out,
            r#"<text x="20" y="{listing_y:.1}" font-size="14" font-weight="bold">Guest output: {} line{}, at the {} where each was complete</text>"#,
            p.output.len(),
            if p.output.len() == 1 { "" } else { "s" },
            p.unit
        );
        for (i, line) in listing.iter().enumerate() {
            let _ = writeln!(
                out,
                r#"<text x="20" y="{:.1}" font-size="12" font-family="{MONO}" xml:space="preserve">{}</text>"#,
                listing_y + LINE * (i + 1) as f64,
                esc(line)
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

impl Picture {
    fn verdict_diverged(&self) -> bool {
        matches!(self.verdict, Verdict::Diverged { .. })
    }
}

/// The lines under the title: what the recording is, then what the replay said, with their colours.
fn header_lines(p: &Picture) -> Vec<(String, &'static str)> {
    let checkpoints = p
        .lanes
        .iter()
        .find(|l| l.kind == "checkpoint")
        .map_or(0, |l| l.marks.len());
    let mut lines = vec![(
        format!(
            "clock {} · time {} · {} {} · {} events · {} checkpoint{} · {}",
            p.clock,
            p.time,
            grouped(p.end),
            p.counted,
            grouped(p.events as u64),
            checkpoints,
            if checkpoints == 1 { "" } else { "s" },
            p.ended
        ),
        "#333",
    )];
    match &p.verdict {
        Verdict::Matched => lines.push((
            "✔ replayed: it matched the recording (every checkpoint and the whole output)".into(),
            "#007a33",
        )),
        Verdict::CutOff => lines.push((
            "replayed to where the recording was cut off (no recorded output to compare with)"
                .into(),
            "#555",
        )),
        Verdict::Diverged { message, .. } => {
            for (i, chunk) in wrap(&format!("✘ {message}"), WRAP).into_iter().enumerate() {
                if i == MAX_VERDICT_LINES {
                    break;
                }
                lines.push((chunk, RED));
            }
        }
        Verdict::Failed(why) => lines.push((
            shorten(&format!("not replayed (no output lane): {why}"), WRAP * 2),
            "#555",
        )),
        Verdict::Skipped => lines.push((
            "not replayed (--no-replay): no output lane and no divergence check".into(),
            "#555",
        )),
    }
    lines
}

/// Vertical lines and labels at round positions, and the axis title.
fn draw_grid(out: &mut String, p: &Picture, top: f64, axis_y: f64, x: &dyn Fn(u64) -> f64) {
    let _ = writeln!(out, r#"<g class="axis" font-size="12">"#);
    for t in ticks(p.end) {
        let xt = x(t);
        let _ = writeln!(
            out,
            r##"<line x1="{xt:.1}" y1="{top:.1}" x2="{xt:.1}" y2="{:.1}" stroke="#e3e3e3"/><text x="{xt:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            axis_y + 5.0,
            axis_y + 19.0,
            short(t)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{} ({}; the recording ends at {})</text></g>"#,
        LEFT + PLOT_WIDTH / 2.0,
        axis_y + 40.0,
        p.unit,
        p.axis_meaning,
        grouped(p.end)
    );
}

/// One lane: its band, label and marks.
fn draw_lane(out: &mut String, lane: &Lane, y: f64, index: usize, x: &dyn Fn(u64) -> f64) {
    let fill = colour(lane.kind);
    let key = lane
        .key
        .as_deref()
        .map(|k| format!(r#" data-key="{}""#, esc(k)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        r#"<g class="lane" data-kind="{}"{key} data-events="{}">"#,
        lane.kind,
        lane.marks.len()
    );
    let band = if index.is_multiple_of(2) {
        "#f5f5f5"
    } else {
        "#ffffff"
    };
    let _ = writeln!(
        out,
        r#"<rect x="{LEFT}" y="{y:.1}" width="{PLOT_WIDTH}" height="{LANE}" fill="{band}"/>"#
    );
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="end">{} <tspan fill="#777">({})</tspan></text>"##,
        LEFT - 10.0,
        y + LANE / 2.0 + 4.5,
        esc(&lane.label),
        grouped(lane.marks.len() as u64)
    );
    if lane.marks.len() > MAX_MARKS {
        draw_bins(out, lane, y, fill, x);
    } else {
        for m in &lane.marks {
            let xm = x(m.position);
            let title = esc(&format!("{} · {}", m.position, m.detail));
            if lane.kind == "output" {
                let _ = writeln!(
                    out,
                    r#"<circle class="mark" cx="{xm:.1}" cy="{:.1}" r="4.5" fill="{fill}" stroke="white" stroke-width="1"><title>{title}</title></circle>"#,
                    y + LANE / 2.0
                );
            } else {
                let (inset, width) = if m.tall { (3.0, 3.0) } else { (7.0, 2.0) };
                let _ = writeln!(
                    out,
                    r#"<rect class="mark" x="{:.1}" y="{:.1}" width="{width}" height="{:.1}" fill="{fill}"><title>{title}</title></rect>"#,
                    xm - width / 2.0,
                    y + inset,
                    LANE - 2.0 * inset
                );
            }
        }
    }
    out.push_str("</g>\n");
}

/// A dense lane: one bar per pixel column that holds events, darker where more fall.
fn draw_bins(out: &mut String, lane: &Lane, y: f64, fill: &str, x: &dyn Fn(u64) -> f64) {
    let mut columns: std::collections::BTreeMap<i64, (u64, u64, u64)> = Default::default();
    for m in &lane.marks {
        let c = columns
            .entry(x(m.position).floor() as i64)
            .or_insert((0, m.position, m.position));
        c.0 += 1;
        c.2 = m.position;
    }
    let most = columns.values().map(|c| c.0).max().unwrap_or(1) as f64;
    for (column, (count, first, last)) in columns {
        let _ = writeln!(
            out,
            r#"<rect class="bin" data-events="{count}" x="{column}" y="{:.1}" width="1" height="{:.1}" fill="{fill}" fill-opacity="{:.2}"><title>{count} events from {first} to {last}</title></rect>"#,
            y + 5.0,
            LANE - 10.0,
            0.3 + 0.7 * count as f64 / most
        );
    }
}

/// The kinds shown, in lane order, each once.
fn legend_kinds(p: &Picture) -> Vec<&'static str> {
    let mut kinds: Vec<&'static str> = Vec::new();
    for lane in &p.lanes {
        if !kinds.contains(&lane.kind) {
            kinds.push(lane.kind);
        }
    }
    kinds
}

/// A swatch and a sentence per kind shown, and the divergence line if there is one.
fn draw_legend(out: &mut String, kinds: &[&str], y: f64, diverged: bool) {
    let _ = writeln!(
        out,
        r#"<g class="legend" font-size="12.5"><text x="20" y="{:.1}" font-size="14" font-weight="bold">What the marks are</text>"#,
        y - 6.0
    );
    let rows = kinds
        .iter()
        .map(|k| (colour(k), lane_name(k), meaning(k)))
        .chain(diverged.then(|| {
            (
                RED,
                "divergence",
                "where the replay stopped agreeing with the recording (the message is at the top)"
                    .into(),
            )
        }));
    for (i, (fill, name, text)) in rows.enumerate() {
        let row = y + LINE * (i as f64 + 0.9);
        let _ = writeln!(
            out,
            r#"<rect x="20" y="{:.1}" width="12" height="12" fill="{fill}"/><text x="40" y="{row:.1}"><tspan font-weight="bold">{name}</tspan>: {}</text>"#,
            row - 10.5,
            esc(&text)
        );
    }
    out.push_str("</g>\n");
}

/// The name of a kind in the legend, as the lanes say it.
fn lane_name(kind: &str) -> &str {
    match kind {
        "output" => "guest output",
        "serial_rx" => "serial input",
        "interrupt" => "interrupt",
        "irq" => "irq",
        "clock" => "clock reads",
        "host_value" => "host values",
        "kick" => "kicks",
        "checkpoint" => "checkpoints",
        other => other,
    }
}

/// The output lines to list: all of them, or the first and last few with a count of the rest between.
fn listed_output(p: &Picture) -> Vec<String> {
    let width = p.end.to_string().len();
    let line = |l: &super::OutputLine| {
        format!(
            "{:>width$}  {}",
            l.position,
            shorten(&l.text, 130),
            width = width
        )
    };
    let n = p.output.len();
    if n <= LISTED_LINES {
        return p.output.iter().map(line).collect();
    }
    let half = LISTED_LINES / 2;
    let mut lines: Vec<String> = p.output[..half].iter().map(line).collect();
    lines.push(format!("{:>width$}  … {} more lines …", "", n - 2 * half));
    lines.extend(p.output[n - half..].iter().map(line));
    lines
}

/// Round positions for the axis: four to eight, at multiples of 1, 2, 2.5 or 5 times a power of ten.
fn ticks(end: u64) -> Vec<u64> {
    let rough = (end.max(1) as f64 / 8.0).max(1.0);
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= rough)
        .unwrap_or(10.0 * magnitude)
        .round()
        .max(1.0) as u64;
    (0..=end / step).map(|i| i * step).collect()
}

/// A position on the axis: 950, 12k, 1.5M, 2G.
fn short(n: u64) -> String {
    let (value, suffix) = match n {
        0..1_000 => return n.to_string(),
        1_000..1_000_000 => (n as f64 / 1e3, "k"),
        1_000_000..1_000_000_000 => (n as f64 / 1e6, "M"),
        _ => (n as f64 / 1e9, "G"),
    };
    let text = format!("{value:.2}");
    format!(
        "{}{suffix}",
        text.trim_end_matches('0').trim_end_matches('.')
    )
}

/// A count with thousands separators: 201,301.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Splits `text` into lines of at most `width` characters, at spaces where it can.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let last = lines.last_mut().expect("lines starts with one");
        if !last.is_empty() && last.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_string());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines
}

/// Text as XML character data or an attribute value: markup characters escaped, and characters XML 1.0
/// does not allow (most control characters, which guest output may hold) shown as `·`.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if c < ' ' || c == '\u{fffe}' || c == '\u{ffff}' => out.push('·'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_axis() {
        assert_eq!(ticks(0), vec![0]);
        assert_eq!(ticks(7), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            ticks(201_301),
            (0..=4).map(|i| i * 50_000).collect::<Vec<_>>()
        );
        assert_eq!(
            ticks(190_000),
            (0..=7).map(|i| i * 25_000).collect::<Vec<_>>()
        );
        assert_eq!(ticks(1046).last(), Some(&1000));
    }

    #[test]
    fn numbers_read_at_a_glance() {
        assert_eq!(short(950), "950");
        assert_eq!(short(12_000), "12k");
        assert_eq!(short(1_500_000), "1.5M");
        assert_eq!(short(125_000), "125k");
        assert_eq!(grouped(201_301), "201,301");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000_000), "1,000,000");
    }

    #[test]
    fn a_dense_lane_is_drawn_as_bins_that_account_for_every_event() {
        let n = 3 * MAX_MARKS as u64;
        let lane = Lane {
            kind: "irq",
            key: Some("0".into()),
            label: "irq line 0".into(),
            marks: (0..n)
                .map(|i| super::super::Mark {
                    position: i * 7,
                    detail: String::new(),
                    tall: false,
                })
                .collect(),
        };
        let picture = Picture {
            trace_name: "t.rvt".into(),
            guest_name: "g.elf".into(),
            clock: "step".into(),
            time: "host",
            unit: "icount",
            counted: "instructions",
            axis_meaning: "instructions retired since boot",
            end: n * 7,
            events: n as usize,
            ended: "guest halted".into(),
            lanes: vec![lane],
            output: Vec::new(),
            verdict: Verdict::Skipped,
        };
        let svg = render(&picture);
        assert!(!svg.contains(r#"class="mark""#));
        let binned: u64 = svg
            .split(r#"class="bin" data-events=""#)
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(binned, n);
        // One bar per pixel column at most: the file stays small however long the recording.
        assert!(svg.matches(r#"class="bin""#).count() <= PLOT_WIDTH as usize + 1);
    }

    #[test]
    fn text_is_escaped_into_valid_xml() {
        assert_eq!(esc("a<b & \"c\"\x07\t"), "a&lt;b &amp; &quot;c&quot;· ");
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
    }
}
