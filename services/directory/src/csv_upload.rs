//! A CSV upload parsed while it arrives: the chunks of an import stream go to a parser on a
//! blocking thread through a short queue, so that the file is never whole in memory (only the
//! validated records are: an import applies all of them or none).

use std::io::Read;

use cms_proto::directory::v1::ImportError;
use tokio::sync::mpsc;

use crate::import::{Record, parse_source};

/// Chunks waiting for the parser; the upload waits for it beyond that.
const QUEUE_CHUNKS: usize = 16;

/// The bytes of a CSV as they arrive, checked as UTF-8 (a sequence may be split between
/// chunks), without a leading byte-order mark, with their lines and quotes counted.
pub struct Utf8Chunks<I> {
    chunks: I,
    /// Validated bytes not yet read, from `at`.
    ready: Vec<u8>,
    at: usize,
    /// The start of a character whose rest is in the next chunk (or the first bytes of the
    /// file, until it is known whether they are a byte-order mark).
    carry: Vec<u8>,
    started: bool,
    /// Validated bytes so far, and the newlines and quotes among them.
    offset: u64,
    newlines: u64,
    pub quotes: u64,
    /// Set at the first byte that is not UTF-8: nothing after it is read.
    pub invalid: Option<ImportError>,
}

impl<I: Iterator<Item = Vec<u8>>> Utf8Chunks<I> {
    pub fn new(chunks: I) -> Self {
        Self {
            chunks,
            ready: Vec::new(),
            at: 0,
            carry: Vec::new(),
            started: false,
            offset: 0,
            newlines: 0,
            quotes: 0,
            invalid: None,
        }
    }

    /// Reads chunks until some validated bytes are ready; false at the end (or at bad UTF-8).
    fn refill(&mut self) -> bool {
        while self.at >= self.ready.len() && self.invalid.is_none() {
            let Some(chunk) = self.chunks.next() else {
                if !self.carry.is_empty() {
                    // The file ends inside a character (or inside what began as a mark).
                    self.fail();
                }
                return false;
            };
            let mut bytes = std::mem::take(&mut self.carry);
            bytes.extend_from_slice(&chunk);
            if !self.started {
                if bytes.len() < 3 && b"\xEF\xBB\xBF".starts_with(&bytes) {
                    self.carry = bytes;
                    continue;
                }
                self.started = true;
                if bytes.starts_with(b"\xEF\xBB\xBF") {
                    bytes.drain(..3);
                }
            }
            self.accept(bytes);
        }
        self.at < self.ready.len()
    }

    /// Takes the valid UTF-8 at the start of `bytes`, carries an incomplete last character.
    fn accept(&mut self, mut bytes: Vec<u8>) {
        match std::str::from_utf8(&bytes) {
            Ok(_) => {}
            Err(e) if e.error_len().is_none() => self.carry = bytes.split_off(e.valid_up_to()),
            Err(e) => {
                let at = e.valid_up_to();
                bytes.truncate(at);
                self.count(&bytes);
                self.fail();
                return;
            }
        }
        self.count(&bytes);
        self.ready = bytes;
        self.at = 0;
    }

    fn count(&mut self, bytes: &[u8]) {
        self.offset += bytes.len() as u64;
        self.newlines += bytes.iter().filter(|b| **b == b'\n').count() as u64;
        self.quotes += bytes.iter().filter(|b| **b == b'"').count() as u64;
    }

    /// Records bad UTF-8 right after the validated bytes.
    fn fail(&mut self) {
        let at = self.offset;
        self.invalid = Some(ImportError {
            line: self.newlines + 1,
            column: String::new(),
            message: format!(
                "invalid UTF-8 at byte {} of the file: save it as UTF-8",
                at + 1
            ),
        });
        self.ready.clear();
        self.at = 0;
    }
}

