//! Offline challenge sessions. GetChallenge opens the card exclusively, begins a transaction
//! and reads the challenge; the transaction stays open on the session's own thread until
//! ApplyResponse, CancelChallenge or the timeout, because any other command, a reset or a
//! removal kills the challenge in the card. A session answers at most one response: after a
//! wrong one the card's challenge is gone too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use cms_card::backend::CardError;
use cms_cardcrypto::Zeroizing;
use cms_proto::agent::v1::{UnblockOutcome, UnblockResult};
use cms_proto::common::v1::ErrorReason;
use tokio::sync::oneshot;

use super::outcome::result;
use crate::card::minidriver;
use crate::card::profile::{CardFacts, Profile, detect};
use crate::card::readers::{Readers, Sharing};
use crate::error::Error;

/// What the session thread is asked to do.
enum Command {
    Apply {
        response: Zeroizing<Vec<u8>>,
        new_pin: Zeroizing<String>,
        reply: oneshot::Sender<UnblockResult>,
    },
    /// Ends the session; `done` is answered once the card is released.
    Cancel { done: oneshot::Sender<()> },
}

struct Session {
    commands: mpsc::Sender<Command>,
    facts: CardFacts,
    expires: Instant,
}

/// A challenge session just opened.
#[derive(Debug)]
pub struct Opened {
    pub handle: String,
    pub challenge: Zeroizing<Vec<u8>>,
    pub facts: CardFacts,
    pub expires_at: SystemTime,
}

/// The open challenge sessions of this agent.
#[derive(Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
}

fn lost(message: &str) -> UnblockResult {
    result(
        UnblockOutcome::SessionLost,
        ErrorReason::CardSessionLost,
        message,
    )
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock leaves the map consistent (plain inserts/removes).
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session on the card in `reader` and returns its challenge.
    pub async fn open(
        &self,
        readers: Arc<dyn Readers>,
        reader: String,
        expected_card_id: Vec<u8>,
        timeout: Duration,
    ) -> Result<Opened, Error> {
        let now = Instant::now();
        self.lock().retain(|_, s| s.expires > now);
        let (ready_tx, ready_rx) = oneshot::channel();
        let (commands, inbox) = mpsc::channel();
        let thread_reader = reader.clone();
        std::thread::Builder::new()
            .name("card-session".into())
            .spawn(move || {
                run(
                    readers,
                    &thread_reader,
                    &expected_card_id,
                    timeout,
                    ready_tx,
                    inbox,
                )
            })
            .map_err(|e| {
                Error::Card(CardError::Transport(format!(
                    "cannot start a card session: {e}"
                )))
            })?;
        let (facts, challenge) = ready_rx
            .await
            .map_err(|_| Error::Card(CardError::Transport("the card session ended".into())))??;
        let handle = uuid::Uuid::new_v4().simple().to_string();
        let expires = Instant::now() + timeout;
        self.lock().insert(
            handle.clone(),
            Session {
                commands,
                facts: facts.clone(),
                expires,
            },
        );
        Ok(Opened {
            handle,
            challenge,
            facts,
            expires_at: SystemTime::now() + timeout,
        })
    }

    /// The card facts of an open session (to check the typed response and PIN against).
    pub fn facts(&self, handle: &str) -> Result<CardFacts, UnblockResult> {
        match self.lock().get(handle) {
            Some(s) if s.expires > Instant::now() => Ok(s.facts.clone()),
            Some(_) => Err(lost(
                "the challenge expired: start again with a new challenge",
            )),
            None => Err(lost(
                "no such challenge (expired, cancelled or already answered): start again with a new challenge",
            )),
        }
    }

    /// Sends the checked response and new PIN to the session; the session ends with it.
    pub async fn apply(
        &self,
        handle: &str,
        response: Zeroizing<Vec<u8>>,
        new_pin: Zeroizing<String>,
    ) -> UnblockResult {
        let Some(session) = self.lock().remove(handle) else {
            return lost(
                "no such challenge (expired, cancelled or already answered): start again with a new challenge",
            );
        };
        let (reply, answer) = oneshot::channel();
        let sent = session.commands.send(Command::Apply {
            response,
            new_pin,
            reply,
        });
        if sent.is_err() {
            return lost("the challenge expired: start again with a new challenge");
        }
        answer
            .await
            .unwrap_or_else(|_| lost("the card session ended: start again with a new challenge"))
    }

    /// Ends a session; its challenge dies with the transaction. False when unknown.
    pub async fn cancel(&self, handle: &str) -> bool {
        let Some(session) = self.lock().remove(handle) else {
            return false;
        };
        let (done, released) = oneshot::channel();
        if session.commands.send(Command::Cancel { done }).is_ok() {
            // Answer only once the card is free, so the caller's next call finds it so. The
            // thread answers at once; the bound only guards against a card that hangs.
            let _ = tokio::time::timeout(Duration::from_secs(5), released).await;
        }
        true
    }
}

type Ready = Result<(CardFacts, Zeroizing<Vec<u8>>), Error>;

/// The session thread: card, transaction, challenge, then one command or the timeout.
fn run(
    readers: Arc<dyn Readers>,
    reader: &str,
    expected_card_id: &[u8],
    timeout: Duration,
    ready: oneshot::Sender<Ready>,
    inbox: mpsc::Receiver<Command>,
) {
    let mut backend = match readers.open(reader, Sharing::Exclusive) {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(Error::Card(e)));
            return;
        }
    };
    let mut tx = match backend.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            let _ = ready.send(Err(Error::Card(e)));
            return;
        }
    };
    let opened = (|| {
        let mut facts = detect(&mut *tx, reader).map_err(Error::Card)?;
        check_card(&facts, expected_card_id)?;
        let challenge = minidriver::get_challenge(&mut *tx).map_err(Error::Card)?;
        facts.challenge_length = challenge.len();
        Ok((facts, challenge))
    })();
    let failed = opened.is_err();
    if ready.send(opened).is_err() || failed {
        return;
    }
    let deadline = Instant::now() + timeout;
    match inbox.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(Command::Apply {
            response,
            new_pin,
            reply,
        }) => {
            let outcome =
                super::authenticate_and_reset(&mut *tx, &response, new_pin.as_bytes(), "admin key");
            // Release the card before answering, so the caller's next call finds it free.
            drop(tx);
            drop(backend);
            let _ = reply.send(outcome);
        }
        Ok(Command::Cancel { done }) => {
            drop(tx);
            drop(backend);
            let _ = done.send(());
        }
        Err(_) => {}
    }
}

/// The card must be a minidriver card with a usable admin key (and the expected one).
pub fn check_card(facts: &CardFacts, expected_card_id: &[u8]) -> Result<(), Error> {
    match facts.profile {
        Some(Profile::Minidriver) => {}
        Some(Profile::Piv) => {
            return Err(Error::Refused(
                "this is a PIV card: it has no admin-key challenge; unblock it with the PUK from the helpdesk".into(),
            ));
        }
        None => {
            return Err(Error::Refused(
                "the card in the reader is not a supported card".into(),
            ));
        }
    }
    if !expected_card_id.is_empty() && facts.card_id != expected_card_id {
        return Err(Error::Refused(
            "the card in the reader is not the expected card".into(),
        ));
    }
    if facts.admin_blocked() {
        return Err(Error::Refused(
            "the card's admin key is blocked: this card cannot be unblocked any more and must be replaced".into(),
        ));
    }
    Ok(())
}
