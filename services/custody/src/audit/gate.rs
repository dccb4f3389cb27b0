//! The audit around custody's administrative RPCs: every refused or failed administrative
//! call is a record (whatever refused it: the caller's scope, the seal, a bad argument, a
//! key check value), and so are the ceremony steps and head exports that succeed. One layer
//! for all of them, so that no handler, present or future, can refuse without a record.
//!
//! Cryptograms and PUK requests are audited by their own handlers (their records also
//! decide the per-card budget), and reads that change nothing (status, key list, SO token
//! info) are not audited.

use cms_kit::PeerIdentity;
use cms_proto::common::v1::AuthContext;
use cms_proto::custody::v1 as pb;
use cms_proto::custody::v1::custody_service_server::CustodyService;
use cms_proto::custody::v1::{AuditEvent, AuditOutcome};
use tonic::{Code, Request, Response, Status};

use super::Event;
use super::events::{Ceremony, CeremonyStep, KcvOutcome};
use crate::service::Custody;

type Rpc<T> = Result<Response<T>, Status>;

/// Custody's gRPC service with its administrative calls audited.
pub struct Audited(pub Custody);

/// Who asked, taken from the request before it is handed on.
struct Asker {
    caller: String,
    auth: AuthContext,
}

fn asker<T>(request: &Request<T>, auth: Option<&AuthContext>) -> Asker {
    Asker {
        caller: PeerIdentity::of(request)
            .map(|p| p.spiffe_id.to_string())
            .unwrap_or_else(|| "unidentified".into()),
        auth: auth.cloned().unwrap_or_default(),
    }
}

/// The outcome and reason a refusal is recorded with: internal failures without detail.
fn refusal(status: &Status) -> (AuditOutcome, String) {
    match status.code() {
        Code::Internal | Code::Unknown | Code::DataLoss => {
            (AuditOutcome::Failed, "internal error".into())
        }
        Code::Unavailable => (AuditOutcome::Failed, status.message().to_owned()),
        _ => (AuditOutcome::Refused, status.message().to_owned()),
    }
}

impl Audited {
    /// Records `status` as a refusal of `rpc`; the caller gets `status` whatever happens to
    /// the record (when the audit cannot be written, the call was refused all the same).
    async fn refused(
        &self,
        event: AuditEvent,
        rpc: &'static str,
        asker: Asker,
        status: Status,
        edit: impl FnOnce(Event) -> Event,
    ) -> Status {
        let (outcome, reason) = refusal(&status);
        let record = edit(Event::admin_refused(
            event,
            rpc,
            &asker.caller,
            asker.auth,
            outcome,
            reason,
        ));
        if let Err(e) = self.0.audit.record(record, None).await {
            tracing::warn!(error = %e, rpc, "a refused administrative call could not be audited");
        }
        status
    }

    /// Hands `request` on, and records a refusal of it.
    async fn audited<T, R, F>(
        &self,
        event: AuditEvent,
        rpc: &'static str,
        request: Request<T>,
        auth: impl FnOnce(&T) -> Option<&AuthContext>,
        call: impl FnOnce(Request<T>) -> F,
    ) -> Rpc<R>
    where
        F: Future<Output = Rpc<R>>,
    {
        let asker = asker(&request, auth(request.get_ref()));
        match call(request).await {
            Ok(response) => Ok(response),
            Err(status) => Err(self.refused(event, rpc, asker, status, |e| e).await),
        }
    }
}

fn no_auth<T>(_: &T) -> Option<&AuthContext> {
    None
}

#[tonic::async_trait]
impl CustodyService for Audited {
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Rpc<pb::GetStatusResponse> {
        self.0.get_status(request).await
    }

    async fn list_master_keys(
        &self,
        request: Request<pb::ListMasterKeysRequest>,
    ) -> Rpc<pb::ListMasterKeysResponse> {
        self.0.list_master_keys(request).await
    }

    async fn compute_cryptogram(
        &self,
        request: Request<pb::ComputeCryptogramRequest>,
    ) -> Rpc<pb::ComputeCryptogramResponse> {
        self.0.compute_cryptogram(request).await
    }

    async fn release_piv_puk(
        &self,
        request: Request<pb::ReleasePivPukRequest>,
    ) -> Rpc<pb::ReleasePivPukResponse> {
        self.0.release_piv_puk(request).await
    }

    async fn confirm_puk_rotation(
        &self,
        request: Request<pb::ConfirmPukRotationRequest>,
    ) -> Rpc<pb::ConfirmPukRotationResponse> {
        self.0.confirm_puk_rotation(request).await
    }

    async fn get_puk_status(
        &self,
        request: Request<pb::GetPukStatusRequest>,
    ) -> Rpc<pb::GetPukStatusResponse> {
        self.0.get_puk_status(request).await
    }

