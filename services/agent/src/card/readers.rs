//! The readers the agent sees, behind one trait: PC/SC (cms-card-pcsc) in production, and any
//! other [`Readers`] (the in-process virtual card) in tests and `cms up`.

use std::time::Duration;

use cms_card::backend::{CardBackend, CardError};
pub use cms_card_pcsc::{ReaderEvent, ReaderStatus, Sharing, Watch};

/// Receives reader events (or the error that ended the watch) on the watcher's thread.
pub type EventSink = Box<dyn FnMut(Result<ReaderEvent, CardError>) -> Watch + Send>;

/// Stops a watch when dropped.
pub struct WatchGuard(Option<Box<dyn FnOnce() + Send>>);

impl WatchGuard {
    pub fn new(stop: impl FnOnce() + Send + 'static) -> Self {
        WatchGuard(Some(Box::new(stop)))
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            stop();
        }
    }
}

/// Where the agent finds readers and cards. All methods block.
pub trait Readers: Send + Sync {
    /// Every reader with its card state.
    fn list(&self) -> Result<Vec<ReaderStatus>, CardError>;
    /// Opens the card in `reader`.
    fn open(&self, reader: &str, sharing: Sharing) -> Result<Box<dyn CardBackend>, CardError>;
    /// Starts watching on a thread of its own; the watch ends when the guard is dropped, the
    /// sink says stop, or the stack fails (the sink gets the error).
    fn watch(&self, initial_state: bool, sink: EventSink) -> Result<WatchGuard, CardError>;
}

/// Picks the reader to use: the named one, or the only reader holding a card.
pub fn choose(readers: &dyn Readers, name: &str) -> Result<String, ChooseError> {
    let list = readers.list().map_err(ChooseError::Card)?;
    if !name.is_empty() {
        return match list.iter().find(|r| r.name == name) {
            Some(_) => Ok(name.to_owned()),
            None => Err(ChooseError::Card(CardError::ReaderGone)),
        };
    }
    let with_card: Vec<&ReaderStatus> = list.iter().filter(|r| r.card_present).collect();
    match with_card.as_slice() {
        [one] => Ok(one.name.clone()),
        [] if list.is_empty() => Err(ChooseError::NoReader),
        [] => Err(ChooseError::Card(CardError::NoCard)),
        _ => Err(ChooseError::Several),
    }
}

/// Why no reader could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChooseError {
    #[error("no card reader is connected")]
    NoReader,
    #[error("several readers hold a card: name the reader")]
    Several,
    #[error(transparent)]
    Card(CardError),
}

/// How long opening a card waits while another connection holds it exclusively.
const BUSY_WAIT: Duration = Duration::from_secs(2);

/// PC/SC through pcscd. A context is established per call, so the agent starts (and keeps
/// running) while pcscd is down and works again as soon as it is back.
#[derive(Debug, Default, Clone, Copy)]
pub struct PcscReaders;

impl Readers for PcscReaders {
    fn list(&self) -> Result<Vec<ReaderStatus>, CardError> {
        cms_card_pcsc::Pcsc::establish()?.readers()
    }

    fn open(&self, reader: &str, sharing: Sharing) -> Result<Box<dyn CardBackend>, CardError> {
        let pcsc = cms_card_pcsc::Pcsc::establish()?;
        // Another application (or our own session that just ended) may hold the card for a
        // moment: wait a little before saying it is in use.
        let deadline = std::time::Instant::now() + BUSY_WAIT;
        loop {
            match pcsc.connect(reader, sharing) {
                Ok(card) => return Ok(Box::new(card)),
                Err(CardError::Busy) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn watch(&self, initial_state: bool, mut sink: EventSink) -> Result<WatchGuard, CardError> {
        let watcher = cms_card_pcsc::Pcsc::establish()?.watcher()?;
        let canceller = watcher.canceller();
        std::thread::Builder::new()
            .name("pcsc-watch".into())
            .spawn(move || {
                let result = watcher.run(initial_state, |event| sink(Ok(event)));
                if let Err(e) = result {
                    sink(Err(e));
                }
            })
            .map_err(|e| CardError::Transport(format!("cannot start the reader watch: {e}")))?;
        Ok(WatchGuard::new(move || canceller.cancel()))
    }
}

/// A watch for readers that cannot notify: compares `list` snapshots every `interval`.
pub fn poll_watch<F>(
    list: F,
    interval: Duration,
    initial_state: bool,
    mut sink: EventSink,
) -> Result<WatchGuard, CardError>
where
    F: Fn() -> Result<Vec<ReaderStatus>, CardError> + Send + 'static,
{
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let mut before: Vec<ReaderStatus> = if initial_state { Vec::new() } else { list()? };
    std::thread::Builder::new()
        .name("reader-poll".into())
        .spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let now = match list() {
                    Ok(now) => now,
                    Err(e) => {
                        sink(Err(e));
                        return;
                    }
                };
                for event in diff(&before, &now) {
                    if sink(Ok(event)) == Watch::Stop {
                        return;
                    }
                }
                before = now;
                std::thread::sleep(interval);
            }
        })
        .map_err(|e| CardError::Transport(format!("cannot start the reader watch: {e}")))?;
    Ok(WatchGuard::new(move || {
        stop.store(true, std::sync::atomic::Ordering::Relaxed)
    }))
}

/// The events that turn snapshot `before` into `now`.
pub fn diff(before: &[ReaderStatus], now: &[ReaderStatus]) -> Vec<ReaderEvent> {
    let mut events = Vec::new();
    for old in before {
        match now.iter().find(|r| r.name == old.name) {
            None => {
                if old.card_present {
                    events.push(ReaderEvent::CardRemoved {
                        reader: old.name.clone(),
                    });
                }
                events.push(ReaderEvent::ReaderRemoved {
                    reader: old.name.clone(),
                });
            }
            Some(new) => {
                let swapped = old.card_present && new.card_present && old.atr != new.atr;
                if old.card_present && (!new.card_present || swapped) {
                    events.push(ReaderEvent::CardRemoved {
                        reader: new.name.clone(),
                    });
                }
                if new.card_present && (!old.card_present || swapped) {
                    events.push(ReaderEvent::CardInserted {
                        reader: new.name.clone(),
                        atr: new.atr.clone(),
                    });
                }
            }
        }
    }
    for new in now {
        if !before.iter().any(|r| r.name == new.name) {
            events.push(ReaderEvent::ReaderAdded {
                reader: new.name.clone(),
            });
            if new.card_present {
                events.push(ReaderEvent::CardInserted {
                    reader: new.name.clone(),
                    atr: new.atr.clone(),
                });
            }
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(name: &str, atr: &[u8]) -> ReaderStatus {
        ReaderStatus {
            name: name.into(),
            card_present: !atr.is_empty(),
            atr: atr.to_vec(),
            in_use: false,
        }
    }

    #[test]
    fn snapshot_differences_become_events() {
        let before = [reader("A", &[1]), reader("B", &[])];
        let now = [reader("A", &[2]), reader("C", &[3])];
        assert_eq!(
            diff(&before, &now),
            vec![
                ReaderEvent::CardRemoved { reader: "A".into() },
                ReaderEvent::CardInserted {
                    reader: "A".into(),
                    atr: vec![2]
                },
                ReaderEvent::ReaderRemoved { reader: "B".into() },
                ReaderEvent::ReaderAdded { reader: "C".into() },
                ReaderEvent::CardInserted {
                    reader: "C".into(),
                    atr: vec![3]
                },
            ]
        );
        assert!(diff(&now, &now).is_empty());
    }
}
