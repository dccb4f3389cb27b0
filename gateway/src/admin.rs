//! AdminService: system administration by operators: the system status, and templates,
//! operators, users, cards and custody passed through to their backends. Every call is
//! authorised against the caller's operator account first, and forwarded by `forward`.

use std::sync::Arc;
use std::time::Duration;

use cms_kit::tls::TlsSource;
use cms_proto::common::v1::ServingState;
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::admin_service_server::AdminService;
use cms_proto::gateway::v1::{GetSystemStatusRequest, GetSystemStatusResponse, ServiceStatus};
use futures_util::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::admin_scope::Target;
use crate::agents::Registry;
use crate::backends::Backends;
use crate::custody_instances::{self, CustodyInstances};
use crate::forward::{self, Call};
use crate::key_references;
use crate::operators::OperatorAccounts;
use crate::roles::Action;

pub type CustodyClient =
    cms_proto::custody::v1::custody_service_client::CustodyServiceClient<cms_kit::client::Channel>;
pub type TemplateClient = cms_proto::template::v1::template_service_client::TemplateServiceClient<
    cms_kit::client::Channel,
>;
pub type DirectoryClient =
    cms_proto::directory::v1::directory_service_client::DirectoryServiceClient<
        cms_kit::client::Channel,
    >;

pub struct Admin {
    pub custody: CustodyClient,
    /// Every custody instance, for Unseal and Seal.
    pub custody_instances: CustodyInstances,
    pub template: TemplateClient,
    pub directory: DirectoryClient,
    pub operators: Arc<OperatorAccounts>,
    pub backends: Backends,
    pub agents: Registry,
    pub tls: Arc<TlsSource>,
    pub listen: String,
    pub stale_after: Duration,
    /// The gateway's database, for the decision log.
    pub db: sea_orm::DatabaseConnection,
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

type ImportCredentialsStream = std::pin::Pin<
    Box<dyn Stream<Item = Result<gw::ImportCredentialsResponse, Status>> + Send + 'static>,
>;

type SyncLdapStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<gw::SyncLdapResponse, Status>> + Send + 'static>>;

impl Admin {
    /// Authorises `request` for `action`, or records the refusal in the decision log.
    async fn begin<T>(
        &self,
        rpc: &'static str,
        action: Action,
        request: &Request<T>,
    ) -> Result<Call, Status> {
        match self.operators.authorize(request, action).await {
            Ok(who) => Ok(Call::new(rpc, action, &who, request).logged_to(&self.db)),
            Err(err) => {
                let status = Status::from(err);
                self.record_refusal(rpc, action, request, &status);
                Err(status)
            }
        }
    }

    /// Logs a refusal before any backend was called, in the tracing log and the database.
    pub fn record_refusal<T>(
        &self,
        rpc: &'static str,
        action: Action,
        request: &Request<T>,
        status: &Status,
    ) {
        forward::record_refusal(rpc, action, request, status);
        crate::decisions::Decision {
            peer: crate::caller::peer_label(request),
            rpc,
            action: "admin",
            rule: "roles",
            request_id: forward::request_id_of(request),
            ..Default::default()
        }
        .spawn_record(
            &self.db,
            format!("{:?}", status.code()),
            status.message().to_owned(),
        );
    }

    /// As `begin`, for a request head that the caller does not need back.
    async fn begin_owned(
        &self,
        rpc: &'static str,
        action: Action,
        head: Request<()>,
    ) -> Result<Call, Status> {
        self.begin(rpc, action, &head).await
    }

