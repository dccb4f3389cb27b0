//! One constructor per kind of audited event, so that every record of a kind carries the
//! same fields and attributes. None takes a secret: no key, component, share, challenge,
//! response or PUK reaches an [`Event`].

use cms_proto::common::v1::AuthContext;
use cms_proto::custody::v1::{AuditEvent, AuditOutcome};
use ring::digest;

use super::Event;

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
    /// "generated" or "imported".
    pub origin: &'a str,
}

/// A non-secret fingerprint of an identifier that may be a bearer secret (an online session
/// id): the first 16 bytes of its SHA-256, in hex. Whoever holds the id can compute it to
/// find the record; the record does not give the id away.
pub fn id_fingerprint(id: &[u8]) -> String {
    digest::digest(&digest::SHA256, id).as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
        caller: &str,
        auth: AuthContext,
        outcome: AuditOutcome,
        reason: String,
    ) -> Self {
        let mut e = Self::by(event, outcome, caller, auth).with("rpc", rpc);
        e.reason = reason;
        e
    }

    /// A PIV PUK rotation confirmation (before its outcome is known).
    pub fn puk_rotation(caller: &str, auth: AuthContext, reference: &str) -> Self {
        let mut e = Self::by(AuditEvent::PukRotation, AuditOutcome::Success, caller, auth);
        e.key_reference = reference.to_owned();
        e
    }

    /// A PIV PUK release (before its outcome is known).
    pub fn puk_release(
        caller: &str,
        auth: AuthContext,
        reference: &str,
        master_version: u32,
    ) -> Self {
        let mut e = Self::by(AuditEvent::PukRelease, AuditOutcome::Success, caller, auth);
        e.key_reference = reference.to_owned();
        e.key_version = master_version;
        e
    }
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
