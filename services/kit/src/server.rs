//! Runs a tonic server the same way for every service: our mTLS acceptor, the allow-list,
//! trace propagation and metrics, gRPC health and reflection, the plaintext ops port, and a
//! graceful shutdown bounded by a timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::accept::{self, AcceptLimits};
use crate::authz::{AccessSettings, AllowListLayer};
use crate::metrics::Metrics;
use crate::ops::{self, Readiness};
use crate::served::ServedApi;
use crate::shutdown::Shutdown;
use crate::tls::TlsSource;
use crate::trace::ServerTraceLayer;

/// The `[server]` section of every service config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// gRPC (mutual TLS) listen address.
    pub listen: SocketAddr,
    /// Plaintext `/livez`, `/readyz`, `/metrics` listen address.
    pub ops_listen: SocketAddr,
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    #[serde(
        default = "default_max_handshakes",
        deserialize_with = "crate::config::at_least_one"
    )]
    pub max_concurrent_handshakes: usize,
    /// How long in-flight requests may take to finish after shutdown starts.
    #[serde(default = "default_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Requests in flight per connection.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_streams: u32,
    /// When set, the bound addresses are written here once serving (`grpc=…` and `ops=…`
    /// lines), so a supervisor can use port 0.
    #[serde(default)]
    pub announce_file: Option<std::path::PathBuf>,
}

fn default_handshake_timeout_ms() -> u64 {
    5_000
}
fn default_max_handshakes() -> usize {
    256
}
fn default_grace_ms() -> u64 {
    10_000
}
fn default_concurrency() -> u32 {
    1_024
}

/// The two listeners a service needs; bound by `main` (or a test) and passed in.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub ops: TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl Listeners {
    pub async fn bind(settings: &ServerSettings) -> Result<Self, BindError> {
        let bind = |key, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError::Bind { key, addr, source })
        };
        Ok(Self {
            grpc: bind("server.listen", settings.listen).await?,
            ops: bind("server.ops_listen", settings.ops_listen).await?,
        })
    }

    /// Both on 127.0.0.1 with ports chosen by the kernel, for tests.
    pub async fn loopback() -> std::io::Result<Self> {
        Ok(Self {
            grpc: TcpListener::bind("127.0.0.1:0").await?,
            ops: TcpListener::bind("127.0.0.1:0").await?,
        })
    }
}

/// One service's gRPC server, built in a few lines by every service:
///
/// ```ignore
/// Server::new(NAME, config.server, config.access, tls)
///     .add_service(TemplateServiceServer::new(templates))
///     .serve(listeners, shutdown)
///     .await?;
/// ```
///
/// The served services are named once, by the generated code (`NamedService::NAME`): health
/// reports them SERVING, reflection lists them, and metrics and spans name only their methods.
pub struct Server {
    /// Short service name, e.g. "custody" (also the `cms.<name>` allow-list scope).
    name: &'static str,
    /// Software version, sent back in the `x-cms-version` response header.
    version: &'static str,
    /// Encoded FileDescriptorSet describing the served services (it may describe more;
    /// reflection serves only the files those services need).
    descriptors: &'static [u8],
    settings: ServerSettings,
    access: AccessSettings,
    tls: Arc<TlsSource>,
    readiness: Readiness,
    metrics: Metrics,
    routes: Routes,
    grpc_services: Vec<&'static str>,
    health: HealthReporter,
    /// Services whose health the service itself reports.
    self_reported: Vec<&'static str>,
    /// Paths callers known only by a bound certificate may reach.
    bound_paths: Vec<&'static str>,
}

impl Server {
    /// A server for service `name` serving nothing yet; readiness starts not ready
    /// ("starting") and metrics are the service's own.
    pub fn new(
        name: &'static str,
        settings: ServerSettings,
        access: AccessSettings,
        tls: Arc<TlsSource>,
    ) -> Self {
        Self {
            name,
            version: env!("CARGO_PKG_VERSION"),
            descriptors: cms_proto::FILE_DESCRIPTOR_SET,
            settings,
            access,
            tls,
            readiness: Readiness::new("starting"),
            metrics: Metrics::new(name),
            routes: Routes::default(),
            grpc_services: Vec::new(),
            health: HealthReporter::new(),
            self_reported: Vec::new(),
            bound_paths: Vec::new(),
        }
    }

