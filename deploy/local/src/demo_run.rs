//! `cms demo`: a fresh system like `cms up`, the walk-through of cms_launcher::demo, then the
//! system stays up with the user's card in the agent until Ctrl-C.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cms_launcher::demo::{self, scene::Narrator};
use cms_launcher::layout::{self, Layout};
use cms_launcher::supervise::{self, Service};

use crate::{Error, current_exe, print_running, signals, start_services, watch, write_configs};

/// What marks a data directory as the demo's own, to be made afresh on the next run.
const MARKER: &str = "CMS-DEMO";

/// The line that says the walk-through is over and the system serves (tests wait for it).
pub const SYSTEM_IS_UP: &str = "The demo system is up.";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where the demo's system lives. Made afresh on every run (only the PKI is kept, so a
    /// certificate imported into a browser stays valid); a directory that an earlier
    /// `cms demo` did not make is refused.
    #[arg(long, env = "CMS_DEMO_DIR", default_value = "./cms-demo")]
    data_dir: PathBuf,
    /// SPIFFE trust domain of the dev PKI.
    #[arg(long, default_value = layout::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// First port, as for `cms up` (gateway BASE, template +1, ...; ops ports +10). Not 7400,
    /// so that the demo and `cms up` can run side by side.
    #[arg(long, default_value_t = 7500)]
    base_port: u16,
}

pub async fn run(args: &DemoArgs) -> Result<(), Error> {
    let layout = fresh(&args.data_dir, &args.trust_domain)?;
    layout.pki().init()?;
    let card_file = demo::user_card_file(&layout);
    write_configs(&layout, args.base_port, |name| {
        if name == "agent" {
            // The agent serves the demo's virtual card from an in-process reader.
            let path = toml::Value::from(card_file.display().to_string());
            format!("[cards]\nvirtual_card = {path}\n")
        } else {
            String::new()
        }
    })?;

    let exe = current_exe()?;
    let shutdown = signals()?;
    let mut running: Vec<Service> = Vec::new();
    let (servers, agent) = layout::START_ORDER.split_at(layout::START_ORDER.len() - 1);
    if !start_services(&exe, &layout, servers, &shutdown, &mut running).await? {
        return Ok(());
    }
    let gateway = running
        .iter()
        .find(|s| s.name == "gateway")
        .map(|s| s.grpc)
        .ok_or_else(|| Error::Failed("the gateway did not start".into()))?;

    let narrator = Narrator::new();
    let walked = tokio::select! {
        r = demo::walk_through(&layout, gateway, &narrator) => Some(r),
        () = shutdown.wait() => None,
    };
    let prepared = match walked {
        Some(Ok(prepared)) => prepared,
        Some(Err(e)) => {
            supervise::stop_all(&mut running, Duration::from_secs(15)).await;
            return Err(e.into());
        }
        None => {
            supervise::stop_all(&mut running, Duration::from_secs(15)).await;
            return Ok(());
        }
    };

    // The walk-through has let go of the card file: the agent service takes the card over.
    println!();
    if !start_services(&exe, &layout, agent, &shutdown, &mut running).await? {
        return Ok(());
    }
    println!();
    print_running(&layout, &running);
    print_how_to_try(&layout, gateway, &prepared);
    println!("\n{SYSTEM_IS_UP} Ctrl-C stops it.");

    let outcome = watch(&exe, &layout, &mut running, &shutdown).await;
    println!("stopping ...");
    supervise::stop_all(&mut running, Duration::from_secs(15)).await;
    println!("stopped");
    outcome
}

/// The demo's data directory, emptied of an earlier run's state (its PKI is kept).
fn fresh(dir: &Path, trust_domain: &str) -> Result<Layout, Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    if dir.exists() {
        let entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .collect::<Result<_, _>>()
            .map_err(io(dir))?;
        if !entries.is_empty() && !dir.join(MARKER).exists() {
            return Err(Error::Failed(format!(
                "{} exists and was not made by `cms demo`; it is left alone: give another --data-dir",
                dir.display()
            )));
        }
        for entry in entries {
            let path = entry.path();
            if entry.file_name() == "pki" {
                continue;
            }
            if path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            } else {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
    }
    let layout = Layout::new(dir, trust_domain)?;
    layout.create_dirs()?;
    let marker = dir.join(MARKER);
    std::fs::write(
        &marker,
        "made by `cms demo`; the next `cms demo` empties this directory (keeping pki/)\n",
    )
    .map_err(io(&marker))?;
    Ok(layout)
}

fn print_how_to_try(layout: &Layout, gateway: std::net::SocketAddr, p: &demo::Prepared) {
    let data = layout.data_dir.display();
    let pki = layout.data_dir.join("pki");
    let agent_socket = layout.service_dir("agent").join("agent.sock");
    println!("\nTry it yourself, in another terminal:");
    println!("  export CMS_DATA_DIR={data}");
    println!("  cargo run --release --bin cmsctl -- status");
    println!("  # as the helpdesk operator:");
    println!(
        "  export CMSCTL_CERT={0}/operator-helpdesk.pem CMSCTL_KEY={0}/operator-helpdesk.key",
        pki.display()
    );
    println!("  cargo run --release --bin cmsctl -- helpdesk search dana");
    println!(
        "  cargo run --release --bin cmsctl -- helpdesk cards {}",
        p.user.id
    );
    println!("  # the user's card is now in the agent; it shows a new challenge:");
    println!(
        "  cargo run --release --bin cms-agent -- unblock --socket {}",
        agent_socket.display()
    );
    println!(
        "  cargo run --release --bin cmsctl -- helpdesk offline-response --user {} --card {}",
        p.user.id, p.card.id
    );
    println!(
        "The web console (https://localhost:{}/, see above): import operator-helpdesk.p12 for the \
         helpdesk, operator-approver.p12 for a second operator who approves.",
        gateway.port()
    );
}
