//! AdminService: system administration by operators: the system status and custody's
//! administration. Every call is authorised against the caller's operator account first.

use std::sync::Arc;
use std::time::Duration;

use cms_kit::tls::TlsSource;
use cms_proto::common::v1::ServingState;
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::admin_service_server::AdminService;
use cms_proto::gateway::v1::{GetSystemStatusRequest, GetSystemStatusResponse, ServiceStatus};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::agents::Registry;
use crate::backends::Backends;
use crate::custody_admin::{self as custody, CustodyClient};
use crate::operators::OperatorAccounts;
use crate::roles::Action;

pub struct Admin {
    pub custody: CustodyClient,
    pub operators: OperatorAccounts,
    pub backends: Backends,
    pub agents: Registry,
    pub tls: Arc<TlsSource>,
    pub listen: String,
    pub stale_after: Duration,
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

#[tonic::async_trait]
impl AdminService for Admin {
    async fn get_system_status(
        &self,
        request: Request<GetSystemStatusRequest>,
    ) -> Result<Response<GetSystemStatusResponse>, Status> {
        self.operators
            .authorize(&request, Action::ViewStatus)
            .await?;
        let probes = self.backends.all().map(|backend| {
            let span = tracing::info_span!("probe", backend = backend.name);
            backend.probe().instrument(span)
        });
        let [template, directory, custody] = probes;
        let (template, directory, custody) = tokio::join!(template, directory, custody);

        let gateway_identity = self.tls.identity().to_string();
        let mut services = vec![ServiceStatus {
            name: "gateway".into(),
            address: self.listen.clone(),
            identity: gateway_identity.clone(),
            state: ServingState::Serving as i32,
            version: VERSION.into(),
            checked_at: Some(std::time::SystemTime::now().into()),
            ..Default::default()
        }];
        services.extend([template, directory, custody]);
        let agents = self.agents.list(self.stale_after);
        for view in &agents {
            services.push(ServiceStatus {
                name: "agent".into(),
                address: view.remote.map(|a| a.to_string()).unwrap_or_default(),
                identity: view.agent.identity.clone(),
                state: if view.stale {
                    ServingState::Degraded
                } else {
                    ServingState::Serving
                } as i32,
                version: view.agent.version.clone(),
                detail: if view.stale {
                    "connected, but silent longer than agent_link.stale_after_ms".into()
                } else {
                    format!("linked agent {}", view.agent.agent_id)
                },
                checked_at: view.agent.last_heartbeat_at,
                latency_ms: 0,
            });
        }
        let overall = services
            .iter()
            .map(|s| s.state)
            .max()
            .unwrap_or(ServingState::Unspecified as i32);
        Ok(Response::new(GetSystemStatusResponse {
            services,
            agents: agents.into_iter().map(|v| v.agent).collect(),
            gateway_version: VERSION.into(),
            gateway_identity,
            overall_state: overall,
        }))
    }

    async fn get_custody_status(
        &self,
        r: Request<gw::GetCustodyStatusRequest>,
    ) -> Result<Response<gw::GetCustodyStatusResponse>, Status> {
        let who = self.operators.authorize(&r, Action::ViewStatus).await?;
        custody::status(self.custody.clone(), who, r).await
    }

    async fn init_custody(
        &self,
        r: Request<gw::InitCustodyRequest>,
    ) -> Result<Response<gw::InitCustodyResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::AdministerCustody)
            .await?;
        custody::init(self.custody.clone(), who, r).await
    }

    async fn unseal(
        &self,
        r: Request<gw::UnsealRequest>,
    ) -> Result<Response<gw::UnsealResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::AdministerCustody)
            .await?;
        custody::unseal(self.custody.clone(), who, r).await
    }

    async fn seal(
        &self,
        r: Request<gw::SealRequest>,
    ) -> Result<Response<gw::SealResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::AdministerCustody)
            .await?;
        custody::seal(self.custody.clone(), who, r).await
    }

    async fn list_master_keys(
        &self,
        r: Request<gw::ListMasterKeysRequest>,
    ) -> Result<Response<gw::ListMasterKeysResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::ReadKeyMetadata)
            .await?;
        custody::list_keys(self.custody.clone(), who, r).await
    }

    async fn generate_master_key(
        &self,
        r: Request<gw::GenerateMasterKeyRequest>,
    ) -> Result<Response<gw::GenerateMasterKeyResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::AdministerCustody)
            .await?;
        custody::generate_key(self.custody.clone(), who, r).await
    }

    async fn rotate_master_key(
        &self,
        r: Request<gw::RotateMasterKeyRequest>,
    ) -> Result<Response<gw::RotateMasterKeyResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::AdministerCustody)
            .await?;
        custody::rotate_key(self.custody.clone(), who, r).await
    }

    async fn retire_master_key_version(
        &self,
        r: Request<gw::RetireMasterKeyVersionRequest>,
    ) -> Result<Response<gw::RetireMasterKeyVersionResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::AdministerCustody)
            .await?;
        custody::retire_key(self.custody.clone(), who, r).await
    }

    async fn begin_key_import(
        &self,
        r: Request<gw::BeginKeyImportRequest>,
    ) -> Result<Response<gw::BeginKeyImportResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::AdministerCustody)
            .await?;
        custody::begin_import(self.custody.clone(), who, r).await
    }

    async fn add_key_component(
        &self,
        r: Request<gw::AddKeyComponentRequest>,
    ) -> Result<Response<gw::AddKeyComponentResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::AdministerCustody)
            .await?;
        custody::add_component(self.custody.clone(), who, r).await
    }

    async fn finish_key_import(
        &self,
        r: Request<gw::FinishKeyImportRequest>,
    ) -> Result<Response<gw::FinishKeyImportResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::AdministerCustody)
            .await?;
        custody::finish_import(self.custody.clone(), who, r).await
    }

    async fn abort_key_import(
        &self,
        r: Request<gw::AbortKeyImportRequest>,
    ) -> Result<Response<gw::AbortKeyImportResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::AdministerCustody)
            .await?;
        custody::abort_import(self.custody.clone(), who, r).await
    }

    async fn query_audit(
        &self,
        r: Request<gw::QueryAuditRequest>,
    ) -> Result<Response<gw::QueryAuditResponse>, Status> {
        let who = self.operators.authorize(&r, Action::ReadAudit).await?;
        custody::query_audit(self.custody.clone(), who, r).await
    }

    async fn export_audit_head(
        &self,
        r: Request<gw::ExportAuditHeadRequest>,
    ) -> Result<Response<gw::ExportAuditHeadResponse>, Status> {
        let who = self.operators.authorize(&r, Action::ReadAudit).await?;
        custody::export_head(self.custody.clone(), who, r).await
    }

    async fn verify_audit(
        &self,
        r: Request<gw::VerifyAuditRequest>,
    ) -> Result<Response<gw::VerifyAuditResponse>, Status> {
        let who = self.operators.authorize(&r, Action::ReadAudit).await?;
        custody::verify_audit(self.custody.clone(), who, r).await
    }

    async fn init_so_token(
        &self,
        r: Request<gw::InitSoTokenRequest>,
    ) -> Result<Response<gw::InitSoTokenResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::AdministerCustody)
            .await?;
        custody::init_so_token(self.custody.clone(), who, r).await
    }

    async fn get_so_token_info(
        &self,
        r: Request<gw::GetSoTokenInfoRequest>,
    ) -> Result<Response<gw::GetSoTokenInfoResponse>, Status> {
        let who = self
            .operators
            .authorize(&r, Action::ReadKeyMetadata)
            .await?;
        custody::so_token_info(self.custody.clone(), who, r).await
    }
}
