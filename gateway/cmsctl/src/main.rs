//! `cmsctl`: the operator and admin CLI. Every command goes to the gateway over mutual TLS
//! with the operator's certificate; by default the files of a local `cms up` data directory.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cms_kit::SpiffeId;
use cms_kit::client::UpstreamSettings;
use cms_kit::tls::{TlsSettings, TlsSource};
use cms_proto::common::v1::ServingState;
use cms_proto::gateway::v1::GetSystemStatusRequest;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;

#[derive(Parser)]
#[command(
    name = "cmsctl",
    version,
    about = "Smart-card PIN unblock CMS: operator CLI",
    after_help = exit::HELP
)]
pub(crate) struct Cli {
    /// Data directory of a local `cms up`: supplies the defaults below.
    #[arg(
        long,
        env = "CMS_DATA_DIR",
        default_value = "./cms-data",
        global = true
    )]
    data_dir: PathBuf,
    /// Gateway address (host:port). Default: the address a local gateway announced in
    /// <data-dir>/run/gateway.addr, else server.listen of <data-dir>/config/gateway.toml.
    #[arg(long, env = "CMSCTL_GATEWAY", global = true)]
    gateway: Option<String>,
    /// SPIFFE ID the gateway must present. Default: the one in <data-dir>/pki/gateway.pem.
    #[arg(long, env = "CMSCTL_GATEWAY_ID", global = true)]
    gateway_id: Option<SpiffeId>,
    /// CA bundle. Default: <data-dir>/pki/ca.pem.
    #[arg(long, env = "CMSCTL_CA", global = true)]
    ca: Option<PathBuf>,
    /// Operator certificate. Default: <data-dir>/pki/operator-admin.pem.
    #[arg(long, env = "CMSCTL_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Operator private key. Default: <data-dir>/pki/operator-admin.key.
    #[arg(long, env = "CMSCTL_KEY", global = true)]
    key: Option<PathBuf>,
    /// Print answers as JSON (proto3 JSON mapping, proto field names).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Each service's state, verified identity and address, as the gateway sees them.
    /// Exits 0 when everything is serving, 1 otherwise.
    Status,
    /// Key custody: seal state, initialisation, unsealing.
    Custody {
        #[command(subcommand)]
        command: admin::CustodyCmd,
    },
    /// Master keys: list, generate, rotate, retire, import by components.
    Keys {
        #[command(subcommand)]
        command: admin::KeysCmd,
    },
    /// The custody audit log: export its head, verify the chain.
    Audit {
        #[command(subcommand)]
        command: admin::AuditCmd,
    },
    /// Card templates from policy files: create, list, show, versions, update, retire, validate.
    Templates {
        #[command(subcommand)]
        command: templates::TemplatesCmd,
    },
    /// Operator accounts: create, show, list, update (roles, scope, certificate).
    Operators {
        #[command(subcommand)]
        command: directory::OperatorsCmd,
    },
    /// Users: create, update, disable, import from CSV.
    Users {
        #[command(subcommand)]
        command: directory::UsersCmd,
    },
    /// LDAP synchronisation of users.
    Ldap {
        #[command(subcommand)]
        command: directory::LdapCmd,
    },
    /// Cards: register, change status.
    Cards {
        #[command(subcommand)]
        command: directory::CardsCmd,
    },
    /// The helpdesk: find a user and their cards, answer an offline unblock, read a PIV PUK,
    /// issue a self-service one-time code.
    Helpdesk {
        #[command(subcommand)]
        command: helpdesk::HelpdeskCmd,
    },
    /// Dual control: request, list, approve, reject or cancel approvals.
    Approvals {
        #[command(subcommand)]
        command: approvals::ApprovalsCmd,
    },
}

mod admin;
mod approvals;
mod directory;
mod exit;
mod helpdesk;
mod messages;
mod so_token;
mod templates;

pub(crate) use exit::Error;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut code = ExitCode::SUCCESS;
    let result = {
        let code = &mut code;
        cms_kit::exit::run("cmsctl", || async move {
            cms_kit::tls::install_crypto_provider();
            // Errors are reported here, not by the kit, so that the exit code says what kind
            // of failure it was (see `exit::HELP`).
            match dispatch(&cli).await {
                Ok(true) => {}
                Ok(false) => *code = ExitCode::from(exit::NEGATIVE),
                Err(e) => {
                    eprintln!("cmsctl: error: {}", cms_kit::exit::one_line(&e));
                    *code = ExitCode::from(e.exit_code());
                }
            }
            Ok::<(), Error>(())
        })
    };
    if result == ExitCode::SUCCESS {
        code
    } else {
        result
    }
}

/// Runs the command; false when its answer is negative (exit code 1).
async fn dispatch(cli: &Cli) -> Result<bool, Error> {
    match &cli.command {
        Cmd::Status => status(cli).await,
        Cmd::Custody { command } => admin::custody(cli, command).await,
        Cmd::Keys { command } => admin::keys(cli, command).await,
        Cmd::Audit { command } => admin::audit(cli, command).await,
        Cmd::Templates { command } => templates::run(cli, command).await,
        Cmd::Operators { command } => directory::operators(cli, command).await,
        Cmd::Users { command } => directory::users(cli, command).await,
        Cmd::Ldap { command } => directory::ldap(cli, command).await,
        Cmd::Cards { command } => directory::cards(cli, command).await,
        Cmd::Helpdesk { command } => helpdesk::run(cli, command).await,
        Cmd::Approvals { command } => approvals::run(cli, command).await,
    }
}

