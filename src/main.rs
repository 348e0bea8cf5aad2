//! The `tidewatch` command: run, validate and draw pipelines.

use std::process::ExitCode;

fn main() -> ExitCode {
    tidewatch::cli::main(tidewatch::builtins())
}
