//! The command line: parse, set up logging, run the command, map the outcome to an exit code.
//! Everything else lives in the library (`dssm_certs::commands`, one file per command).

use std::process::ExitCode;

use clap::Parser;
use dssm_certs::cli::{Cli, LogFormat};
use dssm_certs::commands::{self, log};
use dssm_certs::exit;

fn main() -> ExitCode {
    let cli = match Cli::try_parse().and_then(|c| c.validate().map(|()| c)) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            if log::json_requested() {
                log::init(LogFormat::Json);
                log::fatal(&e.render().to_string());
            } else {
                let _ = e.print();
            }
            return code(exit::USAGE);
        }
        Err(e) => {
            let _ = e.print(); // --help, --version
            return code(exit::OK);
        }
    };
    log::init(cli.log_format);
    code(match commands::run(cli) {
        Ok(c) => c,
        Err(e) => {
            log::fatal(&e.to_string());
            e.exit_code()
        }
    })
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}
