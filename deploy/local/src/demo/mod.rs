//! `cms demo`: the product's central scene on a freshly started system. A user whose card PIN
//! is blocked phones the helpdesk: the card agent shows the card's challenge, the operator
//! gets the response through the gateway, the agent applies it with a new PIN, and the card
//! accepts the new PIN. Then a System Owner token is unblocked with its unblock key, by the
//! agent alone.
//!
//! [`prepare`] sets the system up through the gateway ([`setup`]), [`scene`] walks through
//! the two unblocks over virtual cards ([`card`]) with the operators of [`access`].

pub mod access;
pub mod card;
pub mod scene;
pub mod setup;

use std::net::SocketAddr;
use std::path::PathBuf;

use cms_cardcrypto::{KeyAlgorithm, SecretKey};
use cms_proto::directory::v1::{Credential, User};
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;

use crate::layout::Layout;
use scene::Narrator;
use setup::{CardRecord, SoToken};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] cms_kit::pki::PkiError),
    #[error(transparent)]
    Tls(#[from] cms_kit::tls::TlsError),
    #[error(transparent)]
    Client(#[from] cms_kit::client::ClientError),
    #[error("{step}: the gateway answered {code:?}: {message}")]
    Rpc {
        step: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("{0}")]
    Failed(String),
}

/// Reader names of the two virtual cards (the first is the agent service's virtual card).
pub const USER_READER: &str = cms_agent::VIRTUAL_READER;
pub const SO_READER: &str = "CMS Virtual Card 00 01";

/// Where the demo keeps its card files.
pub fn cards_dir(layout: &Layout) -> PathBuf {
    layout.data_dir.join("demo")
}

/// The user's card file (the agent service serves it once the walk-through is over).
pub fn user_card_file(layout: &Layout) -> PathBuf {
    cards_dir(layout).join("user-card.toml")
}

fn so_card_file(layout: &Layout) -> PathBuf {
    cards_dir(layout).join("so-token.toml")
}

/// What [`prepare`] made.
pub struct Prepared {
    pub user: User,
    pub card: Credential,
    pub user_card: PathBuf,
    pub so_card: PathBuf,
    pub so: SoToken,
}

/// Sets the system behind `gateway` up for the demo, as the dev operator: the master key, the
/// template, the user and their blocked card, the helpdesk and approver operators (accounts
/// and certificates), and the System Owner token with its blocked card.
pub async fn prepare(
    layout: &Layout,
    gateway: SocketAddr,
    n: &Narrator,
) -> Result<Prepared, DemoError> {
    let dir = cards_dir(layout);
    std::fs::create_dir_all(&dir).map_err(|source| DemoError::Io {
        path: dir.clone(),
        source,
    })?;
    let mut admin = AdminServiceClient::new(access::operator_channel(
        layout,
        gateway,
        crate::bootstrap::dev_admin_username(),
    )?);
    n.title("Setting the system up (as the dev operator, through the gateway)");

    let master = SecretKey::new(KeyAlgorithm::Aes128, &setup::random(16)?)
        .map_err(|e| DemoError::Failed(format!("master key: {e}")))?;
    let version = setup::import_master_key(&mut admin, setup::MASTER_KEY, &master).await?;
    n.say(
        "admin",
        &format!(
            "master key {:?} version {version} imported in a two-component key ceremony",
            setup::MASTER_KEY
        ),
    );
    let (template_id, template_version) =
        setup::create_template(&mut admin, setup::template_spec(setup::MASTER_KEY)).await?;
    n.say(
        "admin",
        "card template \"Demo minidriver card\": AES admin keys, offline unblock by the helpdesk role",
    );
    let user = setup::create_user(&mut admin, setup::USERNAME).await?;
    n.say(
        "admin",
        &format!("user {} ({})", user.username, user.display_name),
    );

    // The personalisation bureau: the card gets its diversified admin key, and (for the demo)
    // a PIN the user has already forgotten.
    let card_id = setup::random(cms_card::minidriver::CARD_ID_LEN)?;
    let serial = data_encoding::HEXUPPER.encode(&card_id);
    let user_card = user_card_file(layout);
    card::write_blocked_card(
        &user_card,
        &card_id,
        1,
        setup::admin_key(&master, &card_id, version)?,
    )?;
    drop(master);
    let card = setup::register_card(
        &mut admin,
        &CardRecord {
            user_id: user.id.clone(),
            profile: cms_proto::common::v1::CardProfile::Minidriver,
            card_id: card_id.to_vec(),
            serial,
            template_id,
            template_version,
            master_key_version: version,
        },
    )
    .await?;
    n.say(
        "admin",
        &format!(
            "card {} issued to {} (its PIN is blocked)",
            card.serial, user.username
        ),
    );

    for (name, roles) in [
        (access::HELPDESK, &["helpdesk"][..]),
        (access::APPROVER, &["approver", "helpdesk"][..]),
    ] {
        access::ensure_operator_cert(layout, name)?;
        setup::create_operator(&mut admin, name, roles).await?;
        n.say(
            "admin",
            &format!(
                "operator {name:?} (roles {}), certificate pki/operator-{name}.pem",
                roles.join(", ")
            ),
        );
    }

    let so_card_id = setup::random(cms_card::minidriver::CARD_ID_LEN)?;
    let so = setup::init_so_token(&mut admin, &so_card_id).await?;
    let so_card = so_card_file(layout);
    card::write_blocked_card(&so_card, &so_card_id, 2, so.key.clone())?;
    n.say(
        "admin",
        &format!("System Owner token {:?} initialised", setup::SO_LABEL),
    );
    Ok(Prepared {
        user,
        card,
        user_card,
        so_card,
        so,
    })
}

/// [`prepare`], then both unblocks. The card files are closed again when this returns, so
/// the agent service can take the user's card over.
pub async fn walk_through(
    layout: &Layout,
    gateway: SocketAddr,
    n: &Narrator,
) -> Result<Prepared, DemoError> {
    let prepared = prepare(layout, gateway, n).await?;
    let helpdesk = access::operator_channel(layout, gateway, access::HELPDESK)?;
    let identity = layout
        .pki()
        .spiffe_id(&format!("operator/{}", access::HELPDESK))?
        .to_string();
    let reader = card::insert(&prepared.user_card)?;
    scene::offline_unblock(
        n,
        scene::OfflineCall {
            reader_name: USER_READER,
            reader: &reader,
            helpdesk,
            operator_identity: identity,
            search: "dana",
            user_id: &prepared.user.id,
            credential_id: &prepared.card.id,
        },
    )
    .await?;
    drop(reader);
    let so_reader = card::insert(&prepared.so_card)?;
    scene::so_unblock(n, SO_READER, &so_reader, &prepared.so).await?;
    Ok(prepared)
}
