//! `retrovisor calls` and gdb's `monitor calls`: every call of a function over a whole recording, with
//! its arguments (named from the image's DWARF), its return value and where it returned.

mod common;
use common::*;
use serde_json::Value;

/// The demo guest calls is_prime(n) for n = 2..999 and checksum(s) twice, so the answers are known.
fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..n)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn calls_json(trace: &std::path::Path, function: &str, extra: &[&str]) -> Value {
    let mut args = vec!["calls", trace.to_str().unwrap(), function, "--json"];
    args.extend_from_slice(extra);
    let out = rv(&args);
    assert_eq!(status(&out), 0, "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

#[test]
fn every_call_of_a_function_with_its_arguments_and_results_as_stepping_finds_them() {
    let dir = scratch("calls-demo");
    let (trace, rec) = record(&dir, "demo", &["--clock", "landmark"]);
    assert_eq!(status(&rec), 3, "{}", text(&rec.stderr));

    let listing = calls_json(&trace, "is_prime", &[]);
    assert_eq!(listing["complete"], true);
    assert_eq!(listing["params"][0]["name"], "n");
    assert_eq!(listing["params"][0]["type"], "int");
    let calls = listing["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 998, "is_prime(2) .. is_prime(999)");
    for (call, n) in calls.iter().zip(2u64..) {
        assert_eq!(call["abi"], "i386 cdecl");
        assert_eq!(call["args"][0]["name"], "n");
        assert_eq!(call["args"][0]["value"], n, "{call}");
        assert_eq!(call["returned"]["value"], u64::from(is_prime(n)), "{call}");
        // The return comes after the call, at the address after the call instruction.
        assert!(call["returned"]["position"].as_str().is_some(), "{call}");
    }

    // The same list from single-stepping the whole recording: the free-running search skips nothing.
    let stepped = calls_json(&trace, "is_prime", &["--clock", "step"]);
    assert_eq!(stepped["calls"], listing["calls"]);

    // A limit: the first calls, said to be possibly incomplete.
    let first = calls_json(&trace, "is_prime", &["--limit", "3"]);
    assert_eq!(first["end"], "limit");
    assert_eq!(first["calls"].as_array().unwrap()[..], calls[..3]);

    // Text, with the signature from DWARF.
    let out = rv(&["calls", trace.to_str().unwrap(), "checksum"]);
    assert_eq!(status(&out), 0, "{}", text(&out.stderr));
    let out = text(&out.stdout);
    assert!(
        out.contains("2 call(s) of checksum") && out.contains("checksum(const char * s)"),
        "{out}"
    );
    assert_eq!(out.matches("checksum(s=0x").count(), 2, "{out}");

    // A function the image does not have, and an image without it: clear errors.
    let out = rv(&["calls", trace.to_str().unwrap(), "no_such_function"]);
    assert_eq!(status(&out), 2);
    assert!(
        text(&out.stderr).contains("\"no_such_function\" is not a function of the guest image"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn monitor_calls_lists_them_in_gdb_and_rv_seek_goes_to_one() {
    let dir = scratch("calls-gdb");
    let (trace, rec) = record(&dir, "demo", &["--clock", "landmark"]);
    assert_eq!(status(&rec), 3, "{}", text(&rec.stderr));
    let listing = calls_json(&trace, "checksum", &[]);
    let second = listing["calls"][1]["position"]
        .as_str()
        .unwrap()
        .to_string();
    let returned = listing["calls"][1]["returned"]["position"]
        .as_str()
        .unwrap()
        .to_string();
    let value = listing["calls"][1]["returned"]["value"].as_u64().unwrap();

    let server = GdbServer::start(&trace, &[]);
    let script = server.script.clone().expect("no `source` line printed");
    let out = gdb_batch(
        server.port,
        &guest("demo"),
        &[
            &format!("source {}", script.display()),
            "monitor calls checksum",
            "monitor calls is_prime 2",
            "monitor calls is_prime zero",
            "monitor calls nosuch",
            // The listing leaves the replay where it was.
            "rv-when",
            &format!("rv-seek {second}"),
            "print s",
            &format!("rv-seek {returned}"),
            "print/x $eax",
        ],
    );
    assert_in_order(
        &out,
        &[
            "2 call(s) of checksum at 0x",
            "checksum(s=0x",
            "checksum(s=0x",
            "2 call(s) of is_prime",
            "is_prime(n=0x2)  -> 0x1 (1)",
            "is_prime(n=0x3)  -> 0x1 (1)",
            "(stopped after 2 calls; there may be more",
            "monitor calls: the limit must be a number of calls",
            "monitor calls: \"nosuch\" is not a function of the guest image",
            "landmark 0 (the recording ends at",
            "\"time travel debugging\"",
            &format!("{value:#x}"),
        ],
    );
}
