//! W3C trace-context propagation on every gRPC hop.
//!
//! Clients wrap their channel in [`InjectContext`], which writes `traceparent` from the current
//! span. Servers wrap their routes in [`ServerTraceLayer`], which opens one span per request as
//! a child of the caller's context and counts the request in [`Metrics`]. Spans carry the
//! method, the caller's identity and the gRPC status; never a request or response body. The
//! span name and method come from the served API ([`ServedApi`]): a path it does not serve is
//! "unknown", so callers cannot mint span names or metric series.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use opentelemetry::propagation::{Extractor, Injector};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::identity::{ConnectionIdentity, PeerIdentity};
use crate::metrics::Metrics;
use crate::served::ServedApi;

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes the current span's context into outgoing request headers.
pub fn inject_current(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers));
    });
}

/// Client middleware: see the module docs.
#[derive(Clone, Debug)]
pub struct InjectContext<S> {
    inner: S,
}

impl<S> InjectContext<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> tower_service::Service<Request<B>> for InjectContext<S>
where
    S: tower_service::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        inject_current(req.headers_mut());
        self.inner.call(req)
    }
}

/// Server middleware: see the module docs.
#[derive(Clone, Debug)]
pub struct ServerTraceLayer {
    metrics: Metrics,
    version: HeaderValue,
    api: ServedApi,
}

/// Response header that tells callers which software version answered.
pub const VERSION_HEADER: &str = "x-cms-version";

impl ServerTraceLayer {
    pub fn new(metrics: Metrics, version: &'static str, api: ServedApi) -> Self {
        Self {
            metrics,
            version: HeaderValue::from_static(version),
            api,
        }
    }
}

impl<S> tower_layer::Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace {
            inner,
            metrics: self.metrics.clone(),
            version: self.version.clone(),
            api: self.api.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServerTrace<S> {
    inner: S,
    metrics: Metrics,
    version: HeaderValue,
    api: ServedApi,
}

impl<S, B, RB> tower_service::Service<Request<B>> for ServerTrace<S>
where
    S: tower_service::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let method = self.api.method(req.uri().path()).clone();
        let peer = match (
            req.extensions().get::<PeerIdentity>(),
            req.extensions().get::<ConnectionIdentity>(),
        ) {
            (Some(p), _) => p.spiffe_id.to_string(),
            (None, Some(c)) => match (&c.spiffe_id, &c.certificate) {
                (Some(id), _) => id.to_string(),
                (None, Some(_)) => "bound certificate".to_owned(),
                (None, None) => String::new(),
            },
            (None, None) => String::new(),
        };
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %method.path,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %method.service,
            rpc.method = %method.name,
            peer.identity = %peer,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(req.headers()))
        });
        let _ = span.set_parent(parent);
        let metrics = self.metrics.clone();
        let version = self.version.clone();
        let started = Instant::now();
        let fut = {
            let _enter = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let mut result = fut.await;
                if let Ok(resp) = &mut result {
                    resp.headers_mut().insert(VERSION_HEADER, version);
                }
                // Errors from handlers are trailers-only responses with grpc-status in the
                // headers; a successful stream carries 0 in its trailers.
                let code = match &result {
                    Ok(resp) => resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .unwrap_or(0),
                    Err(_) => tonic::Code::Unknown as i32,
                };
                tracing::Span::current().record("rpc.grpc.status_code", code);
                metrics.request(&method, code, started.elapsed());
                result
            }
            .instrument(span),
        )
    }
}