    async fn get_so_token_info(
        &self,
        request: Request<pb::GetSoTokenInfoRequest>,
    ) -> Rpc<pb::GetSoTokenInfoResponse> {
        self.0.get_so_token_info(request).await
    }

    async fn init_seal(&self, request: Request<pb::InitSealRequest>) -> Rpc<pb::InitSealResponse> {
        let call = |r| self.0.init_seal(r);
        self.audited(
            AuditEvent::SealInit,
            "InitSeal",
            request,
            |r: &pb::InitSealRequest| r.auth.as_ref(),
            call,
        )
        .await
    }

    async fn unseal(&self, request: Request<pb::UnsealRequest>) -> Rpc<pb::UnsealResponse> {
        let call = |r| self.0.unseal(r);
        self.audited(
            AuditEvent::Unseal,
            "Unseal",
            request,
            |r: &pb::UnsealRequest| r.auth.as_ref(),
            call,
        )
        .await
    }

    async fn seal(&self, request: Request<pb::SealRequest>) -> Rpc<pb::SealResponse> {
        let call = |r| self.0.seal(r);
        self.audited(
            AuditEvent::Seal,
            "Seal",
            request,
            |r: &pb::SealRequest| r.auth.as_ref(),
            call,
        )
        .await
    }

    async fn generate_master_key(
        &self,
        request: Request<pb::GenerateMasterKeyRequest>,
    ) -> Rpc<pb::GenerateMasterKeyResponse> {
        let call = |r| self.0.generate_master_key(r);
        self.audited(
            AuditEvent::MasterKeyGenerate,
            "GenerateMasterKey",
            request,
            |r: &pb::GenerateMasterKeyRequest| r.auth.as_ref(),
            call,
        )
        .await
    }

    async fn finish_key_import(
        &self,
        request: Request<pb::FinishKeyImportRequest>,
    ) -> Rpc<pb::FinishKeyImportResponse> {
        let call = |r| self.0.finish_key_import(r);
        self.audited(
            AuditEvent::MasterKeyImport,
            "FinishKeyImport",
            request,
            |r: &pb::FinishKeyImportRequest| r.auth.as_ref(),
            call,
        )
        .await
    }

    async fn rotate_master_key(
        &self,
        request: Request<pb::RotateMasterKeyRequest>,
    ) -> Rpc<pb::RotateMasterKeyResponse> {
        let call = |r| self.0.rotate_master_key(r);
        self.audited(
            AuditEvent::MasterKeyRotate,
            "RotateMasterKey",
            request,
            |r: &pb::RotateMasterKeyRequest| r.auth.as_ref(),
            call,
        )
        .await
    }

    async fn retire_master_key_version(
        &self,
        request: Request<pb::RetireMasterKeyVersionRequest>,
    ) -> Rpc<pb::RetireMasterKeyVersionResponse> {
        let call = |r| self.0.retire_master_key_version(r);
        self.audited(
            AuditEvent::MasterKeyRetire,
            "RetireMasterKeyVersion",
            request,
            |r: &pb::RetireMasterKeyVersionRequest| r.auth.as_ref(),
            call,
        )
        .await
    }

    async fn init_so_token(
        &self,
        request: Request<pb::InitSoTokenRequest>,
    ) -> Rpc<pb::InitSoTokenResponse> {
        let call = |r| self.0.init_so_token(r);
        self.audited(
            AuditEvent::SoTokenInit,
            "InitSoToken",
            request,
            |r: &pb::InitSoTokenRequest| r.auth.as_ref(),
            call,
        )
        .await
    }

