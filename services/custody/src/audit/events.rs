//! One constructor per kind of audited event, so that every record of a kind carries the
//! same fields and attributes. None takes a secret: no key, component, share, challenge,
//! response or PUK reaches an [`Event`].

use cms_cardcrypto::Scheme;
use cms_proto::common::v1::AuthContext;
use cms_proto::custody::v1::{AuditEvent, AuditOutcome};

use super::Event;
use super::gate::Asker;

mod ceremony;
mod puk;

pub use ceremony::{Ceremony, CeremonyStep, KcvOutcome};
pub use puk::{PukReleaseFacts, id_fingerprint};

/// The caller custody itself is, in the records it writes on its own behalf.
pub const SELF: &str = "custody";

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

impl Event {
    pub(super) fn by(
        event: AuditEvent,
        outcome: AuditOutcome,
        caller: &str,
        auth: AuthContext,
    ) -> Self {
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
}
