//! The agent link: card agents dial out to the gateway and keep one bidirectional stream open.
//! The registry knows which agents are connected, with what readers, and can send them
//! commands (online unblock by an operator drives a card over this link).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cms_proto::gateway::v1::agent_link_service_server::AgentLinkService;
use cms_proto::gateway::v1::link_request::Body;
use cms_proto::gateway::v1::{ConnectedAgent, Hello, LinkRequest, LinkResponse};
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::Error;
use crate::caller::require_agent;
use crate::config::AgentLinkSettings;

struct Entry {
    /// Distinguishes a reconnect from the connection it replaced.
    generation: u64,
    identity: String,
    remote: Option<SocketAddr>,
    connected_since: SystemTime,
    hello: Hello,
    last_seen: Instant,
    last_seen_at: SystemTime,
    #[allow(dead_code)] // Commands flow over this once online unblock lands.
    commands: mpsc::Sender<Result<LinkResponse, Status>>,
}

/// Connected agents, by agent id.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<RegistryInner>>,
}

#[derive(Default)]
struct RegistryInner {
    next_generation: u64,
    agents: HashMap<String, Entry>,
}

/// One connected agent as the status page shows it.
#[derive(Clone, Debug)]
pub struct AgentView {
    pub agent: ConnectedAgent,
    pub remote: Option<SocketAddr>,
    pub stale: bool,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(
        &self,
        agent_id: &str,
        identity: String,
        remote: Option<SocketAddr>,
        hello: Hello,
        commands: mpsc::Sender<Result<LinkResponse, Status>>,
    ) -> u64 {
        let mut inner = self.lock();
        inner.next_generation += 1;
        let generation = inner.next_generation;
        let replaced = inner.agents.insert(
            agent_id.to_owned(),
            Entry {
                generation,
                identity,
                remote,
                connected_since: SystemTime::now(),
                hello,
                last_seen: Instant::now(),
                last_seen_at: SystemTime::now(),
                commands,
            },
        );
        if replaced.is_some() {
            tracing::info!(agent_id, "agent reconnected; the older link is dropped");
        }
        generation
    }

    fn touch(&self, agent_id: &str, generation: u64, update: impl FnOnce(&mut Hello)) {
        let mut inner = self.lock();
        if let Some(entry) = inner.agents.get_mut(agent_id)
            && entry.generation == generation
        {
            entry.last_seen = Instant::now();
            entry.last_seen_at = SystemTime::now();
            update(&mut entry.hello);
        }
    }

    fn remove(&self, agent_id: &str, generation: u64) {
        let mut inner = self.lock();
        if inner
            .agents
            .get(agent_id)
            .is_some_and(|e| e.generation == generation)
        {
            inner.agents.remove(agent_id);
        }
    }

    /// Connected agents, sorted by id.
    pub fn list(&self, stale_after: Duration) -> Vec<AgentView> {
        let inner = self.lock();
        let mut out: Vec<AgentView> = inner
            .agents
            .iter()
            .map(|(id, e)| AgentView {
                agent: ConnectedAgent {
                    agent_id: id.clone(),
                    identity: e.identity.clone(),
                    connected_since: Some(e.connected_since.into()),
                    readers: e.hello.reader_states.clone(),
                    version: e.hello.version.clone(),
                    hostname: e.hello.hostname.clone(),
                    last_heartbeat_at: Some(e.last_seen_at.into()),
                    supported_profiles: e.hello.supported_profiles.clone(),
                    local_pin_prompt: e.hello.local_pin_prompt,
                },
                remote: e.remote,
                stale: e.last_seen.elapsed() > stale_after,
            })
            .collect();
        out.sort_by(|a, b| a.agent.agent_id.cmp(&b.agent.agent_id));
        out
    }
}

/// The AgentLinkService implementation.
pub struct AgentLink {
    pub registry: Registry,
    pub settings: AgentLinkSettings,
}

type LinkStream = Pin<Box<dyn Stream<Item = Result<LinkResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentLinkService for AgentLink {
    async fn link(
        &self,
        request: Request<Streaming<LinkRequest>>,
    ) -> Result<Response<LinkStream>, Status> {
        let (agent_id, peer) = require_agent(&request)?;
        let mut inbound = request.into_inner();
        let hello_timeout = Duration::from_millis(self.settings.hello_timeout_ms);
        let first = tokio::time::timeout(hello_timeout, inbound.message())
            .await
            .map_err(|_| Error::Timeout("no Hello within the hello timeout".into()))??;
        let hello = match first.and_then(|m| m.body) {
            Some(Body::Hello(hello)) => hello,
            _ => {
                return Err(
                    Error::BadRequest("the first message of a link must be Hello".into()).into(),
                );
            }
        };
        if hello.agent_id != agent_id {
            return Err(Error::Forbidden(format!(
                "Hello.agent_id {:?} does not match the certificate's identity {}",
                hello.agent_id, peer.spiffe_id
            ))
            .into());
        }
        let (tx, rx) = mpsc::channel(16);
        let generation = self.registry.insert(
            &agent_id,
            peer.spiffe_id.to_string(),
            peer.remote_addr,
            hello,
            tx,
        );
        tracing::info!(%agent_id, identity = %peer.spiffe_id, "agent linked");
        let registry = self.registry.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => registry.touch(&agent_id, generation, |hello| {
                        if let Some(Body::ReaderEvent(event)) = message.body {
                            apply_reader_event(hello, &event);
                        }
                    }),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(%agent_id, code = ?status.code(), "agent link broke");
                        break;
                    }
                }
            }
            registry.remove(&agent_id, generation);
            tracing::info!(%agent_id, "agent unlinked");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn apply_reader_event(hello: &mut Hello, event: &cms_proto::agent::v1::ReaderEvent) {
    use cms_proto::agent::v1::{Reader, ReaderEventKind};
    let kind = ReaderEventKind::try_from(event.kind).unwrap_or(ReaderEventKind::Unspecified);
    let position = hello
        .reader_states
        .iter()
        .position(|r| r.name == event.reader);
    match (kind, position) {
        (ReaderEventKind::ReaderRemoved, Some(i)) => {
            hello.reader_states.remove(i);
        }
        (ReaderEventKind::ReaderRemoved, None) => {}
        (_, None) => hello.reader_states.push(Reader {
            name: event.reader.clone(),
            ..Default::default()
        }),
        (ReaderEventKind::CardInserted, Some(i)) => {
            hello.reader_states[i].card_present = true;
        }
        (ReaderEventKind::CardRemoved, Some(i)) => {
            hello.reader_states[i].card_present = false;
            hello.reader_states[i].atr.clear();
        }
        (_, Some(_)) => {}
    }
}