fn pki_file(cli: &Cli, given: &Option<PathBuf>, name: &str) -> PathBuf {
    given
        .clone()
        .unwrap_or_else(|| cli.data_dir.join("pki").join(name))
}

/// The gateway to talk to and who it must be.
fn gateway(cli: &Cli) -> Result<UpstreamSettings, Error> {
    let announced = cms_kit::server::read_announce(&cli.data_dir.join("run").join("gateway.addr"));
    let address = match (&cli.gateway, announced) {
        (Some(a), _) => a.clone(),
        (None, Some((grpc, _))) => grpc.to_string(),
        (None, None) => {
            let path = cli.data_dir.join("config").join("gateway.toml");
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::Setup(format!(
                    "no --gateway given and {} is unreadable ({e}); is `cms up` running here?",
                    path.display()
                ))
            })?;
            let value: toml::Table = text
                .parse()
                .map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?;
            value
                .get("server")
                .and_then(|s| s.get("listen"))
                .and_then(|l| l.as_str())
                .ok_or_else(|| Error::Setup(format!("{}: no server.listen", path.display())))?
                .to_owned()
        }
    };
    let identity = match &cli.gateway_id {
        Some(id) => id.clone(),
        None => {
            let path = cli.data_dir.join("pki").join("gateway.pem");
            let pem = std::fs::read(&path).map_err(|e| {
                Error::Setup(format!(
                    "no --gateway-id given and {} is unreadable ({e})",
                    path.display()
                ))
            })?;
            cms_kit::pki::spiffe_id_of_pem(&pem)
                .map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?
        }
    };
    Ok(UpstreamSettings {
        address,
        identity,
        connect_timeout_ms: 3_000,
    })
}

/// An AdminService client as the operator, and who that operator is.
pub(crate) struct Session {
    pub admin: AdminServiceClient<cms_kit::client::Channel>,
    /// The same connection, for the other gateway services.
    pub channel: cms_kit::client::Channel,
    pub address: String,
    pub identity: SpiffeId,
}

impl Session {
    pub fn rpc_error(&self, status: tonic::Status) -> Error {
        Error::Rpc {
            address: self.address.clone(),
            status: Box::new(status),
        }
    }
}

pub(crate) fn connect(cli: &Cli) -> Result<Session, Error> {
    let tls = TlsSource::load(TlsSettings {
        ca: pki_file(cli, &cli.ca, "ca.pem"),
        cert: pki_file(cli, &cli.cert, "operator-admin.pem"),
        key: pki_file(cli, &cli.key, "operator-admin.key"),
        reload_interval_ms: 0,
    })?;
    let upstream = gateway(cli)?;
    let channel = cms_kit::client::channel(&upstream, tls.clone())?;
    Ok(Session {
        admin: AdminServiceClient::new(channel.clone()),
        channel,
        address: upstream.address,
        identity: tls.identity(),
    })
}

async fn status(cli: &Cli) -> Result<bool, Error> {
    let mut session = connect(cli)?;
    let response = session
        .admin
        .get_system_status(GetSystemStatusRequest {})
        .await
        .map_err(|status| session.rpc_error(status))?
        .into_inner();
    if cli.json {
        messages::print_json(&response, "cms.gateway.v1.GetSystemStatusResponse")?;
        let all_serving = response.overall_state == ServingState::Serving as i32;
        return Ok(all_serving && !response.agents.is_empty());
    }
    let (tls_identity, upstream_address) = (session.identity.clone(), session.address.clone());

    println!("as {tls_identity} via gateway {upstream_address}");
    println!(
        "{:<10} {:<12} {:<22} {:<36} {:<8} detail",
        "SERVICE", "STATE", "ADDRESS", "IDENTITY (verified)", "VERSION"
    );
    let mut all_serving = true;
    for s in &response.services {
        let state = ServingState::try_from(s.state).unwrap_or(ServingState::Unspecified);
        all_serving &= state == ServingState::Serving;
        println!(
            "{:<10} {:<12} {:<22} {:<36} {:<8} {}",
            s.name,
            state_name(state),
            s.address,
            if s.identity.is_empty() {
                "-"
            } else {
                &s.identity
            },
            if s.version.is_empty() {
                "-"
            } else {
                &s.version
            },
            s.detail
        );
    }
    if response.agents.is_empty() {
        println!("agent      NONE         no agent is linked to the gateway");
        all_serving = false;
    }
    Ok(all_serving)
}

fn state_name(state: ServingState) -> &'static str {
    match state {
        ServingState::Serving => "SERVING",
        ServingState::Degraded => "DEGRADED",
        ServingState::NotServing => "NOT_SERVING",
        ServingState::Unreachable => "UNREACHABLE",
        ServingState::Unspecified => "UNKNOWN",
    }
}
