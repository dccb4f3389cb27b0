//! `cms-agent`: the card agent service (default, `serve`) and the commands for the person at
//! the PC (`readers`, `card`, `watch`, `unblock`, `so-unblock`).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    match args.command {
        None | Some(cli::Command::Serve) => {
            let program = cms_agent::PROGRAM;
            let config_path = args.config.or_else(|| program.config_from_env());
            program.start(config_path.as_deref(), cms_kit::service::Mode::Serve)
        }
        Some(command) => cli::run(command, args.config.as_deref()),
    }
}
