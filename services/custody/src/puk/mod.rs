//! PIV PUKs: the one secret custody hands out (DESIGN 3 and 5).
//!
//! A PIV card's PIN is reset with its PUK, derived per card and PUK version from a PUK master
//! key ([`cms_cardcrypto::puk`], computed by the keystore where the key lives) and never
//! stored. What custody keeps per card (keyed by the fingerprint of master key reference and
//! card id, like the per-card limit) is only state: the PUK version on the card, whether that
//! version was read out offline (exposed) and when, and when it was last rotated; plus the
//! online sessions that already had their release.
//!
//! * `ReleasePivPuk`, only for callers whose scope has `release_puk` (the gateway) and names
//!   the key reference:
//!   * `ONLINE_SESSION`: one release per session id, ever. Returns the current PUK and the
//!     next one (version + 1), which the agent sets right after the reset.
//!   * `OFFLINE_HELPDESK`: returns the current PUK and marks that version exposed.
//!   * The request's PUK version must be custody's (or, for a card custody has not seen, it
//!     becomes custody's).
//! * `ConfirmPukRotation`: the card now has version + 1; exposure is cleared.
//! * `GetPukStatus`: the state, never a PUK.
//!
//! * Exposure: a version is exposed once it was read out offline, or released online and not
//!   confirmed rotated within the session's lifetime (`guards.puk_session_secs`), or released
//!   to a second online session (the first may still hold it).
//! * Versions are 1 to `u32::MAX - 1`, so that a card's next version is always one.
//!
//! Order, so that no PUK leaves without its audit record and its state, and the audit holds
//! only what happened: releases and rotations go one at a time (`Custody::puk_lock`); each
//! checks the card's state (session free, version current) and derives the PUKs (each
//! refusal is audited, without a claim), then writes the audit record, which also claims a
//! use of the card's budget (the per-card limit that cryptograms count against) and is
//! refused there when the budget is spent, then changes the state (session taken, version
//! exposed), and only then answers. A concurrent release of the same session waits, then
//! finds the session taken: it writes its refusal only. Should the state change fail after
//! the record (a database error), a second record says so and no PUK is returned. A release
//! is a use without a challenge: its use fingerprint is keyed over the card and fresh
//! randomness, so it counts against the limit and never as a replay. An online release
//! records a fingerprint of its session id (`session_sha256`), not the id.
//!
//! Nothing here logs, audits or returns in an error a PUK, its checksum or a derived secret:
//! PUKs live in [`cms_cardcrypto::Puk`] (zeroizing, `Debug` shows the length only) until
//! they are copied into the response.

mod checks;
mod rotation;
mod state;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use cms_cardcrypto::{Puk, PukError, PukInput};
use cms_proto::custody::v1 as pb;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tokio::sync::OwnedSemaphorePermit;

use crate::audit::events::PukReleaseFacts;
use crate::audit::{self, Event, Refusal, UsageClaim, Written};
use crate::custody::{Custody, context};
use crate::error::Error;
use crate::guards::{self, Caller, Peer};
use crate::keystore::{KeystoreError, MasterKeyHandle, on_keystore};
use crate::store::entities::puk_session;
use crate::wrap::{Fingerprint, Kek};
use checks::{Checked, audited_outcome, card_fingerprint, check_release, session_used};

/// A release that passed every check, with its PUKs derived.
struct Release {
    _slot: OwnedSemaphorePermit,
    kek: Arc<Kek>,
    card_fp: Fingerprint,
    version: u32,
    /// The version was read out offline before, or released online before (online releases
    /// report it).
    exposed: bool,
    /// Online: this version was released to another session before and not rotated since, so
    /// it is exposed from this time (that session's end, or now if it is still running).
    exposed_since: Option<i64>,
    session_fp: Option<Vec<u8>>,
    puk: Puk,
    /// Online only: the PUK of version + 1.
    next: Option<Puk>,
}

impl Custody {
    /// Writes a refusal (or failure) record of a PUK request and returns the error to send.
    async fn refuse_puk(&self, event: Event, error: Error) -> Error {
        let (outcome, reason) = audited_outcome(&error);
        match self
            .audit
            .record(event.concluded(outcome, reason), None)
            .await
        {
            Ok(_) => error,
            Err(e) => e.into(),
        }
    }

