//! A throwaway dev PKI in a temp dir, plus the odd certificates refusal tests need.

use std::path::{Path, PathBuf};

use cms_kit::SpiffeId;
use cms_kit::pki::{Ca, DevPki, LeafSpec};
use cms_kit::tls::TlsSettings;

pub const TRUST_DOMAIN: &str = "cms.test";

pub struct TestPki {
    pub dev: DevPki,
    ca: Ca,
}

impl TestPki {
    /// A complete dev PKI under `dir/pki`.
    pub fn new(dir: &Path) -> Self {
        let dev = DevPki::new(dir.join("pki"), TRUST_DOMAIN);
        dev.init().expect("dev PKI");
        let ca = Ca::from_pem(
            &std::fs::read_to_string(dev.dir.join("ca.pem")).expect("ca.pem"),
            &std::fs::read_to_string(dev.dir.join("ca.key")).expect("ca.key"),
        )
        .expect("load CA");
        Self { dev, ca }
    }

    pub fn id(&self, workload: &str) -> SpiffeId {
        self.dev.spiffe_id(workload).expect("SPIFFE ID")
    }

    /// The `[tls]` settings of a dev PKI workload, reloading every 100 ms.
    pub fn tls(&self, workload: &str) -> TlsSettings {
        TlsSettings {
            reload_interval_ms: 100,
            ..self.dev.tls_settings(workload)
        }
    }

    /// Issues a certificate for `spec` from this PKI's CA and writes `<stem>.pem/.key`.
    pub fn issue(&self, stem: &str, spec: &LeafSpec) -> TlsSettings {
        let issued = self.ca.issue(spec).expect("issue");
        self.write(stem, &issued.cert_pem, &issued.key_pem, &self.dev.ca_path())
    }

    /// A valid-looking certificate for `workload` from a different CA (the holder still
    /// trusts our CA, so only the server can refuse the connection).
    pub fn foreign(&self, stem: &str, workload: &str) -> TlsSettings {
        let other = Ca::generate("some other CA").expect("CA");
        let issued = other
            .issue(&LeafSpec::new(self.id(workload), 30))
            .expect("issue");
        self.write(stem, &issued.cert_pem, &issued.key_pem, &self.dev.ca_path())
    }

    /// A certificate for `workload` that expired yesterday.
    pub fn expired(&self, stem: &str, workload: &str) -> TlsSettings {
        let mut spec = LeafSpec::new(self.id(workload), 30);
        let now = time::OffsetDateTime::now_utc();
        spec.not_before = now - time::Duration::days(30);
        spec.not_after = now - time::Duration::days(1);
        self.issue(stem, &spec)
    }

    fn write(&self, stem: &str, cert: &str, key: &str, ca: &Path) -> TlsSettings {
        let cert_path: PathBuf = self.dev.dir.join(format!("{stem}.pem"));
        let key_path: PathBuf = self.dev.dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert).expect("write cert");
        std::fs::write(&key_path, key).expect("write key");
        TlsSettings {
            ca: ca.to_owned(),
            cert: cert_path,
            key: key_path,
            reload_interval_ms: 100,
        }
    }
}
