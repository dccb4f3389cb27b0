//! The control socket: a test (or a person) pulls the card out and puts it back.
//!
//! One command per line, one answer line: `remove` (answers once vpcd's connection is closed),
//! `insert` (answers once pcscd has powered the card, or `timeout`), `status`
//! (`inserted=1 connected=1 powered=0 ready=1`), `wait-ready` (waits until pcscd has powered the
//! card once on the current connection, i.e. PC/SC clients can see it).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::vpcd::Reader;

/// How long `insert` and `wait-ready` wait for pcscd to see the card.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The control commands.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ControlCommand {
    /// Pull the card out of the reader.
    Remove,
    /// Put it back (waits until pcscd has seen it).
    Insert,
    /// Print `inserted=… connected=… powered=… ready=…`.
    Status,
    /// Wait until pcscd has seen the card.
    WaitReady,
}

#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// The running card's control socket (`cms-vcard run --control`).
    #[arg(long)]
    socket: std::path::PathBuf,
    /// What to do.
    #[arg(value_enum)]
    command: ControlCommand,
}

/// `cms-vcard control`: one command, its answer on stdout; fails unless the answer is `ok`
/// (or a status line).
pub fn send(args: &ControlArgs) -> anyhow::Result<()> {
    let mut stream = UnixStream::connect(&args.socket)
        .with_context(|| format!("control socket {}", args.socket.display()))?;
    let line = match args.command {
        ControlCommand::Remove => "remove",
        ControlCommand::Insert => "insert",
        ControlCommand::Status => "status",
        ControlCommand::WaitReady => "wait-ready",
    };
    writeln!(stream, "{line}")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    let answer = answer.trim_end();
    println!("{answer}");
    match args.command {
        ControlCommand::Status => Ok(()),
        _ if answer == "ok" => Ok(()),
        _ => anyhow::bail!("the card answered {answer}"),
    }
}

pub fn spawn(path: &Path, reader: Reader) -> anyhow::Result<()> {
    // A stale socket from a killed run would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("control socket {}", path.display()))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let reader = reader.clone();
                let _ = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || client(stream, &reader));
            }
        })
        .context("control thread")?;
    Ok(())
}

fn client(stream: UnixStream, reader: &Reader) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let answer = match line.trim() {
            "remove" => {
                reader.remove();
                "ok".to_owned()
            }
            "insert" => {
                reader.insert();
                ready(reader)
            }
            "wait-ready" => ready(reader),
            "status" => reader.status(),
            _ => "error unknown command (remove, insert, status, wait-ready)".to_owned(),
        };
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

fn ready(reader: &Reader) -> String {
    if reader.wait_ready(READY_TIMEOUT) {
        "ok".to_owned()
    } else {
        "timeout".to_owned()
    }
}
