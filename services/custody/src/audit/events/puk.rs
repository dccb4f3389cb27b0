//! PIV PUK records: releases (with the purpose and a fingerprint of the session, never the
//! PUK or the session id), rotations, and how each ended.

use cms_proto::common::v1::AuthContext;
use cms_proto::custody::v1::{AuditEvent, AuditOutcome, PukPurpose};
use ring::digest;

use super::super::Event;

/// A non-secret fingerprint of an identifier that may be a bearer secret (an online session
/// id): the first 16 bytes of its SHA-256, in hex. Whoever holds the id can compute it to
/// find the record; the record does not give the id away.
pub fn id_fingerprint(id: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&digest::digest(&digest::SHA256, id).as_ref()[..16])
}

impl Event {
    /// A PIV PUK rotation confirmation to `new_version` (before its outcome is known).
    pub fn puk_rotation(
        caller: &str,
        auth: AuthContext,
        reference: &str,
        new_version: u32,
    ) -> Self {
        let mut e = Self::by(AuditEvent::PukRotation, AuditOutcome::Success, caller, auth)
            .with("new_puk_version", new_version.to_string());
        e.key_reference = reference.to_owned();
        e
    }

    /// The rotation confirmed: the card went from version `old`.
    pub fn puk_rotated(mut self, old: i64, new_version: u32) -> Self {
        self.reason = format!("puk version {old} rotated to {new_version}");
        self.with("puk_version", old.to_string())
    }

    /// A PIV PUK release (before its outcome is known): the card's PUK version, the purpose
    /// and, online, a fingerprint of the session id (never the id: it may be a bearer secret).
    pub fn puk_release(caller: &str, auth: AuthContext, release: &PukReleaseFacts<'_>) -> Self {
        let mut e = Self::by(AuditEvent::PukRelease, AuditOutcome::Success, caller, auth)
            .with("puk_version", release.puk_version.to_string());
        e.key_reference = release.reference.to_owned();
        e.key_version = release.master_version;
        match PukPurpose::try_from(release.purpose) {
            Ok(PukPurpose::OnlineSession) => e = e.with("purpose", "online session"),
            Ok(PukPurpose::OfflineHelpdesk) => e = e.with("purpose", "offline helpdesk"),
            _ => {}
        }
        if !release.session_id.is_empty() {
            e = e.with(
                "session_sha256",
                id_fingerprint(release.session_id.as_bytes()),
            );
        }
        e
    }

    /// The release passed its checks: which version went out, the next one (online), and
    /// whether that version was exposed before.
    pub fn puk_released(mut self, version: u32, online: bool, exposed: bool) -> Self {
        self.reason = if online {
            format!(
                "online session: puk version {version}, next version {}",
                version + 1
            )
        } else {
            format!("offline helpdesk read-out: puk version {version} is now exposed")
        };
        if online {
            self = self.with("next_puk_version", (version + 1).to_string());
        }
        if exposed {
            self = self.with("exposed", "true");
        }
        self
    }

    /// A PUK release refused before anything about it was looked at (its context is
    /// missing).
    pub fn puk_release_refused(
        caller: &str,
        auth: AuthContext,
        reference: &str,
        master_version: u32,
        reason: String,
    ) -> Self {
        let mut e = Self::by(AuditEvent::PukRelease, AuditOutcome::Refused, caller, auth);
        e.key_reference = reference.to_owned();
        e.key_version = master_version;
        e.reason = reason;
        e
    }

    /// The event, concluded as refused or failed (PUK requests), and why.
    pub fn concluded(mut self, outcome: AuditOutcome, reason: String) -> Self {
        self.outcome = outcome as i32;
        self.reason = reason;
        self
    }
}

/// What a PUK release record names (no PUK, no session id).
pub struct PukReleaseFacts<'a> {
    pub reference: &'a str,
    pub master_version: u32,
    pub puk_version: u32,
    /// `PukPurpose`, as the request gave it.
    pub purpose: i32,
    pub session_id: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_fingerprint_is_stable_short_and_not_the_id() {
        let fp = id_fingerprint(b"session-1234");
        assert_eq!(fp.len(), 32);
        assert_eq!(fp, id_fingerprint(b"session-1234"));
        assert_ne!(fp, id_fingerprint(b"session-1235"));
        assert!(!fp.contains("session"));
    }
}
