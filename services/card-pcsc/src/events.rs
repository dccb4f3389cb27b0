//! Reader and card insertion/removal events (the model is pcsc-rust's examples/monitor.rs):
//! one blocking loop over SCardGetStatusChange, with the PnP pseudo-reader so that readers
//! that appear are picked up at once.

use std::collections::HashMap;
use std::ffi::CString;
use std::time::Duration;

use cms_card::backend::CardError;
use pcsc::{Context, PNP_NOTIFICATION, ReaderState, State};

use crate::error::card_error;
use crate::readers::{Pcsc, name_of, reader_status};

/// A change of a reader or of the card in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderEvent {
    /// A reader appeared.
    ReaderAdded { reader: String },
    /// A reader disappeared (a card in it is reported removed first).
    ReaderRemoved { reader: String },
    /// A card was inserted.
    CardInserted { reader: String, atr: Vec<u8> },
    /// A card was removed: any card session on it is gone.
    CardRemoved { reader: String },
}

/// What the event callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    Continue,
    Stop,
}

/// Stops a running [`ReaderWatcher::run`] from another thread.
#[derive(Clone)]
pub struct WatchCanceller {
    context: Context,
}

impl std::fmt::Debug for WatchCanceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchCanceller").finish_non_exhaustive()
    }
}

impl WatchCanceller {
    /// Makes the watcher's pending wait return; the watcher then ends.
    pub fn cancel(&self) {
        let _ = self.context.cancel();
    }
}

/// Watches every reader until cancelled, the callback says stop, or pcscd goes away.
pub struct ReaderWatcher {
    context: Context,
    /// Upper bound of one wait, so a PC/SC stack without PnP notification still sees new
    /// readers.
    poll: Duration,
}

impl std::fmt::Debug for ReaderWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderWatcher").finish_non_exhaustive()
    }
}

/// What the watcher remembers of a reader between waits.
struct Known {
    present: bool,
    events: u32,
}

impl Pcsc {
    /// A watcher on its own PC/SC context (a blocked wait must not hold up other calls).
    pub fn watcher(&self) -> Result<ReaderWatcher, CardError> {
        let context = Context::establish(pcsc::Scope::User).map_err(card_error)?;
        Ok(ReaderWatcher {
            context,
            poll: Duration::from_millis(1_000),
        })
    }
}

fn is_dead(state: &ReaderState) -> bool {
    state
        .event_state()
        .intersects(State::UNKNOWN | State::IGNORE)
}

impl ReaderWatcher {
    /// A handle that stops [`ReaderWatcher::run`].
    pub fn canceller(&self) -> WatchCanceller {
        WatchCanceller {
            context: self.context.clone(),
        }
    }

    /// Runs the watch loop on the calling thread (blocking). With `initial_state`, the
    /// readers and cards present at start are reported first as added and inserted.
    /// Returns `Ok` when cancelled or stopped by the callback; `Err` when pcscd goes away.
    pub fn run(
        self,
        initial_state: bool,
        mut on_event: impl FnMut(ReaderEvent) -> Watch,
    ) -> Result<(), CardError> {
        let mut states = vec![ReaderState::new(PNP_NOTIFICATION(), State::UNAWARE)];
        let mut known: HashMap<String, Known> = HashMap::new();
        let mut first = true;
        loop {
            let mut events = Vec::new();
            // Readers that went away.
            states.retain(|rs| {
                if rs.name() == PNP_NOTIFICATION() || !is_dead(rs) {
                    return true;
                }
                let name = name_of(rs.name());
                if let Some(k) = known.remove(&name) {
                    if k.present {
                        events.push(ReaderEvent::CardRemoved {
                            reader: name.clone(),
                        });
                    }
                    events.push(ReaderEvent::ReaderRemoved { reader: name });
                }
                false
            });
            // Readers that appeared.
            let names = match self.context.list_readers_owned() {
                Ok(names) => names,
                Err(pcsc::Error::NoReadersAvailable) => Vec::new(),
                Err(pcsc::Error::Cancelled) => return Ok(()),
                Err(e) => return Err(card_error(e)),
            };
            for name in names {
                if !states.iter().any(|rs| rs.name() == name.as_c_str()) {
                    states.push(ReaderState::new(name, State::UNAWARE));
                }
            }
            // A listed reader that is no longer in the list is gone too.
            for rs in &mut states {
                rs.sync_current_state();
            }
            if emit(&mut events, &mut on_event) == Watch::Stop {
                return Ok(());
            }
            match self.context.get_status_change(self.poll, &mut states) {
                Ok(()) | Err(pcsc::Error::Timeout) => {}
                Err(pcsc::Error::Cancelled) => return Ok(()),
                Err(pcsc::Error::UnknownReader) => {
                    // A reader vanished between listing and waiting: drop unknown ones.
                    let current: Vec<CString> =
                        self.context.list_readers_owned().unwrap_or_default();
                    states.retain(|rs| {
                        rs.name() == PNP_NOTIFICATION()
                            || current.iter().any(|n| n.as_c_str() == rs.name())
                    });
                    continue;
                }
                Err(e) => return Err(card_error(e)),
            }
            for rs in &states {
                if rs.name() == PNP_NOTIFICATION() || is_dead(rs) {
                    continue;
                }
                let status = reader_status(rs);
                let count = rs.event_count();
                match known.get_mut(&status.name) {
                    None => {
                        if !first || initial_state {
                            events.push(ReaderEvent::ReaderAdded {
                                reader: status.name.clone(),
                            });
                            if status.card_present {
                                events.push(ReaderEvent::CardInserted {
                                    reader: status.name.clone(),
                                    atr: status.atr.clone(),
                                });
                            }
                        }
                        known.insert(
                            status.name,
                            Known {
                                present: status.card_present,
                                events: count,
                            },
                        );
                    }
                    Some(k) => {
                        // The event counter also catches a removal and re-insertion that
                        // happened between two waits.
                        let swapped =
                            k.present && status.card_present && count.wrapping_sub(k.events) >= 2;
                        if k.present && (!status.card_present || swapped) {
                            events.push(ReaderEvent::CardRemoved {
                                reader: status.name.clone(),
                            });
                        }
                        if status.card_present && (!k.present || swapped) {
                            events.push(ReaderEvent::CardInserted {
                                reader: status.name.clone(),
                                atr: status.atr.clone(),
                            });
                        }
                        k.present = status.card_present;
                        k.events = count;
                    }
                }
            }
            first = false;
            if emit(&mut events, &mut on_event) == Watch::Stop {
                return Ok(());
            }
        }
    }
}

fn emit(events: &mut Vec<ReaderEvent>, on_event: &mut impl FnMut(ReaderEvent) -> Watch) -> Watch {
    for event in events.drain(..) {
        if on_event(event) == Watch::Stop {
            return Watch::Stop;
        }
    }
    Watch::Continue
}
