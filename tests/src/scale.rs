//! The system scaled out on one machine, as the Helm chart runs it on PostgreSQL: two of every
//! service as real processes (`cms serve …`) over mutual TLS, on one PostgreSQL cluster with
//! one database per service.
//!
//! Two "nodes", A and B, each a [`Layout`] with its own config, logs and data directory (and
//! a copy of one dev PKI): node A runs template, directory, custody and gateway, and so does
//! node B. Template, directory and gateway run active/active (the gateways share their own
//! database too); custody runs active/standby (the one holding the PostgreSQL lease serves,
//! the other fails `/readyz`). Each gateway talks to its own node's template and directory,
//! and to custody through a [`ServiceProxy`]: what a
//! Kubernetes Service does for the chart, a TCP forwarder that sends each new connection to a
//! backend whose `/readyz` answers 200 (TLS passes through untouched).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cms_launcher::layout::{Layout, Peers, Ports};
use cms_launcher::supervise::{self, Service};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::pki::{TRUST_DOMAIN, TestPki};
use crate::postgres::Postgres;

/// How often the [`ServiceProxy`] probes its backends' `/readyz` (the chart probes custody
/// every second; faster here so that the measured failover is custody's, not the probe's).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The two nodes' names, in the order of [`ScaleOut::nodes`].
pub const NODES: [&str; 2] = ["a", "b"];

/// One custody process. A standby never becomes ready, so it is started without waiting for
/// `/readyz` (unlike [`supervise::start`]).
pub struct CustodyProcess {
    pub layout: Layout,
    pub process: Child,
    pub grpc: SocketAddr,
    pub ops: SocketAddr,
}

