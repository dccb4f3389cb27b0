//! Operators identified by a client certificate the directory binds to their account: a
//! certificate of the enterprise's own CA (no SPIFFE ID), trusted by the gateway's port
//! through `[operators] client_ca_file`. Real processes over mTLS (`cms serve …`), the binding
//! made with `cmsctl operators create --bind-cert`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use cms_kit::pki::rcgen::{DistinguishedName, DnType};
use cms_kit::pki::{Ca, Issued, LeafSpec};
use cms_proto::gateway::v1::WhoAmIRequest;
use cms_proto::gateway::v1::helpdesk_service_client::HelpdeskServiceClient;
use cms_tests::cluster::Cluster;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// A certificate of the enterprise CA for a person: clientAuth, no SPIFFE URI SAN, no SANs.
fn person_cert(ca: &Ca, common_name: &str) -> Issued {
    let placeholder = "spiffe://acme.example/unused".parse().unwrap();
    ca.issue_with(&LeafSpec::new(placeholder, 30), |p| {
        p.subject_alt_names.clear();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Acme");
        p.distinguished_name = dn;
    })
    .expect("issue person certificate")
}

/// An HTTP/2 channel to `addr` presenting `client` (which the kit's `TlsSource` would refuse:
/// it has no SPIFFE ID), trusting the cluster's CA for the server.
async fn channel_as(
    client: &Issued,
    cluster_ca: &Path,
    addr: SocketAddr,
) -> Result<Channel, tonic::transport::Error> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(client.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("client chain");
    let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).expect("client key");
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(cluster_ca).expect("cluster CA") {
        roots.add(ca.expect("cluster CA")).expect("add CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = config.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = ServerName::try_from("localhost").expect("server name");
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_with_connector(connector)
        .await
}

async fn who_am_i(
    channel: Channel,
) -> Result<cms_proto::gateway::v1::WhoAmIResponse, tonic::Status> {
    HelpdeskServiceClient::new(channel)
        .who_am_i(WhoAmIRequest {})
        .await
        .map(tonic::Response::into_inner)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cmsctl --json <args>` as the dev admin; its JSON answer.
fn admin_json(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = tokio::task::block_in_place(|| cluster.cmsctl(&all));
    assert!(out.status.success(), "cmsctl {args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("cmsctl {args:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_with_a_certificate_bound_to_their_account() {
    let enterprise = tempfile::tempdir().expect("temp dir");
    let ca = Ca::generate("Acme Operators CA").expect("enterprise CA");
    let ca_file = enterprise.path().join("operators-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).expect("write CA");
    let gateway_extra = format!(
        "[operators]\ncache_ttl_ms = 200\nclient_ca_file = {:?}\n",
        ca_file.display().to_string()
    );
    let cluster = Cluster::start(|name| {
        if name == "gateway" {
            gateway_extra.clone()
        } else {
            String::new()
        }
    })
    .await;
    let cluster_ca = cluster.pki.dev.ca_path();
    let gateway = cluster.grpc("gateway");

    // Erin's certificate is bound to her helpdesk account by its public key.
    let erin = person_cert(&ca, "Erin Example");
    let erin_pem = enterprise.path().join("erin.pem");
    std::fs::write(&erin_pem, &erin.cert_pem).expect("write cert");
    let account = admin_json(
        &cluster,
        &[
            "operators",
            "create",
            "--username",
            "erin",
            "--role",
            "helpdesk",
            "--role",
            "approver",
            "--bind-cert",
            erin_pem.to_str().unwrap(),
        ],
    );
    let erin_id = account["id"].as_str().expect("operator id").to_owned();

    let erin_channel = channel_as(&erin, &cluster_ca, gateway)
        .await
        .expect("the gateway accepts the bound CA's certificate");
    let me = who_am_i(erin_channel.clone())
        .await
        .expect("WhoAmI with a bound certificate");
    let operator = me.operator.expect("operator");
    assert_eq!(operator.username, "erin");
    let mut roles = operator.roles.clone();
    roles.sort();
    assert_eq!(roles, ["approver", "helpdesk"]);
    assert!(
        me.peer_identity.contains("certificate") && me.peer_identity.contains("Acme Operators CA"),
        "{}",
        me.peer_identity
    );

    // The console, on the same port: its page and its JSON API know Erin too.
    let page = http_get(&erin_channel, "/").await;
    assert_eq!(page.0, 200, "console page");
    let api = http_get(&erin_channel, "/api/v1/whoami").await;
    assert_eq!(api.0, 200, "{}", api.1);
    let api: serde_json::Value = serde_json::from_str(&api.1).expect("JSON");
    assert_eq!(api["operator"]["username"], "erin", "{api}");

    // A certificate of the same CA that no account is bound to: refused, saying why.
    let stranger = person_cert(&ca, "Sam Stranger");
    let refused = who_am_i(
        channel_as(&stranger, &cluster_ca, gateway)
            .await
            .expect("TLS accepts the CA's certificates"),
    )
    .await
    .expect_err("an unbound certificate is not an operator");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("not bound to an active operator"),
        "{}",
        refused.message()
    );
    let stranger_api = http_get(
        &channel_as(&stranger, &cluster_ca, gateway)
            .await
            .expect("TLS"),
        "/api/v1/whoami",
    )
    .await;
    assert_eq!(stranger_api.0, 403, "{}", stranger_api.1);

    // Many requests with that unknown certificate at once cost the directory at most one
    // lookup ("not bound" is cached briefly, and one lookup runs at a time).
    let before = binding_lookups(&cluster).await;
    assert!(
        before >= 2,
        "the directory's metrics count {before} lookups so far"
    );
    let stranger_channel = channel_as(&stranger, &cluster_ca, gateway)
        .await
        .expect("TLS");
    let burst: Vec<_> = (0..20)
        .map(|_| tokio::spawn(who_am_i(stranger_channel.clone())))
        .collect();
    for call in burst {
        let refused = call.await.expect("task").expect_err("unbound");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }
    let after = binding_lookups(&cluster).await;
    assert!(
        after - before <= 1,
        "{} directory lookups for one unknown certificate",
        after - before
    );

    // The enterprise CA is not trusted for SPIFFE IDs: its certificate naming the dev admin
    // (who has an account) is just another unbound certificate.
    let impostor = ca
        .issue(&LeafSpec::new(cluster.pki.id("operator/admin"), 30))
        .expect("issue");
    let refused = who_am_i(
        channel_as(&impostor, &cluster_ca, gateway)
            .await
            .expect("TLS accepts the CA's certificates"),
    )
    .await
    .expect_err("a SPIFFE ID from the operator CA means nothing");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("not bound"),
        "{}",
        refused.message()
    );

    // A bound certificate reaches operator services only: not the agent link.
    let agent_link = erin_channel
        .clone()
        .ready_oneshot_unary("/cms.gateway.v1.AgentLinkService/Link")
        .await;
    assert_eq!(agent_link, Some(Code::PermissionDenied));

    // Erin's account disabled (through the gateway): her certificate no longer signs in.
    admin_json(&cluster, &["operators", "update", &erin_id, "--disable"]);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let refused = who_am_i(erin_channel)
        .await
        .expect_err("a disabled operator is refused");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // The directory has no operator bundle: the same certificate is refused at TLS.
    let directory = cluster.grpc("directory");
    let outcome = match channel_as(&erin, &cluster_ca, directory).await {
        Err(_) => None,
        Ok(channel) => Some(
            cms_proto::directory::v1::directory_service_client::DirectoryServiceClient::new(
                channel,
            )
            .get_operator(cms_proto::directory::v1::GetOperatorRequest {
                id: erin_id.clone(),
            })
            .await
            .map(|_| ()),
        ),
    };
    match outcome {
        None => {}
        Some(Err(status)) => assert!(
            // TLS 1.3: the server checks the client's certificate after the client's side
            // of the handshake, so the refusal shows as the connection closing.
            matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ) && !status.message().contains("not allowed"),
            "the directory answered at the gRPC level instead of refusing the handshake: {status:?}"
        ),
        Some(Ok(())) => panic!("the directory accepted a certificate of a CA it does not trust"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiffe_operator_whose_certificate_is_bound_to_another_account_is_refused() {
    let enterprise = tempfile::tempdir().expect("temp dir");
    let ca = Ca::generate("Acme Operators CA").expect("enterprise CA");
    let ca_file = enterprise.path().join("operators-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).expect("write CA");
    let gateway_extra = format!(
        "[operators]\ncache_ttl_ms = 200\nclient_ca_file = {:?}\n",
        ca_file.display().to_string()
    );
    let cluster = Cluster::start(|name| {
        if name == "gateway" {
            gateway_extra.clone()
        } else {
            String::new()
        }
    })
    .await;
    // Alice's certificate says /cms/operator/alice; the directory binds it to bob.
    let alice_tls = cluster.pki.issue(
        "operator-alice",
        &LeafSpec::new(cluster.pki.id("operator/alice"), 30),
    );
    admin_json(
        &cluster,
        &[
            "operators",
            "create",
            "--username",
            "alice",
            "--role",
            "helpdesk",
        ],
    );
    let alice_channel = || {
        cms_tests::inproc::channel(
            alice_tls.clone(),
            cluster.grpc("gateway"),
            cluster.pki.id("gateway"),
        )
    };
    let me = HelpdeskServiceClient::new(alice_channel())
        .who_am_i(WhoAmIRequest {})
        .await
        .expect("alice before the conflicting binding")
        .into_inner();
    assert_eq!(me.operator.expect("operator").username, "alice");

    admin_json(
        &cluster,
        &[
            "operators",
            "create",
            "--username",
            "bob",
            "--role",
            "helpdesk",
            "--bind-cert",
            alice_tls.cert.to_str().unwrap(),
        ],
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let refused = HelpdeskServiceClient::new(alice_channel())
        .who_am_i(WhoAmIRequest {})
        .await
        .expect_err("SPIFFE ID and binding name different operators");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("bound to another operator account"),
        "{}",
        refused.message()
    );
}

/// How many GetOperatorByCertificate calls the directory has answered.
async fn binding_lookups(cluster: &Cluster) -> u64 {
    let ops = cluster
        .services
        .iter()
        .find(|s| s.name == "directory")
        .expect("directory")
        .ops;
    let (code, body) = cms_kit::ops::http_get(ops, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(code, 200, "{body}");
    body.lines()
        .filter(|l| l.contains("grpc_server_requests") && l.contains("GetOperatorByCertificate"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A browser-like GET on the console: the status and the body.
async fn http_get(channel: &Channel, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let request = http::Request::builder()
        .method("GET")
        .uri(path)
        .body(tonic::body::Body::empty())
        .expect("request");
    let response = channel
        .clone()
        .oneshot(request)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sends an empty unary gRPC request to `path`; the status code, if the server gave one.
trait RawCall {
    async fn ready_oneshot_unary(self, path: &'static str) -> Option<Code>;
}

impl RawCall for Channel {
    async fn ready_oneshot_unary(self, path: &'static str) -> Option<Code> {
        let mut grpc = tonic::client::Grpc::new(self);
        grpc.ready().await.ok()?;
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        grpc.unary(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await
        .err()
        .map(|s| s.code())
    }
}
