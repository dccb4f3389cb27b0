//! The `main` every server binary shares: read the config, install the one rustls provider,
//! start telemetry, bind, run, flush telemetry; any error is one line and exit code 2.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::process::ExitCode;

use serde::de::DeserializeOwned;

use crate::server::{Listeners, ServerSettings};
use crate::shutdown::Shutdown;
use crate::telemetry::TelemetrySettings;

/// What each service's `run` returns: a boxed future, so that its body is compiled in the
/// service's own crate and not again in every binary and test that runs it.
pub type ServiceFuture<E> = Pin<Box<dyn Future<Output = Result<(), E>> + Send>>;

/// The sections `main` needs from any service config.
pub trait ServiceConfig: DeserializeOwned {
    fn server(&self) -> &ServerSettings;
    fn telemetry(&self) -> &TelemetrySettings;
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error(transparent)]
    Bind(#[from] crate::server::BindError),
    #[error("signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Run(Box<dyn std::error::Error + Send + Sync>),
}

/// Runs service `name` (e.g. "custody") with the config file at `config_path` (plus
/// `CMS_<NAME>__…` environment overrides) until SIGINT or SIGTERM.
pub fn main<C, R, F, E>(name: &'static str, config_path: Option<&Path>, run: R) -> ExitCode
where
    C: ServiceConfig,
    R: FnOnce(C, Listeners, Shutdown) -> F,
    F: Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let program = format!("cms-{name}");
    crate::exit::run(&program, || async move {
        let config: C = crate::config::load(name, config_path)?;
        crate::tls::install_crypto_provider();
        let telemetry = crate::telemetry::init(name, config.telemetry())?;
        let outcome = async {
            let listeners = Listeners::bind(config.server()).await?;
            let shutdown = crate::shutdown::on_signals().map_err(StartError::Signals)?;
            run(config, listeners, shutdown)
                .await
                .map_err(|e| StartError::Run(Box::new(e)))
        }
        .await;
        // No log line for the error: exit::run prints it as the one last line on stderr
        // (where the log goes too), not twice, and not after a timestamp at start-up.
        telemetry.shutdown().await;
        outcome
    })
}

/// Parses the one flag server binaries take: `--config <file>` (or `CMS_<NAME>_CONFIG`).
pub fn config_path_from_args(name: &str) -> Result<Option<std::path::PathBuf>, String> {
    let mut args = std::env::args_os().skip(1);
    let mut path = std::env::var_os(format!("CMS_{}_CONFIG", name.to_ascii_uppercase()))
        .map(std::path::PathBuf::from);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--config" | "-c") => match args.next() {
                Some(p) => path = Some(p.into()),
                None => return Err("--config needs a file path".into()),
            },
            Some("--help" | "-h") => {
                return Err(format!(
                    "usage: cms-{name} [--config FILE]\n  environment overrides: CMS_{}__<SECTION>__<KEY>",
                    name.to_ascii_uppercase()
                ));
            }
            _ => return Err(format!("unexpected argument {arg:?} (try --help)")),
        }
    }
    Ok(path)
}
