//! A throwaway dev PKI in a temp dir, plus the odd certificates refusal tests need.

use std::path::{Path, PathBuf};

use cms_kit::SpiffeId;
use cms_kit::pki::rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
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

    /// A certificate for `workload` that becomes valid tomorrow.
    pub fn not_yet_valid(&self, stem: &str, workload: &str) -> TlsSettings {
        let mut spec = LeafSpec::new(self.id(workload), 30);
        spec.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(1);
        self.issue(stem, &spec)
    }

    /// A good certificate for `workload` written with the key of another certificate.
    pub fn mismatched_key(&self, stem: &str, workload: &str) -> TlsSettings {
        let spec = LeafSpec::new(self.id(workload), 30);
        let cert = self.ca.issue(&spec).expect("issue");
        let other = self.ca.issue(&spec).expect("issue");
        self.write(stem, &cert.cert_pem, &other.key_pem, &self.dev.ca_path())
    }

    /// A certificate for `workload` issued by a CA:TRUE intermediate under our pathlen:0 root
    /// (sent as leaf + intermediate): `openssl verify` refuses that chain.
    pub fn via_intermediate(&self, stem: &str, workload: &str) -> TlsSettings {
        let sub = self
            .ca
            .intermediate("unconstrained sub-CA")
            .expect("sub-CA");
        let issued = sub
            .issue(&LeafSpec::new(self.id(workload), 30))
            .expect("issue");
        self.write(stem, &issued.cert_pem, &issued.key_pem, &self.dev.ca_path())
    }

    /// A certificate for `workload` from our CA with `edit` applied to its parameters.
    pub fn edited(
        &self,
        stem: &str,
        workload: &str,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> TlsSettings {
        let issued = self
            .ca
            .issue_with(&LeafSpec::new(self.id(workload), 30), edit)
            .expect("issue");
        self.write(stem, &issued.cert_pem, &issued.key_pem, &self.dev.ca_path())
    }

    /// No extended key usage extension at all.
    pub fn without_eku(&self, stem: &str, workload: &str) -> TlsSettings {
        self.edited(stem, workload, |p| p.extended_key_usages.clear())
    }

    /// serverAuth only: no clientAuth.
    pub fn server_auth_only(&self, stem: &str, workload: &str) -> TlsSettings {
        self.edited(stem, workload, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        })
    }

    /// A key usage that does not allow signing (keyEncipherment only).
    pub fn without_digital_signature(&self, stem: &str, workload: &str) -> TlsSettings {
        self.edited(stem, workload, |p| {
            p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        })
    }

    /// A SPIFFE ID of `bytes` bytes (under `workload`'s path), past the 2,048-byte limit
    /// when `bytes` > 2048.
    pub fn long_spiffe_id(&self, stem: &str, workload: &str, bytes: usize) -> TlsSettings {
        let base = format!("{}/", self.id(workload));
        let uri = format!("{base}{}", "a".repeat(bytes - base.len()));
        self.edited(stem, workload, |p| {
            p.subject_alt_names
                .retain(|n| !matches!(n, SanType::URI(_)));
            p.subject_alt_names
                .push(SanType::URI(uri.try_into().expect("IA5 URI")));
        })
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
