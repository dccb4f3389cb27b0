//! The checks of PUK requests that need no state, and the values they share: what a card
//! is (its fingerprint under its master key), what a status says, how a refusal is audited.

use cms_cardcrypto::diversify::MAX_CARD_ID_LEN;
use cms_cardcrypto::puk::PUK_LENGTHS;
use cms_proto::custody::v1 as pb;
use cms_proto::custody::v1::{AuditOutcome, PukPurpose};

use crate::audit;
use crate::error::Error;
use crate::store::entities::puk_card;
use crate::wrap::{Fingerprint, Kek};

/// Longest session id accepted, in bytes.
pub(super) const MAX_SESSION_ID: usize = 128;

/// Highest PUK version a card can have: its next version (version + 1) is still a version.
pub(super) const MAX_PUK_VERSION: u32 = u32::MAX - 1;

/// A release request that passed the checks that need no state.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Checked<'a> {
    pub(super) card_id: &'a [u8],
    pub(super) reference: &'a str,
    pub(super) master_version: u32,
    pub(super) puk_version: u32,
    pub(super) digits: usize,
    /// The session id of an online release; `None` for an offline read-out.
    pub(super) session: Option<&'a str>,
}

/// The checks of a release request that need no state, in the order a caller fixes them.
pub(super) fn check_release(req: &pb::ReleasePivPukRequest) -> Result<Checked<'_>, Error> {
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

pub(super) fn check_card_id(card_id: &[u8]) -> Result<(), Error> {
    if card_id.is_empty() || card_id.len() > MAX_CARD_ID_LEN {
        return Err(Error::Invalid {
            field: "card_id",
            message: format!("a card identifier is 1 to {MAX_CARD_ID_LEN} bytes"),
        });
    }
    Ok(())
}

pub(super) fn check_reference(reference: &str) -> Result<(), Error> {
    if reference.is_empty() {
        return Err(Error::Invalid {
            field: "master_key_reference",
            message: "the reference of the card's PUK master key is required".into(),
        });
    }
    Ok(())
}

/// The card as custody knows it everywhere: its identifier under its master key.
pub(super) fn card_fingerprint(kek: &Kek, reference: &str, card_id: &[u8]) -> Fingerprint {
    kek.fingerprint("card", &[reference.as_bytes(), card_id])
}

/// The card's state; `lapsed` is when an online release of its version lapsed unrotated
/// (the version is exposed from then on, even if no later release wrote it down yet).
pub(super) fn status(card_id: &[u8], row: &puk_card::Model, lapsed: Option<i64>) -> pb::PukStatus {
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
pub(super) fn audited_outcome(error: &Error) -> (AuditOutcome, String) {
    match error {
        Error::Store(_) | Error::Keystore(_) | Error::Audit(_) | Error::Seal(_) => {
            (AuditOutcome::Failed, "internal error".into())
        }
        other => (AuditOutcome::Refused, other.to_string()),
    }
}

pub(super) fn session_used() -> Error {
    Error::AlreadyExists(
        "a PUK was already released in this session: one release per online session".into(),
    )
}

pub(super) fn unknown_card() -> Error {
    Error::NotFound(
        "custody has no PUK state for this card under this master key: no PUK was released for it"
            .into(),
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::puk) fn online() -> pb::ReleasePivPukRequest {
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
