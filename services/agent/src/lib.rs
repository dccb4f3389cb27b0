//! The card agent beside the readers: a local API for the desktop app, the CLI and a
//! logon-screen plugin (on a Unix domain socket, and on loopback TCP with mutual TLS), the
//! card code over PC/SC, the offline unblock flows, and an outbound link to the gateway through
//! which the gateway can drive a card (online unblock).
//!
//! Module map: [`card`] (readers, profiles, APDU sequences), [`unblock`] (the flows and the
//! checks before the card), [`service`] (the card half of the gRPC service), [`local`] (the
//! Unix socket), `link` (the gateway link), [`client`] (what the CLI uses).

pub mod card;
pub mod client;
mod config;
mod error;
mod link;
pub mod local;
pub mod service;
pub mod unblock;

pub use config::{
    CardSettings, Config, LinkSettings, LocalApiSettings, PinClass, PinPolicySettings,
};
pub use error::Error;

use std::sync::Arc;

use cms_kit::metrics::Metrics;
use cms_kit::server::{Listeners, Server};
use cms_kit::service::{Program, ServiceFuture};
use cms_kit::shutdown::Shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::agent::v1::agent_service_server::{AgentService, AgentServiceServer};
use cms_proto::agent::v1::{
    ApplyResponseRequest, ApplyResponseResponse, CancelChallengeRequest, CancelChallengeResponse,
    GetAgentStatusRequest, GetAgentStatusResponse, GetCardInfoRequest, GetCardInfoResponse,
    GetChallengeRequest, GetChallengeResponse, ListReadersRequest, ListReadersResponse,
    UnblockSoTokenRequest, UnblockSoTokenResponse, UnblockWithPukRequest, UnblockWithPukResponse,
    WatchReadersRequest, WatchReadersResponse,
};
use cms_proto::common::v1::CardProfile;
use cms_proto::gateway::v1::Hello;

use crate::card::readers::{PcscReaders, Readers};
use crate::service::CardService;

pub const NAME: &str = "agent";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The gRPC services the agent serves, on its mTLS port and on its local socket.
const SERVICES: &[&str] = &[<AgentServiceServer<Agent> as tonic::server::NamedService>::NAME];

/// The agent's service (`cms-agent serve`); it has no database.
pub const PROGRAM: Program<Config, Error> = Program {
    name: NAME,
    run,
    migrate: None,
};

/// The AgentService implementation.
pub struct Agent {
    agent_id: String,
    gateway_address: String,
    link: link::LinkState,
    cards: CardService,
}

impl Agent {
    /// An agent with no gateway link: the card flows only (the CLI without
    /// a running agent, tests).
    pub fn offline(readers: Arc<dyn Readers>, settings: &CardSettings) -> Self {
        Agent {
            agent_id: "local".into(),
            gateway_address: String::new(),
            link: link::LinkState::default(),
            cards: CardService::new(readers, settings),
        }
    }

    /// The card half (also used in-process by the CLI).
    pub fn cards(&self) -> &CardService {
        &self.cards
    }
}

