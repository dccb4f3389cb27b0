//! The fabric every service shares, tried from outside as an attacker or a stock gRPC client
//! would: real processes (`cms serve …`) over real mutual TLS on 127.0.0.1.
//!
//! - Metric labels and span names come from the methods a service serves; any other path is
//!   one "unknown" value, so unique bogus paths cannot grow memory or /metrics.
//! - So do span names and the rpc.* attributes of exported spans.
//! - Reflection (v1 and v1alpha) lists only the services a port serves.
//! - Errors carry the standard rich details (google.rpc.Status) a stock client reads.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cms_launcher::layout::{Layout, Peers, Ports};
use cms_launcher::supervise::{self, Service};
use cms_proto::common::v1::ErrorReason;
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::{GenerateMasterKeyRequest, GetStatusRequest};
use cms_proto::template::v1::CreateTemplateRequest;
use cms_proto::template::v1::template_service_client::TemplateServiceClient;
use cms_tests::cluster::Cluster;
use cms_tests::inproc;
use cms_tests::pki::{TRUST_DOMAIN, TestPki};
use futures_util::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tempfile::TempDir;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

/// One service as a real process, with its own dev PKI.
struct Process {
    _dir: TempDir,
    pki: TestPki,
    service: Service,
}

impl Process {
    async fn start(name: &'static str) -> Self {
        Self::start_with(name, "").await
    }

