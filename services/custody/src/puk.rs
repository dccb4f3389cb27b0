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

use std::sync::Arc;

use cms_cardcrypto::diversify::MAX_CARD_ID_LEN;
use cms_cardcrypto::puk::PUK_LENGTHS;
use cms_cardcrypto::{Puk, PukError, PukInput};
use cms_kit::PeerIdentity;
use cms_proto::custody::v1 as pb;
use cms_proto::custody::v1::{AuditOutcome, PukPurpose};
use sea_orm::sea_query::{Expr, Func};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set, TryInsertResult};
use tokio::sync::OwnedSemaphorePermit;
use tonic::Request;

use crate::audit::{self, Event, Refusal, UsageClaim, Written};
use crate::error::Error;
use crate::guards::{self, Caller};
use crate::keystore::{KeystoreError, MasterKeyHandle, on_keystore};
use crate::service::{Custody, context};
use crate::store::entities::{puk_card, puk_session};
use crate::wrap::{Fingerprint, Kek};

/// Longest session id accepted, in bytes.
const MAX_SESSION_ID: usize = 128;

/// Highest PUK version a card can have: its next version (version + 1) is still a version.
const MAX_PUK_VERSION: u32 = u32::MAX - 1;

/// A release request that passed the checks that need no state.
#[derive(Debug, PartialEq, Eq)]
struct Checked<'a> {
    card_id: &'a [u8],
    reference: &'a str,
    master_version: u32,
    puk_version: u32,
    digits: usize,
    /// The session id of an online release; `None` for an offline read-out.
    session: Option<&'a str>,
}

/// The checks of a release request that need no state, in the order a caller fixes them.
fn check_release(req: &pb::ReleasePivPukRequest) -> Result<Checked<'_>, Error> {
    check_card_id(&req.card_id)?;
    let online = match PukPurpose::try_from(req.purpose).unwrap_or(PukPurpose::Unspecified) {
        PukPurpose::OnlineSession => true,
        PukPurpose::OfflineHelpdesk => false,
        PukPurpose::Unspecified => {
            return Err(Error::Invalid {
                field: "purpose",
                message: "a purpose is required: ONLINE_SESSION or OFFLINE_HELPDESK".into(),
            });
        }
    };
    let session = if online {
        let bytes = req.session_id.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_SESSION_ID || bytes.contains(&0) {
            return Err(Error::Invalid {
                field: "session_id",
                message: format!(
                    "an online release names its session: 1 to {MAX_SESSION_ID} bytes of UTF-8, no NUL; got {} bytes",
                    bytes.len()
                ),
            });
        }
        Some(req.session_id.as_str())
    } else {
        None
    };
    let digits = usize::try_from(req.puk_length).unwrap_or(usize::MAX);
    if !PUK_LENGTHS.contains(&digits) {
        return Err(Error::Invalid {
            field: "puk_length",
            message: format!(
                "a PIV PUK is {} to {} digits, got {}",
                PUK_LENGTHS.start(),
                PUK_LENGTHS.end(),
                req.puk_length
            ),
        });
    }
    if req.puk_version == 0 || req.puk_version > MAX_PUK_VERSION {
        return Err(Error::Invalid {
            field: "puk_version",
            message: format!(
                "a PIV card's PUK version is 1 to {MAX_PUK_VERSION} (its next version must be one too)"
            ),
        });
    }
    Ok(Checked {
        card_id: &req.card_id,
        reference: &req.master_key_reference,
        master_version: req.master_key_version,
        puk_version: req.puk_version,
        digits,
        session,
    })
}

fn check_card_id(card_id: &[u8]) -> Result<(), Error> {
    if card_id.is_empty() || card_id.len() > MAX_CARD_ID_LEN {
        return Err(Error::Invalid {
            field: "card_id",
            message: format!("a card identifier is 1 to {MAX_CARD_ID_LEN} bytes"),
        });
    }
    Ok(())
}

fn check_reference(reference: &str) -> Result<(), Error> {
    if reference.is_empty() {
        return Err(Error::Invalid {
            field: "master_key_reference",
            message: "the reference of the card's PUK master key is required".into(),
        });
    }
    Ok(())
}

