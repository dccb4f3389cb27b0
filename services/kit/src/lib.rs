//! Shared runtime of the CMS services.
//!
//! Every server is built the same way: `main` parses its [`config`], installs the one rustls
//! crypto provider ([`tls::install_crypto_provider`]), starts [`telemetry`], binds its listeners
//! and calls the service's `run`, which builds a [`server::Server`] and serves it.

pub mod accept;
pub mod authz;
pub mod client;
pub mod config;
pub mod db;
pub mod error_details;
pub mod exit;
pub mod identity;
pub mod metrics;
pub mod ops;
pub mod page_token;
pub mod pki;
pub mod served;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod verify;

pub use identity::{CertificateIds, ConnectionIdentity, PeerIdentity, SpiffeId};
