//! Where everything lives under the data directory, and the config of each service.
//!
//! ```text
//! <data>/pki/            CA and one certificate per workload (cms pki init)
//! <data>/config/<s>.toml service configs (written once; edit freely, a rerun keeps them)
//! <data>/<s>/            each service's own data (its SQLite file)
//! <data>/logs/<s>.log    each service's log
//! <data>/run/<s>.addr    addresses a running service bound (written by the service)
//! ```

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cms_kit::pki::DevPki;
use toml::{Table, Value};

/// Start order: the gateway needs the backends, the agent needs the gateway.
pub const START_ORDER: [&str; 5] = ["template", "directory", "custody", "gateway", "agent"];

pub const DEFAULT_TRUST_DOMAIN: &str = "cms.local";

#[derive(Clone, Debug)]
pub struct Layout {
    pub data_dir: PathBuf,
    pub trust_domain: String,
}

/// Addresses a service listens on (port 0: chosen by the kernel).
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub grpc: SocketAddr,
    pub ops: SocketAddr,
}

/// Addresses the config of a service needs to know about others.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    pub template: Option<SocketAddr>,
    pub directory: Option<SocketAddr>,
    pub custody: Option<SocketAddr>,
    pub gateway: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("data dir {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} needs the address of {1}, which is not running")]
    MissingPeer(&'static str, &'static str),
    #[error(transparent)]
    Pki(#[from] cms_kit::pki::PkiError),
    #[error("service config: {0}")]
    Toml(String),
}

impl Layout {
    /// `data_dir` is made absolute so configs stay valid from any working directory.
    pub fn new(data_dir: &Path, trust_domain: &str) -> Result<Self, LayoutError> {
        let data_dir = std::path::absolute(data_dir).map_err(|source| LayoutError::Io {
            path: data_dir.to_owned(),
            source,
        })?;
        Ok(Self {
            data_dir,
            trust_domain: trust_domain.to_owned(),
        })
    }

    pub fn pki(&self) -> DevPki {
        DevPki::new(self.data_dir.join("pki"), &self.trust_domain)
    }

    pub fn config_path(&self, service: &str) -> PathBuf {
        self.data_dir.join("config").join(format!("{service}.toml"))
    }

    pub fn service_dir(&self, service: &str) -> PathBuf {
        self.data_dir.join(service)
    }

    pub fn log_path(&self, service: &str) -> PathBuf {
        self.data_dir.join("logs").join(format!("{service}.log"))
    }

    pub fn announce_path(&self, service: &str) -> PathBuf {
        self.data_dir.join("run").join(format!("{service}.addr"))
    }

    /// Creates the directories (owner-only: they hold keys and databases).
    pub fn create_dirs(&self) -> Result<(), LayoutError> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [
            self.data_dir.clone(),
            self.data_dir.join("config"),
            self.data_dir.join("logs"),
            self.data_dir.join("run"),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|source| LayoutError::Io { path: dir, source })?;
        }
        Ok(())
    }

    /// The TOML config of `service`.
    pub fn service_config(
        &self,
        service: &'static str,
        ports: Ports,
        peers: &Peers,
        extra: &str,
    ) -> Result<String, LayoutError> {
        let pki = self.pki();
        let tls = pki.tls_settings(service);
        let td = &self.trust_domain;
        let path = |p: &Path| Value::from(p.display().to_string());
        let mut config = Table::new();
        config.insert("data_dir".into(), path(&self.service_dir(service)));
        config.insert(
            "server".into(),
            table([
                ("listen", Value::from(ports.grpc.to_string())),
                ("ops_listen", Value::from(ports.ops.to_string())),
                ("announce_file", path(&self.announce_path(service))),
            ]),
        );
        config.insert(
            "tls".into(),
            table([
                ("ca", path(&tls.ca)),
                ("cert", path(&tls.cert)),
                ("key", path(&tls.key)),
            ]),
        );
        let allow: Vec<String> = match service {
            "gateway" => vec![
                format!("spiffe://{td}/cms/operator/*"),
                format!("spiffe://{td}/cms/agent"),
                format!("spiffe://{td}/cms/agent/*"),
                format!("spiffe://{td}/cms/service/*"),
            ],
            "agent" => vec![format!("spiffe://{td}/cms/operator/*")],
            _ => vec![format!("spiffe://{td}/cms/gateway")],
        };
        config.insert("access".into(), table([("allow", Value::from(allow))]));
        let upstream = |name: &'static str, addr: Option<SocketAddr>| {
            let addr = addr.ok_or(LayoutError::MissingPeer(service, name))?;
            Ok::<Value, LayoutError>(table([
                ("address", Value::from(addr.to_string())),
                ("identity", Value::from(format!("spiffe://{td}/cms/{name}"))),
            ]))
        };
        if service == "custody" {
            // Dev only: the key-encryption key in a file, so `cms up` starts unsealed.
            config.insert(
                "seal".into(),
                table([(
                    "dev_seal_file",
                    path(&self.service_dir(service).join("dev-seal.key")),
                )]),
            );
            config.insert(
                "callers".into(),
                Value::Array(vec![table([
                    (
                        "identity",
                        Value::from(format!("spiffe://{td}/cms/gateway")),
                    ),
                    ("key_references", Value::from(vec!["*"])),
                    ("admin", Value::from(true)),
                    ("release_puk", Value::from(true)),
                ])]),
            );
        }
        match service {
            "gateway" => {
                config.insert(
                    "backends".into(),
                    table([
                        ("template", upstream("template", peers.template)?),
                        ("directory", upstream("directory", peers.directory)?),
                        ("custody", upstream("custody", peers.custody)?),
                    ]),
                );
            }
            "agent" => {
                config.insert("gateway".into(), upstream("gateway", peers.gateway)?);
            }
            _ => {}
        }
        let mut out = toml::to_string(&config).map_err(|e| LayoutError::Toml(e.to_string()))?;
        out.push('\n');
        out.push_str(extra);
        Ok(out)
    }
}

/// A TOML table of `entries`.
fn table<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Table(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_as_the_services_expect() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(&dir.path().join("d \"q\""), "cms.test").unwrap();
        let ports = Ports {
            grpc: "127.0.0.1:0".parse().unwrap(),
            ops: "127.0.0.1:0".parse().unwrap(),
        };
        let addr = Some("127.0.0.1:1".parse().unwrap());
        let peers = Peers {
            template: addr,
            directory: addr,
            custody: addr,
            gateway: addr,
        };
        let t = layout
            .service_config("template", ports, &peers, "")
            .unwrap();
        cms_kit::config::from_toml::<cms_template::Config>(&t).unwrap();
        let g = layout.service_config("gateway", ports, &peers, "").unwrap();
        cms_kit::config::from_toml::<cms_gateway::Config>(&g).unwrap();
        let c = layout.service_config("custody", ports, &peers, "").unwrap();
        let custody = cms_kit::config::from_toml::<cms_custody::Config>(&c).unwrap();
        assert!(custody.seal.dev_seal_file.is_some() && custody.callers[0].admin);
        // PIV PUKs are released to the gateway only.
        assert_eq!(custody.callers.len(), 1);
        assert!(custody.callers[0].release_puk);
        assert!(
            custody.callers[0]
                .identity
                .matches(&layout.pki().spiffe_id("gateway").unwrap())
        );
        let a = layout.service_config("agent", ports, &peers, "").unwrap();
        cms_kit::config::from_toml::<cms_agent::Config>(&a).unwrap();
        let err = layout
            .service_config("gateway", ports, &Peers::default(), "")
            .unwrap_err();
        assert!(err.to_string().contains("template"), "{err}");
    }
}
