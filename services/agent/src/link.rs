//! The agent's outbound link to the gateway: connect, say Hello, send heartbeats, answer
//! commands; reconnect with capped exponential back-off when the link breaks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cms_kit::client::Channel;
use cms_kit::shutdown::Shutdown;
use cms_proto::common::v1::ErrorReason;
use cms_proto::gateway::v1::agent_link_service_client::AgentLinkServiceClient;
use cms_proto::gateway::v1::command_result::Payload;
use cms_proto::gateway::v1::link_request::Body;
use cms_proto::gateway::v1::link_response::Command;
use cms_proto::gateway::v1::{
    CommandError, CommandResult, Heartbeat, Hello, LinkRequest, LinkResponse, Pong,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::LinkSettings;

/// Whether the link is up, and since when; shown by GetAgentStatus.
#[derive(Clone, Debug)]
pub struct LinkState(Arc<Mutex<(bool, SystemTime)>>);

impl Default for LinkState {
    fn default() -> Self {
        Self(Arc::new(Mutex::new((false, SystemTime::now()))))
    }
}

impl LinkState {
    fn set(&self, up: bool) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 != up {
            *state = (up, SystemTime::now());
        }
    }

    pub fn get(&self) -> (bool, SystemTime) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Link {
    pub channel: Channel,
    pub hello: Hello,
    pub settings: LinkSettings,
    pub state: LinkState,
}

impl Link {
    /// Keeps the link up until shutdown.
    pub async fn run(self, shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(250);
        let max_backoff = Duration::from_millis(self.settings.max_backoff_ms.max(250));
        loop {
            let outcome = tokio::select! {
                r = self.session() => r,
                () = shutdown.wait() => return,
            };
            self.state.set(false);
            match outcome {
                Ok(()) => {
                    tracing::info!("gateway closed the link; reconnecting");
                    backoff = Duration::from_millis(250);
                }
                Err(status) => tracing::warn!(
                    code = ?status.code(),
                    message = status.message(),
                    retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                    "gateway link failed"
                ),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.wait() => return,
            }
            backoff = (backoff * 2).min(max_backoff);
        }
    }

    /// One connection: Hello, then heartbeats and command answers until it ends.
    async fn session(&self) -> Result<(), tonic::Status> {
        let (tx, rx) = mpsc::channel::<LinkRequest>(16);
        tx.send(LinkRequest {
            body: Some(Body::Hello(self.hello.clone())),
        })
        .await
        .map_err(|_| tonic::Status::internal("link channel closed"))?;
        let mut client = AgentLinkServiceClient::new(self.channel.clone());
        let mut commands = client.link(ReceiverStream::new(rx)).await?.into_inner();
        self.state.set(true);
        tracing::info!(agent_id = %self.hello.agent_id, "linked to the gateway");
        let mut heartbeat = tokio::time::interval(Duration::from_millis(
            self.settings.heartbeat_interval_ms.max(100),
        ));
        heartbeat.tick().await;
        let mut sequence = 0u64;
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    sequence += 1;
                    let beat = LinkRequest {
                        body: Some(Body::Heartbeat(Heartbeat {
                            sent_at: Some(SystemTime::now().into()),
                            sequence,
                        })),
                    };
                    if tx.send(beat).await.is_err() { return Ok(()); }
                }
                command = commands.message() => match command? {
                    Some(command) => {
                        let answer = answer(command);
                        if tx.send(answer).await.is_err() { return Ok(()); }
                    }
                    None => return Ok(()),
                }
            }
        }
    }
}

/// The agent's answer to one command. Card commands arrive with the card profiles.
fn answer(command: LinkResponse) -> LinkRequest {
    let payload = match command.command {
        Some(Command::Ping(ping)) => Payload::Pong(Pong { nonce: ping.nonce }),
        Some(_) | None => Payload::Error(CommandError {
            reason: ErrorReason::Unspecified as i32,
            message: "this agent does not support that command yet".into(),
        }),
    };
    LinkRequest {
        body: Some(Body::CommandResult(CommandResult {
            correlation_id: command.correlation_id,
            payload: Some(payload),
        })),
    }
}
