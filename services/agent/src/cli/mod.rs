//! The commands for the person at the PC. They use a running agent's Unix socket, or, with
//! `--direct` (or when no agent socket exists), the readers from this process. Errors are one
//! line; outcomes are one plain line, or one JSON object per line with `--json`.

mod output;
mod prompt;
mod unblock;

use std::path::PathBuf;
use std::process::ExitCode;

use cms_agent::CardSettings;
use cms_agent::client::Api;
use tokio_stream::StreamExt;

/// Default socket of a systemd-managed agent.
const DEFAULT_SOCKET: &str = "/run/cms-agent/agent.sock";

#[derive(Debug, clap::Parser)]
#[command(
    name = "cms-agent",
    version,
    about = "CMS card agent: the service beside the card readers, and its commands"
)]
pub struct Args {
    /// Config file of the service (also CMS_AGENT_CONFIG).
    #[arg(long, short = 'c', global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// How the commands reach the cards.
#[derive(Debug, Clone, clap::Args)]
pub struct Connect {
    /// The running agent's socket (also CMS_AGENT_SOCKET).
    #[arg(long, env = "CMS_AGENT_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Use the readers from this process (no agent service needed); the default when the
    /// socket does not exist.
    #[arg(long)]
    pub direct: bool,
    /// Print JSON (one object per line) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the agent service (the default).
    Serve,
    /// List the card readers and whether a card is in them.
    Readers(Connect),
    /// Show the card in a reader: profile, identifier, PIN and admin/PUK tries left.
    Card {
        #[command(flatten)]
        connect: Connect,
        /// Reader name (default: the only reader holding a card).
        #[arg(long)]
        reader: Option<String>,
    },
    /// Print reader and card events until interrupted.
    Watch(Connect),
    /// Unblock the card's PIN offline with the helpdesk: challenge and response (minidriver
    /// cards) or the PUK (PIV cards).
    Unblock(unblock::UnblockArgs),
    /// Unblock a System Owner token with its unblock key (no server needed).
    SoUnblock(unblock::SoUnblockArgs),
}

/// Runs a command on a small runtime; the exit code says how it went. With `--config`, direct
/// mode uses that config's `[cards]` (its PIN policy, or its virtual card).
pub fn run(command: Command, config: Option<&std::path::Path>) -> ExitCode {
    let cards = match config {
        Some(path) => match cms_kit::config::load::<cms_agent::Config>("agent", Some(path)) {
            Ok(config) => config.cards,
            Err(e) => {
                eprintln!("cms-agent: {e}");
                return ExitCode::from(2);
            }
        },
        None => CardSettings::default(),
    };
    let _ = CARDS.set(cards);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cms-agent: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async move {
        match command {
            Command::Serve => Ok(ExitCode::SUCCESS),
            Command::Readers(connect) => readers(&connect).await,
            Command::Card { connect, reader } => {
                card(&connect, reader.as_deref().unwrap_or("")).await
            }
            Command::Watch(connect) => watch(&connect).await,
            Command::Unblock(args) => unblock::unblock(args).await,
            Command::SoUnblock(args) => unblock::so_unblock(args).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(message) => {
            eprintln!("cms-agent: {message}");
            ExitCode::from(2)
        }
    }
}

/// `[cards]` of the config given with `--config` (direct mode).
static CARDS: std::sync::OnceLock<CardSettings> = std::sync::OnceLock::new();

/// The API the flags ask for.
pub async fn connect(connect: &Connect) -> Result<Api, String> {
    if connect.direct || !connect.socket.exists() {
        let settings = CARDS.get_or_init(CardSettings::default);
        let readers = cms_agent::readers_for(settings).map_err(|e| e.to_string())?;
        return Ok(Api::direct(readers, settings));
    }
    Api::socket(&connect.socket)
        .await
        .map_err(|e| e.to_string())
}

/// One line for a gRPC status (its message is already meant for people).
pub fn one_line(status: &tonic::Status) -> String {
    status.message().lines().next().unwrap_or("").to_owned()
}

async fn readers(c: &Connect) -> Result<ExitCode, String> {
    let mut api = connect(c).await?;
    let readers = api.readers().await.map_err(|s| one_line(&s))?;
    output::readers(&readers, c.json);
    Ok(ExitCode::SUCCESS)
}

async fn card(c: &Connect, reader: &str) -> Result<ExitCode, String> {
    let mut api = connect(c).await?;
    let card = api.card(reader).await.map_err(|s| one_line(&s))?;
    output::card(&card, c.json);
    Ok(ExitCode::SUCCESS)
}

async fn watch(c: &Connect) -> Result<ExitCode, String> {
    let mut api = connect(c).await?;
    let mut events = api.watch(true).await.map_err(|s| one_line(&s))?;
    while let Some(event) = events.next().await {
        let event = event.map_err(|s| one_line(&s))?;
        if let Some(event) = event.event {
            output::event(&event, c.json);
        }
    }
    Ok(ExitCode::SUCCESS)
}
