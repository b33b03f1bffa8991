//! `calls`: every call of a function named in the guest image, over the whole recording, as gdb's
//! `monitor calls` and `retrovisor calls` print it. The search itself is
//! [`replayer::timeline::calls`]; this names the function (the image's symbols), describes its
//! parameters (the image's DWARF) and words the answer, as text or JSON.

use boot::params::{self, FunctionInfo};
use boot::symbols::Symbols;
use replayer::search::ListingEnd;
use replayer::timeline::calls::{Abi, Call, CallQuery};
use replayer::Replayer;
use serde::Serialize;
use thiserror::Error;

/// Arguments shown for a function the DWARF does not describe.
pub const DEFAULT_ARGS: usize = 4;

/// A function `calls` cannot look for.
#[derive(Debug, Error)]
pub enum CallsError {
    /// Neither a symbol of the image nor an address.
    #[error("{0:?} is not a function of the guest image (give its name, or its address as 0x1234 or *0x1234)")]
    UnknownFunction(String),
}

/// The function a listing is about.
#[derive(Debug, Clone)]
pub struct Function {
    /// Its name as the user gave it, or as the symbols name the address.
    pub name: String,
    /// Its first instruction.
    pub entry: u64,
    /// What the image's DWARF says of it (empty without debug information).
    pub info: FunctionInfo,
}

impl Function {
    /// The function `what` names in `image`: a symbol, or an address (`0x1234`, `*0x1234`).
    pub fn find(image: &[u8], symbols: &Symbols, what: &str) -> Result<Function, CallsError> {
        let parsed = crate::number::parse_number(what.strip_prefix('*').unwrap_or(what));
        let (name, entry) = match parsed {
            Some(a) => (
                symbols
                    .lookup(a)
                    .filter(|&(_, off)| off == 0)
                    .map_or_else(|| format!("{a:#x}"), |(n, _)| n.to_string()),
                a,
            ),
            None => (
                what.to_string(),
                symbols
                    .find(what)
                    .map(|(a, _)| a)
                    .ok_or_else(|| CallsError::UnknownFunction(what.to_string()))?,
            ),
        };
        Ok(Function {
            name,
            entry,
            info: params::function_at(image, entry).unwrap_or_default(),
        })
    }

    /// The search for at most `limit` calls of it.
    pub fn query(&self, limit: usize) -> CallQuery {
        CallQuery {
            entry: self.entry,
            args: if self.info.params.is_empty() {
                DEFAULT_ARGS
            } else {
                self.info.params.len()
            },
            regparm: self.info.regparm,
            limit,
        }
    }

    /// The name of argument `i`: the DWARF's, or `argN`, or the register for raw 16-bit calls.
    fn arg_name(&self, abi: Abi, i: usize) -> String {
        const RAW: [&str; 6] = ["ax", "bx", "cx", "dx", "si", "di"];
        match abi {
            Abi::Raw16 => RAW.get(i).copied().unwrap_or("?").to_string(),
            _ => self
                .info
                .params
                .get(i)
                .map_or_else(|| format!("arg{}", i + 1), |p| p.name.clone()),
        }
    }
}

/// One call as a line of text: `#N  POSITION  vCPU c  name(a=0x.., b=0x..)  -> VALUE at POSITION`.
fn describe(f: &Function, r: &Replayer, index: usize, call: &Call) -> String {
    let args: Vec<String> = call
        .args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let value = a.map_or_else(|| "<unreadable>".to_string(), |v| format!("{v:#x}"));
            format!("{}={value}", f.arg_name(call.abi, i))
        })
        .collect();
    let returned = match &call.returned {
        Some(ret) => {
            let moved = if ret.cpu != call.cpu {
                format!(" on vCPU {}", ret.cpu)
            } else {
                String::new()
            };
            format!(
                "-> {:#x} ({}) at {}{moved}",
                ret.value,
                ret.value as i64,
                r.show(ret.position)
            )
        }
        None => "did not return before the recording ended".to_string(),
    };
    let cpu = if r.machine().is_multiprocessor() {
        format!("  vCPU {}", call.cpu)
    } else {
        String::new()
    };
    format!(
        "#{index:<4} {}{cpu}  {}({})  {returned}",
        r.show(call.position),
        f.name,
        args.join(", ")
    )
}

