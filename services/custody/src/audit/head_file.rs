//! The chain head kept outside the database: a small file beside it, so that a tail cut off
//! the audit table (or a table put back from an older copy) is caught at start without an
//! exported head.
//!
//! The file only ever holds a committed head: the writer hands it a head after the batch's
//! commit (and sync) returned. It is written at most once per [`WRITE_INTERVAL`] while records
//! come in, when the writer falls idle, and when the log closes: not once per batch, which
//! would add a file sync to every commit. After a crash it may lag the database by the last
//! batches; so at start it is a record that must be in the chain unchanged (truncation is a
//! chain that ends before it), never the chain's end. Each write is a new file renamed over
//! the old one after its data is synced: a crash leaves the old head or the new one.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a head is written while records come in.
pub const WRITE_INTERVAL: Duration = Duration::from_secs(1);

const MAGIC: &str = "cms-custody-audit-head v1";

/// Where the head is kept.
#[derive(Clone, Debug)]
pub struct HeadFile {
    path: PathBuf,
}

/// A committed head: the last record's sequence number and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptHead {
    pub seq: u64,
    pub hash: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an audit head file custody wrote")]
    Malformed { path: String },
}

impl HeadFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: std::io::Error) -> HeadFileError {
        HeadFileError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// The kept head, or `None` when there is no file yet.
    pub fn read(&self) -> Result<Option<KeptHead>, HeadFileError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        parse(&text)
            .map(Some)
            .ok_or_else(|| HeadFileError::Malformed {
                path: self.path.display().to_string(),
            })
    }

    /// Replaces the kept head with `head`, durably.
    pub fn write(&self, head: &KeptHead) -> Result<(), HeadFileError> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let text = format!("{MAGIC}\n{}\n{}\n", head.seq, hex(&head.hash));
        let mut file = std::fs::File::create(&tmp).map_err(|e| self.err(e))?;
        file.write_all(text.as_bytes()).map_err(|e| self.err(e))?;
        file.sync_data().map_err(|e| self.err(e))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(|e| self.err(e))?;
        // The rename itself is durable once the directory is synced.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn parse(text: &str) -> Option<KeptHead> {
    let mut lines = text.lines();
    if lines.next()? != MAGIC {
        return None;
    }
    let seq = lines.next()?.parse().ok()?;
    let digits = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let hash = data_encoding::HEXLOWER_PERMISSIVE
        .decode(digits.as_bytes())
        .ok()?;
    Some(KeptHead { seq, hash })
}

/// The writer's side: the last committed head, and when and what was last written.
#[derive(Debug)]
pub(super) struct HeadKeeper {
    file: HeadFile,
    state: Mutex<Kept>,
}

#[derive(Debug)]
struct Kept {
    committed: Option<KeptHead>,
    written_seq: u64,
    written_at: Instant,
}

impl HeadKeeper {
    pub(super) fn new(file: HeadFile, written: Option<&KeptHead>) -> Self {
        Self {
            file,
            state: Mutex::new(Kept {
                committed: None,
                written_seq: written.map_or(0, |h| h.seq),
                written_at: Instant::now(),
            }),
        }
    }

    /// A batch up to `head` is committed (noted before anyone is answered, so that a flush at
    /// shutdown has every head an answer was given for).
    pub(super) fn committed(&self, head: KeptHead) {
        let mut kept = self.state.lock().unwrap_or_else(|p| p.into_inner());
        kept.committed = Some(head);
    }

    /// Writes the last committed head if the last write is old enough.
    pub(super) fn write_if_due(&self) {
        let mut kept = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if kept.written_at.elapsed() >= WRITE_INTERVAL {
            self.write(&mut kept);
        }
    }

    /// Writes the last committed head if the file does not have it yet.
    pub(super) fn flush(&self) {
        let mut kept = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.write(&mut kept);
    }

    /// Whether a committed head waits to be written.
    pub(super) fn pending(&self) -> bool {
        let kept = self.state.lock().unwrap_or_else(|p| p.into_inner());
        kept.committed
            .as_ref()
            .is_some_and(|h| h.seq > kept.written_seq)
    }

    fn write(&self, kept: &mut Kept) {
        let Some(head) = kept.committed.as_ref().filter(|h| h.seq > kept.written_seq) else {
            return;
        };
        // A failed write loses no record (they are in the database); the next one may succeed.
        match self.file.write(head) {
            Ok(()) => kept.written_seq = head.seq,
            Err(e) => {
                tracing::error!(error = %e, "the audit head cannot be kept beside the database")
            }
        }
        kept.written_at = Instant::now();
    }
}

/// Writes the last head when the last handle to the audit log goes (shutdown).
#[derive(Debug)]
pub(super) struct FlushOnDrop(pub(super) std::sync::Arc<HeadKeeper>);

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.0.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_survives_the_round_trip_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = HeadFile::new(dir.path().join("audit.head"));
        assert!(file.read().unwrap().is_none());
        let head = KeptHead {
            seq: 42,
            hash: (0..32).collect(),
        };
        file.write(&head).unwrap();
        assert_eq!(file.read().unwrap(), Some(head));
        std::fs::write(file.path(), "42 deadbeef\n").unwrap();
        assert!(matches!(file.read(), Err(HeadFileError::Malformed { .. })));
    }

    #[test]
    fn the_keeper_writes_only_newer_committed_heads() {
        let dir = tempfile::tempdir().unwrap();
        let file = HeadFile::new(dir.path().join("audit.head"));
        let keeper = HeadKeeper::new(file.clone(), None);
        let head = |seq| KeptHead {
            seq,
            hash: vec![seq as u8; 32],
        };
        // Within the interval nothing is written, until a flush.
        keeper.committed(head(1));
        keeper.write_if_due();
        assert!(keeper.pending());
        assert!(file.read().unwrap().is_none());
        keeper.flush();
        assert_eq!(file.read().unwrap(), Some(head(1)));
        assert!(!keeper.pending());
    }
}
