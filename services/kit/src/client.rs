//! Mutual-TLS gRPC clients.
//!
//! The connector checks the server's certificate against our CA and then pins the server's
//! SPIFFE ID to the one configured for that upstream: a valid certificate of another workload
//! is refused. Every connection uses the current certificates of the [`TlsSource`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::Deserialize;
use tokio::net::TcpStream;
use tonic::transport::Endpoint;

use crate::identity::SpiffeId;
use crate::tls::TlsSource;
use crate::trace::InjectContext;

/// A channel that propagates the W3C trace context of the current span on every request.
pub type Channel = InjectContext<tonic::transport::Channel>;

/// Where an upstream service is and who it must be.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// `host:port`; the host must be a DNS or IP SAN of the server's certificate.
    pub address: String,
    /// The SPIFFE ID the server's certificate must carry.
    pub identity: SpiffeId,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

fn default_connect_timeout_ms() -> u64 {
    3_000
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("upstream address {0:?} is not host:port")]
    Address(String),
}

/// A lazily connecting channel: the first request dials, later requests reuse the connection
/// and a broken one is redialled.
pub fn channel(upstream: &UpstreamSettings, tls: Arc<TlsSource>) -> Result<Channel, ClientError> {
    channel_via(upstream, &upstream.address, tls)
}

/// As [`channel`], but dialling `dial` (one address a DNS name of `upstream.address`
/// resolved to), while the certificate is checked for the configured host name.
pub fn channel_via(
    upstream: &UpstreamSettings,
    dial: &str,
    tls: Arc<TlsSource>,
) -> Result<Channel, ClientError> {
    let (host, _) = split_host(&upstream.address)?;
    let server_name = ServerName::try_from(host.to_owned())
        .map_err(|_| ClientError::Address(upstream.address.clone()))?;
    let endpoint = Endpoint::from_shared(format!("http://{dial}"))
        .map_err(|_| ClientError::Address(dial.to_owned()))?
        .connect_timeout(Duration::from_millis(upstream.connect_timeout_ms))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let connector = MtlsConnector {
        tls,
        server_name,
        expected: upstream.identity.clone(),
    };
    Ok(InjectContext::new(
        endpoint.connect_with_connector_lazy(connector),
    ))
}

fn split_host(address: &str) -> Result<(&str, u16), ClientError> {
    let bad = || ClientError::Address(address.to_owned());
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

#[derive(Clone)]
struct MtlsConnector {
    tls: Arc<TlsSource>,
    server_name: ServerName<'static>,
    expected: SpiffeId,
}

type Conn = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for MtlsConnector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or("upstream URI has no authority")?
                .as_str()
                .to_owned();
            let tcp = TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            let connector = tokio_rustls::TlsConnector::from(this.tls.client_config());
            let stream = connector.connect(this.server_name.clone(), tcp).await?;
            let (_, session) = stream.get_ref();
            let leaf = session
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or("server sent no certificate")?;
            let actual = SpiffeId::from_certificate(leaf)?;
            if actual != this.expected {
                return Err(
                    format!("server identity is {actual}, expected {}", this.expected).into(),
                );
            }
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_addresses() {
        assert_eq!(split_host("127.0.0.1:7400").unwrap(), ("127.0.0.1", 7400));
        assert_eq!(split_host("[::1]:7400").unwrap(), ("::1", 7400));
        assert!(split_host("nohost").is_err());
        assert!(split_host(":7").is_err());
        assert!(split_host("h:port").is_err());
    }
}