/// The card as custody knows it everywhere: its identifier under its master key.
fn card_fingerprint(kek: &Kek, reference: &str, card_id: &[u8]) -> Fingerprint {
    kek.fingerprint("card", &[reference.as_bytes(), card_id])
}

/// The verified caller's SPIFFE ID for the audit record, even when it has no scope here.
fn peer<T>(request: &Request<T>) -> String {
    PeerIdentity::of(request)
        .map(|p| p.spiffe_id.to_string())
        .unwrap_or_else(|| "unidentified".into())
}

/// The card's state; `lapsed` is when an online release of its version lapsed unrotated
/// (the version is exposed from then on, even if no later release wrote it down yet).
fn status(card_id: &[u8], row: &puk_card::Model, lapsed: Option<i64>) -> pb::PukStatus {
    let exposed_at = row.exposed_at.filter(|_| row.exposed).or(lapsed);
    pb::PukStatus {
        card_id: card_id.to_vec(),
        puk_version: u32::try_from(row.puk_version).unwrap_or(0),
        exposed: exposed_at.is_some() || row.exposed,
        exposed_at: exposed_at.map(audit::timestamp),
        rotated_at: row.rotated_at.map(audit::timestamp),
    }
}

/// Internal failures are audited as failed, without their detail; refusals with their message
/// (which never holds a secret).
fn audited_outcome(error: &Error) -> (AuditOutcome, String) {
    match error {
        Error::Store(_) | Error::Keystore(_) | Error::Audit(_) | Error::Seal(_) => {
            (AuditOutcome::Failed, "internal error".into())
        }
        other => (AuditOutcome::Refused, other.to_string()),
    }
}

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
    async fn refuse_puk(&self, mut event: Event, error: Error) -> Error {
        let (outcome, reason) = audited_outcome(&error);
        event.outcome = outcome as i32;
        event.reason = reason;
        match self.audit.record(event, None).await {
            Ok(_) => error,
            Err(e) => e.into(),
        }
    }

    fn session_lifetime_ms(&self) -> i64 {
        i64::try_from(self.guards.puk_session_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// When `version` of the card was first released to an online session, if it was.
    async fn online_release(&self, card_fp: &[u8], version: i64) -> Result<Option<i64>, Error> {
        Ok(puk_session::Entity::find()
            .filter(puk_session::Column::CardFp.eq(card_fp.to_vec()))
            .filter(puk_session::Column::PukVersion.eq(version))
            .order_by_asc(puk_session::Column::At)
            .one(&self.db)
            .await?
            .map(|s| s.at))
    }

    /// When `version` of the card became exposed by an online release that was not confirmed
    /// rotated within its session's lifetime; `None` while it may still be.
    async fn lapsed_release(&self, card_fp: &[u8], version: i64) -> Result<Option<i64>, Error> {
        let now = audit::now_ms();
        Ok(self
            .online_release(card_fp, version)
            .await?
            .map(|at| at.saturating_add(self.session_lifetime_ms()))
            .filter(|ends| *ends <= now))
    }

    async fn puk_record(&self, card_fp: &[u8]) -> Result<Option<puk_card::Model>, Error> {
        Ok(puk_card::Entity::find()
            .filter(puk_card::Column::CardFp.eq(card_fp.to_vec()))
            .one(&self.db)
            .await?)
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

    /// Records what a release changes: the card (when first seen), and the session taken
    /// (online) or the version exposed (offline).
    async fn record_release(&self, release: &Release) -> Result<(), Error> {
        let now = audit::now_ms();
        let version = i64::from(release.version);
        let offline = release.session_fp.is_none();
        let first_seen = puk_card::ActiveModel {
            card_fp: Set(release.card_fp.to_vec()),
            puk_version: Set(version),
            exposed: Set(offline),
            exposed_at: Set(offline.then_some(now)),
            rotated_at: Set(None),
            created_at: Set(now),
            ..Default::default()
        };
        puk_card::Entity::insert(first_seen)
            .on_conflict_do_nothing_on([puk_card::Column::CardFp])
            .exec(&self.db)
            .await?;
        let changed_meanwhile = || {
            Error::Precondition(
                "the card's PUK version changed while the PUK was being released; read it again"
                    .into(),
            )
        };
        match &release.session_fp {
            Some(session_fp) => {
                let row = self
                    .puk_record(&release.card_fp)
                    .await?
                    .ok_or_else(changed_meanwhile)?;
                if row.puk_version != version {
                    return Err(changed_meanwhile());
                }
                let taken = puk_session::ActiveModel {
                    session_fp: Set(session_fp.clone()),
                    card_fp: Set(release.card_fp.to_vec()),
                    puk_version: Set(version),
                    at: Set(now),
                    ..Default::default()
                };
                let inserted = puk_session::Entity::insert(taken)
                    .on_conflict_do_nothing_on([puk_session::Column::SessionFp])
                    .exec(&self.db)
                    .await?;
                if !matches!(inserted, TryInsertResult::Inserted(_)) {
                    return Err(session_used());
                }
                if let Some(since) = release.exposed_since {
                    let exposed_at: Expr =
                        Func::coalesce([Expr::col(puk_card::Column::ExposedAt), Expr::val(since)])
                            .into();
                    puk_card::Entity::update_many()
                        .col_expr(puk_card::Column::Exposed, Expr::val(true))
                        .col_expr(puk_card::Column::ExposedAt, exposed_at)
                        .filter(puk_card::Column::CardFp.eq(release.card_fp.to_vec()))
                        .filter(puk_card::Column::PukVersion.eq(version))
                        .exec(&self.db)
                        .await?;
                }
            }
            None => {
                // Exposed since the first read-out of this version.
                let exposed_at: Expr =
                    Func::coalesce([Expr::col(puk_card::Column::ExposedAt), Expr::val(now)]).into();
                let updated = puk_card::Entity::update_many()
                    .col_expr(puk_card::Column::Exposed, Expr::val(true))
                    .col_expr(puk_card::Column::ExposedAt, exposed_at)
                    .filter(puk_card::Column::CardFp.eq(release.card_fp.to_vec()))
                    .filter(puk_card::Column::PukVersion.eq(version))
                    .exec(&self.db)
                    .await?;
                if updated.rows_affected != 1 {
                    return Err(changed_meanwhile());
                }
            }
        }
        Ok(())
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

    /// ReleasePivPuk.
    pub(crate) async fn release_puk(
        &self,
        request: Request<pb::ReleasePivPukRequest>,
    ) -> Result<pb::ReleasePivPukResponse, Error> {
        let identity = peer(&request);
        let caller = guards::caller(&self.callers, &request);
        let req = request.into_inner();
        let mut auth = context(req.auth.clone());
        auth.card_id = req.card_id.clone();
        let mut event = Event::puk_release(
            &identity,
            auth,
            &req.master_key_reference,
            req.master_key_version,
        )
        .with("puk_version", req.puk_version.to_string());
        event = match PukPurpose::try_from(req.purpose) {
            Ok(PukPurpose::OnlineSession) => event.with("purpose", "online session"),
            Ok(PukPurpose::OfflineHelpdesk) => event.with("purpose", "offline helpdesk"),
            _ => event,
        };
        if !req.session_id.is_empty() {
            // The session id may be a bearer secret: a fingerprint its holder can look up.
            event = event.with(
                "session_sha256",
                audit::events::id_fingerprint(req.session_id.as_bytes()),
            );
        }

        // One release (or rotation) at a time: each decides on the card's state (session
        // free, version current, budget left) and writes its record before the next looks,
        // so a loser of a race writes its refusal only, and no claim on the card's budget.
        let _one_at_a_time = self.puk_lock.lock().await;
        let release = match self.prepare_release(caller, &req).await {
            Ok(release) => release,
            Err(e) => return Err(self.refuse_puk(event, e).await),
        };
        let version = release.version;
        event.reason = match &release.next {
            Some(_) => format!(
                "online session: puk version {version}, next version {}",
                version + 1
            ),
            None => format!("offline helpdesk read-out: puk version {version} is now exposed"),
        };
        if release.next.is_some() {
            event = event.with("next_puk_version", (version + 1).to_string());
        }
        if release.exposed {
            event = event.with("exposed", "true");
        }
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

    /// A rotation confirmation's checks; the card's fingerprint and recorded version.
    async fn check_rotation(
        &self,
        caller: Result<Caller<'_>, Error>,
        req: &pb::ConfirmPukRotationRequest,
    ) -> Result<(Fingerprint, i64), Error> {
        let caller = caller?;
        caller.require_release_puk()?;
        caller.require_key(&req.master_key_reference)?;
        guards::require_context(&context(req.auth.clone()))?;
        let kek = self.kek()?;
        check_card_id(&req.card_id)?;
        check_reference(&req.master_key_reference)?;
        let card_fp = card_fingerprint(&kek, &req.master_key_reference, &req.card_id);
        let row = self.puk_record(&card_fp).await?.ok_or_else(unknown_card)?;
        if req.new_puk_version > MAX_PUK_VERSION {
            return Err(Error::Invalid {
                field: "new_puk_version",
                message: format!("a PIV card's PUK version is 1 to {MAX_PUK_VERSION}"),
            });
        }
        if i64::from(req.new_puk_version) != row.puk_version + 1 {
            return Err(Error::Precondition(format!(
                "custody has PUK version {} for this card, so a rotation confirms version {}, not {}",
                row.puk_version,
                row.puk_version + 1,
                req.new_puk_version
            )));
        }
        Ok((card_fp, row.puk_version))
    }

    /// ConfirmPukRotation.
    pub(crate) async fn confirm_rotation(
        &self,
        request: Request<pb::ConfirmPukRotationRequest>,
    ) -> Result<pb::ConfirmPukRotationResponse, Error> {
        let identity = peer(&request);
        let caller = guards::caller(&self.callers, &request);
        let req = request.into_inner();
        let mut auth = context(req.auth.clone());
        auth.card_id = req.card_id.clone();
        let mut event = Event::puk_rotation(&identity, auth, &req.master_key_reference)
            .with("new_puk_version", req.new_puk_version.to_string());

        let _one_at_a_time = self.puk_lock.lock().await;
        let (card_fp, old) = match self.check_rotation(caller, &req).await {
            Ok(checked) => checked,
            Err(e) => return Err(self.refuse_puk(event, e).await),
        };
        event.reason = format!("puk version {old} rotated to {}", req.new_puk_version);
        event = event.with("puk_version", old.to_string());
        self.audit.record(event.clone(), None).await?;
        let updated = puk_card::Entity::update_many()
            .col_expr(
                puk_card::Column::PukVersion,
                Expr::val(i64::from(req.new_puk_version)),
            )
            .col_expr(puk_card::Column::Exposed, Expr::val(false))
            .col_expr(puk_card::Column::ExposedAt, Expr::val(None::<i64>))
            .col_expr(
                puk_card::Column::RotatedAt,
                Expr::val(Some(audit::now_ms())),
            )
            .filter(puk_card::Column::CardFp.eq(card_fp.to_vec()))
            .filter(puk_card::Column::PukVersion.eq(old))
            .exec(&self.db)
            .await;
        match updated {
            Ok(done) if done.rows_affected == 1 => {}
            Ok(_) => {
                let e = Error::Precondition(
                    "the card's PUK version changed while the rotation was confirmed".into(),
                );
                return Err(self.refuse_puk(event, e).await);
            }
            Err(e) => return Err(self.refuse_puk(event, e.into()).await),
        }
        let row = self.puk_record(&card_fp).await?.ok_or_else(unknown_card)?;
        Ok(pb::ConfirmPukRotationResponse {
            status: Some(status(&req.card_id, &row, None)),
        })
    }

    /// GetPukStatus: for the gateway (`release_puk` and the key reference) and administrators.
    pub(crate) async fn puk_status(
        &self,
        request: Request<pb::GetPukStatusRequest>,
    ) -> Result<pb::GetPukStatusResponse, Error> {
        let caller = guards::caller(&self.callers, &request)?;
        let req = request.into_inner();
        if !caller.scope.admin {
            caller.require_release_puk()?;
            caller.require_key(&req.master_key_reference)?;
        }
        let kek = self.kek()?;
        check_card_id(&req.card_id)?;
        check_reference(&req.master_key_reference)?;
        let card_fp = card_fingerprint(&kek, &req.master_key_reference, &req.card_id);
        let row = self.puk_record(&card_fp).await?.ok_or_else(unknown_card)?;
        let lapsed = self.lapsed_release(&card_fp, row.puk_version).await?;
        Ok(pb::GetPukStatusResponse {
            status: Some(status(&req.card_id, &row, lapsed)),
        })
    }
}

fn session_used() -> Error {
    Error::AlreadyExists(
        "a PUK was already released in this session: one release per online session".into(),
    )
}

fn unknown_card() -> Error {
    Error::NotFound(
        "custody has no PUK state for this card under this master key: no PUK was released for it"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn online() -> pb::ReleasePivPukRequest {
        pb::ReleasePivPukRequest {
            card_id: b"card-0001".to_vec(),
            purpose: PukPurpose::OnlineSession as i32,
            session_id: "s-1".into(),
            master_key_reference: "puk".into(),
            master_key_version: 1,
            puk_version: 3,
            puk_length: 8,
            auth: Some(cms_proto::common::v1::AuthContext {
                actor_kind: cms_proto::common::v1::ActorKind::Operator as i32,
                request_id: "req-unit".into(),
                ..Default::default()
            }),
        }
    }

    fn field(result: Result<Checked<'_>, Error>) -> &'static str {
        match result {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_good_request_passes_with_what_it_asked_for() {
        let req = online();
        let checked = check_release(&req).unwrap();
        assert_eq!(
            checked,
            Checked {
                card_id: b"card-0001",
                reference: "puk",
                master_version: 1,
                puk_version: 3,
                digits: 8,
                session: Some("s-1"),
            }
        );
        let offline = pb::ReleasePivPukRequest {
            purpose: PukPurpose::OfflineHelpdesk as i32,
            session_id: String::new(),
            puk_length: 6,
            ..online()
        };
        let checked = check_release(&offline).unwrap();
        assert_eq!((checked.session, checked.digits), (None, 6));
    }

    #[test]
    fn each_bad_field_is_named() {
        for length in [0, 5, 9, 200, u32::MAX] {
            let req = pb::ReleasePivPukRequest {
                puk_length: length,
                ..online()
            };
            assert_eq!(field(check_release(&req)), "puk_length", "{length}");
        }
        let req = pb::ReleasePivPukRequest {
            purpose: 0,
            ..online()
        };
        assert_eq!(field(check_release(&req)), "purpose");
        let req = pb::ReleasePivPukRequest {
            purpose: 42,
            ..online()
        };
        assert_eq!(field(check_release(&req)), "purpose");
        let req = pb::ReleasePivPukRequest {
            session_id: String::new(),
            ..online()
        };
        assert_eq!(field(check_release(&req)), "session_id");
        let req = pb::ReleasePivPukRequest {
            session_id: "s".repeat(MAX_SESSION_ID + 1),
            ..online()
        };
        assert_eq!(field(check_release(&req)), "session_id");
        for card in [Vec::new(), vec![1u8; MAX_CARD_ID_LEN + 1]] {
            let req = pb::ReleasePivPukRequest {
                card_id: card,
                ..online()
            };
            assert_eq!(field(check_release(&req)), "card_id");
        }
        let req = pb::ReleasePivPukRequest {
            puk_version: 0,
            ..online()
        };
        assert_eq!(field(check_release(&req)), "puk_version");
        // Every version leaves room for the next, offline too: a card custody adopted at
        // the last version could never be rotated, so never be unexposed again.
        for purpose in [PukPurpose::OnlineSession, PukPurpose::OfflineHelpdesk] {
            let req = pb::ReleasePivPukRequest {
                puk_version: u32::MAX,
                purpose: purpose as i32,
                ..online()
            };
            assert_eq!(field(check_release(&req)), "puk_version");
            let req = pb::ReleasePivPukRequest {
                puk_version: MAX_PUK_VERSION,
                purpose: purpose as i32,
                ..online()
            };
            check_release(&req).unwrap();
        }
        // A session id is measured in bytes, and has no NUL.
        let req = pb::ReleasePivPukRequest {
            session_id: "é".repeat(MAX_SESSION_ID / 2 + 1),
            ..online()
        };
        let Err(Error::Invalid {
            field: named,
            message,
        }) = check_release(&req)
        else {
            panic!("a session id over {MAX_SESSION_ID} bytes passed");
        };
        assert_eq!(named, "session_id");
        assert!(message.contains("bytes"), "{message}");
        let req = pb::ReleasePivPukRequest {
            session_id: "s-1\0".into(),
            ..online()
        };
        assert_eq!(field(check_release(&req)), "session_id");
    }

    mod flow {
        //! The RPCs on a real Custody (soft keystore, in-memory SQLite), without the network.

        use cms_kit::SpiffeId;
        use cms_proto::custody::v1::custody_service_server::CustodyService;

        use super::*;
        use crate::config::{CallerScope, GuardSettings};
        use crate::service::Options;

        const GATEWAY: &str = "spiffe://cms.test/cms/gateway";
        const OTHER: &str = "spiffe://cms.test/cms/service/reports";

        async fn custody(dir: &std::path::Path) -> Custody {
            let db = crate::store::test_database_in(dir).await;
            let scope = |identity: &str, release_puk| CallerScope {
                identity: identity.parse().unwrap(),
                key_references: vec!["*".into()],
                admin: release_puk,
                release_puk,
            };
            let custody = Custody::open(Options {
                db,
                keystore: Arc::new(crate::keystore::SoftKeystore),
                callers: vec![scope(GATEWAY, true), scope(OTHER, false)],
                guards: GuardSettings {
                    per_card_limit: 100,
                    ..GuardSettings::default()
                },
                dev_seal_file: Some(dir.join("seal.key")),
                audit_head_file: Some(dir.join("audit.head")),
                fence: None,
                unsealed: None,
            })
            .await
            .unwrap();
            custody
                .generate_master_key(from(
                    GATEWAY,
                    pb::GenerateMasterKeyRequest {
                        reference: "puk".into(),
                        algorithm: cms_proto::common::v1::KeyAlgorithm::Aes128 as i32,
                        ..Default::default()
                    },
                ))
                .await
                .unwrap();
            custody
        }

        fn from<T>(identity: &str, message: T) -> Request<T> {
            let mut request = Request::new(message);
            request.extensions_mut().insert(PeerIdentity {
                spiffe_id: identity.parse::<SpiffeId>().unwrap(),
                remote_addr: None,
            });
            request
        }

        fn status_of(custody: &Custody, card: &[u8]) -> impl Future<Output = pb::PukStatus> {
            let request = from(
                GATEWAY,
                pb::GetPukStatusRequest {
                    card_id: card.to_vec(),
                    master_key_reference: "puk".into(),
                },
            );
            async move {
                custody
                    .get_puk_status(request)
                    .await
                    .unwrap()
                    .into_inner()
                    .status
                    .unwrap()
            }
        }

        #[tokio::test]
        async fn one_release_per_session_even_when_racing() {
            let dir = tempfile::tempdir().unwrap();
            let custody = Arc::new(custody(dir.path()).await);
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let custody = custody.clone();
                tasks.push(tokio::spawn(async move {
                    custody
                        .release_piv_puk(from(GATEWAY, online()))
                        .await
                        .map(|r| r.into_inner())
                }));
            }
            let mut released = Vec::new();
            for task in tasks {
                match task.await.unwrap() {
                    Ok(release) => released.push(release),
                    Err(status) => assert_eq!(status.code(), tonic::Code::AlreadyExists),
                }
            }
            assert_eq!(released.len(), 1, "exactly one release in the session");
            let release = &released[0];
            assert_eq!((release.puk_version, release.next_puk_version), (3, 4));
            assert_ne!(release.puk, release.next_puk);
            // Custody now knows the card at the version the request named.
            let state = status_of(&custody, b"card-0001").await;
            assert_eq!((state.puk_version, state.exposed), (3, false));
        }

        #[tokio::test]
        async fn exposure_rotation_and_versions() {
            let dir = tempfile::tempdir().unwrap();
            let custody = custody(dir.path()).await;
            let offline = || pb::ReleasePivPukRequest {
                purpose: PukPurpose::OfflineHelpdesk as i32,
                session_id: String::new(),
                ..online()
            };
            let err = custody
                .get_puk_status(from(
                    GATEWAY,
                    pb::GetPukStatusRequest {
                        card_id: b"card-0001".to_vec(),
                        master_key_reference: "puk".into(),
                    },
                ))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::NotFound);

            let first = custody
                .release_piv_puk(from(GATEWAY, offline()))
                .await
                .unwrap()
                .into_inner();
            assert!(first.exposed && first.next_puk.is_empty());
            let exposed = status_of(&custody, b"card-0001").await;
            assert!(exposed.exposed);
            // A second read-out keeps the first exposure time and gives the same PUK.
            let again = custody
                .release_piv_puk(from(GATEWAY, offline()))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(again.puk, first.puk);
            assert_eq!(status_of(&custody, b"card-0001").await, exposed);

            // Another version than custody's is refused, naming custody's.
            let stale = pb::ReleasePivPukRequest {
                puk_version: 2,
                ..offline()
            };
            let err = custody
                .release_piv_puk(from(GATEWAY, stale))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::FailedPrecondition);
            assert!(err.message().contains("version 3"), "{}", err.message());

            // Rotation: only to version + 1.
            let confirm = |version| {
                from(
                    GATEWAY,
                    pb::ConfirmPukRotationRequest {
                        card_id: b"card-0001".to_vec(),
                        new_puk_version: version,
                        master_key_reference: "puk".into(),
                        auth: online().auth,
                    },
                )
            };
            // A confirmation that does not say who asks is refused before anything else.
            let mut anonymous = confirm(4);
            anonymous.get_mut().auth = None;
            let err = custody.confirm_puk_rotation(anonymous).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(
                err.message().contains("auth.actor_kind"),
                "{}",
                err.message()
            );
            for wrong in [3, 5] {
                let err = custody
                    .confirm_puk_rotation(confirm(wrong))
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), tonic::Code::FailedPrecondition);
                assert!(
                    err.message().contains("version 3") && err.message().contains("version 4"),
                    "{}",
                    err.message()
                );
            }
            let rotated = custody
                .confirm_puk_rotation(confirm(4))
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            assert_eq!((rotated.puk_version, rotated.exposed), (4, false));
            assert!(rotated.exposed_at.is_none() && rotated.rotated_at.is_some());

            // The online release at the new version hands out what was "next" before.
            let online_at_4 = pb::ReleasePivPukRequest {
                puk_version: 4,
                session_id: "s-2".into(),
                ..online()
            };
            let released = custody
                .release_piv_puk(from(GATEWAY, online_at_4))
                .await
                .unwrap()
                .into_inner();
            assert!(!released.exposed);
            assert_ne!(released.puk, first.puk);

            // A caller without release_puk is refused by name, on every PUK RPC.
            let err = custody
                .release_piv_puk(from(OTHER, offline()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied);
            assert!(err.message().contains(OTHER), "{}", err.message());
            let err = custody
                .confirm_puk_rotation(from(OTHER, confirm(5).into_inner()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied);
            let err = custody
                .get_puk_status(from(
                    OTHER,
                    pb::GetPukStatusRequest {
                        card_id: b"card-0001".to_vec(),
                        master_key_reference: "puk".into(),
                    },
                ))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied);
        }
    }

    #[test]
    fn internal_failures_are_audited_without_their_detail() {
        let (outcome, reason) = audited_outcome(&Error::Store(sea_orm::DbErr::Custom(
            "disk I/O error at /var/lib/cms".into(),
        )));
        assert_eq!(
            (outcome, reason.as_str()),
            (AuditOutcome::Failed, "internal error")
        );
        let (outcome, reason) = audited_outcome(&session_used());
        assert_eq!(outcome, AuditOutcome::Refused);
        assert!(
            reason.contains("one release per online session"),
            "{reason}"
        );
    }
}
