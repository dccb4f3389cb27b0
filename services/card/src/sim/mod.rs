//! The virtual card: both profiles of DESIGN.md section 5 over one persistent state, as the
//! `cms-vcard` binary serves it to pcscd's vpcd driver and as [`SimReader`] serves it in process.
//!
//! Card behaviour that the CMS relies on and that this card reproduces:
//! * retry counters: PIN 3 tries, admin/management key and PUK 5 tries; a failed attempt is
//!   written to the card file before the card answers, so a killed card cannot forget it; an
//!   admin key or PUK at zero is blocked for good;
//! * a challenge (GET CHALLENGE, or a GENERAL AUTHENTICATE witness or challenge) is valid for the
//!   very next command only: any other command, a reset or a removal kills it;
//! * authentication states (PIN verified, admin key authenticated) live in RAM and die with a
//!   reset or a removal;
//! * an [`ApduLog`] of headers and status words, never data.

mod inproc;
pub mod log;
mod minidriver;
mod piv;
pub mod state;

use std::path::{Path, PathBuf};

use cms_cardcrypto::SecretKey;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::apdu::{Command, Response, StatusWord};
use crate::iso7816;

pub use inproc::SimReader;
pub use log::{ApduLog, CardEvent, LogEntry};
pub use state::{CardState, Profile, StateError};

/// 6581: memory failure (the card file could not be written).
const MEMORY_FAILURE: StatusWord = StatusWord(0x6581);

/// ATR of the minidriver profile: T=1, historical bytes "CMSvcardMD" (proprietary category).
pub const ATR_MINIDRIVER: [u8; 14] = atr(b"CMSvcardMD");
/// ATR of the PIV profile: T=1, historical bytes "CMSvcardPIV" (proprietary category).
pub const ATR_PIV: [u8; 15] = atr(b"CMSvcardPIV");

/// Builds `3B 8K 01 <K historical bytes> TCK` (N = K + 4): TD1 announces T=1, so TCK is
/// required.
const fn atr<const N: usize>(historical: &[u8]) -> [u8; N] {
    let k = historical.len();
    assert!(k + 4 == N && k <= 15);
    let mut out = [0u8; N];
    out[0] = 0x3B;
    out[1] = 0x80 | k as u8;
    out[2] = 0x01;
    let mut i = 0;
    while i < k {
        out[3 + i] = historical[i];
        i += 1;
    }
    // TCK: XOR of T0 .. the last historical byte.
    let mut tck = 0u8;
    let mut j = 1;
    while j < 3 + k {
        tck ^= out[j];
        j += 1;
    }
    out[3 + k] = tck;
    out
}

/// What a challenge-issuing command left for the next one.
enum Pending {
    /// A challenge the host must encrypt (minidriver GET CHALLENGE, PIV `81`).
    Challenge(Zeroizing<Vec<u8>>),
    /// A PIV witness: the plaintext the host must send back after decrypting it.
    Witness(Zeroizing<Vec<u8>>),
}

/// RAM of the card: gone with a reset or a removal.
#[derive(Default)]
struct Session {
    pending: Option<Pending>,
    pin_verified: bool,
    admin_authenticated: bool,
    /// Command chaining (CLA bit 5): header and data received so far.
    chain: Option<(u8, u8, u8, Zeroizing<Vec<u8>>)>,
    /// Response data that did not fit the last Le, for GET RESPONSE.
    remaining: Option<Zeroizing<Vec<u8>>>,
}

/// The references with retry counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reference {
    Pin,
    Puk,
    Admin,
}

/// A virtual smart card.
pub struct VirtualCard {
    state: CardState,
    store: Option<PathBuf>,
    session: Session,
    log: Option<ApduLog>,
    rng: SystemRandom,
}

impl std::fmt::Debug for VirtualCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualCard")
            .field("state", &self.state)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

type Answer = Result<Response, StatusWord>;

impl VirtualCard {
    /// A card whose state lives only in memory.
    pub fn new(state: CardState) -> Self {
        VirtualCard {
            state,
            store: None,
            session: Session::default(),
            log: None,
            rng: SystemRandom::new(),
        }
    }

