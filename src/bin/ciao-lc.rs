//! `ciao-lc`: the operator's companion. A thin shell over `ciao_launcher::lc`.
use std::process::ExitCode;

fn main() -> ExitCode {
    ciao_launcher::lc::main(std::env::args_os())
}
