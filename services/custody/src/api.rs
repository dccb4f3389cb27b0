//! The one tonic adapter of custody's API: each RPC takes the serving custody of this
//! replica, the verified peer and the message, calls the domain function and encodes its
//! result. Administrative calls pass their result through the audit gate
//! ([`crate::audit::gate`]), so that a refusal is on the record before the caller hears of it.

use std::sync::Arc;

use cms_proto::custody::v1 as pb;
use cms_proto::custody::v1::custody_service_server::CustodyService;
use tonic::{Request, Response, Status};

use crate::audit::gate::{AdminRpc, Asker};
use crate::custody::Custody;
use crate::error::Error;
use crate::guards::{self, Peer};
use crate::replica::{Replica, STANDBY};

type Rpc<T> = Result<Response<T>, Status>;

/// The active instance's own entry for the gateway's per-instance seal list.
fn active_instance(seal_state: i32, progress: u32, threshold: u32) -> pb::InstanceSeal {
    pb::InstanceSeal {
        reached: true,
        role: pb::ReplicaRole::Active as i32,
        seal_state,
        progress,
        threshold,
        ..Default::default()
    }
}

fn answer<T>(result: Result<T, Error>) -> Rpc<T> {
    result.map(Response::new).map_err(Status::from)
}

impl Replica {
    /// The custody serving on this replica (or why none), the verified peer, the message.
    fn decode<T>(&self, request: Request<T>) -> Result<(Arc<Custody>, Peer, T), Status> {
        let custody = self.serving()?;
        let peer = Peer::of(&request);
        Ok((custody, peer, request.into_inner()))
    }
}

#[tonic::async_trait]
impl CustodyService for Replica {
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Rpc<pb::GetStatusResponse> {
        let peer = Peer::of(&request);
        match self.serving() {
            Ok(custody) => answer(custody.status(&peer).await),
            Err(_standby) => {
                guards::caller(self.callers(), &peer)?;
                let (seal_state, unseal_progress, unseal_threshold) =
                    self.standby_seal.status().await;
                Ok(Response::new(pb::GetStatusResponse {
                    seal_state: seal_state as i32,
                    unseal_progress,
                    unseal_threshold,
                    detail: STANDBY.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }))
            }
        }
    }

    async fn init_seal(&self, request: Request<pb::InitSealRequest>) -> Rpc<pb::InitSealResponse> {
        let (custody, peer, req) = self.decode(request)?;
        let asker = Asker::new(&peer, req.auth.as_ref());
        let result = custody.init_seal(&peer, req).await;
        answer(custody.gate(AdminRpc::InitSeal, asker, result).await)
    }

    async fn unseal(&self, request: Request<pb::UnsealRequest>) -> Rpc<pb::UnsealResponse> {
        let Ok(custody) = self.serving() else {
            // A standby keeps the seal for its turn (see `standby_seal`).
            let peer = Peer::of(&request);
            let req = request.into_inner();
            return answer(self.standby_seal.unseal(self.callers(), &peer, req).await);
        };
        let (peer, req) = (Peer::of(&request), request.into_inner());
        let asker = Asker::new(&peer, req.auth.as_ref());
        let result = custody.unseal(&peer, req).await.map(|mut r| {
            r.instances = vec![active_instance(r.seal_state, r.progress, r.threshold)];
            r
        });
        answer(custody.gate(AdminRpc::Unseal, asker, result).await)
    }

    async fn seal(&self, request: Request<pb::SealRequest>) -> Rpc<pb::SealResponse> {
        let Ok(custody) = self.serving() else {
            let peer = Peer::of(&request);
            return answer(self.standby_seal.seal(self.callers(), &peer));
        };
        let (peer, req) = (Peer::of(&request), request.into_inner());
        let asker = Asker::new(&peer, req.auth.as_ref());
        let result = custody.seal(&peer, req).await.map(|mut r| {
            r.instances = vec![active_instance(r.seal_state, 0, 0)];
            r
        });
        answer(custody.gate(AdminRpc::Seal, asker, result).await)
    }

    async fn generate_master_key(
        &self,
        request: Request<pb::GenerateMasterKeyRequest>,
    ) -> Rpc<pb::GenerateMasterKeyResponse> {
        let (custody, peer, req) = self.decode(request)?;
        let asker = Asker::new(&peer, req.auth.as_ref());
        let result = custody.generate_master_key(&peer, req).await;
        answer(
            custody
                .gate(AdminRpc::GenerateMasterKey, asker, result)
                .await,
        )
    }

    async fn rotate_master_key(
        &self,
        request: Request<pb::RotateMasterKeyRequest>,
    ) -> Rpc<pb::RotateMasterKeyResponse> {
        let (custody, peer, req) = self.decode(request)?;
        let asker = Asker::new(&peer, req.auth.as_ref());
        let result = custody.rotate_master_key(&peer, req).await;
        answer(custody.gate(AdminRpc::RotateMasterKey, asker, result).await)
    }

