//! Shows what an input of a fuzz target decodes to and replays it with a trace.
//!
//! `cargo run -p sam-fuzz-checks --example show -- TARGET FILE` (or `-` and hex on stdin).
//! Set `SAM_FUZZ_STRICT=1` to report known findings too.

use std::io::Read;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(target), Some(file)) = (args.first(), args.get(1)) else {
        eprintln!("usage: show TARGET FILE|-");
        std::process::exit(2);
    };
    let data = if file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).expect("stdin");
        let hex: String = s.chars().filter(char::is_ascii_hexdigit).collect();
        (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect()
    } else {
        std::fs::read(file).expect("readable input")
    };
    match target.as_str() {
        "step" | "ndarray_step" => {
            let setup = sam_fuzz_checks::step::Setup::decode(&data, target == "ndarray_step");
            println!("{setup:#?}");
        }
        _ => {}
    }
    // SAFETY of the trace: plain environment variable for this process only.
    if std::env::var_os("SAM_FUZZ_TRACE").is_none() {
        eprintln!("(set SAM_FUZZ_TRACE=1 to trace each call)");
    }
    let check = sam_fuzz_checks::check_for(target)
        .expect("target: config, step, ndarray_step or case_json");
    check(&data);
    println!("no violation");
}
