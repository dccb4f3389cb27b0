//! The demo's operators: a certificate from the dev CA for each, and a gateway connection made
//! with it. Every step of the demo goes through the gateway as one of them, as cmsctl or the
//! console would.

use std::net::SocketAddr;
use std::path::Path;

use cms_kit::client::{Channel, UpstreamSettings};
use cms_kit::pki::{Ca, LeafSpec};
use cms_kit::tls::{TlsSettings, TlsSource};

use super::DemoError;
use crate::layout::Layout;

/// The helpdesk operator of the demo (role helpdesk).
pub const HELPDESK: &str = "helpdesk";
/// A second operator who may approve (roles approver and helpdesk), for trying dual control.
pub const APPROVER: &str = "approver";

/// Issues `pki/operator-<name>.pem` and `.key` from the dev CA unless both exist; returns
/// whether it wrote them.
pub fn ensure_operator_cert(layout: &Layout, name: &str) -> Result<bool, DemoError> {
    let pki = layout.pki();
    let workload = format!("operator/{name}");
    let tls = pki.tls_settings(&workload);
    if tls.cert.exists() && tls.key.exists() {
        return Ok(false);
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| DemoError::Io {
            path: path.to_owned(),
            source,
        })
    };
    let ca = Ca::from_pem(&read(&pki.ca_path())?, &read(&pki.dir.join("ca.key"))?)?;
    let issued = ca.issue(&LeafSpec::new(pki.spiffe_id(&workload)?, 825))?;
    cms_kit::pki::write_secret(&tls.key, &issued.key_pem)?;
    cms_kit::pki::write_secret(&tls.cert, &issued.cert_pem)?;
    Ok(true)
}

/// A connection to the gateway at `gateway` as operator `name` (`admin`: the dev operator).
pub fn operator_channel(
    layout: &Layout,
    gateway: SocketAddr,
    name: &str,
) -> Result<Channel, DemoError> {
    cms_kit::tls::install_crypto_provider();
    let pki = layout.pki();
    let tls = TlsSource::load(TlsSettings {
        reload_interval_ms: 0,
        ..pki.tls_settings(&format!("operator/{name}"))
    })?;
    let upstream = UpstreamSettings {
        address: gateway.to_string(),
        identity: pki.spiffe_id("gateway")?,
        connect_timeout_ms: 3_000,
    };
    Ok(cms_kit::client::channel(&upstream, tls)?)
}
