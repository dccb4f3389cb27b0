//! One constructor per kind of audited event, so that every record of a kind carries the
//! same fields and attributes. None takes a secret: no key, component, share, challenge,
//! response or PUK reaches an [`Event`].

use cms_cardcrypto::Scheme;
use cms_proto::common::v1::AuthContext;
use cms_proto::custody::v1::{AuditEvent, AuditOutcome, PukPurpose};
use ring::digest;

use super::Event;
use super::gate::Asker;

/// The caller custody itself is, in the records it writes on its own behalf.
pub const SELF: &str = "custody";

/// Steps of a key-component import ceremony (attribute "step").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CeremonyStep {
    Begin,
    Component,
    Finish,
    Abort,
}

impl CeremonyStep {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Begin => "begin",
            Self::Component => "component",
            Self::Finish => "finish",
            Self::Abort => "abort",
        }
    }
}

/// How a component's key check value compared with the one on the custodian's form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KcvOutcome {
    Matched,
    Mismatched,
    /// The component was refused before its KCV was compared.
    NotChecked,
}

impl KcvOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Matched => "matched",
            Self::Mismatched => "mismatched",
            Self::NotChecked => "not checked",
        }
    }
}

/// What a ceremony record names: the import and, when known, the key it makes.
#[derive(Clone, Debug, Default)]
pub struct Ceremony<'a> {
    pub import_id: &'a str,
    pub reference: &'a str,
    pub version: u32,
}

/// The public facts of a new master key version.
#[derive(Clone, Debug)]
pub struct NewKeyFacts<'a> {
    pub reference: &'a str,
    pub version: u32,
    pub algorithm: &'a str,
    /// Key check value (public: ListMasterKeys shows it).
    pub kcv: &'a str,
    /// "generated" or "imported" (`KeyOrigin`).
    pub origin: &'a str,
}

/// A non-secret fingerprint of an identifier that may be a bearer secret (an online session
/// id): the first 16 bytes of its SHA-256, in hex. Whoever holds the id can compute it to
/// find the record; the record does not give the id away.
pub fn id_fingerprint(id: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&digest::digest(&digest::SHA256, id).as_ref()[..16])
}

impl Event {
    fn by(event: AuditEvent, outcome: AuditOutcome, caller: &str, auth: AuthContext) -> Self {
        let mut e = Self::new(event, outcome, caller);
        e.context = auth;
        e
    }

    /// Custody started: its version, backend, self-test and the chain it verified.
    pub fn startup(
        version: &str,
        backend: &str,
        self_test: &Result<(), String>,
        records: u64,
    ) -> Self {
        let outcome = match self_test {
            Ok(()) => AuditOutcome::Success,
            Err(_) => AuditOutcome::Failed,
        };
        Self::new(AuditEvent::Startup, outcome, SELF)
            .with("version", version)
            .with("backend", backend)
            .with(
                "self_test",
                if self_test.is_ok() {
                    "passed"
                } else {
                    "failed"
                },
            )
            .with("chain_verified_records", records.to_string())
    }

    /// The start-up known-answer tests ran.
    pub fn self_test(result: &Result<(), String>, tests: u32) -> Self {
        let mut e = Self::new(AuditEvent::SelfTest, AuditOutcome::Success, SELF)
            .with("tests_run", tests.to_string());
        if let Err(why) = result {
            e.outcome = AuditOutcome::Failed as i32;
            e.reason = why.clone();
        }
        e
    }

    /// One step of a key ceremony that succeeded.
    pub fn ceremony(
        step: CeremonyStep,
        caller: &str,
        auth: AuthContext,
        ceremony: &Ceremony<'_>,
    ) -> Self {
        let mut e = Self::by(
            AuditEvent::MasterKeyImport,
            AuditOutcome::Success,
            caller,
            auth,
        )
        .with("step", step.as_str());
        if !ceremony.import_id.is_empty() {
            e = e.with("import_id", ceremony.import_id);
        }
        e.key_reference = ceremony.reference.to_owned();
        e.key_version = ceremony.version;
        e
    }

    /// Component `index` of `expected` of a ceremony, and how its KCV compared.
    pub fn ceremony_component(
        caller: &str,
        auth: AuthContext,
        ceremony: &Ceremony<'_>,
        index: u32,
        expected: u32,
        kcv: KcvOutcome,
    ) -> Self {
        let mut e = Self::ceremony(CeremonyStep::Component, caller, auth, ceremony)
            .with("component", format!("{index} of {expected}"))
            .with("kcv_outcome", kcv.as_str());
        if kcv != KcvOutcome::Matched {
            e.outcome = AuditOutcome::Refused as i32;
        }
        e
    }

    /// A new master key version (generated, rotated in, or imported: then its ceremony's
    /// finish), with its public facts.
    pub fn new_key(
        event: AuditEvent,
        caller: &str,
        auth: AuthContext,
        key: &NewKeyFacts<'_>,
    ) -> Self {
        let mut e = Self::by(event, AuditOutcome::Success, caller, auth)
            .with("algorithm", key.algorithm)
            .with("kcv", key.kcv)
            .with("origin", key.origin);
        if event == AuditEvent::MasterKeyImport {
            e = e.with("step", CeremonyStep::Finish.as_str());
        }
        e.key_reference = key.reference.to_owned();
        e.key_version = key.version;
        e
    }

    /// The key-encryption key was created and split into `shares` shares, `threshold` needed.
    pub fn seal_init(caller: &str, auth: AuthContext, threshold: u32, shares: u32) -> Self {
        let mut e = Self::by(AuditEvent::SealInit, AuditOutcome::Success, caller, auth)
            .with("threshold", threshold.to_string())
            .with("share_count", shares.to_string());
        e.reason = format!("{threshold} of {shares} shares");
        e
    }