    fn session_lifetime_ms(&self) -> i64 {
        i64::try_from(self.guards.puk_session_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// The PUK of `checked`'s card at `puk_version` (on a blocking thread for an HSM).
    async fn derive(
        &self,
        master: &Arc<MasterKeyHandle>,
        checked: &Checked<'_>,
        puk_version: u32,
    ) -> Result<Puk, Error> {
        let master = master.clone();
        let card_id = checked.card_id.to_vec();
        let (master_key_version, digits) = (checked.master_version, checked.digits);
        on_keystore(&self.keystore, move |keystore| {
            let input = PukInput {
                card_id: &card_id,
                master_key_version,
                puk_version,
                digits,
            };
            keystore.puk(&master, &input)
        })
        .await
        .map_err(|e| match e {
            KeystoreError::Puk(PukError::Length { .. }) => Error::Invalid {
                field: "puk_length",
                message: e.to_string(),
            },
            KeystoreError::Puk(PukError::EmptyCardId | PukError::CardIdTooLong { .. }) => {
                Error::Invalid {
                    field: "card_id",
                    message: e.to_string(),
                }
            }
            other => Error::Keystore(other),
        })
    }

    /// Everything a release checks before its audit record: scope, seal, guards, request,
    /// key, recorded version, session; then both PUKs are derived.
    async fn prepare_release(
        &self,
        caller: Result<Caller<'_>, Error>,
        req: &pb::ReleasePivPukRequest,
    ) -> Result<Release, Error> {
        let caller = caller?;
        caller.require_release_puk()?;
        caller.require_key(&req.master_key_reference)?;
        let kek = self.kek()?;
        let slot = self
            .outstanding
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Overloaded)?;
        self.limiter.take(&caller.identity)?;
        let checked = check_release(req)?;
        let master = self.usable_key(checked.reference, checked.master_version)?;
        let card_fp = card_fingerprint(&kek, checked.reference, checked.card_id);
        let record = self.puk_record(&card_fp).await?;
        if let Some(row) = &record
            && row.puk_version != i64::from(checked.puk_version)
        {
            return Err(Error::Precondition(format!(
                "custody has PUK version {} for this card, not {}: read the card's PUK version again",
                row.puk_version, checked.puk_version
            )));
        }
        let session_fp = match checked.session {
            Some(session) => {
                let fp = kek.fingerprint("puk-session", &[session.as_bytes()]);
                let used = puk_session::Entity::find()
                    .filter(puk_session::Column::SessionFp.eq(fp.to_vec()))
                    .one(&self.db)
                    .await?;
                if used.is_some() {
                    return Err(session_used());
                }
                Some(fp.to_vec())
            }
            None => None,
        };
        // The same version handed to another session before (and not rotated since, or the
        // card would be at the next version) is exposed: from that session's end, or from now
        // when that session may still be running.
        let exposed_since = match checked.session {
            Some(_) => self
                .online_release(&card_fp, i64::from(checked.puk_version))
                .await?
                .map(|at| {
                    at.saturating_add(self.session_lifetime_ms())
                        .min(audit::now_ms())
                }),
            None => None,
        };
        let puk = self.derive(&master, &checked, checked.puk_version).await?;
        let next = match checked.session {
            Some(_) => Some(
                self.derive(&master, &checked, checked.puk_version + 1)
                    .await?,
            ),
            None => None,
        };
        Ok(Release {
            _slot: slot,
            kek,
            card_fp,
            version: checked.puk_version,
            exposed: record.is_some_and(|r| r.exposed) || exposed_since.is_some(),
            exposed_since,
            session_fp,
            puk,
            next,
        })
    }

    /// A release's claim on the card's budget. It has no challenge, so its use fingerprint is
    /// keyed over the card and fresh randomness: it counts against the per-card limit and is
    /// never a replay.
    fn release_claim(
        &self,
        release: &Release,
        req: &pb::ReleasePivPukRequest,
    ) -> Result<UsageClaim, Error> {
        let mut nonce = [0u8; 16];
        crate::wrap::random(&mut nonce)
            .map_err(crate::seal::SealError::from)
            .map_err(Error::from)?;
        Ok(UsageClaim {
            card_fp: release.card_fp,
            challenge_fp: release.kek.fingerprint(
                "card-puk-release",
                &[req.master_key_reference.as_bytes(), &req.card_id, &nonce],
            ),
            limit: self.guards.per_card_limit,
            window_ms: i64::try_from(self.guards.per_card_window_secs * 1000).unwrap_or(i64::MAX),
            replay_window_ms: i64::try_from(self.guards.replay_window_secs * 1000)
                .unwrap_or(i64::MAX),
        })
    }

    /// A PUK release names who asks and under which request id (common.proto): one without
    /// is refused, and audited, before anything else is looked at. A caller with no scope
    /// here is left to `prepare_release`, which refuses (and audits) it as such.
    async fn require_release_context(
        &self,
        peer: &Peer,
        req: &pb::ReleasePivPukRequest,
    ) -> Result<(), Error> {
        let Ok(caller) = self.caller(peer) else {
            return Ok(());
        };
        let mut auth = context(req.auth.clone());
        let Err(error) = guards::require_context(&auth) else {
            return Ok(());
        };
        auth.card_id = req.card_id.clone();
        let event = Event::puk_release_refused(
            &caller.identity,
            auth,
            &req.master_key_reference,
            req.master_key_version,
            error.to_string(),
        );
        self.audit.record(event, None).await?;
        Err(error)
    }

    /// ReleasePivPuk.
    pub(crate) async fn release_piv_puk(
        &self,
        peer: &Peer,
        req: pb::ReleasePivPukRequest,
    ) -> Result<pb::ReleasePivPukResponse, Error> {
        self.require_release_context(peer, &req).await?;
        let caller = self.caller(peer);
        let mut auth = context(req.auth.clone());
        auth.card_id = req.card_id.clone();
        let facts = PukReleaseFacts {
            reference: &req.master_key_reference,
            master_version: req.master_key_version,
            puk_version: req.puk_version,
            purpose: req.purpose,
            session_id: &req.session_id,
        };
        let event = Event::puk_release(&peer.audit_name(), auth, &facts);

        // One release (or rotation) at a time: each decides on the card's state (session
        // free, version current, budget left) and writes its record before the next looks,
        // so a loser of a race writes its refusal only, and no claim on the card's budget.
        let _one_at_a_time = self.puk_lock.lock().await;
        let release = match self.prepare_release(caller, &req).await {
            Ok(release) => release,
            Err(e) => return Err(self.refuse_puk(event, e).await),
        };
        let version = release.version;
        let event = event.puk_released(version, release.next.is_some(), release.exposed);
        let claim = match self.release_claim(&release, &req) {
            Ok(claim) => claim,
            Err(e) => return Err(self.refuse_puk(event, e).await),
        };
        let seq = match self.audit.record(event.clone(), Some(claim)).await? {
            Written::Recorded { seq } => seq,
            // The writer recorded the refusal itself.
            Written::Refused {
                refusal: Refusal::CardLimit,
                ..
            } => {
                return Err(Error::CardLimit {
                    limit: self.guards.per_card_limit,
                    window_hours: self.guards.per_card_window_secs / 3600,
                });
            }
            Written::Refused {
                refusal: Refusal::Replay,
                ..
            } => return Err(Error::Replay),
        };
        if let Err(e) = self.record_release(&release).await {
            return Err(self.refuse_puk(event, e).await);
        }
        let Release {
            puk, next, exposed, ..
        } = release;
        Ok(pb::ReleasePivPukResponse {
            puk_checksum: puk.checksum(),
            puk: puk.expose_digits().to_vec(),
            puk_version: version,
            exposed: exposed || next.is_none(),
            next_puk_version: if next.is_some() { version + 1 } else { 0 },
            next_puk: next.map(|p| p.expose_digits().to_vec()).unwrap_or_default(),
            audit_sequence: seq,
        })
    }
}
