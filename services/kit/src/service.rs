//! The `main` every server binary shares: parse `--config <file>` (and `--migrate-only`), read
//! the config, install the one rustls provider, start telemetry, bind, run (or only migrate),
//! flush telemetry; any error is one line and exit code 2.
//!
//! A service declares itself once, as a [`Program`], and its binary's `main` is one line:
//! `cms_template::PROGRAM.main()`.

use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;

use clap::Parser;
use serde::de::DeserializeOwned;

use crate::server::{Listeners, ServerSettings};
use crate::shutdown::Shutdown;
use crate::telemetry::TelemetrySettings;

/// What each service's `run` returns: a boxed future, so that its body is compiled in the
/// service's own crate and not again in every binary and test that runs it.
pub type ServiceFuture<E> = Pin<Box<dyn Future<Output = Result<(), E>> + Send>>;

/// The sections `main` needs from any service config (see [`impl_service_config!`]).
pub trait ServiceConfig: DeserializeOwned {
    fn server(&self) -> &ServerSettings;
    fn telemetry(&self) -> &TelemetrySettings;
}

/// Implements [`ServiceConfig`] for a config struct with the usual `server` and `telemetry`
/// fields.
#[macro_export]
macro_rules! impl_service_config {
    ($config:ty) => {
        impl $crate::service::ServiceConfig for $config {
            fn server(&self) -> &$crate::server::ServerSettings {
                &self.server
            }

            fn telemetry(&self) -> &$crate::telemetry::TelemetrySettings {
                &self.telemetry
            }
        }
    };
}

/// A server binary: its name, how it serves, and how it migrates its database (when it has
/// one).
#[derive(Debug)]
pub struct Program<C, E> {
    /// Short service name, e.g. "custody": the program is `cms-<name>`, its environment
    /// overrides `CMS_<NAME>__…`.
    pub name: &'static str,
    /// Serves until shutdown (the crate's public `run`).
    pub run: fn(C, Listeners, Shutdown) -> ServiceFuture<E>,
    /// Applies pending database migrations, once (under an advisory lock on PostgreSQL).
    pub migrate: Option<fn(C) -> ServiceFuture<E>>,
}

/// What the process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Serve until SIGINT or SIGTERM.
    Serve,
    /// Apply the database migrations and exit (for a deployment's migration job).
    MigrateOnly,
}

/// The command line of every server binary.
#[derive(Debug, Parser)]
struct ServerArgs {
    /// The service's TOML config file (default: $CMS_<NAME>_CONFIG; values may be
    /// overridden with CMS_<NAME>__<SECTION>__<KEY>).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Apply the database migrations, then exit without serving.
    #[arg(long)]
    migrate_only: bool,
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
    #[error("--migrate-only: this service has no database")]
    NoDatabase,
    #[error(transparent)]
    Run(Box<dyn std::error::Error + Send + Sync>),
}

impl<C, E> Program<C, E>
where
    C: ServiceConfig,
    E: std::error::Error + Send + Sync + 'static,
{
    /// The whole `main` of the binary `cms-<name>`: reads the command line and starts.
    pub fn main(&self) -> ExitCode {
        self.main_from(std::env::args_os())
    }

    fn main_from(&self, args: impl IntoIterator<Item = OsString>) -> ExitCode {
        let args = ServerArgs::parse_from(args);
        let config = args.config.or_else(|| self.config_from_env());
        let mode = if args.migrate_only {
            Mode::MigrateOnly
        } else {
            Mode::Serve
        };
        self.start(config.as_deref(), mode)
    }

    /// `CMS_<NAME>_CONFIG`, the config file when `--config` is not given.
    pub fn config_from_env(&self) -> Option<PathBuf> {
        std::env::var_os(format!("CMS_{}_CONFIG", self.name.to_ascii_uppercase())).map(Into::into)
    }

    /// Runs in `mode` with the config file at `config_path` (plus `CMS_<NAME>__…` environment
    /// overrides); serving lasts until SIGINT or SIGTERM.
    pub fn start(&self, config_path: Option<&Path>, mode: Mode) -> ExitCode {
        let program = format!("cms-{}", self.name);
        let name = self.name;
        let run = self.run;
        let migrate = self.migrate;
        crate::exit::run(&program, || async move {
            let config: C = crate::config::load(name, config_path)?;
            crate::tls::install_crypto_provider();
            let telemetry = crate::telemetry::init(name, config.telemetry())?;
            let outcome = match mode {
                Mode::Serve => serve(config, run).await,
                Mode::MigrateOnly => match migrate {
                    Some(migrate) => migrate(config).await.map_err(run_error),
                    None => Err(StartError::NoDatabase),
                },
            };
            // No log line for the error: exit::run prints it as the one last line on stderr
            // (where the log goes too), not twice, and not after a timestamp at start-up.
            telemetry.shutdown().await;
            outcome
        })
    }
}

async fn serve<C: ServiceConfig, E: std::error::Error + Send + Sync + 'static>(
    config: C,
    run: fn(C, Listeners, Shutdown) -> ServiceFuture<E>,
) -> Result<(), StartError> {
    let listeners = Listeners::bind(config.server()).await?;
    let shutdown = crate::shutdown::on_signals().map_err(StartError::Signals)?;
    run(config, listeners, shutdown).await.map_err(run_error)
}

fn run_error<E: std::error::Error + Send + Sync + 'static>(e: E) -> StartError {
    StartError::Run(Box::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_takes_a_config_file_and_migrate_only() {
        let args =
            ServerArgs::try_parse_from(["cms-x", "--config", "a.toml", "--migrate-only"]).unwrap();
        assert_eq!(args.config.as_deref(), Some(Path::new("a.toml")));
        assert!(args.migrate_only);
        let args = ServerArgs::try_parse_from(["cms-x", "-c", "b.toml"]).unwrap();
        assert_eq!(args.config.as_deref(), Some(Path::new("b.toml")));
        assert!(!args.migrate_only);
        assert!(ServerArgs::try_parse_from(["cms-x", "--config"]).is_err());
        assert!(ServerArgs::try_parse_from(["cms-x", "extra"]).is_err());
    }
}
