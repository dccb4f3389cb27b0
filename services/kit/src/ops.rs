//! The plaintext ops port: `/livez`, `/readyz` and `/metrics` for kubelet and Prometheus,
//! which cannot speak our mutual TLS. It serves no data and accepts no commands.

use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Whether the service can take traffic now, and if not, why (shown on `/readyz`).
///
/// Besides the server's own state (starting, serving, shutting down), the service may hold
/// it not ready for a reason of its own ([`Readiness::hold`]): a standby replica is up but
/// must get no traffic.
#[derive(Clone, Debug)]
pub struct Readiness(Arc<RwLock<Option<String>>>, Arc<RwLock<Option<String>>>);

impl Readiness {
    /// Starts not ready, with the reason given.
    pub fn new(reason: &str) -> Self {
        Self(
            Arc::new(RwLock::new(Some(reason.to_owned()))),
            Arc::new(RwLock::new(None)),
        )
    }

    /// Not ready for `reason` until [`Readiness::release`], whatever the server's state.
    pub fn hold(&self, reason: &str) {
        *self.1.write().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_owned());
    }

    /// Ends a [`Readiness::hold`].
    pub fn release(&self) {
        *self.1.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn set_ready(&self) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn set_not_ready(&self, reason: &str) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_owned());
    }

    /// `None` when ready, else the reason.
    pub fn reason(&self) -> Option<String> {
        let held = self.1.read().unwrap_or_else(|p| p.into_inner()).clone();
        held.or_else(|| self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

#[derive(Clone)]
struct OpsState {
    readiness: Readiness,
    metrics: Metrics,
}

pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    metrics: Metrics,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(OpsState { readiness, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.wait())
        .await
}

async fn readyz(State(state): State<OpsState>) -> (StatusCode, String) {
    match state.readiness.reason() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics_text(
    State(state): State<OpsState>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// The largest body [`http_get`] reads.
const MAX_BODY: usize = 16 << 20;

/// GETs `path` on a plaintext ops port (HTTP/1.1, hyper's client) and returns the HTTP status
/// code and body. Used by the launcher and tests to wait for readiness and read metrics.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let invalid = |e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    };
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| invalid(&e))?;
    let connection = tokio::spawn(connection);
    let request = axum::http::Request::get(path)
        .header(axum::http::header::HOST, addr.to_string())
        .body(axum::body::Body::empty())
        .map_err(|e| invalid(&e))?;
    let outcome = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| invalid(&e))?;
        let code = response.status().as_u16();
        let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), MAX_BODY)
            .await
            .map_err(|e| invalid(&e))?;
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }
    .await;
    connection.abort();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_keeps_the_service_not_ready_whatever_the_server_says() {
        let readiness = Readiness::new("starting");
        readiness.hold("standby");
        readiness.set_ready();
        assert_eq!(readiness.reason().as_deref(), Some("standby"));
        readiness.release();
        assert_eq!(readiness.reason(), None);
        readiness.set_not_ready("shutting down");
        assert_eq!(readiness.reason().as_deref(), Some("shutting down"));
    }
}
