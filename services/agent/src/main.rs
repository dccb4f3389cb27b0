//! `cms-agent`: the card agent service (default, `serve`) and the commands for the person at
//! the PC (`readers`, `card`, `watch`, `unblock`, `so-unblock`).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    match args.command {
        None | Some(cli::Command::Serve) => {
            let config_path = args
                .config
                .or_else(|| std::env::var_os("CMS_AGENT_CONFIG").map(Into::into));
            cms_kit::service::main("agent", config_path.as_deref(), cms_agent::run)
        }
        Some(command) => cli::run(command, args.config.as_deref()),
    }
}
