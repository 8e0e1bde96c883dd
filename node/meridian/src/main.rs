//! `meridian`: the daemon and the command-line tool of a meridian site (see [`meridian::cli`]).

fn main() -> std::process::ExitCode {
    meridian::cli::main(std::env::args_os())
}
