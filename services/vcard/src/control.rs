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
