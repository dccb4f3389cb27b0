//! What the CLI (and a desktop app) talks to: a running agent over its Unix socket, or the card
//! code in this very process when no agent runs (`--direct`). The same calls either way.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use cms_proto::agent::v1::agent_service_client::AgentServiceClient;
use cms_proto::agent::v1::{
    ApplyResponseRequest, CancelChallengeRequest, CardInfo, GetCardInfoRequest,
    GetChallengeRequest, GetChallengeResponse, ListReadersRequest, Reader, UnblockResult,
    UnblockSoTokenRequest, UnblockWithPukRequest, WatchReadersRequest, WatchReadersResponse,
};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;

use crate::card::readers::Readers;
use crate::{Agent, CardSettings};

type Events = Pin<Box<dyn Stream<Item = Result<WatchReadersResponse, tonic::Status>> + Send>>;

/// A connection to the agent's card functions.
pub enum Api {
    Socket(AgentServiceClient<Channel>),
    Direct(Arc<Agent>),
}

fn status(err: crate::Error) -> tonic::Status {
    tonic::Status::from(err)
}

impl Api {
    /// Connects to a running agent's Unix socket.
    pub async fn socket(path: &Path) -> Result<Api, crate::Error> {
        Ok(Api::Socket(AgentServiceClient::new(
            crate::local::connect(path).await?,
        )))
    }

    /// Runs the card code in this process over `readers`.
    pub fn direct(readers: Arc<dyn Readers>, settings: &CardSettings) -> Api {
        Api::Direct(Arc::new(Agent::offline(readers, settings)))
    }

    /// Whether a challenge session outlives this process (it does not in direct mode).
    pub fn sessions_outlive_process(&self) -> bool {
        matches!(self, Api::Socket(_))
    }

    pub async fn readers(&mut self) -> Result<Vec<Reader>, tonic::Status> {
        match self {
            Api::Socket(c) => Ok(c
                .list_readers(ListReadersRequest {})
                .await?
                .into_inner()
                .readers),
            Api::Direct(a) => Ok(a.cards().list_readers().await.map_err(status)?.readers),
        }
    }

    pub async fn card(&mut self, reader: &str) -> Result<CardInfo, tonic::Status> {
        let request = GetCardInfoRequest {
            reader: reader.into(),
        };
        let response = match self {
            Api::Socket(c) => c.get_card_info(request).await?.into_inner(),
            Api::Direct(a) => a.cards().card_info(request).await.map_err(status)?,
        };
        Ok(response.card.unwrap_or_default())
    }

    pub async fn challenge(&mut self, reader: &str) -> Result<GetChallengeResponse, tonic::Status> {
        let request = GetChallengeRequest {
            reader: reader.into(),
            expected_card_id: Vec::new(),
        };
        match self {
            Api::Socket(c) => Ok(c.get_challenge(request).await?.into_inner()),
            Api::Direct(a) => a.cards().get_challenge(request).await.map_err(status),
        }
    }

    pub async fn apply(
        &mut self,
        request: ApplyResponseRequest,
    ) -> Result<UnblockResult, tonic::Status> {
        match self {
            Api::Socket(c) => Ok(c
                .apply_response(request)
                .await?
                .into_inner()
                .result
                .unwrap_or_default()),
            Api::Direct(a) => Ok(a.cards().apply_response(request).await),
        }
    }

    pub async fn cancel(&mut self, handle: &str) -> Result<(), tonic::Status> {
        let request = CancelChallengeRequest {
            session_handle: handle.into(),
        };
        match self {
            Api::Socket(c) => c.cancel_challenge(request).await.map(|_| ()),
            Api::Direct(a) => {
                a.cards().cancel_challenge(&request).await;
                Ok(())
            }
        }
    }

    pub async fn unblock_with_puk(
        &mut self,
        request: UnblockWithPukRequest,
    ) -> Result<UnblockResult, tonic::Status> {
        match self {
            Api::Socket(c) => Ok(c
                .unblock_with_puk(request)
                .await?
                .into_inner()
                .result
                .unwrap_or_default()),
            Api::Direct(a) => a.cards().unblock_with_puk(request).await.map_err(status),
        }
    }

    pub async fn unblock_so_token(
        &mut self,
        request: UnblockSoTokenRequest,
    ) -> Result<UnblockResult, tonic::Status> {
        match self {
            Api::Socket(c) => Ok(c
                .unblock_so_token(request)
                .await?
                .into_inner()
                .result
                .unwrap_or_default()),
            Api::Direct(a) => a.cards().unblock_so_token(request).await.map_err(status),
        }
    }

    pub async fn watch(&mut self, initial_state: bool) -> Result<Events, tonic::Status> {
        match self {
            Api::Socket(c) => {
                let stream = c
                    .watch_readers(WatchReadersRequest { initial_state })
                    .await?
                    .into_inner();
                Ok(Box::pin(stream.map(|item| item)))
            }
            Api::Direct(a) => Ok(Box::pin(
                a.cards().watch(initial_state).await.map_err(status)?,
            )),
        }
    }
}
