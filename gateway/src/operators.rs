//! Operator accounts as the directory holds them, read through its operator API and cached
//! briefly, and the authorisation of AdminService calls against them.
//!
//! The cache is one snapshot of every operator (bounded by `MAX_ACCOUNTS`), refreshed at most
//! once per `cache_ttl_ms` by one caller while the others wait for it. An unknown name does
//! not trigger a refresh, so callers with unregistered certificates cannot make the gateway
//! hammer the directory. A change in the directory takes effect within `cache_ttl_ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cms_kit::client::Channel;
use cms_proto::common::v1::PageRequest;
use cms_proto::directory::v1::directory_service_client::DirectoryServiceClient;
use cms_proto::directory::v1::{ListOperatorsRequest, Operator, OperatorStatus};
use tokio::sync::Mutex;

use crate::Error;
use crate::bound_certs::{Binding, BoundCertificates};
use crate::caller::require_operator;
use crate::roles::{self, Account, Action};

/// More operators than this is not a helpdesk: the rest are refused (and logged).
const MAX_ACCOUNTS: usize = 10_000;
const PAGE_SIZE: u32 = 500;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Proof that the caller is an operator allowed to do the action it was checked for.
/// Only `OperatorAccounts::authorize` makes one, so a handler cannot pass a request through
/// without having checked it.
#[derive(Debug)]
pub struct Authorized {
    operator: String,
}

impl Authorized {
    /// The operator's directory username (its SPIFFE ID's last segment, or the account its
    /// bound certificate names).
    pub fn operator(&self) -> &str {
        &self.operator
    }
}

struct Snapshot {
    fetched: Instant,
    accounts: HashMap<String, Account>,
    /// The accounts as the directory holds them (scope, id, display name), by username.
    operators: HashMap<String, Operator>,
}

/// What the last read of the directory left behind.
#[derive(Default)]
struct Cache {
    snapshot: Option<Arc<Snapshot>>,
    /// A failed read, repeated to callers for `RETRY_AFTER_FAILURE` instead of each of them
    /// waiting for the directory in turn.
    failure: Option<(Instant, String)>,
}

pub struct OperatorAccounts {
    directory: DirectoryServiceClient<Channel>,
    ttl: Duration,
    cache: Mutex<Cache>,
    /// Set when the port accepts certificates bound to operator accounts.
    bound: Option<BoundCertificates>,
}

impl OperatorAccounts {
    pub fn new(directory: Channel, ttl: Duration) -> Self {
        Self {
            directory: DirectoryServiceClient::new(directory.clone()),
            ttl,
            cache: Mutex::new(Cache::default()),
            bound: None,
        }
    }

    /// Also identifies operators by the certificates the directory binds to their accounts.
    pub fn with_bound_certificates(mut self, directory: Channel) -> Self {
        self.bound = Some(BoundCertificates::new(directory, self.ttl));
        self
    }

    /// The operator `request` comes from: the account a bound certificate names (on a port
    /// that accepts them), or the name in an operator SPIFFE ID. When certificates are bound,
    /// a SPIFFE operator whose certificate is bound to another account is refused.
    pub async fn operator_of<T>(&self, request: &tonic::Request<T>) -> Result<String, Error> {
        let connection = cms_kit::ConnectionIdentity::of(request);
        if let Some(certificate) = connection.and_then(|c| c.bound_certificate()) {
            let bound = self
                .bound
                .as_ref()
                .ok_or_else(|| Error::denied("no verified client identity"))?;
            return bound.operator(certificate).await;
        }
        let operator = require_operator(request)?;
        if let (Some(bound), Some(certificate)) = (
            self.bound.as_ref(),
            connection.and_then(|c| c.certificate.as_ref()),
        ) && let Binding::Operator(other) = bound.binding(certificate).await?
            && other != operator
        {
            tracing::info!(%operator, "operator refused: certificate bound to another account");
            return Err(Error::denied(format!(
                "the client certificate names operator {operator:?} but is bound to another operator account"
            )));
        }
        Ok(operator)
    }

    /// Checks that the caller is an active operator whose roles allow `action`.
    pub async fn authorize<T>(
        &self,
        request: &tonic::Request<T>,
        action: Action,
    ) -> Result<Authorized, Error> {
        let operator = self.operator_of(request).await?;
        let snapshot = self.current(action).await?;
        match roles::decide(&operator, snapshot.accounts.get(&operator), action) {
            Ok(()) => Ok(Authorized { operator }),
            Err(refusal) => {
                tracing::info!(%operator, ?action, reason = %refusal, "operator refused");
                Err(Error::Forbidden(refusal.to_string()))
            }
        }
    }