    /// A card backed by a card file: loaded now, rewritten on every change.
    pub fn open(card_file: &Path) -> Result<Self, StateError> {
        let mut card = VirtualCard::new(CardState::load(card_file)?);
        card.store = Some(card_file.to_owned());
        Ok(card)
    }

    /// Logs commands and events to `log`.
    pub fn with_log(mut self, log: ApduLog) -> Self {
        self.log = Some(log);
        self
    }

    /// The log, if any.
    pub fn log(&self) -> Option<&ApduLog> {
        self.log.as_ref()
    }

    /// The persistent state (tests read counters from it).
    pub fn state(&self) -> &CardState {
        &self.state
    }

    /// The answer to reset.
    pub fn atr(&self) -> &'static [u8] {
        match self.state.profile {
            Profile::Minidriver => &ATR_MINIDRIVER,
            Profile::Piv => &ATR_PIV,
        }
    }

    /// Power-on, power-off, reset, removal or insertion: the card's RAM is cleared (challenge,
    /// authentication states, chaining).
    pub fn event(&mut self, event: CardEvent) {
        self.session = Session::default();
        if let Some(log) = &mut self.log {
            log.event(event);
        }
    }

    /// Processes raw command bytes, as a reader delivers them.
    pub fn transmit(&mut self, apdu: &[u8]) -> Zeroizing<Vec<u8>> {
        match Command::parse(apdu) {
            Ok(command) => self.process(&command).encode(),
            Err(_) => {
                // Even a malformed command kills a challenge.
                self.session.pending = None;
                Response::status(StatusWord::WRONG_LENGTH).encode()
            }
        }
    }

    /// Processes one command.
    pub fn process(&mut self, command: &Command) -> Response {
        let remaining = self.session.remaining.take();
        let response = if command.ins == iso7816::ins::GET_RESPONSE && command.cla == iso7816::CLA {
            // Transport level (the rest of the previous answer): the challenge lives on.
            match remaining {
                Some(data) => self.limit_to_le(data, command.le),
                None => Response::status(StatusWord::CONDITIONS_NOT_SATISFIED),
            }
        } else {
            // The challenge is valid for this command only, whatever it is.
            let pending = self.session.pending.take();
            match self.dispatch(command, pending) {
                Ok(mut response) if response.is_ok() => {
                    let data = response.take_data();
                    self.limit_to_le(data, command.le)
                }
                Ok(response) => response,
                Err(sw) => Response::status(sw),
            }
        };
        if let Some(log) = &mut self.log {
            log.command(LogEntry::new(command, response.sw));
        }
        response
    }

    /// Sends at most Le bytes (256 when Le is absent); the rest waits for GET RESPONSE, announced
    /// with 61xx, as PIV cards do when a client first asks for a few bytes of an object.
    fn limit_to_le(&mut self, mut data: Zeroizing<Vec<u8>>, le: Option<usize>) -> Response {
        let limit = le.unwrap_or(crate::apdu::SHORT_MAX_LE);
        if data.len() <= limit {
            return Response {
                data,
                sw: StatusWord::OK,
            };
        }
        let rest = Zeroizing::new(data.split_off(limit));
        let announced = rest.len().min(crate::apdu::SHORT_MAX_LE) as u8; // 256 -> 00
        self.session.remaining = Some(rest);
        Response {
            data,
            sw: StatusWord::from_bytes(0x61, announced),
        }
    }

    fn dispatch(&mut self, command: &Command, pending: Option<Pending>) -> Answer {
        if command.cla & !iso7816::CLA_CHAINING != iso7816::CLA {
            self.session.chain = None;
            return Err(StatusWord::CLA_NOT_SUPPORTED);
        }
        let header = (command.ins, command.p1, command.p2);
        let mut data = match self.session.chain.take() {
            Some((ins, p1, p2, data)) if (ins, p1, p2) == header => data,
            Some(_) => return Err(StatusWord::CONDITIONS_NOT_SATISFIED),
            None => Zeroizing::new(Vec::new()),
        };
        data.extend_from_slice(&command.data);
        if command.cla & iso7816::CLA_CHAINING != 0 {
            if data.len() > crate::apdu::EXTENDED_MAX_DATA {
                return Err(StatusWord::WRONG_LENGTH);
            }
            self.session.chain = Some((command.ins, command.p1, command.p2, data));
            return Ok(Response::status(StatusWord::OK));
        }
        let whole = Command {
            cla: iso7816::CLA,
            ins: command.ins,
            p1: command.p1,
            p2: command.p2,
            data,
            le: command.le,
        };
        match self.state.profile {
            Profile::Minidriver => minidriver::handle(self, &whole, pending),
            Profile::Piv => piv::handle(self, &whole, pending),
        }
    }

    fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>, StatusWord> {
        let mut out = Zeroizing::new(vec![0u8; len]);
        self.rng.fill(&mut out).map_err(|_| StatusWord::UNKNOWN)?;
        Ok(out)
    }

    fn tries(&self, reference: Reference) -> u8 {
        match reference {
            Reference::Pin => self.state.pin_tries,
            Reference::Puk => self.state.puk_tries,
            Reference::Admin => self.state.admin_tries,
        }
    }

    fn max_tries(reference: Reference) -> u8 {
        match reference {
            Reference::Pin => state::PIN_TRIES,
            Reference::Puk => state::PUK_TRIES,
            Reference::Admin => state::ADMIN_TRIES,
        }
    }

    fn set_tries(&mut self, reference: Reference, tries: u8) {
        match reference {
            Reference::Pin => self.state.pin_tries = tries,
            Reference::Puk => self.state.puk_tries = tries,
            Reference::Admin => self.state.admin_tries = tries,
        }
    }

    /// Writes the state to the card file (if any). A card that cannot remember must not answer.
    fn persist(&mut self) -> Result<(), StatusWord> {
        match &self.store {
            Some(path) => self.state.save(path).map_err(|_| MEMORY_FAILURE),
            None => Ok(()),
        }
    }

    /// 6983 when the reference is blocked: checked before any comparison.
    fn ensure_usable(&self, reference: Reference) -> Result<(), StatusWord> {
        if self.tries(reference) == 0 {
            Err(StatusWord::AUTH_METHOD_BLOCKED)
        } else {
            Ok(())
        }
    }

    /// The status of a reference without trying it: 63Cx, or 6983 when blocked.
    fn tries_status(&self, reference: Reference) -> StatusWord {
        match self.tries(reference) {
            0 => StatusWord::AUTH_METHOD_BLOCKED,
            n => StatusWord::tries_remaining(n),
        }
    }

    /// Records the outcome of a comparison: a failure costs a try (persisted before answering,
    /// 63Cx), a success restores the counter.
    fn record_attempt(&mut self, reference: Reference, matched: bool) -> Result<(), StatusWord> {
        let tries = self.tries(reference);
        if matched {
            let max = Self::max_tries(reference);
            if tries != max {
                self.set_tries(reference, max);
                self.persist()?;
            }
            Ok(())
        } else {
            let left = tries.saturating_sub(1);
            self.set_tries(reference, left);
            self.persist()?;
            Err(StatusWord::tries_remaining(left))
        }
    }

    /// Checks a PIN or PUK value in constant time, with the counter.
    fn check_secret(&mut self, reference: Reference, candidate: &[u8]) -> Result<(), StatusWord> {
        self.ensure_usable(reference)?;
        let stored: &[u8] = match reference {
            Reference::Pin => &self.state.pin,
            Reference::Puk => self.state.puk.as_deref().map_or(&[][..], |p| &p[..]),
            Reference::Admin => return Err(StatusWord::REFERENCE_NOT_FOUND),
        };
        let matched = cms_cardcrypto::primitives::ct_eq(stored, candidate);
        let result = self.record_attempt(reference, matched);
        if reference == Reference::Pin {
            self.session.pin_verified = result.is_ok();
        }
        result
    }

    /// Sets a new PIN (counter restored) and persists it.
    fn set_pin(&mut self, pin: &[u8]) -> Result<(), StatusWord> {
        self.state.pin = Zeroizing::new(pin.to_vec());
        self.state.pin_tries = state::PIN_TRIES;
        self.persist()
    }

    fn admin_key(&self) -> &SecretKey {
        &self.state.admin_key
    }
}

#[cfg(test)]
mod tests;
