//! `cms`: the local launcher. `cms up` runs the whole system on this machine with embedded
//! defaults; `cms demo` does the same on a fresh system and first walks through an offline
//! unblock; `cms pki init` makes the dev PKI; `cms serve <service>` runs one service in the
//! foreground (what `up` starts for each service).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cms_launcher::bootstrap;
use cms_launcher::layout::{self, Layout, Peers, Ports, START_ORDER};
use cms_launcher::supervise::{self, Service};

#[derive(Parser)]
#[command(
    name = "cms",
    version,
    about = "Smart-card PIN unblock CMS: local launcher"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start all five services on 127.0.0.1, restart any that dies, and stop them on Ctrl-C
    /// or SIGTERM. Creates the dev operator account `admin` in the directory if missing.
    Up {
        #[command(flatten)]
        data: DataArgs,
        /// First port: gateway BASE, template +1, directory +2, custody +3, agent +4; their
        /// plaintext ops ports are +10 each. Used only when a config is first written.
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
    },
    /// The central scene on a fresh system: a user's blocked card unblocked offline with the
    /// helpdesk through the gateway, then a System Owner token unblocked by the agent alone;
    /// then the system stays up (Ctrl-C stops it) for the console, cmsctl and cms-agent.
    /// Pauses between steps when standard input is a terminal.
    Demo(demo_run::DemoArgs),
    /// Development PKI.
    Pki {
        #[command(subcommand)]
        command: PkiCmd,
    },
    /// Operator accounts in the directory.
    Operator {
        #[command(subcommand)]
        command: OperatorCmd,
    },
    /// Run one service in the foreground.
    Serve {
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(START_ORDER))]
        service: String,
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create the CA and every missing certificate under <data-dir>/pki.
    Init {
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Subcommand)]
enum OperatorCmd {
    /// Create an operator account, unless one with that username exists, directly in the
    /// directory with the gateway's certificate: for an installation's first admin (on the
    /// gateway's host in production). Defaults: the files of a local `cms up` data directory.
    Add {
        #[command(flatten)]
        data: DataArgs,
        /// Username: the <name> in the operator certificate's spiffe://<td>/cms/operator/<name>.
        name: String,
        /// A role (repeat for more): helpdesk, approver, template-admin, key-custodian,
        /// auditor, admin.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// The directory's address. Default: <data-dir>/run/directory.addr.
        #[arg(long)]
        directory: Option<String>,
        /// The SPIFFE ID the directory must present. Default: that of <data-dir>/pki/directory.pem.
        #[arg(long)]
        directory_id: Option<cms_kit::SpiffeId>,
        /// CA bundle. Default: <data-dir>/pki/ca.pem.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The gateway's certificate. Default: <data-dir>/pki/gateway.pem.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// The gateway's private key. Default: <data-dir>/pki/gateway.key.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct DataArgs {
    /// Where the PKI, configs, databases and logs live.
    #[arg(long, env = "CMS_DATA_DIR", default_value = "./cms-data")]
    data_dir: PathBuf,
    /// SPIFFE trust domain of the dev PKI.
    #[arg(long, default_value = layout::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error(transparent)]
    Pki(#[from] cms_kit::pki::PkiError),
    #[error(transparent)]
    Supervise(#[from] supervise::SuperviseError),
    #[error("creating the dev operator account: {0}")]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("demo: {0}")]
    Demo(#[from] cms_launcher::demo::DemoError),
    #[error("{0}")]
    Failed(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { service, config } => serve(&service, &config),
        Cmd::Pki {
            command: PkiCmd::Init { data },
        } => cms_kit::exit::run("cms", || async move { pki_init(&data) }),
        Cmd::Operator { command } => {
            cms_kit::exit::run("cms", || async move { operator(command).await })
        }
        Cmd::Up { data, base_port } => {
            cms_kit::exit::run("cms", || async move { up(&data, base_port).await })
        }
        Cmd::Demo(args) => cms_kit::exit::run("cms", || async move { demo_run::run(&args).await }),
    }
}

mod demo_run;

fn serve(service: &str, config: &Path) -> ExitCode {
    use cms_kit::service::Mode::Serve;
    let config = Some(config);
    match service {
        "template" => cms_template::PROGRAM.start(config, Serve),
        "directory" => cms_directory::PROGRAM.start(config, Serve),
        "custody" => cms_custody::PROGRAM.start(config, Serve),
        "gateway" => cms_gateway::PROGRAM.start(config, Serve),
        "agent" => cms_agent::PROGRAM.start(config, Serve),
        other => {
            eprintln!("cms: unknown service {other:?}");
            ExitCode::from(2)
        }
    }
}

fn layout_of(data: &DataArgs) -> Result<Layout, Error> {
    let layout = Layout::new(&data.data_dir, &data.trust_domain)?;
    layout.create_dirs()?;
    Ok(layout)
}

fn pki_init(data: &DataArgs) -> Result<(), Error> {
    let layout = layout_of(data)?;
    let pki = layout.pki();
    let written = pki.init()?;
    if written.is_empty() {
        println!(
            "dev PKI in {} is complete; nothing to do",
            pki.dir.display()
        );
    } else {
        println!(
            "dev PKI in {} (trust domain {}):",
            pki.dir.display(),
            layout.trust_domain
        );
        for path in written {
            println!("  wrote {}", path.display());
        }
    }
    Ok(())
}

async fn operator(command: OperatorCmd) -> Result<(), Error> {
    let OperatorCmd::Add {
        data,
        name,
        roles,
        directory,
        directory_id,
        ca,
        cert,
        key,
    } = command;
    for role in &roles {
        if !cms_gateway::Role::ALL.iter().any(|r| r.as_str() == role) {
            let known: Vec<&str> = cms_gateway::Role::ALL.iter().map(|r| r.as_str()).collect();
            return Err(Error::Failed(format!(
                "--role {role:?}: use one of {}",
                known.join(", ")
            )));
        }
    }
    let pki = data.data_dir.join("pki");
    let address = match directory {
        Some(a) => a,
        None => {
            let path = data.data_dir.join("run").join("directory.addr");
            cms_kit::server::read_announce(&path)
                .map(|(grpc, _)| grpc.to_string())
                .ok_or_else(|| {
                    Error::Failed(format!(
                        "no --directory given and {} names no running directory",
                        path.display()
                    ))
                })?
        }
    };
    let identity = match directory_id {
        Some(id) => id,
        None => {
            let path = pki.join("directory.pem");
            let pem = std::fs::read(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            cms_kit::pki::spiffe_id_of_pem(&pem)
                .map_err(|e| Error::Failed(format!("{}: {e}", path.display())))?
        }
    };
    let access = bootstrap::DirectoryAccess {
        tls: cms_kit::tls::TlsSettings {
            ca: ca.unwrap_or_else(|| pki.join("ca.pem")),
            cert: cert.unwrap_or_else(|| pki.join("gateway.pem")),
            key: key.unwrap_or_else(|| pki.join("gateway.key")),
            reload_interval_ms: 0,
        },
        upstream: cms_kit::client::UpstreamSettings {
            address,
            identity,
            connect_timeout_ms: 3_000,
        },
    };
    let roles: Vec<&str> = roles.iter().map(String::as_str).collect();
    match bootstrap::ensure_operator(&access, &name, &roles).await? {
        bootstrap::Ensured::Created => {
            println!(
                "created the operator account {name:?} with roles [{}]",
                roles.join(", ")
            );
        }
        bootstrap::Ensured::Present { active, roles } => {
            println!(
                "the operator account {name:?} exists ({}, roles [{}]); left as it is",
                if active { "active" } else { "disabled" },
                roles.join(", ")
            );
        }
    }
    Ok(())
}

/// gRPC and ops ports of a service for a first-time config.
fn default_ports(service: &str, base: u16) -> Result<Ports, Error> {
    let offset = match service {
        "gateway" => 0,
        "template" => 1,
        "directory" => 2,
        "custody" => 3,
        _ => 4,
    };
    let port = |delta: u16| {
        base.checked_add(delta).ok_or_else(|| {
            Error::Failed(format!("--base-port {base} leaves no room for the ports"))
        })
    };
    Ok(Ports {
        grpc: SocketAddr::from((Ipv4Addr::LOCALHOST, port(offset)?)),
        ops: SocketAddr::from((Ipv4Addr::LOCALHOST, port(offset + 10)?)),
    })
}

async fn up(data: &DataArgs, base_port: u16) -> Result<(), Error> {
    let layout = layout_of(data)?;
    let written = layout.pki().init()?;
    if !written.is_empty() {
        println!("created the dev PKI in {}", layout.pki().dir.display());
    }
    write_configs(&layout, base_port, |_| String::new())?;

    let exe = current_exe()?;
    let shutdown = signals()?;
    let mut running: Vec<Service> = Vec::new();
    if !start_services(&exe, &layout, &START_ORDER, &shutdown, &mut running).await? {
        return Ok(());
    }

    println!("\nCMS is up. Data: {}", layout.data_dir.display());
    print_running(&layout, &running);
    println!(
        "Status: cargo run --release --bin cmsctl -- --data-dir {} status",
        layout.data_dir.display()
    );
    println!("Ctrl-C stops everything.");

    let outcome = watch(&exe, &layout, &mut running, &shutdown).await;
    println!("stopping ...");
    supervise::stop_all(&mut running, Duration::from_secs(15)).await;
    println!("stopped");
    outcome
}

/// Writes each service's config unless it exists; `extra(service)` is appended to a new one.
fn write_configs(
    layout: &Layout,
    base_port: u16,
    extra: impl Fn(&str) -> String,
) -> Result<(), Error> {
    let peers = Peers {
        template: Some(default_ports("template", base_port)?.grpc),
        directory: Some(default_ports("directory", base_port)?.grpc),
        custody: Some(default_ports("custody", base_port)?.grpc),
        gateway: Some(default_ports("gateway", base_port)?.grpc),
    };
    for name in START_ORDER {
        let path = layout.config_path(name);
        if path.exists() {
            continue;
        }
        let text =
            layout.service_config(name, default_ports(name, base_port)?, &peers, &extra(name))?;
        std::fs::write(&path, text).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

fn current_exe() -> Result<PathBuf, Error> {
    std::env::current_exe().map_err(|source| Error::Io {
        path: "current executable".into(),
        source,
    })
}

fn signals() -> Result<cms_kit::shutdown::Shutdown, Error> {
    cms_kit::shutdown::on_signals().map_err(|source| Error::Io {
        path: "signal handlers".into(),
        source,
    })
}

/// Starts `names` in order into `running`, making sure the dev operator has its account once
/// the directory runs. Ok(false): a signal came first (everything started is stopped again).
/// On an error, everything started is stopped too.
async fn start_services(
    exe: &Path,
    layout: &Layout,
    names: &[&'static str],
    shutdown: &cms_kit::shutdown::Shutdown,
    running: &mut Vec<Service>,
) -> Result<bool, Error> {
    for &name in names {
        println!("starting {name} ...");
        let started = tokio::select! {
            r = supervise::start(exe, layout, name, Duration::from_secs(60)) => r,
            () = shutdown.wait() => {
                supervise::stop_all(running, Duration::from_secs(15)).await;
                return Ok(false);
            }
        };
        match started {
            Ok(service) if name == "directory" => {
                let directory = service.grpc;
                running.push(service);
                // The dev operator needs its account before anyone uses cmsctl.
                match bootstrap::ensure_dev_admin(layout, directory).await {
                    Ok(Some(line)) => println!("{line}"),
                    Ok(None) => {}
                    Err(e) => {
                        supervise::stop_all(running, Duration::from_secs(15)).await;
                        return Err(e.into());
                    }
                }
            }
            Ok(service) => running.push(service),
            Err(e) => {
                supervise::stop_all(running, Duration::from_secs(15)).await;
                return Err(e.into());
            }
        }
    }
    Ok(true)
}

/// The table of running services: addresses and identities.
fn print_running(layout: &Layout, running: &[Service]) {
    println!(
        "  {:<10} {:<22} {:<22} identity",
        "service", "gRPC (mTLS)", "ops (/readyz)"
    );
    for s in running {
        let id = layout
            .pki()
            .spiffe_id(s.name)
            .map(|i| i.to_string())
            .unwrap_or_default();
        println!(
            "  {:<10} {:<22} {:<22} {id}",
            s.name,
            s.grpc.to_string(),
            s.ops.to_string()
        );
    }
    if let Some(gateway) = running.iter().find(|s| s.name == "gateway") {
        // The console is served on the gateway's mTLS port; browsers need the operator's
        // certificate as PKCS#12. Not fatal: cmsctl works without it.
        let console = format!("https://localhost:{}/", gateway.grpc.port());
        match cms_launcher::browser_cert::ensure_operator_files(&layout.pki()) {
            Ok(certs) => print!(
                "{}",
                cms_launcher::browser_cert::console_instructions(
                    &console,
                    &certs,
                    &layout.pki().ca_path()
                )
            ),
            Err(e) => eprintln!("note: console {console}: no PKCS#12 file for the browser: {e}"),
        }
    }
    println!("Logs: {}", layout.data_dir.join("logs").display());
}

/// Waits for a signal (Ok), restarting each service that dies with a backoff; Err when a
/// service cannot be brought back (its start failed `Backoff::MAX_FAILED_STARTS` times in a row).
async fn watch(
    exe: &Path,
    layout: &Layout,
    running: &mut [Service],
    shutdown: &cms_kit::shutdown::Shutdown,
) -> Result<(), Error> {
    let mut backoffs: Vec<supervise::Backoff> = running
        .iter()
        .map(|_| supervise::Backoff::default())
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            () = shutdown.wait() => return Ok(()),
            _ = tick.tick() => {}
        }
        for (service, backoff) in running.iter_mut().zip(backoffs.iter_mut()) {
            let Ok(Some(status)) = service.process.try_wait() else {
                continue;
            };
            let delay = backoff.delay();
            println!(
                "{} stopped unexpectedly ({status}); restarting it in {} s (log: {})",
                service.name,
                delay.as_secs(),
                service.log.display()
            );
            let started = tokio::select! {
                () = shutdown.wait() => return Ok(()),
                r = async {
                    tokio::time::sleep(delay).await;
                    supervise::start(exe, layout, service.name, Duration::from_secs(60)).await
                } => r,
            };
            match started {
                Ok(fresh) => {
                    backoff.started();
                    println!(
                        "{} restarted (pid {}) on {}",
                        fresh.name,
                        fresh.process.id().unwrap_or_default(),
                        fresh.grpc
                    );
                    *service = fresh;
                }
                Err(e) => {
                    let again = backoff.failed_start();
                    println!(
                        "{} did not come back: {}",
                        service.name,
                        cms_kit::exit::one_line(&e)
                    );
                    if !again {
                        return Err(Error::Failed(format!(
                            "{} stopped unexpectedly and failed to start {} times in a row; giving up. Last lines of {}:\n{}",
                            service.name,
                            supervise::Backoff::MAX_FAILED_STARTS,
                            service.log.display(),
                            supervise::tail(&service.log, 20)
                        )));
                    }
                }
            }
        }
    }
}
