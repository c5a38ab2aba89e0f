//! `ciao-launcher`: the node daemon. A thin shell over `ciao_launcher::daemon`.
use std::process::ExitCode;

fn main() -> ExitCode {
    ciao_launcher::daemon::main(std::env::args_os())
}