impl CustodyProcess {
    /// Starts `cms serve custody` with `layout`'s config and waits until it announced its
    /// addresses.
    pub async fn spawn(layout: &Layout) -> Self {
        let announce = layout.announce_path("custody");
        let _ = std::fs::remove_file(&announce);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(layout.log_path("custody"))
            .expect("custody log");
        let mut process = Command::new(crate::binary("cms"))
            .arg("serve")
            .arg("custody")
            .arg("--config")
            .arg(layout.config_path("custody"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start custody");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = process.try_wait().expect("custody status") {
                panic!(
                    "custody exited ({status}):\n{}",
                    supervise::tail(&layout.log_path("custody"), 20)
                );
            }
            if let Some((grpc, ops)) = cms_kit::server::read_announce(&announce) {
                return Self {
                    layout: layout.clone(),
                    process,
                    grpc,
                    ops,
                };
            }
            assert!(Instant::now() < deadline, "custody did not announce itself");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether `/readyz` answers 200 (the active instance).
    pub async fn ready(&self) -> bool {
        matches!(
            cms_kit::ops::http_get(self.ops, "/readyz").await,
            Ok((200, _))
        )
    }

    /// The `/readyz` status code (0 when nothing answers).
    pub async fn readyz(&self) -> u16 {
        cms_kit::ops::http_get(self.ops, "/readyz")
            .await
            .map(|(code, _)| code)
            .unwrap_or(0)
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill(&mut self) {
        self.process.start_kill().expect("SIGKILL custody");
        self.process.wait().await.expect("custody exit");
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        supervise::tail(&self.layout.log_path("custody"), 20)
    }
}

/// A Kubernetes Service on loopback: new connections go to a backend that is ready.
pub struct ServiceProxy {
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

/// A backend of a [`ServiceProxy`]: where to forward, and where its `/readyz` is.
#[derive(Clone, Copy, Debug)]
pub struct Backend {
    pub grpc: SocketAddr,
    pub ops: SocketAddr,
}

impl ServiceProxy {
    /// Listens on 127.0.0.1:0 and forwards each connection to one of `backends` that was
    /// ready at the last probe; with none ready the connection is closed at once (the client
    /// sees UNAVAILABLE and retries).
    pub async fn start(backends: Vec<Backend>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let ready: Arc<Mutex<Vec<bool>>> = Arc::new(Mutex::new(vec![false; backends.len()]));
        let probe = {
            let ready = ready.clone();
            let backends = backends.clone();
            tokio::spawn(async move {
                loop {
                    for (i, b) in backends.iter().enumerate() {
                        let up =
                            matches!(cms_kit::ops::http_get(b.ops, "/readyz").await, Ok((200, _)));
                        ready.lock().unwrap_or_else(|p| p.into_inner())[i] = up;
                    }
                    tokio::time::sleep(PROBE_INTERVAL).await;
                }
            })
        };
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = {
                    let ready = ready.lock().unwrap_or_else(|p| p.into_inner());
                    ready.iter().position(|r| *r).map(|i| backends[i].grpc)
                };
                let Some(target) = target else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            addr,
            tasks: vec![probe, accept],
        }
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Two nodes of the whole server side on one PostgreSQL (see the module docs).
pub struct ScaleOut {
    pub dir: tempfile::TempDir,
    pub pki: TestPki,
    /// Node A's and node B's layouts (PKI copied from A to B).
    pub nodes: [Layout; 2],
    pub templates: Vec<Service>,
    pub directories: Vec<Service>,
    /// Custody of node A and node B; the first one started is active.
    pub custody: Vec<CustodyProcess>,
    /// The custody "Service" both gateways dial.
    pub custody_service: ServiceProxy,
    pub gateways: Vec<Service>,
}

impl ScaleOut {
    /// Starts both nodes on `pg`: a new database each for template, directory, custody and
    /// gateway; `custody_extra` and `gateway_extra` are appended to both configs of that
    /// service (e.g. `[guards]`). Returns once node A's custody is active, node B's is
    /// standing by, and everything else is ready.
    pub async fn start(pg: &Postgres, custody_extra: &str, gateway_extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = Layout::new(&dir.path().join(NODES[0]), TRUST_DOMAIN).expect("layout");
        let b = Layout::new(&dir.path().join(NODES[1]), TRUST_DOMAIN).expect("layout");
        let pki = TestPki::new(&a.data_dir);
        a.create_dirs().expect("dirs");
        b.create_dirs().expect("dirs");
        copy_dir(&a.data_dir.join("pki"), &b.data_dir.join("pki"));
        let nodes = [a, b];
        let exe = crate::binary("cms");
        let start = |layout: &Layout, name: &'static str| {
            let exe = exe.clone();
            let layout = layout.clone();
            async move {
                supervise::start(&exe, &layout, name, Duration::from_secs(30))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            }
        };

        // One database per service, shared by both nodes. The first node's instance migrates
        // it before the second starts.
        let mut templates = Vec::new();
        let url = pg.create_database();
        for node in &nodes {
            write_config(node, "template", &Peers::default(), &database(&url));
            templates.push(start(node, "template").await);
        }
        let mut directories = Vec::new();
        let url = pg.create_database();
        for node in &nodes {
            write_config(node, "directory", &Peers::default(), &database(&url));
            directories.push(start(node, "directory").await);
        }
        // The gateway admits operators with an account: the dev admin's, in the one database.
        cms_launcher::bootstrap::ensure_dev_admin(&nodes[0], directories[0].grpc)
            .await
            .unwrap_or_else(|e| panic!("dev operator account: {e}"));

        let url = pg.create_database();
        let extra = format!("{custody_extra}\n{}", database(&url));
        let mut custody = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            write_config(node, "custody", &Peers::default(), &extra);
            if i == 1 {
                // The one key-encryption key of the database: node A's dev seal file.
                share_dev_seal(&nodes[0], node);
            }
            let instance = CustodyProcess::spawn(node).await;
            // Restarts listen where this one does, so the Service keeps its backends.
            pin_addresses(node, "custody", instance.grpc, instance.ops);
            if i == 0 {
                wait_until(Duration::from_secs(30), "custody A ready", || {
                    instance.ready()
                })
                .await;
            }
            custody.push(instance);
        }
        let custody_service = ServiceProxy::start(
            custody
                .iter()
                .map(|c| Backend {
                    grpc: c.grpc,
                    ops: c.ops,
                })
                .collect(),
        )
        .await;

        let mut gateways = Vec::new();
        let url = pg.create_database();
        let extra = format!("{gateway_extra}\n{}", database(&url));
        for (i, node) in nodes.iter().enumerate() {
            let peers = Peers {
                template: Some(templates[i].grpc),
                directory: Some(directories[i].grpc),
                custody: Some(custody_service.addr),
                gateway: None,
            };
            write_config(node, "gateway", &peers, &extra);
            gateways.push(start(node, "gateway").await);
        }
        Self {
            dir,
            pki,
            nodes,
            templates,
            directories,
            custody,
            custody_service,
            gateways,
        }
    }

    /// The custody instance that is ready now, if exactly one is.
    pub async fn active_custody(&self) -> Option<usize> {
        let mut ready = Vec::new();
        for (i, c) in self.custody.iter().enumerate() {
            if c.ready().await {
                ready.push(i);
            }
        }
        assert!(
            ready.len() <= 1,
            "several custody instances ready: {ready:?}"
        );
        ready.first().copied()
    }

    /// Starts node `i`'s custody again (after a kill), on its old addresses; it stands by.
    pub async fn restart_custody(&mut self, i: usize) {
        let layout = self.custody[i].layout.clone();
        self.custody[i] = CustodyProcess::spawn(&layout).await;
    }
}

/// Polls `check` until it holds; panics naming `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

fn database(url: &str) -> String {
    format!("[database]\nurl = {url:?}\n")
}

fn write_config(layout: &Layout, name: &'static str, peers: &Peers, extra: &str) {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let text = layout
        .service_config(
            name,
            Ports {
                grpc: any,
                ops: any,
            },
            peers,
            extra,
        )
        .expect("config");
    std::fs::write(layout.config_path(name), text).expect("write config");
}

/// Makes the next start of `name` listen on `grpc` and `ops` (kernel-chosen the first time).
fn pin_addresses(layout: &Layout, name: &str, grpc: SocketAddr, ops: SocketAddr) {
    let path = layout.config_path(name);
    let text = std::fs::read_to_string(&path).expect("config");
    let pinned = text
        .replacen(
            "\nlisten = \"127.0.0.1:0\"",
            &format!("\nlisten = \"{grpc}\""),
            1,
        )
        .replacen(
            "\nops_listen = \"127.0.0.1:0\"",
            &format!("\nops_listen = \"{ops}\""),
            1,
        );
    assert_ne!(
        text,
        pinned,
        "{}: no listen addresses to pin",
        path.display()
    );
    std::fs::write(path, pinned).expect("config");
}

fn share_dev_seal(from: &Layout, to: &Layout) {
    let file = |layout: &Layout| layout.service_dir("custody").join("dev-seal.key");
    std::fs::create_dir_all(to.service_dir("custody")).expect("custody dir");
    std::fs::copy(file(from), file(to)).expect("copy the dev seal file");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target: PathBuf = to.join(entry.file_name());
        std::fs::copy(entry.path(), target).expect("copy");
    }
}