    /// Refuses a spec naming master keys custody does not have (recorded as a decision).
    async fn check_keys(
        &self,
        call: &Call,
        spec: Option<&cms_proto::template::v1::TemplateSpec>,
    ) -> Result<(), Status> {
        let Some(spec) = spec else { return Ok(()) };
        let violations = key_references::check(&self.custody, call, spec).await;
        let refusal = match violations {
            Ok(v) if v.is_empty() => return Ok(()),
            Ok(v) => key_references::refusal(&v),
            Err(status) => status,
        };
        call.record(Some(&refusal));
        Err(refusal)
    }
}

/// Whether an update with `mask` writes the roles (no mask: every field).
fn writes_roles(mask: Option<&prost_types::FieldMask>) -> bool {
    mask.is_none_or(|m| m.paths.is_empty() || m.paths.iter().any(|p| p == "roles"))
}

/// Refuses (and records) role names the gateway does not know: a typo such as "Admin" would
/// otherwise make an operator who can do nothing.
fn refuse_unknown_roles(call: &Call, roles: &[String]) -> Result<(), Status> {
    crate::roles::check_role_names(roles).map_err(|message| {
        let refusal = Status::invalid_argument(message);
        call.record(Some(&refusal));
        refusal
    })
}

/// A unary pass-through: authorise for `$action`, then forward to `$client.$method`.
macro_rules! pass {
    ($self:ident, $request:ident, $action:expr, $client:ident . $method:ident) => {{
        let call = $self.begin(stringify!($method), $action, &$request).await?;
        let mut client = $self.$client.clone();
        forward::unary(
            &call,
            $request,
            move |r| async move { client.$method(r).await },
        )
        .await
    }};
}

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
        pass!(self, r, Action::ViewStatus, custody.get_status)
    }

    async fn init_custody(
        &self,
        r: Request<gw::InitCustodyRequest>,
    ) -> Result<Response<gw::InitCustodyResponse>, Status> {
        // The one response that is not a twin: custody's numbers its kcv 3, where the
        // gateway's answer (which leaves the kcv out) has seal_state.
        let call = self
            .begin("init_seal", Action::AdministerCustody, &r)
            .await?;
        let mut message: cms_proto::custody::v1::InitSealRequest = forward::transcode(r.get_ref())?;
        forward::BackendRequest::set_auth(&mut message, call.auth());
        let mut client = self.custody.clone();
        let answer = call
            .run(client.init_seal(call.outgoing(message)))
            .await?
            .into_inner();
        Ok(Response::new(gw::InitCustodyResponse {
            shares: answer.shares,
            threshold: answer.threshold,
            seal_state: answer.seal_state,
        }))
    }

    async fn unseal(
        &self,
        r: Request<gw::UnsealRequest>,
    ) -> Result<Response<gw::UnsealResponse>, Status> {
        // The share goes to every custody instance, so that a standby is unsealed too.
        let call = self.begin("unseal", Action::AdministerCustody, &r).await?;
        let mut message: cms_proto::custody::v1::UnsealRequest = forward::transcode(r.get_ref())?;
        forward::BackendRequest::set_auth(&mut message, call.auth());
        let answers = self
            .custody_instances
            .each(&call, message, |mut client, request| async move {
                client.unseal(request).await
            })
            .await;
        let combined = custody_instances::combine(answers, |a| a.instances.clone());
        call.record(combined.as_ref().err());
        let (lead, instances) = combined?;
        Ok(Response::new(gw::UnsealResponse {
            seal_state: lead.seal_state,
            progress: lead.progress,
            threshold: lead.threshold,
            instances,
        }))
    }

    async fn seal(
        &self,
        r: Request<gw::SealRequest>,
    ) -> Result<Response<gw::SealResponse>, Status> {
        // Every custody instance forgets its key, the standbys included.
        let call = self.begin("seal", Action::AdministerCustody, &r).await?;
        let mut message: cms_proto::custody::v1::SealRequest = forward::transcode(r.get_ref())?;
        forward::BackendRequest::set_auth(&mut message, call.auth());
        let answers = self
            .custody_instances
            .each(&call, message, |mut client, request| async move {
                client.seal(request).await
            })
            .await;
        let combined = custody_instances::combine(answers, |a| a.instances.clone());
        call.record(combined.as_ref().err());
        let (lead, instances) = combined?;
        Ok(Response::new(gw::SealResponse {
            seal_state: lead.seal_state,
            instances,
        }))
    }

    async fn list_master_keys(
        &self,
        r: Request<gw::ListMasterKeysRequest>,
    ) -> Result<Response<gw::ListMasterKeysResponse>, Status> {
        pass!(self, r, Action::ReadKeyMetadata, custody.list_master_keys)
    }

    async fn generate_master_key(
        &self,
        r: Request<gw::GenerateMasterKeyRequest>,
    ) -> Result<Response<gw::GenerateMasterKeyResponse>, Status> {
        pass!(
            self,
            r,
            Action::AdministerCustody,
            custody.generate_master_key
        )
    }

    async fn rotate_master_key(
        &self,
        r: Request<gw::RotateMasterKeyRequest>,
    ) -> Result<Response<gw::RotateMasterKeyResponse>, Status> {
        pass!(
            self,
            r,
            Action::AdministerCustody,
            custody.rotate_master_key
        )
    }

    async fn retire_master_key_version(
        &self,
        r: Request<gw::RetireMasterKeyVersionRequest>,
    ) -> Result<Response<gw::RetireMasterKeyVersionResponse>, Status> {
        pass!(
            self,
            r,
            Action::AdministerCustody,
            custody.retire_master_key_version
        )
    }

    async fn begin_key_import(
        &self,
        r: Request<gw::BeginKeyImportRequest>,
    ) -> Result<Response<gw::BeginKeyImportResponse>, Status> {
        pass!(self, r, Action::AdministerCustody, custody.begin_key_import)
    }

    async fn add_key_component(
        &self,
        r: Request<gw::AddKeyComponentRequest>,
    ) -> Result<Response<gw::AddKeyComponentResponse>, Status> {
        pass!(
            self,
            r,
            Action::AdministerCustody,
            custody.add_key_component
        )
    }

    async fn finish_key_import(
        &self,
        r: Request<gw::FinishKeyImportRequest>,
    ) -> Result<Response<gw::FinishKeyImportResponse>, Status> {
        pass!(
            self,
            r,
            Action::AdministerCustody,
            custody.finish_key_import
        )
    }

    async fn abort_key_import(
        &self,
        r: Request<gw::AbortKeyImportRequest>,
    ) -> Result<Response<gw::AbortKeyImportResponse>, Status> {
        pass!(self, r, Action::AdministerCustody, custody.abort_key_import)
    }

    async fn query_audit(
        &self,
        r: Request<gw::QueryAuditRequest>,
    ) -> Result<Response<gw::QueryAuditResponse>, Status> {
        pass!(self, r, Action::ReadAudit, custody.query_audit)
    }

    async fn export_audit_head(
        &self,
        r: Request<gw::ExportAuditHeadRequest>,
    ) -> Result<Response<gw::ExportAuditHeadResponse>, Status> {
        pass!(self, r, Action::ReadAudit, custody.export_audit_head)
    }

    async fn verify_audit(
        &self,
        r: Request<gw::VerifyAuditRequest>,
    ) -> Result<Response<gw::VerifyAuditResponse>, Status> {
        pass!(self, r, Action::ReadAudit, custody.verify_audit)
    }

    async fn init_so_token(
        &self,
        r: Request<gw::InitSoTokenRequest>,
    ) -> Result<Response<gw::InitSoTokenResponse>, Status> {
        pass!(self, r, Action::AdministerCustody, custody.init_so_token)
    }

    async fn get_so_token_info(
        &self,
        r: Request<gw::GetSoTokenInfoRequest>,
    ) -> Result<Response<gw::GetSoTokenInfoResponse>, Status> {
        pass!(self, r, Action::ReadKeyMetadata, custody.get_so_token_info)
    }

    async fn get_template(
        &self,
        r: Request<gw::GetTemplateRequest>,
    ) -> Result<Response<gw::GetTemplateResponse>, Status> {
        pass!(self, r, Action::ReadTemplates, template.get_template)
    }

    async fn list_templates(
        &self,
        r: Request<gw::ListTemplatesRequest>,
    ) -> Result<Response<gw::ListTemplatesResponse>, Status> {
        pass!(self, r, Action::ReadTemplates, template.list_templates)
    }

    async fn list_template_versions(
        &self,
        r: Request<gw::ListTemplateVersionsRequest>,
    ) -> Result<Response<gw::ListTemplateVersionsResponse>, Status> {
        pass!(
            self,
            r,
            Action::ReadTemplates,
            template.list_template_versions
        )
    }

    async fn retire_template(
        &self,
        r: Request<gw::RetireTemplateRequest>,
    ) -> Result<Response<gw::RetireTemplateResponse>, Status> {
        let id = r.get_ref().id.clone();
        self.require_scope(
            "retire_template",
            Action::ManageTemplates,
            &r,
            Target::Template(&id),
        )
        .await?;
        pass!(self, r, Action::ManageTemplates, template.retire_template)
    }

    async fn create_operator(
        &self,
        r: Request<gw::CreateOperatorRequest>,
    ) -> Result<Response<gw::CreateOperatorResponse>, Status> {
        let call = self
            .begin("create_operator", Action::ManageOperators, &r)
            .await?;
        if let Some(op) = &r.get_ref().operator {
            refuse_unknown_roles(&call, &op.roles)?;
        }
        let mut client = self.directory.clone();
        let answer = forward::unary(
            &call,
            r,
            move |r| async move { client.create_operator(r).await },
        )
        .await;
        if answer.is_ok() {
            // The gateway's cached accounts are stale now: read them again on the next call.
            self.operators.invalidate().await;
        }
        answer
    }

    async fn get_operator(
        &self,
        r: Request<gw::GetOperatorRequest>,
    ) -> Result<Response<gw::GetOperatorResponse>, Status> {
        pass!(self, r, Action::ReadOperators, directory.get_operator)
    }

    async fn list_operators(
        &self,
        r: Request<gw::ListOperatorsRequest>,
    ) -> Result<Response<gw::ListOperatorsResponse>, Status> {
        pass!(self, r, Action::ReadOperators, directory.list_operators)
    }

    async fn update_operator(
        &self,
        r: Request<gw::UpdateOperatorRequest>,
    ) -> Result<Response<gw::UpdateOperatorResponse>, Status> {
        let call = self
            .begin("update_operator", Action::ManageOperators, &r)
            .await?;
        if writes_roles(r.get_ref().update_mask.as_ref())
            && let Some(op) = &r.get_ref().operator
        {
            refuse_unknown_roles(&call, &op.roles)?;
        }
        let mut client = self.directory.clone();
        let answer = forward::unary(
            &call,
            r,
            move |r| async move { client.update_operator(r).await },
        )
        .await;
        if answer.is_ok() {
            // The gateway's cached accounts are stale now: read them again on the next call.
            self.operators.invalidate().await;
        }
        answer
    }

    async fn create_user(
        &self,
        r: Request<gw::CreateUserRequest>,
    ) -> Result<Response<gw::CreateUserResponse>, Status> {
        let unit = r.get_ref().user.as_ref().map(|u| u.org_unit.clone());
        let target = Target::OrgUnit(unit.as_deref().unwrap_or_default());
        self.require_scope("create_user", Action::ManageDirectory, &r, target)
            .await?;
        pass!(self, r, Action::ManageDirectory, directory.create_user)
    }

    async fn update_user(
        &self,
        r: Request<gw::UpdateUserRequest>,
    ) -> Result<Response<gw::UpdateUserResponse>, Status> {
        let user = r.get_ref().user.clone().unwrap_or_default();
        let moves = r
            .get_ref()
            .update_mask
            .as_ref()
            .is_none_or(|m| m.paths.is_empty() || m.paths.iter().any(|p| p == "org_unit"));
        let target = Target::User(&user.id, moves.then_some(user.org_unit.as_str()));
        self.require_scope("update_user", Action::ManageDirectory, &r, target)
            .await?;
        pass!(self, r, Action::ManageDirectory, directory.update_user)
    }

    async fn disable_user(
        &self,
        r: Request<gw::DisableUserRequest>,
    ) -> Result<Response<gw::DisableUserResponse>, Status> {
        let id = r.get_ref().id.clone();
        self.require_scope(
            "disable_user",
            Action::ManageDirectory,
            &r,
            Target::User(&id, None),
        )
        .await?;
        pass!(self, r, Action::ManageDirectory, directory.disable_user)
    }

    async fn register_credential(
        &self,
        r: Request<gw::RegisterCredentialRequest>,
    ) -> Result<Response<gw::RegisterCredentialResponse>, Status> {
        let card = r.get_ref().credential.clone().unwrap_or_default();
        let target = Target::NewCard {
            user_id: &card.user_id,
            template_id: &card.template_id,
        };
        self.require_scope("register_credential", Action::ManageDirectory, &r, target)
            .await?;
        pass!(
            self,
            r,
            Action::ManageDirectory,
            directory.register_credential
        )
    }

    async fn update_credential_status(
        &self,
        r: Request<gw::UpdateCredentialStatusRequest>,
    ) -> Result<Response<gw::UpdateCredentialStatusResponse>, Status> {
        let id = r.get_ref().id.clone();
        self.require_scope(
            "update_credential_status",
            Action::ManageDirectory,
            &r,
            Target::Card(&id),
        )
        .await?;
        pass!(
            self,
            r,
            Action::ManageDirectory,
            directory.update_credential_status
        )
    }

    async fn create_template(
        &self,
        r: Request<gw::CreateTemplateRequest>,
    ) -> Result<Response<gw::CreateTemplateResponse>, Status> {
        let call = self
            .begin("create_template", Action::ManageTemplates, &r)
            .await?;
        self.check_keys(&call, r.get_ref().spec.as_ref()).await?;
        let mut client = self.template.clone();
        forward::unary(
            &call,
            r,
            move |r| async move { client.create_template(r).await },
        )
        .await
    }

    async fn update_template(
        &self,
        r: Request<gw::UpdateTemplateRequest>,
    ) -> Result<Response<gw::UpdateTemplateResponse>, Status> {
        let id = r.get_ref().id.clone();
        self.require_scope(
            "update_template",
            Action::ManageTemplates,
            &r,
            Target::Template(&id),
        )
        .await?;
        let call = self
            .begin("update_template", Action::ManageTemplates, &r)
            .await?;
        self.check_keys(&call, r.get_ref().spec.as_ref()).await?;
        let mut client = self.template.clone();
        forward::unary(
            &call,
            r,
            move |r| async move { client.update_template(r).await },
        )
        .await
    }

    async fn validate_policy(
        &self,
        r: Request<gw::ValidatePolicyRequest>,
    ) -> Result<Response<gw::ValidatePolicyResponse>, Status> {
        let call = self
            .begin("validate_policy", Action::ReadTemplates, &r)
            .await?;
        let key_violations = match r.get_ref().spec.as_ref() {
            Some(spec) => key_references::check(&self.custody, &call, spec).await?,
            None => Vec::new(),
        };
        let mut client = self.template.clone();
        let mut response: Response<gw::ValidatePolicyResponse> = forward::unary(
            &call,
            r,
            move |r| async move { client.validate_policy(r).await },
        )
        .await?;
        let answer = response.get_mut();
        if !key_violations.is_empty() {
            answer.valid = false;
            answer.violations.extend(key_violations);
        }
        Ok(response)
    }

    async fn import_users(
        &self,
        r: Request<Streaming<gw::ImportUsersRequest>>,
    ) -> Result<Response<gw::ImportUsersResponse>, Status> {
        // The upload stream is not Sync: authorise on the request's head alone.
        let (metadata, extensions, upload) = r.into_parts();
        let head = Request::from_parts(metadata, extensions, ());
        self.require_scope(
            "import_users",
            Action::ManageDirectory,
            &head,
            Target::Everything,
        )
        .await?;
        let call = self
            .begin_owned("import_users", Action::ManageDirectory, head)
            .await?;
        let (upload, broken) = forward::client_stream::<
            _,
            cms_proto::directory::v1::ImportUsersRequest,
        >(&call, upload);
        let mut client = self.directory.clone();
        let import = call.run(client.import_users(call.outgoing(upload)));
        let response = tokio::select! {
            response = import => response?,
            Ok((status, _open)) = broken => {
                // Dropping the backend call resets its stream: nothing is imported.
                call.record(Some(&status));
                return Err(Status::cancelled(format!("the CSV upload broke off: {}", status.message())));
            }
        };
        Ok(Response::new(forward::transcode(response.get_ref())?))
    }

    async fn import_credentials(
        &self,
        r: Request<Streaming<gw::ImportCredentialsRequest>>,
    ) -> Result<Response<ImportCredentialsStream>, Status> {
        // The upload stream is not Sync: authorise on the request's head alone.
        let (metadata, extensions, upload) = r.into_parts();
        let head = Request::from_parts(metadata, extensions, ());
        let call = self
            .begin_owned("import_credentials", Action::ManageDirectory, head)
            .await?;
        let mut client = self.directory.clone();
        let events = forward::upload_with_events::<
            _,
            cms_proto::directory::v1::ImportCredentialsRequest,
            _,
            _,
            _,
        >(call, upload, move |r| async move {
            client.import_credentials(r).await
        })
        .await?;
        let (metadata, events, extensions) = events.into_parts();
        let events: ImportCredentialsStream = Box::pin(events);
        Ok(Response::from_parts(metadata, events, extensions))
    }

    async fn sync_ldap(
        &self,
        r: Request<gw::SyncLdapRequest>,
    ) -> Result<Response<SyncLdapStream>, Status> {
        self.require_scope("sync_ldap", Action::ManageDirectory, &r, Target::Everything)
            .await?;
        let call = self.begin("sync_ldap", Action::ManageDirectory, &r).await?;
        let mut message: cms_proto::directory::v1::SyncLdapRequest =
            forward::transcode(r.get_ref())?;
        forward::BackendRequest::set_auth(&mut message, call.auth());
        let mut client = self.directory.clone();
        let response = call.start(client.sync_ldap(call.outgoing(message))).await?;
        let events: SyncLdapStream = Box::pin(forward::server_stream(call, response.into_inner()));
        Ok(Response::new(events))
    }
}
