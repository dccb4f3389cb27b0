//! The in-process transport: a [`CardBackend`] over a [`VirtualCard`] in a simulated reader, so
//! the agent's card code, `cms up` and tests run without pcscd. Clones share the reader, so a
//! test can pull the card out while a transaction is open.

use std::sync::{Arc, Mutex, MutexGuard};

use super::{CardEvent, VirtualCard};
use crate::apdu::{Command, Response};
use crate::backend::{CardBackend, CardError, CardTransaction};

struct Slot {
    card: VirtualCard,
    present: bool,
    /// Bumped on every removal: a transaction begun before it is void.
    insertion: u64,
    in_transaction: bool,
}

/// A simulated reader holding one virtual card.
#[derive(Clone)]
pub struct SimReader {
    slot: Arc<Mutex<Slot>>,
}

impl std::fmt::Debug for SimReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimReader").finish_non_exhaustive()
    }
}

impl SimReader {
    /// A reader with `card` inserted and powered.
    pub fn new(mut card: VirtualCard) -> Self {
        card.event(CardEvent::PowerOn);
        SimReader {
            slot: Arc::new(Mutex::new(Slot {
                card,
                present: true,
                insertion: 0,
                in_transaction: false,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        // A panic while holding the lock leaves a consistent card; keep going.
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pulls the card out: its RAM (challenge, authentication) is lost.
    pub fn remove(&self) {
        let mut slot = self.lock();
        if slot.present {
            slot.present = false;
            slot.insertion += 1;
            slot.card.event(CardEvent::Removed);
        }
    }

    /// Puts the card back (powered, fresh RAM).
    pub fn insert(&self) {
        let mut slot = self.lock();
        if !slot.present {
            slot.present = true;
            slot.card.event(CardEvent::Inserted);
        }
    }

    /// True while the card is in the reader.
    pub fn is_present(&self) -> bool {
        self.lock().present
    }

    /// Runs `f` on the card (tests read counters and the log this way).
    pub fn with_card<R>(&self, f: impl FnOnce(&mut VirtualCard) -> R) -> R {
        f(&mut self.lock().card)
    }
}

impl CardBackend for SimReader {
    fn transaction(&mut self) -> Result<Box<dyn CardTransaction + '_>, CardError> {
        let mut slot = self.lock();
        if !slot.present {
            return Err(CardError::NoCard);
        }
        if slot.in_transaction {
            return Err(CardError::Busy);
        }
        slot.in_transaction = true;
        let insertion = slot.insertion;
        let atr = slot.card.atr();
        drop(slot);
        Ok(Box::new(SimTransaction {
            reader: self.clone(),
            insertion,
            atr,
        }))
    }
}

struct SimTransaction {
    reader: SimReader,
    insertion: u64,
    atr: &'static [u8],
}

impl CardTransaction for SimTransaction {
    fn transmit(&mut self, command: &Command) -> Result<Response, CardError> {
        let mut slot = self.reader.lock();
        if !slot.present || slot.insertion != self.insertion {
            return Err(CardError::Removed);
        }
        // Through the byte encoding, as a reader would deliver it.
        let bytes = command.encode()?;
        let answer = slot.card.transmit(&bytes);
        Ok(Response::parse(&answer)?)
    }

    fn atr(&self) -> &[u8] {
        self.atr
    }
}

impl Drop for SimTransaction {
    fn drop(&mut self) {
        self.reader.lock().in_transaction = false;
    }
}
