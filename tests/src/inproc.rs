//! Services in this test process, each on its own 127.0.0.1:0 listeners (bound here and
//! passed in, never bind-drop-rebind).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use cms_kit::SpiffeId;
use cms_kit::client::{Channel, UpstreamSettings};
use cms_kit::server::Listeners;
use cms_kit::shutdown::{self, Shutdown, Trigger};
use cms_kit::tls::{TlsSettings, TlsSource};
use cms_launcher::layout::{Layout, Peers, Ports};
use tokio::task::JoinHandle;

use crate::pki::TRUST_DOMAIN;

pub struct Running {
    pub grpc: SocketAddr,
    pub ops: SocketAddr,
    trigger: Trigger,
    task: JoinHandle<Result<(), String>>,
}

impl Running {
    /// Starts `run(config, listeners, shutdown)` on fresh loopback listeners and waits until
    /// its `/readyz` answers 200.
    pub async fn start<C, F, Fut, E>(config: C, run: F) -> Self
    where
        C: Send + 'static,
        F: FnOnce(C, Listeners, Shutdown) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send,
        E: std::error::Error + 'static,
    {
        cms_kit::tls::install_crypto_provider();
        let listeners = Listeners::loopback().await.expect("bind loopback");
        let grpc = listeners.grpc.local_addr().expect("addr");
        let ops = listeners.ops.local_addr().expect("addr");
        let (trigger, shutdown) = shutdown::channel();
        let task = tokio::spawn(async move {
            run(config, listeners, shutdown)
                .await
                .map_err(|e| cms_kit::exit::one_line(&e))
        });
        let mut running = Self {
            grpc,
            ops,
            trigger,
            task,
        };
        running.wait_ready().await;
        running
    }

    async fn wait_ready(&mut self) {
        for _ in 0..200 {
            if let Ok((200, _)) = cms_kit::ops::http_get(self.ops, "/readyz").await {
                return;
            }
            if self.task.is_finished() {
                let outcome = (&mut self.task).await;
                panic!("service stopped before it was ready: {outcome:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("service not ready after 5 s");
    }

    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Triggers shutdown and returns the service's result.
    pub async fn stop(self) -> Result<(), String> {
        self.trigger.trigger();
        self.task.await.expect("service task panicked")
    }
}

/// The config of `service` for an in-process run under `dir` (the dev PKI is `dir/pki`).
pub fn config<C: serde::de::DeserializeOwned>(
    dir: &Path,
    service: &'static str,
    peers: &Peers,
) -> C {
    let layout = Layout::new(dir, TRUST_DOMAIN).expect("layout");
    layout.create_dirs().expect("dirs");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let text = layout
        .service_config(
            service,
            Ports {
                grpc: any,
                ops: any,
            },
            peers,
            "",
        )
        .expect("config");
    cms_kit::config::from_toml(&text).expect("parse config")
}

/// An mTLS channel to `addr` as the holder of `tls`, requiring the server to be `server_id`.
pub fn channel(tls: TlsSettings, addr: SocketAddr, server_id: SpiffeId) -> Channel {
    let source: Arc<TlsSource> = TlsSource::load(tls).expect("client TLS");
    cms_kit::client::channel(
        &UpstreamSettings {
            address: addr.to_string(),
            identity: server_id,
            connect_timeout_ms: 2_000,
        },
        source,
    )
    .expect("channel")
}