    /// Starts `name` with `extra` appended to its config.
    async fn start_with(name: &'static str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new(dir.path());
        let layout = Layout::new(dir.path(), TRUST_DOMAIN).unwrap();
        layout.create_dirs().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let config = layout
            .service_config(
                name,
                Ports {
                    grpc: any,
                    ops: any,
                },
                &Peers::default(),
                "",
            )
            .unwrap()
            + extra;
        std::fs::write(layout.config_path(name), config).unwrap();
        let service = supervise::start(
            &cms_tests::binary("cms"),
            &layout,
            name,
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        Self {
            _dir: dir,
            pki,
            service,
        }
    }

    /// Resident set size of the process, in KiB (VmRSS of /proc/<pid>/status).
    fn rss_kib(&self) -> u64 {
        let pid = self.service.process.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The whole /metrics body (up to 16 MiB: the point is to see how big it got).
    async fn metrics(&self) -> String {
        let (code, body) = cms_kit::ops::http_get(self.service.ops, "/metrics")
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        body
    }
}

/// A unary call with an empty message to any path, as a stock gRPC client can send.
async fn call_path(channel: cms_kit::client::Channel, path: &str) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::try_from(path).expect("path");
    grpc.unary(
        tonic::Request::new(()),
        path,
        tonic_prost::ProstCodec::<(), ()>::default(),
    )
    .await
    .map(drop)
}

/// Sends `count` unique ~1 KB paths, 32 at a time, and expects `code` for each.
async fn flood(channel: &cms_kit::client::Channel, tag: &str, count: usize, code: Code) {
    let padding = "x".repeat(1_000);
    futures_util::stream::iter(0..count)
        .map(|i| {
            let channel = channel.clone();
            let path = format!("/bogus.{tag}.{padding}.S{i}/M{i}");
            async move {
                let err = call_path(channel, &path).await.unwrap_err();
                assert_eq!(err.code(), code, "{i}: {err:?}");
            }
        })
        .buffer_unordered(32)
        .collect::<()>()
        .await;
}

/// Series (sample lines) in a Prometheus text exposition.
fn series(body: &str) -> Vec<&str> {
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_bogus_paths_count_as_one_unknown_method() {
    const PATHS: usize = 10_000;
    let custody = Process::start("custody").await;
    let addr = custody.service.grpc;
    let server_id = custody.pki.id("custody");

    // A served method, so its series exist before the flood.
    let gateway = inproc::channel(custody.pki.tls("gateway"), addr, server_id.clone());
    CustodyServiceClient::new(gateway.clone())
        .get_status(GetStatusRequest {})
        .await
        .expect("gateway is served");
    let before = series(&custody.metrics().await).len();
    let rss_before = custody.rss_kib();

    // A certificate of our CA that custody's allow-list refuses (an agent's).
    let started = Instant::now();
    let agent = inproc::channel(custody.pki.tls("agent/desktop-1"), addr, server_id);
    flood(&agent, "denied", PATHS, Code::PermissionDenied).await;
    // The allowed caller on paths custody does not serve.
    flood(&gateway, "unserved", 100, Code::Unimplemented).await;
    let flood_time = started.elapsed();
    // A refusal echoes no more than the start of the path it was sent.
    let padding = "y".repeat(1_000);
    let err = call_path(agent, &format!("/long.{padding}/M"))
        .await
        .unwrap_err();
    assert!(err.message().len() < 300, "{err:?}");

    let body = custody.metrics().await;
    let rss_after = custody.rss_kib();
    let lines = series(&body);
    eprintln!(
        "fabric metrics: {PATHS} bogus paths in {flood_time:?}; series {before} -> {}; \
         /metrics {} bytes; VmRSS {rss_before} kB -> {rss_after} kB",
        lines.len(),
        body.len()
    );

    assert!(
        !body.contains("bogus"),
        "a caller-sent path reached /metrics"
    );
    // The refused and the unserved calls are one method each way: (unknown, 7) and
    // (unknown, 12) requests, one latency histogram for "unknown".
    let unknown_requests: Vec<&&str> = lines
        .iter()
        .filter(|l| {
            l.starts_with("cms_grpc_server_requests_total{") && l.contains("method=\"unknown\"")
        })
        .collect();
    assert_eq!(unknown_requests.len(), 2, "{unknown_requests:#?}");
    assert!(
        unknown_requests
            .iter()
            // The flood and the one long path.
            .any(|l| l.contains("code=\"7\"") && l.ends_with(&format!(" {}", PATHS + 1))),
        "{unknown_requests:#?}"
    );
    assert!(
        lines.len() <= before + 40,
        "series grew from {before} to {}",
        lines.len()
    );
    assert!(body.len() < 64 * 1024, "/metrics is {} bytes", body.len());
    // Before the fix the same flood added about 27 MB (and 225 MB of /metrics).
    assert!(
        rss_after < rss_before + 16 * 1024,
        "VmRSS grew from {rss_before} kB to {rss_after} kB"
    );
}

/// What a reflection client learns from one port: the services it lists, and whether it
/// describes `symbol`. One function per reflection version (their types differ).
macro_rules! reflect {
    ($name:ident, $pb:path) => {
        async fn $name(channel: cms_kit::client::Channel, symbol: &str) -> (Vec<String>, bool) {
            use pb::server_reflection_client::ServerReflectionClient;
            use pb::server_reflection_request::MessageRequest;
            use pb::server_reflection_response::MessageResponse;
            use $pb as pb;
            let requests = [
                MessageRequest::ListServices(String::new()),
                MessageRequest::FileContainingSymbol(symbol.to_owned()),
            ]
            .map(|r| pb::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(r),
            });
            let mut answers = ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::iter(requests))
                .await
                .expect("reflection")
                .into_inner();
            let first = answers.message().await.unwrap().unwrap().message_response;
            let Some(MessageResponse::ListServicesResponse(list)) = first else {
                panic!("not a service list: {first:?}");
            };
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            // tonic-reflection ends the stream with NOT_FOUND for a symbol it does not know.
            let described = match answers.message().await {
                Ok(Some(answer)) => match answer.message_response {
                    Some(MessageResponse::FileDescriptorResponse(files)) => {
                        !files.file_descriptor_proto.is_empty()
                    }
                    Some(MessageResponse::ErrorResponse(e)) => {
                        assert_eq!(e.error_code, Code::NotFound as i32, "{e:?}");
                        false
                    }
                    other => panic!("unexpected answer: {other:?}"),
                },
                Err(status) if status.code() == Code::NotFound => false,
                other => panic!("unexpected answer: {other:?}"),
            };
            (names, described)
        }
    };
}
reflect!(reflect_v1, tonic_reflection::pb::v1);
reflect!(reflect_v1alpha, tonic_reflection::pb::v1alpha);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_only_the_services_of_each_port_in_v1_and_v1alpha() {
    let cluster = Cluster::start(|_| String::new()).await;
    let standard = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let ports: [(&str, &[&str]); 5] = [
        ("template", &["cms.template.v1.TemplateService"]),
        ("directory", &["cms.directory.v1.DirectoryService"]),
        ("custody", &["cms.custody.v1.CustodyService"]),
        (
            "gateway",
            &[
                "cms.gateway.v1.AdminService",
                "cms.gateway.v1.AgentLinkService",
                "cms.gateway.v1.ApprovalService",
                "cms.gateway.v1.HelpdeskService",
            ],
        ),
        ("agent", &["cms.agent.v1.AgentService"]),
    ];
    for (name, own) in ports {
        let mut expected: Vec<String> = own
            .iter()
            .chain(&standard)
            .map(|s| (*s).to_owned())
            .collect();
        expected.sort();
        // Any certificate of our CA may use reflection: an operator's here.
        let channel = inproc::channel(
            cluster.pki.tls("operator/admin"),
            cluster.grpc(name),
            cluster.pki.id(name),
        );
        let (v1, own_described) = reflect_v1(channel.clone(), own[0]).await;
        assert_eq!(v1, expected, "{name} (v1)");
        assert!(own_described, "{name} does not describe {}", own[0]);
        let (v1alpha, _) = reflect_v1alpha(channel.clone(), own[0]).await;
        assert_eq!(v1alpha, expected, "{name} (v1alpha)");
        if name == "custody" {
            // Nor does it describe what another port serves.
            let (_, foreign) = reflect_v1(channel.clone(), "cms.gateway.v1.AdminService").await;
            assert!(!foreign, "custody describes the gateway's AdminService");
            let (_, foreign) = reflect_v1alpha(channel, "cms.gateway.v1.AdminService").await;
            assert!(
                !foreign,
                "custody describes the gateway's AdminService (v1alpha)"
            );
        }
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_carries_standard_error_details() {
    use tonic_types::StatusExt;
    let custody = Process::start("custody").await;
    let channel = inproc::channel(
        custody.pki.tls("gateway"),
        custody.service.grpc,
        custody.pki.id("custody"),
    );
    // No algorithm: INVALID_ARGUMENT on one field.
    let err = CustodyServiceClient::new(channel)
        .generate_master_key(GenerateMasterKeyRequest {
            reference: "mk".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // What any gRPC client of the richer error model sees.
    let details = err.check_error_details().expect("a google.rpc.Status");
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "INVALID_ARGUMENT", "{info:?}");
    assert_eq!(info.domain, "cms.custody", "{info:?}");
    let field = info.metadata.get("field").cloned().unwrap_or_default();
    assert!(field.contains("algorithm"), "{info:?}");
    let bad = details.bad_request().expect("BadRequest");
    assert_eq!(bad.field_violations.len(), 1, "{bad:?}");
    assert_eq!(bad.field_violations[0].field, field);
    assert_eq!(bad.field_violations[0].description, err.message());
    // ... and what CMS clients read, in the same status.
    let ours = cms_custody::error::detail(&err).expect("ErrorDetail");
    assert_eq!(ours.reason, ErrorReason::InvalidArgument as i32);
    assert_eq!(ours.field, field);
    assert_eq!(ours.message, err.message());
}

/// An OTLP/gRPC trace receiver: the name and the string attribute values of every span.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ReceivedSpan>>>);

/// A span's name and its string attribute values.
type ReceivedSpan = (String, Vec<String>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                let values = span
                    .attributes
                    .iter()
                    .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(v) => Some(v.clone()),
                        _ => None,
                    })
                    .collect();
                spans.push((span.name, values));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_paths_make_unknown_spans() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let custody = Process::start_with(
        "custody",
        &format!("[telemetry]\notlp_endpoint = \"http://{otlp}\"\nexport_delay_ms = 100\n"),
    )
    .await;
    let (addr, server_id) = (custody.service.grpc, custody.pki.id("custody"));
    let gateway = inproc::channel(custody.pki.tls("gateway"), addr, server_id.clone());
    let agent = inproc::channel(custody.pki.tls("agent/desktop-1"), addr, server_id);
    flood(&agent, "denied", 20, Code::PermissionDenied).await;
    flood(&gateway, "unserved", 20, Code::Unimplemented).await;
    CustodyServiceClient::new(gateway)
        .get_status(GetStatusRequest {})
        .await
        .expect("gateway is served");

    let served = "/cms.custody.v1.CustodyService/GetStatus";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = receiver.0.lock().unwrap().clone();
        for (name, values) in &spans {
            assert!(
                !name.contains("bogus") && !values.iter().any(|v| v.contains("bogus")),
                "a caller-sent path reached a span: {name} {values:?}"
            );
        }
        let unknown = spans.iter().filter(|(name, _)| name == "unknown").count();
        if unknown >= 40 && spans.iter().any(|(name, _)| name == served) {
            let (_, values) = spans.iter().find(|(name, _)| name == "unknown").unwrap();
            assert!(values.iter().any(|v| v == "unknown"), "{values:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{unknown} unknown spans; spans seen: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_refusal_names_every_violated_field_in_bad_request() {
    use tonic_types::StatusExt;
    let template = Process::start("template").await;
    let channel = inproc::channel(
        template.pki.tls("gateway"),
        template.service.grpc,
        template.pki.id("template"),
    );
    // Two rules broken at once: both flows forced on, and more answers required than asked.
    let mut spec = cms_template::sample::minidriver("Contradictory");
    let policy = spec.unblock_policy.as_mut().unwrap();
    policy.challenge_response_enforced = true;
    policy.online_unblock_allowed = true;
    let questions = policy.user_auth.as_mut().unwrap();
    questions
        .security_questions
        .as_mut()
        .unwrap()
        .required_correct = 4;
    let err = TemplateServiceClient::new(channel)
        .create_template(CreateTemplateRequest {
            spec: Some(spec),
            change_comment: "bad".into(),
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let details = err.check_error_details().expect("a google.rpc.Status");
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("INVALID_ARGUMENT", "cms.template")
    );
    let fields: Vec<&str> = details
        .bad_request()
        .expect("BadRequest")
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert!(fields.len() >= 2, "{fields:?}");
    assert!(
        fields.iter().all(|f| f.starts_with("unblock_policy")),
        "{fields:?}"
    );
    assert_eq!(
        info.metadata.get("field").map(String::as_str),
        Some(fields[0])
    );
}
