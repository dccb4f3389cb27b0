//! Operators known by a client certificate the directory binds to their account (a
//! certificate of the enterprise's own CA, say, with no SPIFFE ID).
//!
//! The directory's `GetOperatorByCertificate` answers which ACTIVE operator, if any, a
//! certificate is bound to. Answers are cached per certificate: a binding for the operator
//! cache's lifetime, "not bound" only for [`NEGATIVE_TTL`] (a new binding works soon, yet a
//! caller with an unknown certificate costs the directory one call per that time). One lookup
//! runs at a time (callers with other uncached certificates wait for it; cached answers never
//! wait), so many unknown certificates at once cannot flood the directory either. The cache
//! is bounded: when full, expired answers go first, then everything.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cms_kit::CertificateIds;
use cms_kit::client::Channel;
use cms_proto::directory::v1::GetOperatorByCertificateRequest;
use cms_proto::directory::v1::directory_service_client::DirectoryServiceClient;
use tokio::sync::Mutex;

use crate::Error;

/// How long "this certificate is bound to no active operator" is reused.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(2);
const MAX_ENTRIES: usize = 10_000;
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the directory said about one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// Bound to this active operator (username).
    Operator(String),
    /// Bound to no active operator.
    Unbound,
}

pub struct BoundCertificates {
    directory: DirectoryServiceClient<Channel>,
    ttl: Duration,
    cache: Mutex<HashMap<CertificateIds, (Instant, Binding)>>,
    /// Held for each directory lookup.
    lookups: Mutex<()>,
}

impl BoundCertificates {
    pub fn new(directory: Channel, ttl: Duration) -> Self {
        Self {
            directory: DirectoryServiceClient::new(directory),
            ttl,
            cache: Mutex::new(HashMap::new()),
            lookups: Mutex::new(()),
        }
    }

    /// The operator `certificate` is bound to, or a refusal that says why not.
    pub async fn operator(&self, certificate: &CertificateIds) -> Result<String, Error> {
        match self.binding(certificate).await? {
            Binding::Operator(name) => Ok(name),
            Binding::Unbound => {
                tracing::info!(?certificate, "bound-certificate caller refused");
                Err(Error::denied(
                    "the client certificate is not bound to an active operator account",
                ))
            }
        }
    }

    /// The directory's answer for `certificate`, cached.
    pub async fn binding(&self, certificate: &CertificateIds) -> Result<Binding, Error> {
        if let Some(binding) = self.cached(certificate).await {
            return Ok(binding);
        }
        let _turn = self.lookups.lock().await;
        // The caller before us may have looked this certificate up.
        if let Some(binding) = self.cached(certificate).await {
            return Ok(binding);
        }
        let binding = self.lookup(certificate).await?;
        let mut cache = self.cache.lock().await;
        if cache.len() >= MAX_ENTRIES {
            cache.retain(|_, (at, b)| at.elapsed() < self.lifetime(b));
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(certificate.clone(), (Instant::now(), binding.clone()));
        Ok(binding)
    }

    async fn cached(&self, certificate: &CertificateIds) -> Option<Binding> {
        match self.cache.lock().await.get(certificate) {
            Some((at, binding)) if at.elapsed() < self.lifetime(binding) => Some(binding.clone()),
            _ => None,
        }
    }

    /// Forgets every answer (after the gateway changed an operator itself).
    pub async fn invalidate(&self) {
        self.cache.lock().await.clear();
    }

    fn lifetime(&self, binding: &Binding) -> Duration {
        match binding {
            Binding::Operator(_) => self.ttl,
            Binding::Unbound => NEGATIVE_TTL.min(self.ttl),
        }
    }

    async fn lookup(&self, certificate: &CertificateIds) -> Result<Binding, Error> {
        let mut request = tonic::Request::new(GetOperatorByCertificateRequest {
            issuer_dn: certificate.issuer_dn.clone(),
            serial_number: certificate.serial_number.clone(),
            spki_sha256: certificate.spki_sha256.to_vec(),
        });
        request.set_timeout(LOOKUP_TIMEOUT);
        let answer = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            self.directory.clone().get_operator_by_certificate(request),
        )
        .await
        .map_err(|_| {
            Error::Unavailable(format!(
                "cannot check the caller's certificate binding: the directory did not answer within {} s",
                LOOKUP_TIMEOUT.as_secs()
            ))
        })?;
        match answer {
            Ok(found) => match found.into_inner().operator {
                Some(operator) if !operator.username.is_empty() => {
                    Ok(Binding::Operator(operator.username))
                }
                _ => Ok(Binding::Unbound),
            },
            Err(status) if status.code() == tonic::Code::NotFound => Ok(Binding::Unbound),
            Err(status) => Err(Error::Unavailable(format!(
                "cannot check the caller's certificate binding: the directory answered {:?}: {}",
                status.code(),
                status.message()
            ))),
        }
    }
}
