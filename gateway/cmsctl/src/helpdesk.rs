//! `cmsctl helpdesk`: the operator's side of a phone call. Find the caller, see their cards and
//! what may be done with each, and read back what the user types: the cryptogram for an offline
//! unblock, a PIV PUK, a self-service one-time code.
//!
//! The challenge the user reads out is checked against its checksum here, before anything is
//! sent: a typing error is caught at once and costs neither a request nor an audit record.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use clap::{Args, Subcommand};
use cms_proto::common::v1::{Flow, PageRequest, TypedCode};
use cms_proto::directory::v1::{CredentialStatus, UserStatus};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::helpdesk_service_client::HelpdeskServiceClient;
use zeroize::Zeroizing;

use crate::messages::print_json;
use crate::{Cli, Error, Session, connect};

/// The deadline of each helpdesk call: the gateway passes what is left of it downstream.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Challenge lengths a minidriver card gives, in bytes (3DES: 8, AES: 16).
const CHALLENGE_LENGTHS: &[usize] = &[8, 16];

/// Mistyped challenges forgiven at a terminal before giving up.
const TYPING_ATTEMPTS: usize = 3;

#[derive(Subcommand)]
pub enum HelpdeskCmd {
    /// Who the gateway takes this certificate for, with its roles and scope.
    Whoami,
    /// Find users by name, username, email, card serial or employee id (within your scope).
    Search {
        query: String,
        /// At most this many users.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only users with this status: active, disabled or locked (repeat for more).
        #[arg(long = "status")]
        statuses: Vec<String>,
    },
    /// A user's cards, each with what you may do with it and what needs an approval first.
    Cards {
        /// The user's id (from `helpdesk search`).
        user: String,
        /// Also revoked and lost cards.
        #[arg(long)]
        all: bool,
    },
    /// Offline unblock: the response (cryptogram) to the challenge the user reads from their
    /// card. The challenge and its checksum are asked for when not given, and checked here
    /// before anything is sent.
    OfflineResponse(OfflineArgs),
    /// Offline PIV: the card's current PUK, to read to the user (its version is then exposed
    /// and rotated at the card's next online contact).
    Puk(CardArgs),
    /// A one-time code for the user's self-service, shown once.
    OneTimeCode {
        #[arg(long)]
        user: String,
        /// Only for this card; default: any of the user's cards.
        #[arg(long = "card")]
        card: Option<String>,
        #[command(flatten)]
        context: ContextArgs,
    },
}

#[derive(Args)]
pub struct CardArgs {
    /// The user's id (the caller you verified).
    #[arg(long)]
    user: String,
    /// The card's credential id (from `helpdesk cards`).
    #[arg(long)]
    card: String,
    #[command(flatten)]
    context: ContextArgs,
}

#[derive(Args)]
pub struct ContextArgs {
    /// The approval id, when the card's template asks for dual control.
    #[arg(long, default_value = "")]
    approval: String,
    /// Your helpdesk ticket reference, recorded with the decision.
    #[arg(long, default_value = "")]
    ticket: String,
}

#[derive(Args)]
pub struct OfflineArgs {
    #[command(flatten)]
    card: CardArgs,
    /// The challenge as the user reads it (hex; spaces and dashes are ignored). Asked for
    /// when not given.
    #[arg(long)]
    challenge: Option<String>,
    /// The challenge's 4-character checksum. Asked for when not given.
    #[arg(long)]
    checksum: Option<String>,
    /// The challenge comes from the Windows unblock screen, which shows no checksum.
    #[arg(long, conflicts_with = "checksum")]
    windows: bool,
}

/// A request with the helpdesk call deadline.
pub(crate) fn call<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// `PREFIX_SOME_NAME` -> `some-name`.
pub(crate) fn enum_word(proto_name: &str, prefix: &str) -> String {
    proto_name
        .strip_prefix(prefix)
        .unwrap_or(proto_name)
        .to_ascii_lowercase()
        .replace('_', "-")
}

pub(crate) fn action_word(value: i32) -> String {
    gw::HelpdeskAction::try_from(value)
        .map(|a| enum_word(a.as_str_name(), "HELPDESK_ACTION_"))
        .unwrap_or_else(|_| format!("action {value}"))
}

fn card_status_word(value: i32) -> String {
    CredentialStatus::try_from(value)
        .map(|s| enum_word(s.as_str_name(), "CREDENTIAL_STATUS_"))
        .unwrap_or_default()
}

fn user_status_word(value: i32) -> String {
    UserStatus::try_from(value)
        .map(|s| enum_word(s.as_str_name(), "USER_STATUS_"))
        .unwrap_or_default()
}

fn user_status(name: &str) -> Result<UserStatus, Error> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "active" => UserStatus::Active,
        "disabled" => UserStatus::Disabled,
        "locked" => UserStatus::Locked,
        other => {
            return Err(Error::Setup(format!(
                "--status {other:?}: use active, disabled or locked"
            )));
        }
    })
}

