//! One request entering the gateway yields spans in the gateway and in the services behind it,
//! all with the same trace id, exported over OTLP/gRPC to a receiver in this test.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cms_tests::cluster::Cluster;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_request_is_one_trace_across_services() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let cluster = Cluster::start(|_| {
        format!("[telemetry]\notlp_endpoint = \"http://{otlp}\"\nexport_delay_ms = 100\n")
    })
    .await;
    let out = tokio::task::block_in_place(|| cluster.cmsctl(&["status"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("custody"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let entry = "/cms.gateway.v1.AdminService/GetSystemStatus";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = receiver.0.lock().unwrap().clone();
        let trace = spans
            .iter()
            .find(|s| s.service == "cms-gateway" && s.name == entry)
            .map(|s| s.trace_id.clone());
        if let Some(trace_id) = trace {
            assert_eq!(trace_id.len(), 16);
            let mut by_service: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for span in spans.iter().filter(|s| s.trace_id == trace_id) {
                by_service
                    .entry(&span.service)
                    .or_default()
                    .insert(&span.name);
            }
            let behind: Vec<&&str> = by_service
                .keys()
                .filter(|s| ["cms-template", "cms-directory", "cms-custody"].contains(s))
                .collect();
            if behind.len() >= 2 {
                for service in behind {
                    assert!(
                        by_service[*service].contains("/grpc.health.v1.Health/Check"),
                        "{by_service:?}"
                    );
                }
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no trace through the gateway and two services; spans seen: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.stop().await;
}
