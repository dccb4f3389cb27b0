//! Custody administration by operators, passed through to custody with the operator's
//! verified identity as the audit context. Every function takes the `Authorized` proof that
//! the caller's roles allow the call. Custody's own errors (already free of secrets, with
//! their ErrorDetail) go back to the operator unchanged.

use cms_proto::common::v1::{ActorKind, AuthContext, Flow};
use cms_proto::custody::v1 as custody;
use cms_proto::gateway::v1 as gw;
use tonic::{Request, Response, Status};

use crate::operators::Authorized;

pub type CustodyClient =
    custody::custody_service_client::CustodyServiceClient<cms_kit::client::Channel>;

/// The operator behind a request, as custody's audit context.
pub fn operator_context<T>(who: &Authorized, request: &Request<T>) -> AuthContext {
    let peer = cms_kit::PeerIdentity::of(request)
        .map(|p| p.spiffe_id.to_string())
        .unwrap_or_default();
    let request_id = request
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .chars()
        .take(64)
        .collect();
    AuthContext {
        actor_kind: ActorKind::Operator as i32,
        actor_id: who.operator().to_owned(),
        flow: Flow::Administration as i32,
        peer_identity: peer,
        request_id,
        ..Default::default()
    }
}

pub async fn status(
    mut client: CustodyClient,
    _who: Authorized,
    _request: Request<gw::GetCustodyStatusRequest>,
) -> Result<Response<gw::GetCustodyStatusResponse>, Status> {
    let s = client
        .get_status(custody::GetStatusRequest {})
        .await?
        .into_inner();
    Ok(Response::new(gw::GetCustodyStatusResponse {
        seal_state: s.seal_state,
        self_test: s.self_test,
        backend: s.backend,
        unseal_progress: s.unseal_progress,
        unseal_threshold: s.unseal_threshold,
        master_key_count: s.master_key_count,
        active_key_version_count: s.active_key_version_count,
        audit_head: s.audit_head,
        so_token_initialised: s.so_token_initialised,
        detail: s.detail,
        version: s.version,
    }))
}

pub async fn init(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::InitCustodyRequest>,
) -> Result<Response<gw::InitCustodyResponse>, Status> {
    let auth = operator_context(&who, &request);
    let req = request.into_inner();
    let r = client
        .init_seal(custody::InitSealRequest {
            threshold: req.threshold,
            share_count: req.share_count,
            custodian_labels: req.custodian_labels,
            auth: Some(auth),
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::InitCustodyResponse {
        shares: r.shares,
        threshold: r.threshold,
        seal_state: r.seal_state,
    }))
}

pub async fn unseal(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::UnsealRequest>,
) -> Result<Response<gw::UnsealResponse>, Status> {
    let auth = operator_context(&who, &request);
    let req = request.into_inner();
    let r = client
        .unseal(custody::UnsealRequest {
            share: req.share,
            reset: req.reset,
            custodian_label: req.custodian_label,
            auth: Some(auth),
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::UnsealResponse {
        seal_state: r.seal_state,
        progress: r.progress,
        threshold: r.threshold,
    }))
}

pub async fn seal(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::SealRequest>,
) -> Result<Response<gw::SealResponse>, Status> {
    let auth = operator_context(&who, &request);
    let req = request.into_inner();
    let r = client
        .seal(custody::SealRequest {
            reason: req.reason,
            auth: Some(auth),
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::SealResponse {
        seal_state: r.seal_state,
    }))
}

pub async fn list_keys(
    mut client: CustodyClient,
    _who: Authorized,
    request: Request<gw::ListMasterKeysRequest>,
) -> Result<Response<gw::ListMasterKeysResponse>, Status> {
    let req = request.into_inner();
    let r = client
        .list_master_keys(custody::ListMasterKeysRequest {
            reference: req.reference,
            include_retired: req.include_retired,
            page: req.page,
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::ListMasterKeysResponse {
        keys: r.keys,
        page: r.page,
    }))
}

pub async fn generate_key(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::GenerateMasterKeyRequest>,
) -> Result<Response<gw::GenerateMasterKeyResponse>, Status> {
    let auth = operator_context(&who, &request);
    let req = request.into_inner();
    let r = client
        .generate_master_key(custody::GenerateMasterKeyRequest {
            reference: req.reference,
            algorithm: req.algorithm,
            description: req.description,
            auth: Some(auth),
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::GenerateMasterKeyResponse { key: r.key }))
}

pub async fn rotate_key(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::RotateMasterKeyRequest>,
) -> Result<Response<gw::RotateMasterKeyResponse>, Status> {
    let auth = operator_context(&who, &request);
    let req = request.into_inner();
    let r = client
        .rotate_master_key(custody::RotateMasterKeyRequest {
            reference: req.reference,
            description: req.description,
            auth: Some(auth),
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::RotateMasterKeyResponse {
        key: r.key,
        previous: r.previous,
    }))
}

pub async fn retire_key(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::RetireMasterKeyVersionRequest>,
) -> Result<Response<gw::RetireMasterKeyVersionResponse>, Status> {
    let auth = operator_context(&who, &request);
    let req = request.into_inner();
    let r = client
        .retire_master_key_version(custody::RetireMasterKeyVersionRequest {
            reference: req.reference,
            version: req.version,
            reason: req.reason,
            auth: Some(auth),
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::RetireMasterKeyVersionResponse {
        key: r.key,
    }))
}