pub async fn run(cli: &Cli, command: &HelpdeskCmd) -> Result<bool, Error> {
    // The challenge is read and checked before any connection is made.
    let typed = match command {
        HelpdeskCmd::OfflineResponse(args) => Some(read_challenge(args)?),
        _ => None,
    };
    let session = connect(cli)?;
    let mut client = HelpdeskServiceClient::new(session.channel.clone());
    let json = cli.json;
    match command {
        HelpdeskCmd::Whoami => whoami(&session, &mut client, json).await?,
        HelpdeskCmd::Search {
            query,
            limit,
            statuses,
        } => {
            let statuses = statuses
                .iter()
                .map(|s| user_status(s).map(|s| s as i32))
                .collect::<Result<Vec<_>, _>>()?;
            let r = client
                .search_users(call(gw::SearchUsersRequest {
                    query: query.clone(),
                    page: Some(PageRequest {
                        page_size: *limit,
                        page_token: String::new(),
                    }),
                    statuses,
                }))
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            if json {
                print_json(&r, "cms.gateway.v1.SearchUsersResponse")?;
            } else {
                print_search(&r);
            }
        }
        HelpdeskCmd::Cards { user, all } => {
            let r = client
                .get_user_cards(call(gw::GetUserCardsRequest {
                    user_id: user.clone(),
                    include_inactive: *all,
                }))
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            if json {
                print_json(&r, "cms.gateway.v1.GetUserCardsResponse")?;
            } else {
                print_cards(&r);
            }
        }
        HelpdeskCmd::OfflineResponse(args) => {
            let Some((challenge, flow)) = typed else {
                return Err(Error::Setup("no challenge was read".into()));
            };
            let r = client
                .compute_offline_response(call(gw::ComputeOfflineResponseRequest {
                    user_id: args.card.user.clone(),
                    credential_id: args.card.card.clone(),
                    challenge: Some(challenge),
                    flow: flow as i32,
                    approval_id: args.card.context.approval.clone(),
                    ticket_reference: args.card.context.ticket.clone(),
                }))
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            show_response(&r, json)?;
        }
        HelpdeskCmd::Puk(args) => {
            let r = client
                .read_piv_puk(call(gw::ReadPivPukRequest {
                    user_id: args.user.clone(),
                    credential_id: args.card.clone(),
                    approval_id: args.context.approval.clone(),
                    ticket_reference: args.context.ticket.clone(),
                }))
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            show_puk(&r, json)?;
        }
        HelpdeskCmd::OneTimeCode {
            user,
            card,
            context,
        } => {
            let r = client
                .issue_one_time_code(call(gw::IssueOneTimeCodeRequest {
                    user_id: user.clone(),
                    credential_id: card.clone().unwrap_or_default(),
                    ticket_reference: context.ticket.clone(),
                    approval_id: context.approval.clone(),
                }))
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            if json {
                print_json(&r, "cms.gateway.v1.IssueOneTimeCodeResponse")?;
            } else {
                println!(
                    "one-time code (read it to the user; it is shown once): {}",
                    r.code
                );
                if let Some(t) = &r.expires_at {
                    println!("valid until:  {t}");
                }
                println!("code id:      {}", r.code_id);
            }
        }
    }
    Ok(true)
}

async fn whoami(
    session: &Session,
    client: &mut HelpdeskServiceClient<cms_kit::client::Channel>,
    json: bool,
) -> Result<(), Error> {
    let r = client
        .who_am_i(call(gw::WhoAmIRequest {}))
        .await
        .map_err(|s| session.rpc_error(s))?
        .into_inner();
    if json {
        return print_json(&r, "cms.gateway.v1.WhoAmIResponse");
    }
    let op = r.operator.unwrap_or_default();
    println!("operator:  {} ({})", op.username, op.id);
    println!("identity:  {}", r.peer_identity);
    println!("roles:     {}", op.roles.join(", "));
    let scope = op.scope.unwrap_or_default();
    if scope.org_units.is_empty() && scope.template_ids.is_empty() {
        println!("scope:     everything");
    } else {
        println!(
            "scope:     org units [{}], templates [{}]",
            scope.org_units.join(", "),
            scope.template_ids.join(", ")
        );
    }
    println!("services:  {}", r.allowed_services.join(", "));
    Ok(())
}

fn print_search(r: &gw::SearchUsersResponse) {
    if r.results.is_empty() {
        println!("no user matches");
        return;
    }
    println!(
        "{:<36} {:<16} {:<24} {:<12} {:<8} CARDS",
        "ID", "USERNAME", "NAME", "ORG UNIT", "STATUS"
    );
    for hit in &r.results {
        let u = hit.user.clone().unwrap_or_default();
        println!(
            "{:<36} {:<16} {:<24} {:<12} {:<8} {}",
            u.id,
            u.username,
            u.display_name,
            u.org_unit,
            user_status_word(u.status),
            hit.credential_count
        );
    }
    let more = r
        .page
        .as_ref()
        .is_some_and(|p| !p.next_page_token.is_empty());
    if more {
        println!("(more users match: narrow the query or raise --limit)");
    }
}

