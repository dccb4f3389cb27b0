//! The kit's Server reports every added service SERVING once the port is up, except those
//! whose health the service reports itself (`reports_own_health`): those start NOT_SERVING
//! and follow the service's reporter.

use cms_kit::server::Server;
use cms_kit::tls::TlsSource;
use cms_launcher::layout::Peers;
use cms_proto::template::v1::template_service_server::TemplateServiceServer;
use cms_tests::inproc::{self, Running};
use cms_tests::pki::TestPki;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Wire;
use tonic_health::pb::health_client::HealthClient;

type Templates = TemplateServiceServer<cms_template::Templates>;
const NAME: &str = "cms.template.v1.TemplateService";

async fn status(pki: &TestPki, server: &Running, service: &str) -> i32 {
    let channel = inproc::channel(pki.tls("gateway"), server.grpc, pki.id("template"));
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status
}

/// Starts the template API on the kit's Server; `own` leaves its health to the test.
async fn start(
    dir: &std::path::Path,
    own: bool,
) -> (Running, tonic_health::server::HealthReporter) {
    let config: cms_template::Config = inproc::config(dir, "template", &Peers::default());
    let (reporter_tx, reporter_rx) = tokio::sync::oneshot::channel();
    let running = Running::start(config, move |config, listeners, shutdown| async move {
        let tls = TlsSource::load(config.tls.clone()).map_err(cms_template::Error::from)?;
        let db = cms_template::open_database(&config).await?;
        let mut server = Server::new("template", config.server, config.access, tls)
            .add_service(Templates::new(cms_template::Templates::new(db)));
        if own {
            server = server.reports_own_health::<Templates>();
        }
        let _ = reporter_tx.send(server.health_reporter());
        server.serve(listeners, shutdown).await?;
        Ok::<(), cms_template::Error>(())
    })
    .await;
    (running, reporter_rx.await.expect("reporter"))
}

#[tokio::test]
async fn added_services_are_serving_unless_they_report_their_own_health() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());

    let (server, _) = start(dir.path(), false).await;
    assert_eq!(status(&pki, &server, NAME).await, Wire::Serving as i32);
    assert_eq!(status(&pki, &server, "").await, Wire::Serving as i32);
    server.stop().await.unwrap();

    let (server, reporter) = start(dir.path(), true).await;
    assert_eq!(status(&pki, &server, NAME).await, Wire::NotServing as i32);
    reporter
        .set_service_status(NAME, ServingStatus::Serving)
        .await;
    assert_eq!(status(&pki, &server, NAME).await, Wire::Serving as i32);
    server.stop().await.unwrap();
}
