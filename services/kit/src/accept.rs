//! Our own mutual-TLS acceptor for tonic servers.
//!
//! Handshakes run off the accept loop with a timeout and a cap on how many run at once (a slow
//! or hostile client cannot hold the listener), ALPN is h2 only, every handshake uses the
//! current certificates of the [`TlsSource`], and each connection carries the verified
//! [`ConnectionIdentity`] that tonic puts into every request's extensions (the server adds
//! the `PeerIdentity` derived from it).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::identity::{CertificateIds, ConnectionIdentity, SpiffeId};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::tls::TlsSource;

#[derive(Clone, Copy, Debug)]
pub struct AcceptLimits {
    pub handshake_timeout: Duration,
    pub max_concurrent_handshakes: usize,
}

pin_project! {
    /// An accepted, authenticated connection.
    pub struct TlsConn {
        #[pin]
        inner: TlsStream<TcpStream>,
        peer: ConnectionIdentity,
    }
}

impl Connected for TlsConn {
    type ConnectInfo = ConnectionIdentity;

    fn connect_info(&self) -> ConnectionIdentity {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections until shutdown and yields those whose handshake succeeded.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<TlsSource>,
    limits: AcceptLimits,
    metrics: Metrics,
    shutdown: Shutdown,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    // Config refuses 0; limits built in code may still carry it, and 0 permits would never
    // accept again.
    let permits = Arc::new(Semaphore::new(limits.max_concurrent_handshakes.max(1)));
    tokio::spawn(async move {
        loop {
            // Wait for a handshake slot before accepting: at the cap, the kernel backlog holds
            // new connections instead of us starting unbounded work.
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                () = shutdown.wait() => return,
            };
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = shutdown.wait() => return,
            };
            let tx = tx.clone();
            let tls = tls.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let outcome =
                    tokio::time::timeout(limits.handshake_timeout, handshake(tcp, remote, &tls))
                        .await;
                drop(permit);
                match outcome {
                    Ok(Ok(conn)) => {
                        metrics.handshake("ok");
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(reason)) => {
                        metrics.handshake("refused");
                        tracing::info!(%remote, %reason, "TLS connection refused");
                    }
                    Err(_) => {
                        metrics.handshake("timeout");
                        tracing::info!(%remote, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(tcp: TcpStream, remote: SocketAddr, tls: &TlsSource) -> Result<TlsConn, String> {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let stream = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
    let (_, session) = stream.get_ref();
    if session.alpn_protocol() != Some(b"h2") {
        return Err("client did not negotiate ALPN h2".into());
    }
    let peer = identify(session, remote, tls)?;
    Ok(TlsConn {
        inner: stream,
        peer,
    })
}

/// What the verified certificate says about the client.
fn identify(
    session: &rustls::ServerConnection,
    remote: SocketAddr,
    tls: &TlsSource,
) -> Result<ConnectionIdentity, String> {
    let chain = session
        .peer_certificates()
        .filter(|c| !c.is_empty())
        .ok_or("client sent no certificate")?;
    let (leaf, intermediates) = (&chain[0], &chain[1..]);
    let spiffe_id = match tls.bound_rules() {
        None => Some(SpiffeId::from_certificate(leaf).map_err(|e| e.to_string())?),
        // The verifier accepted the certificate through one of the two bundles; only the
        // workload bundle vouches for a SPIFFE ID (a bound certificate's URI SAN means
        // nothing here).
        Some(_) => tls
            .rules()
            .check(
                leaf,
                intermediates,
                rustls_pki_types::UnixTime::now(),
                crate::verify::Purpose::Client,
            )
            .ok(),
    };
    Ok(ConnectionIdentity {
        spiffe_id,
        certificate: CertificateIds::from_certificate(leaf).ok(),
        remote_addr: Some(remote),
    })
}