fn print_cards(r: &gw::GetUserCardsResponse) {
    let u = r.user.clone().unwrap_or_default();
    println!(
        "user {} {:?} ({}), {}",
        u.id,
        u.username,
        u.display_name,
        user_status_word(u.status)
    );
    if r.cards.is_empty() {
        println!("no cards");
        return;
    }
    for view in &r.cards {
        let c = view.credential.clone().unwrap_or_default();
        println!(
            "card {}  serial {:?}  {}  template {:?}",
            c.id,
            c.serial,
            card_status_word(c.status),
            view.template_name
        );
        if view.challenge_length > 0 {
            println!(
                "  challenge: {} hex digits",
                view.challenge_length as usize * 2
            );
        }
        let words = |actions: &[i32]| {
            actions
                .iter()
                .map(|a| action_word(*a))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !view.allowed_actions.is_empty() {
            println!("  you may:   {}", words(&view.allowed_actions));
        }
        if !view.approval_required_actions.is_empty() {
            println!(
                "  approval first: {}",
                words(&view.approval_required_actions)
            );
        }
        for why in &view.restrictions {
            println!("  not now:   {why}");
        }
    }
}

/// The challenge to send and its flow: from the options, else asked for (again after a
/// typing error when a person is at the terminal).
fn read_challenge(args: &OfflineArgs) -> Result<(TypedCode, Flow), Error> {
    let flow = if args.windows {
        Flow::WindowsUnblockScreen
    } else {
        Flow::OfflineHelpdesk
    };
    let interactive = std::io::stdin().is_terminal();
    let attempts = if interactive && args.challenge.is_none() {
        TYPING_ATTEMPTS
    } else {
        1
    };
    let mut last = None;
    for _ in 0..attempts {
        let hex = match &args.challenge {
            Some(c) => Zeroizing::new(c.clone()),
            None => ask("challenge (as the user reads it)", interactive)?,
        };
        let checksum = match (&args.checksum, args.windows) {
            (_, true) => Zeroizing::new(String::new()),
            (Some(c), false) => Zeroizing::new(c.clone()),
            (None, false) => ask("its checksum (4 characters)", interactive)?,
        };
        let parsed = if args.windows {
            cms_cardcrypto::parse_hex(&hex, CHALLENGE_LENGTHS)
        } else {
            cms_cardcrypto::parse_with_checksum(&hex, &checksum, CHALLENGE_LENGTHS)
        };
        match parsed {
            Ok(bytes) => {
                let code = TypedCode {
                    hex: cms_cardcrypto::format_groups(&bytes),
                    checksum: if args.windows {
                        String::new()
                    } else {
                        cms_cardcrypto::checksum(&bytes)
                    },
                };
                return Ok((code, flow));
            }
            Err(e) => {
                if attempts > 1 {
                    eprintln!("challenge: {e}; type it again");
                }
                last = Some(e);
            }
        }
    }
    Err(Error::Setup(format!(
        "challenge: {}; nothing was sent",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

/// One line from standard input, prompted for on a terminal.
fn ask(prompt: &str, interactive: bool) -> Result<Zeroizing<String>, Error> {
    if interactive {
        eprint!("{prompt}: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = Zeroizing::new(String::new());
    let read = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Error::Setup(format!("reading the {prompt}: {e}")))?;
    if read == 0 {
        return Err(Error::Setup(format!(
            "the {prompt} was not given (--challenge/--checksum or standard input)"
        )));
    }
    Ok(Zeroizing::new(line.trim().to_owned()))
}

/// Shows the response only when its checksum holds: a garbled answer must not be read out.
fn show_response(r: &gw::ComputeOfflineResponseResponse, json: bool) -> Result<(), Error> {
    let code = r.response.clone().unwrap_or_default();
    let bytes = cms_cardcrypto::parse_with_checksum(&code.hex, &code.checksum, CHALLENGE_LENGTHS)
        .map_err(|e| Error::Setup(format!("the response the gateway returned: {e}")))?;
    if json {
        return print_json(r, "cms.gateway.v1.ComputeOfflineResponseResponse");
    }
    println!("response (read it to the user, then the checksum):");
    println!(
        "  {}   checksum {}",
        cms_cardcrypto::format_groups(&bytes),
        cms_cardcrypto::checksum(&bytes)
    );
    println!(
        "request id {} (master key version {})",
        r.request_id, r.master_key_version
    );
    Ok(())
}

fn show_puk(r: &gw::ReadPivPukResponse, json: bool) -> Result<(), Error> {
    if let Some(code) = &r.puk_code
        && !code.hex.is_empty()
    {
        cms_cardcrypto::parse_with_checksum(&code.hex, &code.checksum, &[])
            .map_err(|e| Error::Setup(format!("the PUK the gateway returned: {e}")))?;
    }
    if json {
        return print_json(r, "cms.gateway.v1.ReadPivPukResponse");
    }
    println!("PUK (read it to the user): {}", r.puk);
    if let Some(code) = &r.puk_code {
        println!(
            "as hex, for the Windows unblock screen: {}   checksum {}",
            code.hex, code.checksum
        );
    }
    println!(
        "PUK version {} is now exposed; the agent rotates it at the card's next online contact",
        r.puk_version
    );
    println!("request id {}", r.request_id);
    Ok(())
}