    async fn query_audit(
        &self,
        request: Request<pb::QueryAuditRequest>,
    ) -> Rpc<pb::QueryAuditResponse> {
        let call = |r| self.0.query_audit(r);
        self.audited(AuditEvent::AuditRead, "QueryAudit", request, no_auth, call)
            .await
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Rpc<pb::VerifyAuditResponse> {
        let call = |r| self.0.verify_audit(r);
        self.audited(AuditEvent::AuditRead, "VerifyAudit", request, no_auth, call)
            .await
    }

    async fn begin_key_import(
        &self,
        request: Request<pb::BeginKeyImportRequest>,
    ) -> Rpc<pb::BeginKeyImportResponse> {
        let asker = asker(&request, request.get_ref().auth.as_ref());
        let reference = request.get_ref().reference.clone();
        let response = match self.0.begin_key_import(request).await {
            Ok(response) => response,
            Err(status) => {
                let edit = |e: Event| {
                    let mut e = e.with("step", CeremonyStep::Begin.as_str());
                    e.key_reference = reference.clone();
                    e
                };
                let rpc = "BeginKeyImport";
                return Err(self
                    .refused(AuditEvent::MasterKeyImport, rpc, asker, status, edit)
                    .await);
            }
        };
        let begun = response.get_ref();
        let ceremony = Ceremony {
            import_id: &begun.import_id,
            reference: &reference,
            version: begun.version,
        };
        let event = Event::ceremony(CeremonyStep::Begin, &asker.caller, asker.auth, &ceremony);
        // The ceremony goes on only with its first record; without it, it is abandoned.
        if let Err(e) = self.0.audit.record(event, None).await {
            self.0.forget_import(&begun.import_id);
            return Err(crate::Error::from(e).into());
        }
        Ok(response)
    }

    async fn add_key_component(
        &self,
        request: Request<pb::AddKeyComponentRequest>,
    ) -> Rpc<pb::AddKeyComponentResponse> {
        let asker = asker(&request, request.get_ref().auth.as_ref());
        let import_id = request.get_ref().import_id.clone();
        let progress = self.0.import_progress(&import_id);
        let (reference, version, index, expected) = progress.clone().unwrap_or_default();
        let ceremony = Ceremony {
            import_id: &import_id,
            reference: &reference,
            version,
        };
        match self.0.add_key_component(request).await {
            Ok(response) => {
                let added = response.get_ref();
                let event = Event::ceremony_component(
                    &asker.caller,
                    asker.auth,
                    &ceremony,
                    added.components_received,
                    added.components_expected,
                    KcvOutcome::Matched,
                );
                self.0
                    .audit
                    .record(event, None)
                    .await
                    .map_err(crate::Error::from)?;
                Ok(response)
            }
            Err(status) => {
                let kcv = if status.message().contains("key check value") {
                    KcvOutcome::Mismatched
                } else {
                    KcvOutcome::NotChecked
                };
                let (outcome, reason) = refusal(&status);
                let mut event = Event::ceremony_component(
                    &asker.caller,
                    asker.auth,
                    &ceremony,
                    index + 1,
                    expected,
                    kcv,
                )
                .with("rpc", "AddKeyComponent");
                event.outcome = outcome as i32;
                event.reason = reason;
                if progress.is_none() {
                    event.attributes.remove("component");
                }
                if let Err(e) = self.0.audit.record(event, None).await {
                    tracing::warn!(error = %e, "a refused key component could not be audited");
                }
                Err(status)
            }
        }
    }

    async fn abort_key_import(
        &self,
        request: Request<pb::AbortKeyImportRequest>,
    ) -> Rpc<pb::AbortKeyImportResponse> {
        let asker = asker(&request, request.get_ref().auth.as_ref());
        let import_id = request.get_ref().import_id.clone();
        let reason: String = request.get_ref().reason.chars().take(200).collect();
        let (reference, version, ..) = self.0.import_progress(&import_id).unwrap_or_default();
        match self.0.abort_key_import(request).await {
            Ok(response) => {
                let ceremony = Ceremony {
                    import_id: &import_id,
                    reference: &reference,
                    version,
                };
                let mut event =
                    Event::ceremony(CeremonyStep::Abort, &asker.caller, asker.auth, &ceremony);
                event.reason = reason;
                self.0
                    .audit
                    .record(event, None)
                    .await
                    .map_err(crate::Error::from)?;
                Ok(response)
            }
            Err(status) => {
                let edit = |e: Event| {
                    e.with("step", CeremonyStep::Abort.as_str())
                        .with("import_id", import_id.clone())
                };
                Err(self
                    .refused(
                        AuditEvent::MasterKeyImport,
                        "AbortKeyImport",
                        asker,
                        status,
                        edit,
                    )
                    .await)
            }
        }
    }

    async fn export_audit_head(
        &self,
        request: Request<pb::ExportAuditHeadRequest>,
    ) -> Rpc<pb::ExportAuditHeadResponse> {
        let asker = asker(&request, request.get_ref().auth.as_ref());
        match self.0.export_audit_head(request).await {
            Ok(response) => {
                let sequence = response.get_ref().head.as_ref().map_or(0, |h| h.sequence);
                let event = Event::head_export(&asker.caller, asker.auth, sequence);
                // The export is answered only once it is on the record.
                self.0
                    .audit
                    .record(event, None)
                    .await
                    .map_err(crate::Error::from)?;
                Ok(response)
            }
            Err(status) => Err(self
                .refused(
                    AuditEvent::AuditHeadExport,
                    "ExportAuditHead",
                    asker,
                    status,
                    |e| e,
                )
                .await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_failures_are_recorded_without_their_detail() {
        let (outcome, reason) = refusal(&Status::internal("database: disk I/O error at /var"));
        assert_eq!(
            (outcome, reason.as_str()),
            (AuditOutcome::Failed, "internal error")
        );
        let (outcome, reason) = refusal(&Status::permission_denied("no admin scope"));
        assert_eq!(
            (outcome, reason.as_str()),
            (AuditOutcome::Refused, "no admin scope")
        );
        let (outcome, _) = refusal(&Status::unavailable("the audit log cannot be written"));
        assert_eq!(outcome, AuditOutcome::Failed);
    }
}
