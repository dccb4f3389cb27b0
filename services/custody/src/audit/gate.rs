//! The audit around custody's administrative RPCs: every refused or failed administrative
//! call is a record (whatever refused it: the caller's scope, the seal, a bad argument, a
//! key check value), and so are the ceremony steps and head exports that succeed. The API
//! adapter passes each administrative result through [`Custody::gate`]; the ceremony steps
//! and the head export record their own outcomes (`key_import`, `audit_admin`).
//!
//! Cryptograms and PUK requests are audited by their own domain functions (their records
//! also decide the per-card budget), and reads that change nothing (status, key list, SO
//! token info) are not audited.

use cms_proto::common::v1::AuthContext;
use cms_proto::custody::v1::{AuditEvent, AuditOutcome};
use tonic::Code;

use super::Event;
use crate::custody::Custody;
use crate::error::Error;
use crate::guards::Peer;

/// Who asked, taken from the request before it is handed on.
pub struct Asker {
    pub caller: String,
    pub auth: AuthContext,
}

impl Asker {
    pub fn new(peer: &Peer, auth: Option<&AuthContext>) -> Self {
        Self {
            caller: peer.audit_name(),
            auth: auth.cloned().unwrap_or_default(),
        }
    }
}

/// An administrative RPC whose refusals the gate records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AdminRpc {
    InitSeal,
    Unseal,
    Seal,
    GenerateMasterKey,
    FinishKeyImport,
    RotateMasterKey,
    RetireMasterKeyVersion,
    InitSoToken,
    QueryAudit,
    VerifyAudit,
}

impl AdminRpc {
    /// The RPC's name in the record (attribute "rpc").
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::InitSeal => "InitSeal",
            Self::Unseal => "Unseal",
            Self::Seal => "Seal",
            Self::GenerateMasterKey => "GenerateMasterKey",
            Self::FinishKeyImport => "FinishKeyImport",
            Self::RotateMasterKey => "RotateMasterKey",
            Self::RetireMasterKeyVersion => "RetireMasterKeyVersion",
            Self::InitSoToken => "InitSoToken",
            Self::QueryAudit => "QueryAudit",
            Self::VerifyAudit => "VerifyAudit",
        }
    }

    /// The kind of event its refusal is recorded as.
    pub(crate) fn event(self) -> AuditEvent {
        match self {
            Self::InitSeal => AuditEvent::SealInit,
            Self::Unseal => AuditEvent::Unseal,
            Self::Seal => AuditEvent::Seal,
            Self::GenerateMasterKey => AuditEvent::MasterKeyGenerate,
            Self::FinishKeyImport => AuditEvent::MasterKeyImport,
            Self::RotateMasterKey => AuditEvent::MasterKeyRotate,
            Self::RetireMasterKeyVersion => AuditEvent::MasterKeyRetire,
            Self::InitSoToken => AuditEvent::SoTokenInit,
            Self::QueryAudit | Self::VerifyAudit => AuditEvent::AuditRead,
        }
    }
}

/// The outcome and reason a refusal is recorded with: internal failures without detail.
pub(crate) fn refusal(error: &Error) -> (AuditOutcome, String) {
    match error.code() {
        Code::Internal | Code::Unknown | Code::DataLoss => {
            (AuditOutcome::Failed, "internal error".into())
        }
        Code::Unavailable => (AuditOutcome::Failed, error.to_string()),
        _ => (AuditOutcome::Refused, error.to_string()),
    }
}

impl Custody {
    /// `result` of administrative call `rpc`, its refusal recorded first. The caller gets the
    /// refusal whatever happens to the record (when the audit cannot be written, the call was
    /// refused all the same).
    pub(crate) async fn gate<T>(
        &self,
        rpc: AdminRpc,
        asker: Asker,
        result: Result<T, Error>,
    ) -> Result<T, Error> {
        let error = match result {
            Ok(answer) => return Ok(answer),
            Err(error) => error,
        };
        let (outcome, reason) = refusal(&error);
        let event = Event::admin_refused(rpc.event(), rpc.name(), &asker, outcome, reason);
        self.record_refusal(event, rpc.name()).await;
        Err(error)
    }

    /// Records a refused administrative call; a record that cannot be written is logged.
    pub(crate) async fn record_refusal(&self, event: Event, rpc: &'static str) {
        if let Err(e) = self.audit.record(event, None).await {
            tracing::warn!(error = %e, rpc, "a refused administrative call could not be audited");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_failures_are_recorded_without_their_detail() {
        let (outcome, reason) = refusal(&Error::Store(sea_orm::DbErr::Custom(
            "database: disk I/O error at /var".into(),
        )));
        assert_eq!(
            (outcome, reason.as_str()),
            (AuditOutcome::Failed, "internal error")
        );
        let (outcome, reason) = refusal(&Error::NotAllowed("no admin scope".into()));
        assert_eq!(
            (outcome, reason.as_str()),
            (AuditOutcome::Refused, "no admin scope")
        );
        let (outcome, _) = refusal(&Error::AuditUnavailable);
        assert_eq!(outcome, AuditOutcome::Failed);
    }
}
