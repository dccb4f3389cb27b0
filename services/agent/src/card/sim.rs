//! The in-process virtual card as [`Readers`]: simulated readers (cms-card's `SimReader`), so
//! tests and `cms up` run the agent's real card code without pcscd.

use std::time::Duration;

use cms_card::backend::{CardBackend, CardError};
use cms_card::sim::SimReader;

use super::readers::{EventSink, ReaderStatus, Readers, Sharing, WatchGuard, poll_watch};

/// Named simulated readers.
#[derive(Debug, Clone, Default)]
pub struct SimReaders {
    readers: Vec<(String, SimReader)>,
}

impl SimReaders {
    /// Adds a reader (a clone of `reader` shares its card: tests keep one to pull the card).
    pub fn with(mut self, name: &str, reader: SimReader) -> Self {
        self.readers.push((name.to_owned(), reader));
        self
    }

    fn snapshot(readers: &[(String, SimReader)]) -> Vec<ReaderStatus> {
        readers
            .iter()
            .map(|(name, reader)| {
                let present = reader.is_present();
                ReaderStatus {
                    name: name.clone(),
                    card_present: present,
                    atr: if present {
                        reader.with_card(|c| c.atr().to_vec())
                    } else {
                        Vec::new()
                    },
                    in_use: false,
                }
            })
            .collect()
    }
}

impl Readers for SimReaders {
    fn list(&self) -> Result<Vec<ReaderStatus>, CardError> {
        Ok(Self::snapshot(&self.readers))
    }

    fn open(&self, reader: &str, _sharing: Sharing) -> Result<Box<dyn CardBackend>, CardError> {
        let (_, sim) = self
            .readers
            .iter()
            .find(|(name, _)| name == reader)
            .ok_or(CardError::ReaderGone)?;
        if !sim.is_present() {
            return Err(CardError::NoCard);
        }
        Ok(Box::new(sim.clone()))
    }

    fn watch(&self, initial_state: bool, sink: EventSink) -> Result<WatchGuard, CardError> {
        let readers = self.readers.clone();
        poll_watch(
            move || Ok(Self::snapshot(&readers)),
            Duration::from_millis(20),
            initial_state,
            sink,
        )
    }
}