pub async fn begin_import(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::BeginKeyImportRequest>,
) -> Result<Response<gw::BeginKeyImportResponse>, Status> {
    let auth = operator_context(&who, &request);
    let req = request.into_inner();
    let r = client
        .begin_key_import(custody::BeginKeyImportRequest {
            reference: req.reference,
            algorithm: req.algorithm,
            component_count: req.component_count,
            description: req.description,
            make_current: req.make_current,
            auth: Some(auth),
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::BeginKeyImportResponse {
        import_id: r.import_id,
        version: r.version,
        expires_at: r.expires_at,
    }))
}

pub async fn add_component(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::AddKeyComponentRequest>,
) -> Result<Response<gw::AddKeyComponentResponse>, Status> {
    let auth = operator_context(&who, &request);
    let req = request.into_inner();
    let r = client
        .add_key_component(custody::AddKeyComponentRequest {
            import_id: req.import_id,
            component: req.component,
            expected_kcv: req.expected_kcv,
            custodian_label: req.custodian_label,
            auth: Some(auth),
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::AddKeyComponentResponse {
        components_received: r.components_received,
        components_expected: r.components_expected,
        component_kcv: r.component_kcv,
    }))
}

pub async fn finish_import(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::FinishKeyImportRequest>,
) -> Result<Response<gw::FinishKeyImportResponse>, Status> {
    let auth = operator_context(&who, &request);
    let req = request.into_inner();
    let r = client
        .finish_key_import(custody::FinishKeyImportRequest {
            import_id: req.import_id,
            expected_kcv: req.expected_kcv,
            auth: Some(auth),
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::FinishKeyImportResponse { key: r.key }))
}

pub async fn abort_import(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::AbortKeyImportRequest>,
) -> Result<Response<gw::AbortKeyImportResponse>, Status> {
    let auth = operator_context(&who, &request);
    let req = request.into_inner();
    client
        .abort_key_import(custody::AbortKeyImportRequest {
            import_id: req.import_id,
            reason: req.reason,
            auth: Some(auth),
        })
        .await?;
    Ok(Response::new(gw::AbortKeyImportResponse {}))
}

pub async fn query_audit(
    mut client: CustodyClient,
    _who: Authorized,
    request: Request<gw::QueryAuditRequest>,
) -> Result<Response<gw::QueryAuditResponse>, Status> {
    let q = request.into_inner();
    let r = client
        .query_audit(custody::QueryAuditRequest {
            from_time: q.from_time,
            to_time: q.to_time,
            card_id: q.card_id,
            actor_id: q.actor_id,
            user_id: q.user_id,
            events: q.events,
            outcome: q.outcome,
            request_id: q.request_id,
            from_sequence: q.from_sequence,
            page: q.page,
            descending: q.descending,
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::QueryAuditResponse {
        records: r.records,
        page: r.page,
    }))
}

pub async fn export_head(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::ExportAuditHeadRequest>,
) -> Result<Response<gw::ExportAuditHeadResponse>, Status> {
    let auth = operator_context(&who, &request);
    let r = client
        .export_audit_head(custody::ExportAuditHeadRequest { auth: Some(auth) })
        .await?
        .into_inner();
    Ok(Response::new(gw::ExportAuditHeadResponse { head: r.head }))
}

pub async fn verify_audit(
    mut client: CustodyClient,
    _who: Authorized,
    request: Request<gw::VerifyAuditRequest>,
) -> Result<Response<gw::VerifyAuditResponse>, Status> {
    let req = request.into_inner();
    let r = client
        .verify_audit(custody::VerifyAuditRequest {
            expected_head: req.expected_head,
            from_sequence: req.from_sequence,
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::VerifyAuditResponse {
        ok: r.ok,
        records_checked: r.records_checked,
        first_bad_sequence: r.first_bad_sequence,
        reason: r.reason,
        head: r.head,
    }))
}

pub async fn init_so_token(
    mut client: CustodyClient,
    who: Authorized,
    request: Request<gw::InitSoTokenRequest>,
) -> Result<Response<gw::InitSoTokenResponse>, Status> {
    let auth = operator_context(&who, &request);
    let req = request.into_inner();
    let r = client
        .init_so_token(custody::InitSoTokenRequest {
            label: req.label,
            algorithm: req.algorithm,
            share_count: req.share_count,
            share_threshold: req.share_threshold,
            card_id: req.card_id,
            auth: Some(auth),
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::InitSoTokenResponse {
        so_unblock_key: r.so_unblock_key,
        shares: r.shares,
        kcv: r.kcv,
        info: r.info,
    }))
}

pub async fn so_token_info(
    mut client: CustodyClient,
    _who: Authorized,
    request: Request<gw::GetSoTokenInfoRequest>,
) -> Result<Response<gw::GetSoTokenInfoResponse>, Status> {
    let r = client
        .get_so_token_info(custody::GetSoTokenInfoRequest {
            label: request.into_inner().label,
        })
        .await?
        .into_inner();
    Ok(Response::new(gw::GetSoTokenInfoResponse { info: r.info }))
}
