//! `cms-vcard`: the virtual smart card of the CMS.
//!
//! * `cms-vcard new` writes a card file: profile, card id, serial, admin (or 9B management) key
//!   given or diversified from a master key, PIN, PUK, counters.
//! * `cms-vcard run` serves that card to pcsc-lite's vpcd driver over TCP (127.0.0.1:35963 by
//!   default), so PC/SC clients (the agent, OpenSC, yubico-piv-tool) see it in the reader
//!   "Virtual PCD 00 00". The card file is rewritten on every change; an optional APDU log
//!   records command headers and status words; an optional control socket pulls the card out and
//!   puts it back (`remove`, `insert`, `status`, `wait-ready`).
//! * `cms-vcard control --socket S remove` sends one such command.

mod control;
mod new;
mod vpcd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cms-vcard",
    version,
    about = "The CMS virtual smart card (vpcd)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes a new card file.
    New(new::NewArgs),
    /// Serves a card file to vpcd.
    Run(RunArgs),
    /// Sends one command to a running card's control socket and prints the answer.
    Control(control::ControlArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The card file (`cms-vcard new` writes it); rewritten on every change of the card.
    #[arg(long, env = "CMS_VCARD_CARD")]
    card: PathBuf,
    /// vpcd's address: pcscd's vpcd driver listens on 35963 for its first slot, 35964 for the
    /// second.
    #[arg(long, env = "CMS_VCARD_VPCD", default_value = "127.0.0.1:35963")]
    vpcd: String,
    /// Appends the APDU log (headers and status words only) to this file.
    #[arg(long, env = "CMS_VCARD_APDU_LOG")]
    apdu_log: Option<PathBuf>,
    /// Listens on this Unix socket for `remove`, `insert`, `status` and `wait-ready`.
    #[arg(long, env = "CMS_VCARD_CONTROL")]
    control: Option<PathBuf>,
    /// Exits when standard input reaches end of file (a test harness ties the card's life to a
    /// pipe, so a killed test leaves no card behind).
    #[arg(long)]
    exit_on_stdin_eof: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::New(args) => new::run(&args),
        Command::Run(args) => run(args),
        Command::Control(args) => control::send(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cms-vcard: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut card = cms_card::sim::VirtualCard::open(&args.card)?;
    if let Some(path) = &args.apdu_log {
        let log = cms_card::sim::ApduLog::open(path)
            .with_context(|| format!("APDU log {}", path.display()))?;
        card = card.with_log(log);
    }
    if args.exit_on_stdin_eof {
        std::thread::Builder::new()
            .name("stdin-watch".into())
            .spawn(|| {
                // The state is on disk after every change: exiting here loses nothing.
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                std::process::exit(0);
            })
            .context("stdin watcher")?;
    }
    let reader = vpcd::Reader::new();
    if let Some(path) = &args.control {
        control::spawn(path, reader.clone())?;
    }
    eprintln!(
        "cms-vcard: {} card {} for vpcd at {}",
        card.state().profile.as_str(),
        args.card.display(),
        args.vpcd
    );
    vpcd::serve(&args.vpcd, &mut card, &reader)
}
