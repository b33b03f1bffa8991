//! `retrovisor diff A B`: where two recordings of the same guest part, and what differed there, as
//! text or JSON (see `replayer::diff` for the search).

use boot::symbols::Symbols;
use indicatif::{ProgressBar, ProgressStyle};
use replayer::diff::{self, Cause, DiffError, Differing, PageDifference, Parting, Report};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use thiserror::Error;
use vocab::Clock;

/// Arguments of `retrovisor diff`.
#[derive(clap::Args)]
pub struct DiffArgs {
    /// The first recording (A): a trace directory written by `record`.
    a: PathBuf,
    /// The second recording (B), of the same guest image on the same machine.
    b: PathBuf,
    /// Print one JSON document instead of text (positions as `replay --to` and rv-seek take them).
    #[arg(long)]
    json: bool,
    /// Guest image to replay both with instead of the path stored in the traces (its hash must match).
    #[arg(long, value_name = "ELF")]
    kernel: Option<PathBuf>,
    /// The ELF whose symbols name what the differing pages hold, if not the guest image (the ELF64
    /// build with symbols of a 32-bit container image, for example).
    #[arg(long, value_name = "ELF")]
    symbols: Option<PathBuf>,
}

/// What can stop a diff.
#[derive(Debug, Error)]
pub enum DiffCliError {
    /// The search failed or the traces cannot be compared.
    #[error(transparent)]
    Diff(#[from] DiffError),
    /// Standard output cannot be written.
    #[error("cannot write to standard output: {0}")]
    Output(std::io::Error),
}

/// How many differing pages a text report lists.
const MAX_PAGES_SHOWN: usize = 16;

/// Runs `retrovisor diff`; exit status 0 when the recordings do not part, 1 when they do (as diff(1)),
/// 130 when interrupted.
pub fn run(a: &DiffArgs) -> Result<i32, DiffCliError> {
    recorder::install_stop_handlers();
    let bar = spinner();
    let found = diff::diff(
        &a.a,
        &a.b,
        a.kernel.as_deref(),
        &mut recorder::stop_requested,
        &mut |what| bar.set_message(what.to_string()),
    );
    bar.finish_and_clear();
    let report = match found {
        Err(DiffError::Interrupted) => {
            eprintln!("retrovisor: diff: stopped before it found where the recordings part");
            return Ok(130);
        }
        other => other?,
    };
    let symbols = page_symbols(a, &report);
    let text = if a.json {
        json(a, &report, &symbols)
    } else {
        text(a, &report, &symbols)
    };
    writeln!(std::io::stdout(), "{text}").map_err(DiffCliError::Output)?;
    Ok(if report.parting.is_some() { 1 } else { 0 })
}

/// For each differing page, the image's symbols it holds.
fn page_symbols(a: &DiffArgs, report: &Report) -> Vec<Vec<String>> {
    let Some(parting) = &report.parting else {
        return Vec::new();
    };
    let path = a.symbols.clone().or_else(|| a.kernel.clone()).or_else(|| {
        traces::TraceReader::open(&a.a)
            .ok()
            .map(|t| PathBuf::from(&t.header().image_path))
    });
    let image = path.and_then(|p| std::fs::read(p).ok()).unwrap_or_default();
    let symbols = Symbols::from_elf(&image);
    parting
        .pages
        .iter()
        .map(|page| {
            let paddr = page.pfn * memory::PAGE_SIZE as u64;
            let start = boot::elf::virtual_address(&image, paddr).unwrap_or(paddr);
            symbols
                .overlapping(start, start + memory::PAGE_SIZE as u64)
                .map(str::to_string)
                .collect()
        })
        .collect()
}

fn cause_text(parting: &Parting) -> String {
    match parting.cause {
        Cause::Input => "an input differs".into(),
        Cause::Placement => {
            "no input differs: the interleaving or an interrupt's position differs".into()
        }
        Cause::State => {
            "no input differs before the guests do: they part by themselves (their disks \
            differ, or a host clock reading reached the guest)"
                .into()
        }
    }
}

fn text(a: &DiffArgs, report: &Report, symbols: &[Vec<String>]) -> String {
    let clock = report.clock;
    let mut out = vec![
        format!(
            "A: {} (ends at {})",
            a.a.display(),
            report.ends.0.show(clock)
        ),
        format!(
            "B: {} (ends at {})",
            a.b.display(),
            report.ends.1.show(clock)
        ),
    ];
    out.extend(report.notes.iter().map(|n| format!("note: {n}")));
    let Some(p) = &report.parting else {
        out.push(
            "The recordings do not part: the same inputs at the same positions, and the guests alike \
             where the shorter ends."
                .into(),
        );
        out.push(format!("Found in {} replays.", report.replays));
        return out.join("\n");
    };
    out.push(format!(
        "They part at {} (the same position in both): {}.",
        p.at.show(clock),
        cause_text(p)
    ));
    if let Some((n, x, y)) = p.serial_byte {
        out.push(format!(
            "  Serial input byte {n} (the {}th) is {} in A, {} in B.",
            n + 1,
            diff::show_byte(x),
            diff::show_byte(y)
        ));
    }
    for (name, d) in [("A", &p.a), ("B", &p.b)] {
        out.push(match d {
            Some(d) => format!(
                "  {name}'s first differing event (#{}, at {}, rip {:#x}): {}",
                d.index,
                d.at.show(clock),
                d.rip,
                d.what
            ),
            None => format!("  {name} has no more events"),
        });
    }
    out.push(format!(
        "At {}, just after, they differ in:",
        p.after.show(clock)
    ));
    if p.fields.is_empty() && p.pages.is_empty() {
        out.push("  nothing yet that the guest holds (the difference is in a device)".into());
    }
    out.extend(p.fields.iter().map(|f| format!("  {f}")));
    if !p.pages.is_empty() {
        out.push(format!("  {} page(s) of RAM:", p.pages.len()));
        for (page, names) in p.pages.iter().zip(symbols).take(MAX_PAGES_SHOWN) {
            out.push(format!(
                "    {}{}",
                page_text(page),
                if names.is_empty() {
                    String::new()
                } else {
                    format!(", holding {}", names.join(", "))
                }
            ));
        }
        if p.pages.len() > MAX_PAGES_SHOWN {
            out.push(format!("    and {} more", p.pages.len() - MAX_PAGES_SHOWN));
        }
    }
    if report.time_readings > 0 {
        out.push(format!(
            "Host clock readings differed {} time(s) before that, as they do between any two runs.",
            report.time_readings
        ));
    }
    out.push(format!(
        "Found in {} replays. To look: retrovisor replay {} --to {} --gdb",
        report.replays,
        a.a.display(),
        p.at
    ));
    out.join("\n")
}

fn page_text(page: &PageDifference) -> String {
    let (addr, x, y) = page.first;
    format!(
        "page {:#x}: {} byte(s) differ, the first at {addr:#x} ({x:#04x} in A, {y:#04x} in B)",
        page.pfn, page.bytes
    )
}

fn json(a: &DiffArgs, report: &Report, symbols: &[Vec<String>]) -> String {
    let clock = match report.clock {
        Clock::Step => "step",
        Clock::Landmark => "landmark",
    };
    let event = |d: &Option<Differing>| {
        d.as_ref().map(|d| {
            serde_json::json!({
                "index": d.index,
                "position": d.at.to_string(),
                "rip": d.rip,
                "what": d.what,
            })
        })
    };
    let parting = report.parting.as_ref().map(|p| {
        serde_json::json!({
            "position": p.at.to_string(),
            "after": p.after.to_string(),
            "cause": match p.cause {
                Cause::Input => "input",
                Cause::Placement => "placement",
                Cause::State => "state",
            },
            "explanation": cause_text(p),
            "a": event(&p.a),
            "b": event(&p.b),
            "serial_byte": p.serial_byte.map(|(n, x, y)| serde_json::json!({"index": n, "a": x, "b": y})),
            "fields": p.fields,
            "pages": p.pages.iter().zip(symbols).map(|(page, names)| serde_json::json!({
                "pfn": page.pfn,
                "bytes": page.bytes,
                "first_address": page.first.0,
                "a": page.first.1,
                "b": page.first.2,
                "symbols": names,
            })).collect::<Vec<_>>(),
        })
    });
    serde_json::json!({
        "a": a.a.display().to_string(),
        "b": a.b.display().to_string(),
        "clock": clock,
        "ends": [report.ends.0.to_string(), report.ends.1.to_string()],
        "parting": parting,
        "time_readings": report.time_readings,
        "replays": report.replays,
        "notes": report.notes,
    })
    .to_string()
}

/// A line on stderr saying what the search does, when stderr is a terminal.
fn spinner() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("diff: {msg} {spinner} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