    /// Serves `service` too, under the name its generated code gives it.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower_service::Service<
                http::Request<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.grpc_services.push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }

    /// Routes that are not gRPC services of their own (e.g. an HTTP API on the same port).
    pub fn map_routes(mut self, map: impl FnOnce(Routes) -> Routes) -> Self {
        self.routes = map(self.routes);
        self
    }

    /// Lets callers known only by a certificate bound to an account (a port whose TLS source
    /// has a bound bundle) reach `paths` (a path ending in `/` covers everything below it);
    /// nothing else.
    pub fn admit_bound_certificates(
        mut self,
        paths: impl IntoIterator<Item = &'static str>,
    ) -> Self {
        self.bound_paths.extend(paths);
        self
    }

    /// Uses `readiness` (which the service may hold not ready for reasons of its own).
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// Uses `metrics` (shared with another listener of the same service).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Overrides the version reported in `x-cms-version` (default: the workspace version).
    pub fn with_version(mut self, version: &'static str) -> Self {
        self.version = version;
        self
    }

    /// Leaves the health of service `S` to the service, which sets it (and changes it as its
    /// state does) through [`Server::health_reporter`] or the reporter it passed to
    /// [`Server::with_health`]; otherwise every added service is SERVING once the port is up.
    pub fn reports_own_health<S: NamedService>(mut self) -> Self {
        self.self_reported.push(S::NAME);
        self
    }

    /// Answers gRPC health from `health` (made before the server, e.g. to hand to the
    /// service's state).
    pub fn with_health(mut self, health: HealthReporter) -> Self {
        self.health = health;
        self
    }

    /// The reporter of this port's gRPC health service.
    pub fn health_reporter(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Serves until `shutdown`, then lets in-flight requests finish for at most
    /// `shutdown_grace_ms`.
    pub async fn serve(self, listeners: Listeners, shutdown: Shutdown) -> Result<(), ServeError> {
        serve(self, listeners, shutdown).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("ops server: {0}")]
    Ops(std::io::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("served API: {0}")]
    Api(#[from] crate::served::ServedError),
    #[error("server.announce_file: {0}")]
    Announce(std::io::Error),
}

/// Writes the announce file atomically (temporary file, then rename).
fn announce(path: &std::path::Path, grpc: SocketAddr, ops: SocketAddr) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("grpc={grpc}\nops={ops}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Reads an announce file written by a serving process.
pub fn read_announce(path: &std::path::Path) -> Option<(SocketAddr, SocketAddr)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut grpc = None;
    let mut ops = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("grpc", a)) => grpc = a.parse().ok(),
            Some(("ops", a)) => ops = a.parse().ok(),
            _ => {}
        }
    }
    Some((grpc?, ops?))
}

/// See [`Server::serve`].
async fn serve(spec: Server, listeners: Listeners, shutdown: Shutdown) -> Result<(), ServeError> {
    for name in &spec.grpc_services {
        if !spec.self_reported.contains(name) {
            spec.health
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }
    }
    // The service's own API plus health and reflection (v1 and v1alpha).
    let api = ServedApi::with_standard(spec.descriptors, &spec.grpc_services)?;
    let reflection = || {
        let builder = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(api.descriptors());
        api.services()
            .iter()
            .fold(builder, |b, name| b.with_service_name(name))
    };
    let routes = spec
        .routes
        .add_service(HealthServer::new(HealthService::from_health_reporter(
            spec.health.clone(),
        )))
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);

    let reloader = spec.tls.spawn_reloader(shutdown.clone());
    let grpc_addr = listeners.grpc.local_addr().ok();
    let ops_addr = listeners.ops.local_addr().ok();
    let incoming = accept::incoming(
        listeners.grpc,
        spec.tls.clone(),
        AcceptLimits {
            handshake_timeout: Duration::from_millis(spec.settings.handshake_timeout_ms),
            max_concurrent_handshakes: spec.settings.max_concurrent_handshakes,
        },
        spec.metrics.clone(),
        shutdown.clone(),
    );
    let ops = tokio::spawn(ops::serve(
        listeners.ops,
        spec.readiness.clone(),
        spec.metrics.clone(),
        shutdown.clone(),
    ));

    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(spec.settings.max_concurrent_streams)
        .layer(ServerTraceLayer::new(
            spec.metrics.clone(),
            spec.version,
            api.clone(),
        ))
        .layer(
            AllowListLayer::new(
                &format!("cms.{}", spec.name),
                spec.access.allow.iter().cloned(),
            )
            .admitting_bound_certificates(&spec.bound_paths),
        )
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.wait());
    tracing::info!(
        service = spec.name,
        identity = %spec.tls.identity(),
        grpc = ?grpc_addr,
        ops = ?ops_addr,
        "serving"
    );
    if let (Some(path), Some(grpc), Some(ops)) = (&spec.settings.announce_file, grpc_addr, ops_addr)
    {
        announce(path, grpc, ops).map_err(ServeError::Announce)?;
    }
    spec.readiness.set_ready();

    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        () = shutdown.wait() => {
            spec.readiness.set_not_ready("shutting down");
            let grace = Duration::from_millis(spec.settings.shutdown_grace_ms);
            match tokio::time::timeout(grace, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(grace_ms = spec.settings.shutdown_grace_ms, "requests still in flight after the grace period; closing them");
                    Ok(())
                }
            }
        }
    };
    reloader.abort();
    if let Some(path) = &spec.settings.announce_file {
        let _ = std::fs::remove_file(path);
    }
    if let Ok(Err(e)) = ops.await {
        return Err(ServeError::Ops(e));
    }
    tracing::info!(service = spec.name, "stopped");
    Ok(result?)
}