    async fn retire_master_key_version(
        &self,
        request: Request<pb::RetireMasterKeyVersionRequest>,
    ) -> Rpc<pb::RetireMasterKeyVersionResponse> {
        let (custody, peer, req) = self.decode(request)?;
        let asker = Asker::new(&peer, req.auth.as_ref());
        let result = custody.retire_master_key_version(&peer, req).await;
        answer(
            custody
                .gate(AdminRpc::RetireMasterKeyVersion, asker, result)
                .await,
        )
    }

    async fn list_master_keys(
        &self,
        request: Request<pb::ListMasterKeysRequest>,
    ) -> Rpc<pb::ListMasterKeysResponse> {
        let (custody, peer, req) = self.decode(request)?;
        answer(custody.list_master_keys(&peer, req).await)
    }

    async fn begin_key_import(
        &self,
        request: Request<pb::BeginKeyImportRequest>,
    ) -> Rpc<pb::BeginKeyImportResponse> {
        let (custody, peer, req) = self.decode(request)?;
        answer(custody.begin_key_import(&peer, req).await)
    }

    async fn add_key_component(
        &self,
        request: Request<pb::AddKeyComponentRequest>,
    ) -> Rpc<pb::AddKeyComponentResponse> {
        let (custody, peer, req) = self.decode(request)?;
        answer(custody.add_key_component(&peer, req).await)
    }

    async fn finish_key_import(
        &self,
        request: Request<pb::FinishKeyImportRequest>,
    ) -> Rpc<pb::FinishKeyImportResponse> {
        let (custody, peer, req) = self.decode(request)?;
        let asker = Asker::new(&peer, req.auth.as_ref());
        let result = custody.finish_key_import(&peer, req).await;
        answer(custody.gate(AdminRpc::FinishKeyImport, asker, result).await)
    }

    async fn abort_key_import(
        &self,
        request: Request<pb::AbortKeyImportRequest>,
    ) -> Rpc<pb::AbortKeyImportResponse> {
        let (custody, peer, req) = self.decode(request)?;
        answer(custody.abort_key_import(&peer, req).await)
    }

    async fn compute_cryptogram(
        &self,
        request: Request<pb::ComputeCryptogramRequest>,
    ) -> Rpc<pb::ComputeCryptogramResponse> {
        let (custody, peer, req) = self.decode(request)?;
        answer(custody.compute_cryptogram(&peer, req).await)
    }

    async fn release_piv_puk(
        &self,
        request: Request<pb::ReleasePivPukRequest>,
    ) -> Rpc<pb::ReleasePivPukResponse> {
        let (custody, peer, req) = self.decode(request)?;
        answer(custody.release_piv_puk(&peer, req).await)
    }

    async fn confirm_puk_rotation(
        &self,
        request: Request<pb::ConfirmPukRotationRequest>,
    ) -> Rpc<pb::ConfirmPukRotationResponse> {
        let (custody, peer, req) = self.decode(request)?;
        answer(custody.confirm_puk_rotation(&peer, req).await)
    }

    async fn get_puk_status(
        &self,
        request: Request<pb::GetPukStatusRequest>,
    ) -> Rpc<pb::GetPukStatusResponse> {
        let (custody, peer, req) = self.decode(request)?;
        answer(custody.puk_status(&peer, req).await)
    }

    async fn init_so_token(
        &self,
        request: Request<pb::InitSoTokenRequest>,
    ) -> Rpc<pb::InitSoTokenResponse> {
        let (custody, peer, req) = self.decode(request)?;
        let asker = Asker::new(&peer, req.auth.as_ref());
        let result = custody.init_so_token(&peer, req).await;
        answer(custody.gate(AdminRpc::InitSoToken, asker, result).await)
    }

    async fn get_so_token_info(
        &self,
        request: Request<pb::GetSoTokenInfoRequest>,
    ) -> Rpc<pb::GetSoTokenInfoResponse> {
        let (custody, peer, req) = self.decode(request)?;
        answer(custody.so_token_info(&peer, req).await)
    }

    async fn query_audit(
        &self,
        request: Request<pb::QueryAuditRequest>,
    ) -> Rpc<pb::QueryAuditResponse> {
        let (custody, peer, req) = self.decode(request)?;
        let asker = Asker::new(&peer, None);
        let result = custody.query_audit(&peer, req).await;
        answer(custody.gate(AdminRpc::QueryAudit, asker, result).await)
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Rpc<pb::VerifyAuditResponse> {
        let (custody, peer, req) = self.decode(request)?;
        let asker = Asker::new(&peer, None);
        let result = custody.verify_audit(&peer, req).await;
        answer(custody.gate(AdminRpc::VerifyAudit, asker, result).await)
    }

    async fn export_audit_head(
        &self,
        request: Request<pb::ExportAuditHeadRequest>,
    ) -> Rpc<pb::ExportAuditHeadResponse> {
        let (custody, peer, req) = self.decode(request)?;
        answer(custody.export_audit_head(&peer, req).await)
    }
}
