//! `testbed`: `testbed bench` runs the mesh benchmarks; `testbed meridian ARGS…` is `meridian`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("meridian") => {
            args.remove(0);
            meridian::cli::main(args)
        }
        Some("bench") => match testbed::bench::main(&args[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: testbed bench [--only NAME[,NAME…]] | testbed meridian ARGS…");
            ExitCode::from(2)
        }
    }
}
