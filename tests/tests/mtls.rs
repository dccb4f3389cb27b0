//! The mTLS fabric of one real service (custody, in-process on loopback listeners): who is
//! refused, who is served, certificate reload and the handshake timeout.

use std::net::SocketAddr;
use std::time::Duration;

use cms_kit::pki::LeafSpec;
use cms_kit::tls::{TlsSettings, TlsSource};
use cms_launcher::layout::Peers;
use cms_proto::custody::v1::GetStatusRequest;
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_tests::inproc::{self, Running};
use cms_tests::pki::TestPki;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

async fn start_custody(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut cms_custody::Config),
) -> Running {
    let mut config: cms_custody::Config = inproc::config(dir, "custody", &Peers::default());
    config.tls.reload_interval_ms = 100;
    tweak(&mut config);
    Running::start(config, cms_custody::run).await
}

async fn get_status(
    pki: &TestPki,
    tls: TlsSettings,
    addr: SocketAddr,
) -> Result<(), tonic::Status> {
    let channel = inproc::channel(tls, addr, pki.id("custody"));
    CustodyServiceClient::new(channel)
        .get_status(GetStatusRequest {})
        .await
        .map(drop)
}

/// How many handshakes the server refused so far, from its Prometheus metrics.
async fn refused_handshakes(server: &Running) -> u64 {
    let (code, body) = cms_kit::ops::http_get(server.ops, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(code, 200);
    body.lines()
        .find(|l| l.starts_with("cms_tls_handshakes_total{") && l.contains("outcome=\"refused\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A TLS client that presents no certificate at all.
async fn handshake_without_certificate(pki: &TestPki, addr: SocketAddr) -> std::io::Result<usize> {
    let roots = TlsSource::load(pki.tls("gateway")).expect("tls").roots();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await?;
    // TLS 1.3 reports a refused client certificate on the first read after the handshake.
    let mut buf = [0u8; 64];
    tls.read(&mut buf).await
}

#[tokio::test]
async fn refuses_bad_clients_serves_allowed_one_and_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let server = start_custody(dir.path(), |_| {}).await;

    // Served: the gateway is on custody's allow-list.
    get_status(&pki, pki.tls("gateway"), server.grpc)
        .await
        .expect("gateway is served");
    assert_eq!(refused_handshakes(&server).await, 0);

    // No certificate: the handshake is refused.
    let outcome = handshake_without_certificate(&pki, server.grpc).await;
    assert!(
        !matches!(outcome, Ok(n) if n > 0),
        "got data without a certificate: {outcome:?}"
    );
    assert_eq!(refused_handshakes(&server).await, 1);

    // A certificate from another CA, with an allowed SPIFFE ID.
    let foreign = pki.foreign("foreign-gateway", "gateway");
    let err = get_status(&pki, foreign, server.grpc).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert_eq!(refused_handshakes(&server).await, 2);

    // An expired certificate of our CA, with an allowed SPIFFE ID.
    let expired = pki.expired("expired-gateway", "gateway");
    let err = get_status(&pki, expired, server.grpc).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert_eq!(refused_handshakes(&server).await, 3);

    // A valid certificate whose SPIFFE ID is not on custody's allow-list.
    let err = get_status(&pki, pki.tls("operator/admin"), server.grpc)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("spiffe://cms.test/cms/operator/admin"),
        "{err:?}"
    );
    // ... who may still ask for health (open to any peer of our CA).
    let channel = inproc::channel(pki.tls("operator/admin"), server.grpc, pki.id("custody"));
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is open to authenticated peers");

    // After all that, the service is still up and serves the allowed caller.
    assert!(server.is_running());
    get_status(&pki, pki.tls("gateway"), server.grpc)
        .await
        .expect("still served");

    // Every request was counted, by method and status code (7 = PERMISSION_DENIED).
    let (_, metrics) = cms_kit::ops::http_get(server.ops, "/metrics")
        .await
        .unwrap();
    let counted = |code: i32| {
        metrics.lines().any(|l| {
            l.starts_with("cms_grpc_server_requests_total{")
                && l.contains("GetStatus")
                && l.contains(&format!("code=\"{code}\""))
        })
    };
    assert!(counted(0) && counted(7), "{metrics}");
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn reflection_lists_the_service_and_health() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let server = start_custody(dir.path(), |_| {}).await;
    let channel = inproc::channel(pki.tls("operator/admin"), server.grpc, pki.id("custody"));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"cms.custody.v1.CustodyService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let server = start_custody(dir.path(), |_| {}).await;
    // Expect the directory, reach custody: the client must not send the request.
    let channel = inproc::channel(pki.tls("gateway"), server.grpc, pki.id("directory"));
    let err = CustodyServiceClient::new(channel)
        .get_status(GetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let text = format!("{err:?}");
    assert!(
        text.contains("server identity is spiffe://cms.test/cms/custody"),
        "{text}"
    );
    server.stop().await.expect("clean stop");
}

/// The leaf certificate a new connection sees.
async fn presented_certificate(pki: &TestPki, addr: SocketAddr) -> CertificateDer<'static> {
    let source = TlsSource::load(pki.tls("gateway")).expect("tls");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(source.client_config())
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certificates")[0]
        .clone()
        .into_owned()
}

fn first_cert(path: &std::path::Path) -> CertificateDer<'static> {
    let pem = std::fs::read(path).unwrap();
    CertificateDer::from_pem_slice(&pem).unwrap()
}

#[tokio::test]
async fn replaced_certificate_is_used_for_new_connections_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let server = start_custody(dir.path(), |_| {}).await;
    let files = pki.tls("custody");
    let old = first_cert(&files.cert);
    assert_eq!(presented_certificate(&pki, server.grpc).await, old);

    // A new certificate and key for custody, written over the old files.
    let stem_files = pki.issue("custody-next", &LeafSpec::new(pki.id("custody"), 30));
    let new = first_cert(&stem_files.cert);
    assert_ne!(new, old);
    std::fs::copy(&stem_files.key, &files.key).unwrap();
    std::fs::copy(&stem_files.cert, &files.cert).unwrap();

    let mut seen = presented_certificate(&pki, server.grpc).await;
    for _ in 0..100 {
        if seen == new {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen = presented_certificate(&pki, server.grpc).await;
    }
    assert_eq!(seen, new, "the new certificate was not picked up");
    // And the service still serves over the new certificate.
    get_status(&pki, pki.tls("gateway"), server.grpc)
        .await
        .expect("served");
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let _pki = TestPki::new(dir.path());
    let server = start_custody(dir.path(), |c| c.server.handshake_timeout_ms = 300).await;
    let mut idle = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("the server kept a silent connection open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    server.stop().await.expect("clean stop");
}
