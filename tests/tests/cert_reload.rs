//! Certificate reload in a real service process (cms-template): a replacement read from disk
//! is used only when it is fit to be this service's certificate. Each bad replacement leaves
//! the old certificate on the wire (seen through a real TLS handshake) and one clear log line;
//! a good one is then picked up without a restart.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cms_kit::tls::TlsSettings;
use cms_launcher::layout::{Layout, Peers, Ports};
use cms_tests::pki::{TRUST_DOMAIN, TestPki};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// cms-template as a child process, its stderr collected line by line.
struct Template {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    grpc: SocketAddr,
}

impl Template {
    fn start(dir: &Path) -> Self {
        let layout = Layout::new(dir, TRUST_DOMAIN).unwrap();
        layout.create_dirs().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let text = layout
            .service_config(
                "template",
                Ports {
                    grpc: any,
                    ops: any,
                },
                &Peers::default(),
                "",
            )
            .unwrap()
            .replacen("[tls]\n", "[tls]\nreload_interval_ms = 100\n", 1);
        let path = layout.config_path("template");
        std::fs::write(&path, text).unwrap();
        let mut child = Command::new(cms_tests::binary("cms-template"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        let announce = layout.announce_path("template");
        let deadline = Instant::now() + Duration::from_secs(30);
        let grpc = loop {
            if let Some((grpc, _)) = cms_kit::server::read_announce(&announce) {
                break grpc;
            }
            assert!(child.try_wait().unwrap().is_none(), "cms-template exited");
            assert!(Instant::now() < deadline, "cms-template not serving");
            std::thread::sleep(Duration::from_millis(50));
        };
        Self { child, log, grpc }
    }

    fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Accepts any server certificate: the probe reports what is served, whatever it is.
#[derive(Debug)]
struct ShowAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for ShowAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The leaf certificate the service presents to a new connection (as the gateway).
async fn served_leaf(pki: &TestPki, addr: SocketAddr) -> CertificateDer<'static> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let gateway = pki.tls("gateway");
    let chain = read_chain(&gateway.cert);
    let key_pem = std::fs::read(&gateway.key).unwrap();
    let key = PrivateKeyDer::from_pem_slice(&key_pem).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ShowAnything(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certificates")[0]
        .clone()
        .into_owned()
}

fn read_chain(path: &Path) -> Vec<CertificateDer<'static>> {
    let pem = std::fs::read(path).unwrap();
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Puts `from`'s files in place of `to`'s, each by rename (as cert-manager and SPIRE do).
fn install(from: &TlsSettings, to: &TlsSettings) {
    for (src, dst) in [(&from.key, &to.key), (&from.cert, &to.cert)] {
        let tmp = dst.with_extension("new");
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, dst).unwrap();
    }
}

/// What the service did with one replacement.
#[derive(Debug)]
struct Outcome {
    case: &'static str,
    kept_old: bool,
    /// The line logged about it: a refusal naming `reason`, or the reload message.
    line: Option<String>,
}

/// Installs `bad` and waits until the service logs a refusal naming `reason` or a reload.
async fn try_replacement(
    service: &Template,
    pki: &TestPki,
    case: &'static str,
    bad: &TlsSettings,
    reason: &str,
    old: &CertificateDer<'static>,
) -> Outcome {
    let own = pki.tls("template");
    let seen = service.log_lines().len();
    install(bad, &own);
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let lines = service.log_lines();
        let found = lines[seen..].iter().find(|l| {
            (l.contains("refused") && l.contains(reason)) || l.contains("TLS certificates reloaded")
        });
        if let Some(line) = found {
            break Some(line.clone());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Give a wrongly accepted replacement the time to be taken into use.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept_old = served_leaf(pki, service.grpc).await == *old;
    Outcome {
        case,
        kept_old,
        line,
    }
}

#[tokio::test]
async fn unfit_replacements_are_refused_and_a_good_one_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let service = Template::start(dir.path());
    let own = pki.tls("template");
    let old = read_chain(&own.cert).remove(0);
    assert_eq!(served_leaf(&pki, service.grpc).await, old);

    let cases: Vec<(&'static str, TlsSettings, &str)> = vec![
        (
            "key does not match",
            pki.mismatched_key("bad-key", "template"),
            "does not match the certificate",
        ),
        (
            "expired",
            pki.expired("bad-expired", "template"),
            "certificate expired",
        ),
        (
            "not yet valid",
            pki.not_yet_valid("bad-future", "template"),
            "not valid yet",
        ),
        (
            "other CA",
            pki.foreign("bad-foreign", "template"),
            "not issued by a CA of the trust bundle",
        ),
        (
            "operator's SPIFFE ID",
            pki.issue(
                "bad-operator",
                &cms_kit::pki::LeafSpec::new(pki.id("operator/admin"), 30),
            ),
            "its SPIFFE ID is spiffe://cms.test/cms/operator/admin, this service is spiffe://cms.test/cms/template",
        ),
    ];
    let mut outcomes = Vec::new();
    for (case, files, reason) in &cases {
        outcomes.push(try_replacement(&service, &pki, case, files, reason, &old).await);
    }
    for o in &outcomes {
        eprintln!(
            "{:<22} kept old certificate: {:<5} log: {}",
            o.case,
            o.kept_old,
            o.line.as_deref().unwrap_or("(nothing)")
        );
    }
    for o in &outcomes {
        assert!(
            o.kept_old,
            "{}: the bad certificate is being served",
            o.case
        );
        let line = o.line.as_deref().unwrap_or_default();
        assert!(
            line.contains("new TLS certificate refused; still serving with the current one"),
            "{}: no refusal logged: {line:?}",
            o.case
        );
    }
    // One line per bad replacement, not one per reload tick.
    let refusals = service
        .log_lines()
        .iter()
        .filter(|l| l.contains("new TLS certificate refused"))
        .count();
    assert!(refusals <= 2 * cases.len(), "{refusals} refusal lines");

    // A good replacement is then used for new connections, without a restart.
    let good = pki.issue(
        "good-next",
        &cms_kit::pki::LeafSpec::new(pki.id("template"), 30),
    );
    let new = read_chain(&good.cert).remove(0);
    install(&good, &own);
    let deadline = Instant::now() + Duration::from_secs(5);
    while served_leaf(&pki, service.grpc).await != new {
        assert!(
            Instant::now() < deadline,
            "the good certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        service
            .log_lines()
            .iter()
            .any(|l| l.contains("TLS certificates reloaded")),
        "{:?}",
        service.log_lines()
    );
    // And a client with the full rules (the gateway's) is served over it.
    let channel = cms_tests::inproc::channel(pki.tls("gateway"), service.grpc, pki.id("template"));
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("served over the new certificate");
}

#[tokio::test]
async fn a_replacement_refused_as_not_yet_valid_is_taken_once_valid() {
    // cert-manager's notBefore is "now" by the issuer's clock: a service whose clock is a
    // little behind refuses the file at first, and must take it when the time comes without
    // waiting for the file to change again.
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let service = Template::start(dir.path());
    let own = pki.tls("template");
    let mut spec = cms_kit::pki::LeafSpec::new(pki.id("template"), 30);
    spec.not_before = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let soon = pki.issue("soon", &spec);
    let new = read_chain(&soon.cert).remove(0);
    install(&soon, &own);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_leaf(&pki, service.grpc).await != new {
        assert!(
            Instant::now() < deadline,
            "not taken once valid: {:?}",
            service.log_lines()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = service.log_lines();
    let refusals = lines
        .iter()
        .filter(|l| l.contains("new TLS certificate refused") && l.contains("not valid yet"))
        .count();
    assert_eq!(refusals, 1, "{lines:?}");
}