impl<I: Iterator<Item = Vec<u8>>> Read for Utf8Chunks<I> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if !self.refill() {
            return Ok(0);
        }
        let n = out.len().min(self.ready.len() - self.at);
        out[..n].copy_from_slice(&self.ready[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// An upload being parsed: [`push`](Self::push) its chunks, then [`finish`](Self::finish).
pub struct CsvUpload {
    queue: Option<mpsc::Sender<Vec<u8>>>,
    parser: tokio::task::JoinHandle<Result<Vec<Record>, Vec<ImportError>>>,
    received: u64,
}

impl CsvUpload {
    pub fn start(has_header: bool, delimiter: u8) -> Self {
        let (queue, mut chunks) = mpsc::channel::<Vec<u8>>(QUEUE_CHUNKS);
        let parser = tokio::task::spawn_blocking(move || {
            let source = std::iter::from_fn(move || chunks.blocking_recv());
            parse_source(Utf8Chunks::new(source), has_header, delimiter)
        });
        Self {
            queue: Some(queue),
            parser,
            received: 0,
        }
    }

    /// Bytes pushed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Hands a chunk to the parser, waiting while its queue is full.
    pub async fn push(&mut self, chunk: Vec<u8>) {
        self.received += chunk.len() as u64;
        if let Some(queue) = &self.queue {
            // The parser never stops reading before the end: a failed send means it failed.
            let _ = queue.send(chunk).await;
        }
    }

    /// The records, or every problem found (with line numbers).
    pub async fn finish(mut self) -> Result<Result<Vec<Record>, Vec<ImportError>>, String> {
        self.queue = None;
        (&mut self.parser)
            .await
            .map_err(|e| format!("parsing task: {e}"))
    }
}

impl Drop for CsvUpload {
    fn drop(&mut self) {
        // An interrupted upload: the parser sees the end of its input and finishes on its own.
        self.queue = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::parse_csv;

    /// `bytes` parsed in chunks of `size` bytes.
    fn in_chunks(bytes: &[u8], size: usize) -> Result<Vec<Record>, Vec<ImportError>> {
        let chunks = bytes.chunks(size).map(<[u8]>::to_vec);
        parse_source(Utf8Chunks::new(chunks), true, b',')
    }

    fn summary(r: Result<Vec<Record>, Vec<ImportError>>) -> String {
        match r {
            Ok(records) => records
                .iter()
                .map(|r| format!("{}:{}:{}", r.line, r.fields.username, r.fields.display_name))
                .collect::<Vec<_>>()
                .join("|"),
            Err(errors) => errors
                .iter()
                .map(|e| format!("{}:{}:{}", e.line, e.column, e.message))
                .collect::<Vec<_>>()
                .join("|"),
        }
    }

    #[test]
    fn any_split_parses_as_the_whole_file() {
        let files: [&[u8]; 6] = [
            "\u{feff}username,display_name\nzoe,Zoë Ström\nolaf,\"Ólafur, \"\"Óli\"\"\"\n"
                .as_bytes(),
            "username,display_name\nann,Ann\nbob,\"Bob\nca,Carl\n".as_bytes(),
            b"username,display_name\nann,Ann\n\xff\xfe,x\n",
            b"username,display_name\nann,Ann\xc3",
            b"\xef\xbb",
            b"username,email\njdoe,j@example.com\nbad,not-an-email\n",
        ];
        for file in files {
            let whole = summary(parse_csv(file, true, b','));
            for size in [1, 2, 3, 5, 64] {
                assert_eq!(summary(in_chunks(file, size)), whole, "chunks of {size}");
            }
        }
    }

    #[test]
    fn bad_utf8_is_found_across_chunks() {
        let file = "username,display_name\nzoe,Zoë\nx\u{e9}".as_bytes();
        let mut cut = file.to_vec();
        cut.truncate(cut.len() - 1); // "é" without its second byte, at the end of the file
        let errors = in_chunks(&cut, 1).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 3);
        assert!(
            errors[0].message.contains("invalid UTF-8 at byte"),
            "{errors:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_upload_is_parsed_while_it_arrives() {
        let mut upload = CsvUpload::start(true, b',');
        upload.push(b"username,display_name\nann,A".to_vec()).await;
        upload
            .push("nn\nzoe,Zo\u{eb}".as_bytes()[..10].to_vec())
            .await;
        upload.push(b"\xab\n".to_vec()).await;
        assert_eq!(upload.received(), 39);
        let records = upload.finish().await.unwrap().unwrap();
        assert_eq!(summary(Ok(records)), "2:ann:Ann|3:zoe:Zoë");
    }
}
