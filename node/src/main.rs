//! `meridian`: the daemon and the command-line tool of a meridian site (see [`node::cli`]).

fn main() -> std::process::ExitCode {
    node::cli::main(std::env::args_os())
}
