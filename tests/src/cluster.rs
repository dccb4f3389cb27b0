//! The whole system as real processes: `cms serve <service>` for each of the five services,
//! on 127.0.0.1 with kernel-chosen ports, a dev PKI and SQLite files in a temp dir.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use cms_launcher::layout::{Layout, Peers, Ports, START_ORDER};
use cms_launcher::supervise::{self, Service};
use tempfile::TempDir;

use crate::pki::{TRUST_DOMAIN, TestPki};

pub struct Cluster {
    pub dir: TempDir,
    pub layout: Layout,
    pub pki: TestPki,
    pub services: Vec<Service>,
}

impl Cluster {
    /// Starts all five services in order; `extra(service)` is appended to each config (for
    /// example a `[telemetry]` section).
    pub async fn start(extra: impl Fn(&str) -> String) -> Self {
        Self::start_with(|name, text| text + &extra(name)).await
    }

    /// Starts all five services; `edit(service, config)` returns the config to use.
    pub async fn start_with(edit: impl Fn(&str, String) -> String) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = TestPki::new(dir.path());
        let layout = Layout::new(dir.path(), TRUST_DOMAIN).expect("layout");
        layout.create_dirs().expect("dirs");
        let exe = crate::binary("cms");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut peers = Peers::default();
        let mut services: Vec<Service> = Vec::new();
        for name in START_ORDER {
            let text = layout
                .service_config(
                    name,
                    Ports {
                        grpc: any,
                        ops: any,
                    },
                    &peers,
                    "",
                )
                .expect("config");
            let text = edit(name, text);
            std::fs::write(layout.config_path(name), text).expect("write config");
            let service = supervise::start(&exe, &layout, name, Duration::from_secs(30))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            match name {
                "template" => peers.template = Some(service.grpc),
                "directory" => {
                    peers.directory = Some(service.grpc);
                    // The gateway admits only operators with an account: `cmsctl`'s dev
                    // operator gets its admin account, as under `cms up`.
                    cms_launcher::bootstrap::ensure_dev_admin(&layout, service.grpc)
                        .await
                        .unwrap_or_else(|e| panic!("dev operator account: {e}"));
                }
                "custody" => peers.custody = Some(service.grpc),
                "gateway" => peers.gateway = Some(service.grpc),
                _ => {}
            }
            services.push(service);
        }
        Self {
            dir,
            layout,
            pki,
            services,
        }
    }

    pub fn service(&mut self, name: &str) -> &mut Service {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    pub fn grpc(&self, name: &str) -> SocketAddr {
        self.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.grpc)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// Stops `name` and starts it again on the same address (its clients keep theirs).
    pub async fn restart(&mut self, name: &str) {
        let grpc = self.grpc(name);
        let path = self.layout.config_path(name);
        let text = std::fs::read_to_string(&path).expect("config");
        // The line `listen = …` (not `ops_listen`), kernel-chosen the first time.
        let pinned = text.replacen(
            "\nlisten = \"127.0.0.1:0\"",
            &format!("\nlisten = \"{grpc}\""),
            1,
        );
        std::fs::write(&path, pinned).expect("config");
        let index = self
            .services
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"));
        self.services[index].stop(Duration::from_secs(15)).await;
        let service = supervise::start(
            &crate::binary("cms"),
            &self.layout,
            self.services[index].name,
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        self.services[index] = service;
    }

    /// Runs `cmsctl --data-dir <dir> <args>` with `stdin` as its standard input.
    pub fn cmsctl_with_input(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = std::process::Command::new(crate::binary("cmsctl"))
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run cmsctl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("cmsctl output")
    }

    /// Runs `cmsctl --data-dir <dir> <args>` (the operator certificate of the dev PKI).
    pub fn cmsctl(&self, args: &[&str]) -> Output {
        std::process::Command::new(crate::binary("cmsctl"))
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(args)
            .output()
            .expect("run cmsctl")
    }

    /// Stops every service with SIGTERM and returns their exit statuses.
    pub async fn stop(mut self) -> Vec<(&'static str, Option<std::process::ExitStatus>)> {
        let mut out = Vec::new();
        for service in self.services.iter_mut().rev() {
            out.push((service.name, service.stop(Duration::from_secs(15)).await));
        }
        out
    }
}