    /// The active account of `operator` (its roles and scope), for the helpdesk workflow,
    /// which decides per card from the template; no account or a disabled one is refused.
    pub async fn active_account(&self, operator: &str) -> Result<Operator, Error> {
        let snapshot = self.current(Action::ViewHelpdesk).await?;
        let refusal = match (
            snapshot.accounts.get(operator),
            snapshot.operators.get(operator),
        ) {
            (Some(account), Some(found)) if account.active => return Ok(found.clone()),
            (Some(_), Some(_)) => roles::Refusal::Disabled {
                operator: operator.to_owned(),
            },
            _ => roles::Refusal::NoAccount {
                operator: operator.to_owned(),
            },
        };
        tracing::info!(%operator, reason = %refusal, "operator refused");
        Err(Error::Forbidden(refusal.to_string()))
    }

    /// Forgets the cached accounts, after the gateway itself changed one: the next call reads
    /// them again, so a new or changed operator takes effect at once.
    pub async fn invalidate(&self) {
        self.cache.lock().await.snapshot = None;
        if let Some(bound) = &self.bound {
            bound.invalidate().await;
        }
    }

    /// The accounts, fetched again when older than the TTL. One caller fetches while the
    /// others wait for its result.
    async fn current(&self, action: Action) -> Result<Arc<Snapshot>, Error> {
        let mut cache = self.cache.lock().await;
        if let Some(s) = cache.snapshot.as_ref()
            && s.fetched.elapsed() < self.ttl
        {
            return Ok(s.clone());
        }
        let outcome = match &cache.failure {
            Some((at, message)) if at.elapsed() < RETRY_AFTER_FAILURE => {
                Err(Error::Unavailable(message.clone()))
            }
            _ => self.fetch().await,
        };
        match outcome {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                cache.snapshot = Some(fresh.clone());
                cache.failure = None;
                Ok(fresh)
            }
            Err(err) => {
                if cache.failure.is_none() {
                    tracing::warn!(error = %err, "cannot read operator accounts");
                }
                if !matches!(&cache.failure, Some((at, _)) if at.elapsed() < RETRY_AFTER_FAILURE) {
                    cache.failure = Some((Instant::now(), err.to_string()));
                }
                match cache.snapshot.as_ref() {
                    Some(stale) if action.tolerates_stale_accounts() => Ok(stale.clone()),
                    _ => Err(err),
                }
            }
        }
    }

    async fn fetch(&self) -> Result<Snapshot, Error> {
        let unavailable = |detail: String| {
            Error::Unavailable(format!(
                "cannot check the caller's operator account: the directory {detail}"
            ))
        };
        let mut client = self.directory.clone();
        let mut accounts = HashMap::new();
        let mut operators = HashMap::new();
        let mut token = String::new();
        let started = Instant::now();
        loop {
            let mut request = tonic::Request::new(ListOperatorsRequest {
                page: Some(PageRequest {
                    page_size: PAGE_SIZE,
                    page_token: token.clone(),
                }),
                role: String::new(),
                include_disabled: true,
            });
            let left = FETCH_TIMEOUT.saturating_sub(started.elapsed());
            request.set_timeout(left);
            let page = tokio::time::timeout(left, client.list_operators(request))
                .await
                .map_err(|_| {
                    unavailable(format!(
                        "did not answer within {} s",
                        FETCH_TIMEOUT.as_secs()
                    ))
                })?
                .map_err(|status| {
                    unavailable(format!(
                        "answered {:?}: {}",
                        status.code(),
                        status.message()
                    ))
                })?
                .into_inner();
            for operator in page.operators {
                if accounts.len() >= MAX_ACCOUNTS {
                    tracing::warn!(
                        max = MAX_ACCOUNTS,
                        "the directory holds more operator accounts than the gateway reads; the rest are refused"
                    );
                    return Ok(Snapshot {
                        fetched: Instant::now(),
                        accounts,
                        operators,
                    });
                }
                accounts.insert(
                    operator.username.clone(),
                    Account {
                        active: operator.status == OperatorStatus::Active as i32,
                        role_names: operator.roles.clone(),
                    },
                );
                operators.insert(operator.username.clone(), operator);
            }
            token = page.page.map(|p| p.next_page_token).unwrap_or_default();
            if token.is_empty() {
                break;
            }
        }
        Ok(Snapshot {
            fetched: Instant::now(),
            accounts,
            operators,
        })
    }
}
