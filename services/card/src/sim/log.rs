//! The virtual card's APDU log: one line per command with its header, lengths and status word,
//! plus card events (power, reset, removal). Never any data byte: no PIN, PUK, key, challenge or
//! response can end up in it. Tests read it to prove what did (or did not) reach the card.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::apdu::{Command, StatusWord};

/// One logged command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntry {
    /// Class byte.
    pub cla: u8,
    /// Instruction byte.
    pub ins: u8,
    /// Parameter 1.
    pub p1: u8,
    /// Parameter 2.
    pub p2: u8,
    /// Length of the command data.
    pub lc: usize,
    /// Le, when present.
    pub le: Option<usize>,
    /// The card's status word.
    pub sw: StatusWord,
}

impl LogEntry {
    /// The entry of a command and its answer.
    pub fn new(command: &Command, sw: StatusWord) -> Self {
        LogEntry {
            cla: command.cla,
            ins: command.ins,
            p1: command.p1,
            p2: command.p2,
            lc: command.data.len(),
            le: command.le,
            sw,
        }
    }

    /// Parses a line written by [`fmt::Display`]; `None` for event lines and anything else.
    pub fn parse_line(line: &str) -> Option<LogEntry> {
        let mut words = line.split_whitespace();
        if words.next()? != "apdu" {
            return None;
        }
        let mut byte = || u8::from_str_radix(words.next()?, 16).ok();
        let (cla, ins, p1, p2) = (byte()?, byte()?, byte()?, byte()?);
        let lc = words.next()?.strip_prefix("lc=")?.parse().ok()?;
        let le = match words.next()?.strip_prefix("le=")? {
            "-" => None,
            n => Some(n.parse().ok()?),
        };
        let sw = u16::from_str_radix(words.next()?.strip_prefix("sw=")?, 16).ok()?;
        Some(LogEntry {
            cla,
            ins,
            p1,
            p2,
            lc,
            le,
            sw: StatusWord(sw),
        })
    }
}

impl fmt::Display for LogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "apdu {:02X} {:02X} {:02X} {:02X} lc={} le=",
            self.cla, self.ins, self.p1, self.p2, self.lc
        )?;
        match self.le {
            Some(le) => write!(f, "{le}")?,
            None => f.write_str("-")?,
        }
        write!(f, " sw={}", self.sw)
    }
}

/// Card events that are logged besides commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardEvent {
    /// The reader powered the card (or the card was inserted).
    PowerOn,
    /// The reader powered the card down.
    PowerOff,
    /// Warm reset.
    Reset,
    /// The card was pulled out of the reader.
    Removed,
    /// The card was put back.
    Inserted,
}

impl CardEvent {
    fn as_str(self) -> &'static str {
        match self {
            CardEvent::PowerOn => "power-on",
            CardEvent::PowerOff => "power-off",
            CardEvent::Reset => "reset",
            CardEvent::Removed => "removed",
            CardEvent::Inserted => "inserted",
        }
    }
}

/// Where log lines go.
#[derive(Debug)]
pub enum ApduLog {
    /// Appended to a file, one line at a time (readable while the card runs).
    File(File),
    /// Kept in memory (in-process card).
    Memory(Vec<String>),
}

impl ApduLog {
    /// Appends to (or creates) a log file.
    pub fn open(path: &Path) -> std::io::Result<ApduLog> {
        Ok(ApduLog::File(
            OpenOptions::new().create(true).append(true).open(path)?,
        ))
    }

    /// A log in memory.
    pub fn memory() -> ApduLog {
        ApduLog::Memory(Vec::new())
    }

    fn line(&mut self, line: String) {
        match self {
            // A log that cannot be written must not stop the card; the test that reads it fails.
            ApduLog::File(file) => {
                let _ = writeln!(file, "{line}");
            }
            ApduLog::Memory(lines) => lines.push(line),
        }
    }

    /// Logs a command.
    pub fn command(&mut self, entry: LogEntry) {
        self.line(entry.to_string());
    }

    /// Logs an event.
    pub fn event(&mut self, event: CardEvent) {
        self.line(format!("event {}", event.as_str()));
    }

    /// The lines of an in-memory log (empty for a file log).
    pub fn lines(&self) -> &[String] {
        match self {
            ApduLog::File(_) => &[],
            ApduLog::Memory(lines) => lines,
        }
    }
}

/// Reads the commands of a log file (event lines skipped).
pub fn read_entries(path: &Path) -> std::io::Result<Vec<LogEntry>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter_map(LogEntry::parse_line)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_roundtrip_and_carry_no_data() {
        let command = Command::new(0x00, 0x20, 0x00, 0x80).with_data(b"123456\xFF\xFF".to_vec());
        let entry = LogEntry::new(&command, StatusWord(0x63C2));
        let line = entry.to_string();
        assert_eq!(line, "apdu 00 20 00 80 lc=8 le=- sw=63C2");
        assert_eq!(LogEntry::parse_line(&line), Some(entry));
        let with_le = LogEntry::new(&Command::new(0, 0x84, 0, 0).with_le(8), StatusWord::OK);
        assert_eq!(LogEntry::parse_line(&with_le.to_string()), Some(with_le));
        assert_eq!(LogEntry::parse_line("event removed"), None);
        let mut log = ApduLog::memory();
        log.command(entry);
        log.event(CardEvent::Removed);
        assert_eq!(
            log.lines(),
            ["apdu 00 20 00 80 lc=8 le=- sw=63C2", "event removed"]
        );
    }
}
