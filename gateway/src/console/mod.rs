//! The helpdesk web console, served on the gateway's mutual-TLS port beside gRPC: operators'
//! browsers present their certificate, our acceptor verifies it and puts the peer identity
//! into every request, and the console's handlers pass it on to the same workflow objects
//! the gRPC servers wrap (one implementation, two transports).
//!
//! - `/` and a few assets: the pages, embedded in the binary ([`assets`]);
//! - `/api/v1/…`: the JSON API ([`api`]), errors as JSON ([`error`]), views of the proto
//!   messages ([`views`]).
//!
//! Every console response carries a strict Content-Security-Policy (scripts and styles from
//! this origin only), `nosniff` and no framing; API responses are never cached (`no-store`:
//! cryptograms, PUKs and one-time codes travel in them). Writes must come from the console's
//! own pages: a browser that says a request is cross-site (`Sec-Fetch-Site`) is refused, and
//! bodies must be JSON, which a cross-site form cannot send without a CORS preflight we never
//! grant.

mod api;
mod assets;
mod error;
mod views;

#[cfg(test)]
mod tests;

pub use api::{AuditQuery, Services};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use cms_proto::gateway::v1::admin_service_server::AdminService;

/// The largest JSON body the API reads; its bodies are a few short strings.
const MAX_BODY_BYTES: usize = 16 * 1024;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// AdminService.QueryAudit of `admin`, for the console's audit view.
pub fn audit_query<A: AdminService>(admin: std::sync::Arc<A>) -> AuditQuery {
    std::sync::Arc::new(move |request| {
        let admin = admin.clone();
        Box::pin(async move { admin.query_audit(request).await })
    })
}

/// The paths of the console's pages (`/api/v1` is separate).
pub fn page_paths() -> impl Iterator<Item = &'static str> {
    assets::paths()
}

/// Adds the console (pages and `/api/v1`) to the router that serves the gateway's gRPC
/// services. Requests that match neither get gRPC's UNIMPLEMENTED when they are gRPC, and a
/// JSON 404 otherwise.
pub fn mount(grpc: Router, services: Services) -> Router {
    let api = api::routes(services)
        .layer(middleware::from_fn(same_origin_writes))
        .layer(middleware::map_response(no_store))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    let console = assets::routes()
        .layer(middleware::map_response(revalidate))
        .nest("/api/v1", api)
        .layer(middleware::map_response(security_headers));
    grpc.merge(console).fallback(fallback)
}

async fn fallback(request: Request) -> Response {
    let is_grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if is_grpc {
        return tonic::Status::unimplemented("").into_http();
    }
    security_headers(no_store(error::ApiError::not_found().into_response()).await).await
}

/// Refuses writes a browser marks as coming from another site (a page elsewhere that tries to
/// use the operator's certificate).
async fn same_origin_writes(request: Request, next: Next) -> Response {
    let write = !matches!(*request.method(), Method::GET | Method::HEAD);
    let cross_site = request
        .headers()
        .get("sec-fetch-site")
        .is_some_and(|site| site != "same-origin");
    if write && cross_site {
        return (
            axum::http::StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({
                "error": {
                    "code": "PERMISSION_DENIED",
                    "reason": "PERMISSION_DENIED",
                    "field": "",
                    "message": "the console accepts changes only from its own pages",
                }
            })),
        )
            .into_response();
    }
    next.run(request).await
}

async fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn revalidate(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
        (
            HeaderName::from_static("cross-origin-resource-policy"),
            "same-origin",
        ),
    ];
    for (name, value) in set {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
