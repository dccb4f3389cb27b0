//! The key import ceremony's records: each step, each component and how its key check
//! value compared, refusals and aborts.

use cms_proto::common::v1::AuthContext;
use cms_proto::custody::v1::{AuditEvent, AuditOutcome};

use super::super::Event;
use super::super::gate::Asker;

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

impl Event {
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
}
