//! The card half of the AgentService: readers, card information and the offline unblock
//! flows. Card work is blocking: it runs on blocking threads (or a session's own thread).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use cms_proto::agent::v1::{
    ApplyResponseRequest, CancelChallengeRequest, CancelChallengeResponse, CardInfo,
    GetCardInfoRequest, GetCardInfoResponse, GetChallengeRequest, GetChallengeResponse,
    ListReadersResponse, Reader, ReaderEvent as ProtoEvent, ReaderEventKind, UnblockResult,
    UnblockSoTokenRequest, UnblockWithPukRequest, WatchReadersResponse,
};
use cms_proto::common::v1::TypedCode;
use cms_proto::template::v1::PinPolicy;
use tokio_stream::Stream;
use zeroize::{Zeroize, Zeroizing};

use crate::card::minidriver;
use crate::card::profile::{CardFacts, Profile, detect};
use crate::card::readers::{ReaderEvent, Readers, Sharing, Watch, WatchGuard, choose};
use crate::config::CardSettings;
use crate::error::Error;
use crate::unblock::{codes, pin, puk, session::Sessions, so_token};

/// A typed code from a request, wiped when dropped.
struct SecretCode(TypedCode);

impl From<TypedCode> for SecretCode {
    fn from(code: TypedCode) -> Self {
        SecretCode(code)
    }
}

impl Drop for SecretCode {
    fn drop(&mut self) {
        self.0.hex.zeroize();
        self.0.checksum.zeroize();
    }
}

/// Readers, open challenge sessions and the configured PIN policy.
pub struct CardService {
    readers: Arc<dyn Readers>,
    sessions: Sessions,
    challenge_timeout: Duration,
    policy: Option<PinPolicy>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Refused(format!("card task failed: {e}")))
}

impl CardService {
    pub fn new(readers: Arc<dyn Readers>, settings: &CardSettings) -> Self {
        CardService {
            readers,
            sessions: Sessions::default(),
            challenge_timeout: Duration::from_millis(settings.challenge_timeout_ms),
            policy: settings.pin_policy.as_ref().map(|p| p.to_proto()),
        }
    }

    /// The configured PIN policy (for explanations in the CLI).
    pub fn pin_policy(&self) -> Option<&PinPolicy> {
        self.policy.as_ref()
    }

    pub async fn list_readers(&self) -> Result<ListReadersResponse, Error> {
        let readers = self.readers.clone();
        let list = blocking(move || readers.list()).await??;
        Ok(ListReadersResponse {
            readers: list
                .into_iter()
                .map(|r| Reader {
                    name: r.name,
                    card_present: r.card_present,
                    atr: r.atr,
                    in_use: r.in_use,
                })
                .collect(),
        })
    }

    pub async fn card_info(
        &self,
        request: GetCardInfoRequest,
    ) -> Result<GetCardInfoResponse, Error> {
        let readers = self.readers.clone();
        let facts = blocking(move || -> Result<CardFacts, Error> {
            let reader = choose(&*readers, &request.reader)?;
            read_card(&*readers, &reader, true)
        })
        .await??;
        Ok(GetCardInfoResponse {
            card: Some(facts.to_proto()),
        })
    }

    pub async fn get_challenge(
        &self,
        request: GetChallengeRequest,
    ) -> Result<GetChallengeResponse, Error> {
        let readers = self.readers.clone();
        let name = request.reader.clone();
        let reader = blocking(move || choose(&*readers, &name)).await??;
        let opened = self
            .sessions
            .open(
                self.readers.clone(),
                reader,
                request.expected_card_id,
                self.challenge_timeout,
            )
            .await?;
        Ok(GetChallengeResponse {
            session_handle: opened.handle,
            challenge: Some(TypedCode {
                hex: cms_cardcrypto::format_groups(&opened.challenge),
                checksum: cms_cardcrypto::checksum(&opened.challenge),
            }),
            card: Some(opened.facts.to_proto()),
            expires_at: Some(opened.expires_at.into()),
        })
    }

    pub async fn apply_response(&self, mut request: ApplyResponseRequest) -> UnblockResult {
        // The secrets leave the request at once, into memory that is wiped.
        let new_pin = Zeroizing::new(std::mem::take(&mut request.new_pin));
        let typed = request.response.take().map(SecretCode::from);
        let facts = match self.sessions.facts(&request.session_handle) {
            Ok(f) => f,
            Err(r) => return r,
        };
        // Checked before the card sees a byte; on these errors the session stays open.
        let response = match codes::response(typed.as_ref().map(|t| &t.0), facts.challenge_length) {
            Ok(r) => r,
            Err(r) => return r,
        };
        let policy = pin::in_force(request.pin_policy.as_ref(), self.policy.as_ref());
        if let Err(r) = pin::check(&new_pin, policy, Profile::Minidriver) {
            return r;
        }
        self.sessions
            .apply(&request.session_handle, response, new_pin)
            .await
    }