    /// The System Owner token `label` was initialised: its unblock key's algorithm and how it
    /// was handed out (`share_count` shares, `threshold` needed; 0 shares: shown whole).
    pub fn so_token_init(
        caller: &str,
        auth: AuthContext,
        label: &str,
        algorithm: &str,
        share_count: u32,
        threshold: u32,
    ) -> Self {
        let mut e = Self::by(AuditEvent::SoTokenInit, AuditOutcome::Success, caller, auth)
            .with("algorithm", algorithm)
            .with("share_count", share_count.to_string())
            .with("threshold", threshold.to_string());
        e.key_reference = label.to_owned();
        e.reason = if share_count == 0 {
            format!("{algorithm} unblock key, not split into shares")
        } else {
            format!("{algorithm} unblock key, {share_count} shares, {threshold} needed")
        };
        e
    }

    /// Custody unsealed with the last share, given by `custodian`.
    pub fn unsealed(caller: &str, auth: AuthContext, custodian: &str) -> Self {
        let custodian: String = custodian.chars().take(64).collect();
        let mut e = Self::by(AuditEvent::Unseal, AuditOutcome::Success, caller, auth)
            .with("custodian", custodian.clone());
        e.reason = custodian;
        e
    }

    /// Custody was sealed on request.
    pub fn sealed(caller: &str, auth: AuthContext, reason: &str) -> Self {
        let mut e = Self::by(AuditEvent::Seal, AuditOutcome::Success, caller, auth);
        e.reason = reason.chars().take(200).collect();
        e
    }

    /// The audit head was exported.
    pub fn head_export(caller: &str, auth: AuthContext, sequence: u64) -> Self {
        Self::by(
            AuditEvent::AuditHeadExport,
            AuditOutcome::Success,
            caller,
            auth,
        )
        .with("head_sequence", sequence.to_string())
    }

    /// An administrative call that was refused (or failed): which RPC, and why.
    pub fn admin_refused(
        event: AuditEvent,
        rpc: &'static str,
        asker: &Asker,
        outcome: AuditOutcome,
        reason: String,
    ) -> Self {
        let mut e = Self::by(event, outcome, &asker.caller, asker.auth.clone()).with("rpc", rpc);
        e.reason = reason;
        e
    }

    /// A ceremony step (begin, abort) that was refused: which RPC, why, and what it named.
    pub fn ceremony_refused(
        step: CeremonyStep,
        rpc: &'static str,
        asker: &Asker,
        ceremony: &Ceremony<'_>,
        outcome: AuditOutcome,
        reason: String,
    ) -> Self {
        let mut e = Self::admin_refused(AuditEvent::MasterKeyImport, rpc, asker, outcome, reason)
            .with("step", step.as_str());
        if !ceremony.import_id.is_empty() {
            e = e.with("import_id", ceremony.import_id);
        }
        e.key_reference = ceremony.reference.to_owned();
        e.key_version = ceremony.version;
        e
    }

    /// A component that was refused: its number of `expected` when the ceremony is known
    /// (`component`), how its KCV compared, and why.
    pub fn ceremony_component_refused(
        asker: &Asker,
        ceremony: &Ceremony<'_>,
        component: Option<(u32, u32)>,
        kcv: KcvOutcome,
        outcome: AuditOutcome,
        reason: String,
    ) -> Self {
        let (index, expected) = component.unwrap_or_default();
        let mut e = Self::ceremony_component(
            &asker.caller,
            asker.auth.clone(),
            ceremony,
            index,
            expected,
            kcv,
        )
        .with("rpc", "AddKeyComponent");
        e.outcome = outcome as i32;
        e.reason = reason;
        if component.is_none() {
            e.attributes.remove("component");
        }
        e
    }

    /// A ceremony was aborted, for `reason` (its first 200 characters).
    pub fn ceremony_aborted(asker: &Asker, ceremony: &Ceremony<'_>, reason: &str) -> Self {
        let mut e = Self::ceremony(
            CeremonyStep::Abort,
            &asker.caller,
            asker.auth.clone(),
            ceremony,
        );
        e.reason = reason.chars().take(200).collect();
        e
    }

    /// A master key version was retired, for `reason` (its first 200 characters).
    pub fn key_retired(
        caller: &str,
        auth: AuthContext,
        reference: &str,
        version: u32,
        reason: &str,
    ) -> Self {
        let mut e = Self::by(
            AuditEvent::MasterKeyRetire,
            AuditOutcome::Success,
            caller,
            auth,
        );
        e.key_reference = reference.to_owned();
        e.key_version = version;
        e.reason = reason.chars().take(200).collect();
        e
    }

    /// A cryptogram is answered (the record also claims the card's budget): under which key
    /// and scheme. Neither the challenge nor the response is in it.
    pub fn cryptogram_answered(
        caller: &str,
        auth: AuthContext,
        reference: &str,
        version: u32,
        scheme: Scheme,
    ) -> Self {
        let mut e = Self::by(AuditEvent::Cryptogram, AuditOutcome::Success, caller, auth);
        e.key_reference = reference.to_owned();
        e.key_version = version;
        e.reason = ["scheme ", scheme.as_str()].concat();
        e
    }

    /// A cryptogram request was refused, and why.
    pub fn cryptogram_refused(
        caller: &str,
        auth: AuthContext,
        reference: &str,
        version: u32,
        reason: String,
    ) -> Self {
        let mut e = Self::by(AuditEvent::Cryptogram, AuditOutcome::Refused, caller, auth);
        e.key_reference = reference.to_owned();
        e.key_version = version;
        e.reason = reason;
        e
    }

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
