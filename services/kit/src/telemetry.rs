//! Logs and traces. Logs go to stderr (text or JSON); traces go to an OTLP/gRPC collector when
//! `telemetry.otlp_endpoint` is set (off by default). The W3C trace-context propagator is
//! installed either way so context passes through a service even when it exports nothing.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Library noise kept out of the default log: sqlx logs every statement at INFO.
const QUIET: &str = "sqlx=warn,sea_orm=warn,sea_orm_migration=warn,h2=warn,hyper=warn,tower=warn,rustls=warn,opentelemetry=warn";

/// The `[telemetry]` section of every service config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Log filter, `tracing` EnvFilter syntax (`RUST_LOG` overrides it).
    #[serde(default = "default_log")]
    pub log: String,
    /// Log lines as JSON objects instead of text.
    #[serde(default)]
    pub json: bool,
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`. Unset: no trace export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// How long finished spans wait before they are sent, in milliseconds.
    #[serde(default = "default_export_delay_ms")]
    pub export_delay_ms: u64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log: default_log(),
            json: false,
            otlp_endpoint: None,
            export_delay_ms: default_export_delay_ms(),
        }
    }
}

fn default_log() -> String {
    "info".into()
}
fn default_export_delay_ms() -> u64 {
    2_000
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.log: {0}")]
    Filter(String),
    #[error("telemetry.otlp_endpoint: {0}")]
    Exporter(String),
    #[error("telemetry: {0}")]
    Init(String),
}

/// Flushes and stops trace export; call from inside the runtime before it ends.
#[must_use = "spans are lost unless the guard is shut down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The provider's shutdown blocks on the export; keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Installs the global subscriber and propagator. Must run inside a Tokio runtime (the OTLP
/// exporter's channel lives on it).
pub fn init(service: &str, settings: &TelemetrySettings) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.log.clone());
    let filter = EnvFilter::try_new(format!("{QUIET},{directives}"))
        .map_err(|e| TelemetryError::Filter(e.to_string()))?;

    // A provider even without an exporter: spans still get ids, so the context of an incoming
    // request is passed on to the next hop.
    let mut builder = SdkTracerProvider::builder().with_resource(
        Resource::builder()
            .with_service_name(format!("cms-{service}"))
            .build(),
    );
    if let Some(endpoint) = &settings.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_millis(settings.export_delay_ms))
                    .build(),
            )
            .build();
        builder = builder.with_span_processor(processor);
    }
    let provider = builder.build();
    let otel_layer =
        tracing_opentelemetry::layer().with_tracer(provider.tracer(format!("cms-{service}")));

    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let result = if settings.json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    result.map_err(|e| TelemetryError::Init(e.to_string()))?;
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}