    pub async fn cancel_challenge(
        &self,
        request: &CancelChallengeRequest,
    ) -> CancelChallengeResponse {
        self.sessions.cancel(&request.session_handle).await;
        CancelChallengeResponse {}
    }

    pub async fn unblock_with_puk(
        &self,
        request: UnblockWithPukRequest,
    ) -> Result<UnblockResult, Error> {
        let readers = self.readers.clone();
        let policy = self.policy.clone();
        blocking(move || {
            let mut request = request;
            let result = puk::unblock(&*readers, &request, policy.as_ref());
            request.puk.zeroize();
            request.puk_checksum.zeroize();
            request.new_pin.zeroize();
            result
        })
        .await
    }

    pub async fn unblock_so_token(
        &self,
        request: UnblockSoTokenRequest,
    ) -> Result<UnblockResult, Error> {
        let readers = self.readers.clone();
        let policy = self.policy.clone();
        blocking(move || {
            let mut request = request;
            let result = so_token::unblock(&*readers, &request, policy.as_ref());
            if let Some(key) = request.so_unblock_key.take() {
                drop(SecretCode::from(key));
            }
            request.new_pin.zeroize();
            result
        })
        .await
    }

    /// Reader and card events until the stream is dropped.
    pub async fn watch(&self, initial_state: bool) -> Result<WatchStream, Error> {
        let (events, rx) = tokio::sync::mpsc::channel(64);
        let readers = self.readers.clone();
        let info_readers = self.readers.clone();
        let guard = blocking(move || {
            readers.watch(
                initial_state,
                Box::new(move |event| {
                    let item = match event {
                        Ok(event) => Ok(to_proto_event(&*info_readers, event)),
                        Err(e) => Err(tonic::Status::from(Error::Card(e))),
                    };
                    match events.blocking_send(item) {
                        Ok(()) => Watch::Continue,
                        Err(_) => Watch::Stop,
                    }
                }),
            )
        })
        .await??;
        Ok(WatchStream { rx, _guard: guard })
    }
}

/// Reads a card's facts in one (shared) transaction; with `probe_challenge`, a minidriver card's
/// challenge length too (a GET CHALLENGE whose challenge is dropped: it costs no try).
fn read_card(
    readers: &dyn Readers,
    reader: &str,
    probe_challenge: bool,
) -> Result<CardFacts, Error> {
    let mut backend = readers.open(reader, Sharing::Shared)?;
    let mut tx = backend.transaction()?;
    let mut facts = detect(&mut *tx, reader)?;
    if probe_challenge
        && facts.profile == Some(Profile::Minidriver)
        && !facts.admin_blocked()
        && let Ok(challenge) = minidriver::get_challenge(&mut *tx)
    {
        facts.challenge_length = challenge.len();
    }
    Ok(facts)
}

fn to_proto_event(readers: &dyn Readers, event: ReaderEvent) -> WatchReadersResponse {
    let (kind, reader, card) = match event {
        ReaderEvent::ReaderAdded { reader } => (ReaderEventKind::ReaderAdded, reader, None),
        ReaderEvent::ReaderRemoved { reader } => (ReaderEventKind::ReaderRemoved, reader, None),
        ReaderEvent::CardRemoved { reader } => (ReaderEventKind::CardRemoved, reader, None),
        ReaderEvent::CardInserted { reader, atr } => {
            let card = read_card(readers, &reader, false)
                .map(|f| f.to_proto())
                .unwrap_or_else(|_| CardInfo {
                    reader: reader.clone(),
                    atr,
                    ..CardInfo::default()
                });
            (ReaderEventKind::CardInserted, reader, Some(card))
        }
    };
    WatchReadersResponse {
        event: Some(ProtoEvent {
            kind: kind as i32,
            reader,
            card,
            occurred_at: Some(SystemTime::now().into()),
        }),
    }
}

/// The WatchReaders stream; dropping it stops the watch.
pub struct WatchStream {
    rx: tokio::sync::mpsc::Receiver<Result<WatchReadersResponse, tonic::Status>>,
    _guard: WatchGuard,
}

impl Stream for WatchStream {
    type Item = Result<WatchReadersResponse, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}