/// The heading of a listing: the function, where it is, its convention and its parameters.
fn heading(f: &Function, calls: &[Call]) -> String {
    let abi = calls.first().map_or("", |c| c.abi.name());
    let params: Vec<String> = f
        .info
        .params
        .iter()
        .map(|p| match &p.type_name {
            Some(t) => format!("{t} {}", p.name),
            None => p.name.clone(),
        })
        .collect();
    let signature = if params.is_empty() {
        format!("no debug information: the first {DEFAULT_ARGS} argument slots are shown")
    } else {
        format!("{}({})", f.name, params.join(", "))
    };
    format!(
        "{} call(s) of {} at {:#x} [{signature}]{}",
        calls.len(),
        f.name,
        f.entry,
        if abi.is_empty() {
            String::new()
        } else {
            format!(", arguments by {abi}")
        }
    )
}

/// The listing as lines of text: the heading, a line per call, and why it stopped short, if it did.
pub fn text(
    f: &Function,
    r: &Replayer,
    calls: &[Call],
    end: ListingEnd,
    limit: usize,
) -> Vec<String> {
    let mut lines = vec![heading(f, calls)];
    lines.extend(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| format!("  {}", describe(f, r, i + 1, c))),
    );
    lines.extend(ending(end, limit));
    lines
}

/// The line that ends a listing that is not complete, if any.
fn ending(end: ListingEnd, limit: usize) -> Option<String> {
    match end {
        ListingEnd::Complete => None,
        ListingEnd::Limit => Some(format!(
            "(stopped after {limit} calls; there may be more: give a larger limit)"
        )),
        ListingEnd::Interrupted => {
            Some("(interrupted: the calls before the stop are listed)".into())
        }
    }
}

#[derive(Serialize)]
struct JsonListing<'a> {
    function: &'a str,
    entry: u64,
    params: Vec<JsonParam<'a>>,
    complete: bool,
    end: &'static str,
    calls: Vec<JsonCall>,
}

#[derive(Serialize)]
struct JsonParam<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    type_name: Option<&'a str>,
}

#[derive(Serialize)]
struct JsonCall {
    /// As `replay --to`, `monitor seek` and rv-seek take it.
    position: String,
    cpu: u8,
    abi: &'static str,
    args: Vec<JsonArg>,
    sp: u64,
    return_address: Option<u64>,
    returned: Option<JsonReturn>,
}

#[derive(Serialize)]
struct JsonArg {
    name: String,
    value: Option<u64>,
}

#[derive(Serialize)]
struct JsonReturn {
    position: String,
    cpu: u8,
    value: u64,
}

/// The listing as one JSON document, for scripts.
pub fn json(f: &Function, calls: &[Call], end: ListingEnd) -> String {
    let listing = JsonListing {
        function: &f.name,
        entry: f.entry,
        params: f
            .info
            .params
            .iter()
            .map(|p| JsonParam {
                name: &p.name,
                type_name: p.type_name.as_deref(),
            })
            .collect(),
        complete: end == ListingEnd::Complete,
        end: match end {
            ListingEnd::Complete => "complete",
            ListingEnd::Limit => "limit",
            ListingEnd::Interrupted => "interrupted",
        },
        calls: calls
            .iter()
            .map(|c| JsonCall {
                position: c.position.to_string(),
                cpu: c.cpu,
                abi: c.abi.name(),
                args: c
                    .args
                    .iter()
                    .enumerate()
                    .map(|(i, &value)| JsonArg {
                        name: f.arg_name(c.abi, i),
                        value,
                    })
                    .collect(),
                sp: c.sp,
                return_address: c.return_address,
                returned: c.returned.map(|r| JsonReturn {
                    position: r.position.to_string(),
                    cpu: r.cpu,
                    value: r.value,
                }),
            })
            .collect(),
    };
    serde_json::to_string_pretty(&listing).expect("a listing always serializes")
}
