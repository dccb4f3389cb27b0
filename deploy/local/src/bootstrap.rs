//! Operator accounts the local deployment needs. The gateway admits an operator only with an
//! active account in the directory, so `cms up` (and the test harness) make sure the dev
//! operator whose certificate `cms pki init` writes (`pki/operator-admin.pem`,
//! `spiffe://<td>/cms/operator/admin`) has one with the admin role. The account is created
//! through the directory's operator API with the gateway's certificate, the one identity the
//! directory serves.

use std::net::SocketAddr;
use std::time::Duration;

use cms_kit::client::{self, UpstreamSettings};
use cms_kit::tls::{TlsSettings, TlsSource};
use cms_proto::common::v1::PageRequest;
use cms_proto::directory::v1::directory_service_client::DirectoryServiceClient;
use cms_proto::directory::v1::{
    CreateOperatorRequest, ListOperatorsRequest, Operator, OperatorStatus,
};

use crate::layout::Layout;

/// Username of the dev operator: the name in `cms_kit::pki::OPERATOR_CLIENT`.
pub fn dev_admin_username() -> &'static str {
    cms_kit::pki::OPERATOR_CLIENT
        .strip_prefix("operator/")
        .unwrap_or(cms_kit::pki::OPERATOR_CLIENT)
}

/// What `ensure_operator` found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ensured {
    Created,
    /// The account exists; it is left as it is (an admin may have changed it on purpose).
    Present {
        active: bool,
        roles: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Tls(#[from] cms_kit::tls::TlsError),
    #[error(transparent)]
    Client(#[from] cms_kit::client::ClientError),
    #[error(transparent)]
    Pki(#[from] cms_kit::pki::PkiError),
    #[error("directory at {address}: {action}: {code:?}: {message}")]
    Rpc {
        address: String,
        action: &'static str,
        code: tonic::Code,
        message: String,
    },
}

pub type DirectoryClient = DirectoryServiceClient<client::Channel>;

/// How to reach the directory as the gateway: its certificate and the directory's address
/// and identity.
#[derive(Clone, Debug)]
pub struct DirectoryAccess {
    pub tls: TlsSettings,
    pub upstream: UpstreamSettings,
}

impl DirectoryAccess {
    /// The directory at `directory` with the gateway's certificate of `layout`'s dev PKI.
    pub fn dev(layout: &Layout, directory: SocketAddr) -> Result<Self, BootstrapError> {
        let pki = layout.pki();
        Ok(Self {
            tls: pki.tls_settings("gateway"),
            upstream: UpstreamSettings {
                address: directory.to_string(),
                identity: pki.spiffe_id("directory")?,
                connect_timeout_ms: 3_000,
            },
        })
    }

    pub fn client(&self) -> Result<DirectoryClient, BootstrapError> {
        cms_kit::tls::install_crypto_provider();
        let tls = TlsSource::load(TlsSettings {
            reload_interval_ms: 0,
            ..self.tls.clone()
        })?;
        Ok(DirectoryServiceClient::new(client::channel(
            &self.upstream,
            tls,
        )?))
    }
}

/// A DirectoryService client with the gateway's certificate of `layout`'s dev PKI.
pub fn directory_client(
    layout: &Layout,
    directory: SocketAddr,
) -> Result<DirectoryClient, BootstrapError> {
    DirectoryAccess::dev(layout, directory)?.client()
}

/// Creates the operator account `username` with `roles` unless one with that username exists.
pub async fn ensure_operator(
    access: &DirectoryAccess,
    username: &str,
    roles: &[&str],
) -> Result<Ensured, BootstrapError> {
    let mut client = access.client()?;
    let address = access.upstream.address.as_str();
    let rpc = |action| {
        move |status: tonic::Status| BootstrapError::Rpc {
            address: address.to_owned(),
            action,
            code: status.code(),
            message: status.message().to_owned(),
        }
    };
    let mut token = String::new();
    loop {
        let mut request = tonic::Request::new(ListOperatorsRequest {
            page: Some(PageRequest {
                page_size: 500,
                page_token: token,
            }),
            role: String::new(),
            include_disabled: true,
        });
        request.set_timeout(Duration::from_secs(10));
        let page = client
            .list_operators(request)
            .await
            .map_err(rpc("listing operators"))?
            .into_inner();
        if let Some(found) = page.operators.into_iter().find(|o| o.username == username) {
            return Ok(Ensured::Present {
                active: found.status == OperatorStatus::Active as i32,
                roles: found.roles,
            });
        }
        token = page.page.map(|p| p.next_page_token).unwrap_or_default();
        if token.is_empty() {
            break;
        }
    }
    let mut request = tonic::Request::new(CreateOperatorRequest {
        operator: Some(Operator {
            username: username.to_owned(),
            display_name: format!("{username} (created by the local launcher)"),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            ..Default::default()
        }),
        auth: None,
    });
    request.set_timeout(Duration::from_secs(10));
    client
        .create_operator(request)
        .await
        .map_err(rpc("creating an operator"))?;
    Ok(Ensured::Created)
}

/// The dev operator's roles: administration and, so that one certificate can set a dev system
/// up end to end, the template-admin role that changing templates needs.
const DEV_ADMIN_ROLES: [&str; 2] = ["admin", "template-admin"];

/// Makes sure the dev operator has its admin account; returns a line to print, if any.
pub async fn ensure_dev_admin(
    layout: &Layout,
    directory: SocketAddr,
) -> Result<Option<String>, BootstrapError> {
    let name = dev_admin_username();
    Ok(
        match ensure_operator(
            &DirectoryAccess::dev(layout, directory)?,
            name,
            &DEV_ADMIN_ROLES,
        )
        .await?
        {
            Ensured::Created => Some(format!(
                "created the operator account {name:?} (roles admin, template-admin) for pki/operator-admin.pem"
            )),
            Ensured::Present { active, roles }
                if !active || !DEV_ADMIN_ROLES.iter().all(|d| roles.iter().any(|r| r == d)) =>
            {
                Some(format!(
                    "note: the operator account {name:?} is {} with roles [{}]; cmsctl with pki/operator-admin.pem may be refused",
                    if active { "active" } else { "disabled" },
                    roles.join(", ")
                ))
            }
            Ensured::Present { .. } => None,
        },
    )
}