type Res<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl AgentService for Agent {
    async fn get_agent_status(
        &self,
        _request: tonic::Request<GetAgentStatusRequest>,
    ) -> Res<GetAgentStatusResponse> {
        let (connected, since) = self.link.get();
        Ok(tonic::Response::new(GetAgentStatusResponse {
            agent_id: self.agent_id.clone(),
            version: VERSION.into(),
            gateway_connected: connected,
            gateway_address: self.gateway_address.clone(),
            connection_changed_at: Some(since.into()),
            supported_profiles: vec![CardProfile::Minidriver as i32, CardProfile::Piv as i32],
        }))
    }

    async fn list_readers(
        &self,
        _request: tonic::Request<ListReadersRequest>,
    ) -> Res<ListReadersResponse> {
        Ok(tonic::Response::new(self.cards.list_readers().await?))
    }

    async fn watch_readers(
        &self,
        request: tonic::Request<WatchReadersRequest>,
    ) -> Res<
        std::pin::Pin<
            Box<
                dyn tokio_stream::Stream<Item = Result<WatchReadersResponse, tonic::Status>> + Send,
            >,
        >,
    > {
        let stream = self.cards.watch(request.get_ref().initial_state).await?;
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn get_card_info(
        &self,
        request: tonic::Request<GetCardInfoRequest>,
    ) -> Res<GetCardInfoResponse> {
        Ok(tonic::Response::new(
            self.cards.card_info(request.into_inner()).await?,
        ))
    }

    async fn get_challenge(
        &self,
        request: tonic::Request<GetChallengeRequest>,
    ) -> Res<GetChallengeResponse> {
        Ok(tonic::Response::new(
            self.cards.get_challenge(request.into_inner()).await?,
        ))
    }

    async fn apply_response(
        &self,
        request: tonic::Request<ApplyResponseRequest>,
    ) -> Res<ApplyResponseResponse> {
        let result = self.cards.apply_response(request.into_inner()).await;
        Ok(tonic::Response::new(ApplyResponseResponse {
            result: Some(result),
        }))
    }

    async fn cancel_challenge(
        &self,
        request: tonic::Request<CancelChallengeRequest>,
    ) -> Res<CancelChallengeResponse> {
        Ok(tonic::Response::new(
            self.cards.cancel_challenge(request.get_ref()).await,
        ))
    }

    async fn unblock_with_puk(
        &self,
        request: tonic::Request<UnblockWithPukRequest>,
    ) -> Res<UnblockWithPukResponse> {
        let result = self.cards.unblock_with_puk(request.into_inner()).await?;
        Ok(tonic::Response::new(UnblockWithPukResponse {
            result: Some(result),
        }))
    }

    async fn unblock_so_token(
        &self,
        request: tonic::Request<UnblockSoTokenRequest>,
    ) -> Res<UnblockSoTokenResponse> {
        let result = self.cards.unblock_so_token(request.into_inner()).await?;
        Ok(tonic::Response::new(UnblockSoTokenResponse {
            result: Some(result),
        }))
    }
}

/// The agent id is the SPIFFE path after `/cms/`: `agent` or `agent/<name>`.
fn agent_id(tls: &TlsSource) -> Result<String, Error> {
    let id = tls.identity();
    let path = id.path();
    match path.strip_prefix("/cms/") {
        Some(rest) if rest == "agent" || rest.starts_with("agent/") => Ok(rest.to_owned()),
        _ => Err(Error::AgentId(format!(
            "the agent certificate's SPIFFE ID {id} is not under /cms/agent"
        ))),
    }
}

/// Serves the agent's local API on `listeners` and on its Unix socket, and keeps the gateway
/// link up until `shutdown`. Cards are reached through PC/SC.
///
/// Boxed so that the service's async code is compiled once, in this crate: a binary or test
/// that awaited the bare future would compile all of it again (minutes per binary).
pub fn run(config: Config, listeners: Listeners, shutdown: Shutdown) -> ServiceFuture<Error> {
    Box::pin(async move {
        let readers = readers_for(&config.cards)?;
        serve_agent(config, listeners, shutdown, readers).await
    })
}

/// The readers `[cards]` asks for: PC/SC, or the in-process virtual card of a card file.
pub fn readers_for(settings: &CardSettings) -> Result<Arc<dyn Readers>, Error> {
    let Some(path) = &settings.virtual_card else {
        return Ok(Arc::new(PcscReaders));
    };
    let card = cms_card::sim::VirtualCard::open(path)
        .map_err(|e| Error::Refused(format!("cards.virtual_card: {e}")))?;
    Ok(Arc::new(
        card::sim::SimReaders::default().with(VIRTUAL_READER, cms_card::sim::SimReader::new(card)),
    ))
}

/// The reader name of `[cards] virtual_card`.
pub const VIRTUAL_READER: &str = "CMS Virtual Card 00 00";

/// [`run`] with other readers (the in-process virtual card in tests and `cms up`).
pub fn run_with_readers(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
    readers: Arc<dyn Readers>,
) -> ServiceFuture<Error> {
    Box::pin(serve_agent(config, listeners, shutdown, readers))
}

async fn serve_agent(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
    readers: Arc<dyn Readers>,
) -> Result<(), Error> {
    let tls = TlsSource::load(config.tls)?;
    let agent_id = agent_id(&tls)?;
    let socket = if config.local_api.enabled {
        Some(local::bind(&config.local_api, &config.data_dir)?)
    } else {
        None
    };
    let state = link::LinkState::default();
    let link_task = match &config.gateway {
        Some(gateway) => {
            let link = link::Link {
                channel: cms_kit::client::channel(gateway, tls.clone())?,
                hello: Hello {
                    agent_id: agent_id.clone(),
                    version: VERSION.into(),
                    hostname: hostname(),
                    ..Default::default()
                },
                settings: config.link.clone(),
                state: state.clone(),
            };
            Some(tokio::spawn(link.run(shutdown.clone())))
        }
        None => {
            tracing::info!("no [gateway] configured: offline mode");
            None
        }
    };
    let agent = Arc::new(Agent {
        agent_id,
        gateway_address: config
            .gateway
            .as_ref()
            .map(|g| g.address.clone())
            .unwrap_or_default(),
        link: state,
        cards: CardService::new(readers, &config.cards),
    });
    let metrics = Metrics::new(NAME);
    let grace = std::time::Duration::from_millis(config.server.shutdown_grace_ms);
    // The socket serves the agent's API alone (no health or reflection there).
    let local_api = cms_kit::served::ServedApi::new(&[cms_proto::FILE_DESCRIPTOR_SET], SERVICES)
        .map_err(|e| Error::LocalApi(e.to_string()))?;
    let local_task = socket.map(|socket| {
        let routes = tonic::service::Routes::new(AgentServiceServer::from_arc(agent.clone()));
        tokio::spawn(local::serve(
            routes,
            socket,
            metrics.clone(),
            VERSION,
            local_api,
            grace,
            shutdown.clone(),
        ))
    });
    let served = Server::new(NAME, config.server, config.access, tls)
        .with_version(VERSION)
        .with_metrics(metrics)
        .add_service(AgentServiceServer::from_arc(agent))
        .serve(listeners, shutdown)
        .await;
    if let Some(task) = link_task {
        task.abort();
    }
    if let Some(task) = local_task
        && let Ok(Err(e)) = task.await
    {
        tracing::warn!(error = %e, "local API");
    }
    served?;
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}
