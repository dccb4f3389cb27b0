//! The walk-through: the offline unblock on the phone with the helpdesk, then the System Owner
//! unblock, printing what the user and the operator see at each step.
//!
//! The user's side is the card agent's own code (`cms_agent::client::Api`, as its CLI and
//! desktop app use it) over the virtual card in an in-process reader; the operator's side is
//! the gateway's HelpdeskService with the helpdesk operator's certificate, as cmsctl and the
//! console use it. The new PIN is checked by the card itself (VERIFY).

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

use cms_agent::CardSettings;
use cms_agent::card::sim::SimReaders;
use cms_agent::client::Api;
use cms_card::sim::SimReader;
use cms_kit::client::Channel;
use cms_proto::agent::v1::{ApplyResponseRequest, UnblockOutcome, UnblockSoTokenRequest};
use cms_proto::common::v1::{Flow, KeyAlgorithm as ProtoAlgorithm, PageRequest, TypedCode};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::helpdesk_service_client::HelpdeskServiceClient;
use zeroize::Zeroizing;

use super::DemoError;
use super::setup::SoToken;

/// Prints the steps; pauses between them when a person is at the terminal.
pub struct Narrator {
    /// One message per line typed; `None` when standard input is not a terminal.
    enter: Option<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<()>>>,
}

impl Narrator {
    /// Pauses only when standard input is a terminal. Lines are read on a thread of their
    /// own, so that Ctrl-C during a pause stops the demo at once.
    pub fn new() -> Self {
        if !std::io::stdin().is_terminal() {
            return Narrator { enter: None };
        }
        let (lines, enter) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            while std::io::stdin().lock().read_line(&mut line).unwrap_or(0) > 0 {
                line.clear();
                if lines.send(()).is_err() {
                    break;
                }
            }
        });
        Narrator {
            enter: Some(tokio::sync::Mutex::new(enter)),
        }
    }

    pub fn title(&self, text: &str) {
        println!("\n== {text} ==");
    }

    /// One line, said by `who`: user, operator, card, SO holder.
    pub fn say(&self, who: &str, text: &str) {
        println!("{:<WHO$} {text}", format!("[{who}]"));
    }

    /// A line the screen shows, indented under the last one.
    pub fn show(&self, text: &str) {
        println!("{:<WHO$}     {text}", "");
    }

    /// Waits for Enter (at a terminal only).
    pub async fn pause(&self) {
        let Some(enter) = &self.enter else {
            return;
        };
        print!("{:<WHO$}     (Enter to go on) ", "");
        let _ = std::io::stdout().flush();
        enter.lock().await.recv().await;
    }
}

/// Width of the speaker column.
const WHO: usize = 12;

impl Default for Narrator {
    fn default() -> Self {
        Self::new()
    }
}

/// The agent's API over one simulated reader named `reader_name`.
pub fn agent_over(reader_name: &str, reader: &SimReader) -> Api {
    let readers = SimReaders::default().with(reader_name, reader.clone());
    Api::direct(Arc::new(readers), &CardSettings::default())
}

/// A new PIN of six random digits (never printed).
pub fn new_pin() -> Result<Zeroizing<String>, DemoError> {
    let bytes = super::setup::random(6)?;
    Ok(Zeroizing::new(
        bytes.iter().map(|b| char::from(b'0' + b % 10)).collect(),
    ))
}

fn failed(step: &str) -> impl FnOnce(tonic::Status) -> DemoError + '_ {
    move |status| DemoError::Failed(format!("{step}: {}", status.message()))
}

/// Who and what the offline scene is about.
pub struct OfflineCall<'a> {
    pub reader_name: &'a str,
    pub reader: &'a SimReader,
    /// The gateway as the helpdesk operator.
    pub helpdesk: Channel,
    pub operator_identity: String,
    pub search: &'a str,
    pub user_id: &'a str,
    pub credential_id: &'a str,
}

/// The offline unblock. Returns an error (and the demo stops) when any step does not end as a
/// real one must.
pub async fn offline_unblock(n: &Narrator, call: OfflineCall<'_>) -> Result<(), DemoError> {
    n.title("Offline unblock: the user phones the helpdesk");
    let mut agent = agent_over(call.reader_name, call.reader);
    let card = agent
        .card(call.reader_name)
        .await
        .map_err(failed("the agent reading the card"))?;
    n.say(
        "user",
        &format!(
            "The card agent shows the card in {:?}: serial {}, PIN {}.",
            call.reader_name,
            card.serial,
            if card.pin_blocked {
                "BLOCKED"
            } else {
                "not blocked"
            }
        ),
    );
    if !card.pin_blocked {
        return Err(DemoError::Failed(
            "the demo card's PIN should be blocked".into(),
        ));
    }
    let started = agent
        .challenge(call.reader_name)
        .await
        .map_err(failed("the agent asking the card for a challenge"))?;
    let challenge = started.challenge.unwrap_or_default();
    n.say(
        "user",
        "\"Unblock with the helpdesk\": the agent shows the card's challenge to read out:",
    );
    n.show(&format!(
        "challenge {}   checksum {}",
        challenge.hex, challenge.checksum
    ));
    n.pause().await;

    let mut helpdesk = HelpdeskServiceClient::new(call.helpdesk);
    n.say(
        "operator",
        &format!(
            "Signed in as {}; searches {:?}:",
            call.operator_identity, call.search
        ),
    );
    let found = helpdesk
        .search_users(request(gw::SearchUsersRequest {
            query: call.search.to_owned(),
            page: Some(PageRequest {
                page_size: 10,
                page_token: String::new(),
            }),
            statuses: Vec::new(),
        }))
        .await
        .map_err(failed("searching the user"))?
        .into_inner();
    for hit in &found.results {
        let u = hit.user.clone().unwrap_or_default();
        n.show(&format!(
            "{}  {}  ({}, {})  {} card(s)",
            u.username, u.display_name, u.org_unit, u.email, hit.credential_count
        ));
    }
    let cards = helpdesk
        .get_user_cards(request(gw::GetUserCardsRequest {
            user_id: call.user_id.to_owned(),
            include_inactive: false,
        }))
        .await
        .map_err(failed("reading the user's cards"))?
        .into_inner();
    for view in &cards.cards {
        let c = view.credential.clone().unwrap_or_default();
        let actions: Vec<String> = view
            .allowed_actions
            .iter()
            .map(|a| {
                gw::HelpdeskAction::try_from(*a)
                    .map(|a| {
                        a.as_str_name()
                            .trim_start_matches("HELPDESK_ACTION_")
                            .to_lowercase()
                            .replace('_', "-")
                    })
                    .unwrap_or_default()
            })
            .collect();
        n.show(&format!(
            "card {} ({}): may {}",
            c.serial,
            view.template_name,
            actions.join(", ")
        ));
    }
    n.say(
        "operator",
        "Types the challenge and its checksum as the user reads them; the gateway checks the template and asks custody:",
    );
    let answer = helpdesk
        .compute_offline_response(request(gw::ComputeOfflineResponseRequest {
            user_id: call.user_id.to_owned(),
            credential_id: call.credential_id.to_owned(),
            challenge: Some(challenge.clone()),
            flow: Flow::OfflineHelpdesk as i32,
            approval_id: String::new(),
            ticket_reference: "DEMO-1".into(),
        }))
        .await
        .map_err(failed("computing the response"))?
        .into_inner();
    let response = answer.response.unwrap_or_default();
    n.show(&format!(
        "response  {}   checksum {}   (request id {})",
        response.hex, response.checksum, answer.request_id
    ));
    n.pause().await;

    let pin = new_pin()?;
    n.say(
        "user",
        "Types the response, its checksum and a new PIN; the agent checks the checksum, then the card takes the response:",
    );
    let result = agent
        .apply(ApplyResponseRequest {
            session_handle: started.session_handle,
            response: Some(response),
            new_pin: pin.to_string(),
            pin_policy: None,
        })
        .await
        .map_err(failed("the agent applying the response"))?;
    let outcome = UnblockOutcome::try_from(result.outcome).unwrap_or(UnblockOutcome::Unspecified);
    n.show(&result.message);
    if outcome != UnblockOutcome::Success {
        return Err(DemoError::Failed(format!(
            "the card did not take the response: {}",
            result.message
        )));
    }
    verify(n, call.reader, &pin)
}

/// The System Owner unblock: the holder types the unblock key; no server takes part.
pub async fn so_unblock(
    n: &Narrator,
    reader_name: &str,
    reader: &SimReader,
    so: &SoToken,
) -> Result<(), DemoError> {
    n.title("System Owner token: unblocked with its unblock key, no server needed");
    n.say(
        "admin",
        "At initialisation custody made the SO token's unblock key and showed it once:",
    );
    n.show(&format!(
        "unblock key {}   checksum {}   (KCV {})",
        so.shown.hex, so.shown.checksum, so.kcv
    ));
    let mut agent = agent_over(reader_name, reader);
    let card = agent
        .card(reader_name)
        .await
        .map_err(failed("the agent reading the SO token"))?;
    n.say(
        "SO holder",
        &format!(
            "The agent shows the SO token in {reader_name:?}: PIN {}.",
            if card.pin_blocked {
                "BLOCKED"
            } else {
                "not blocked"
            }
        ),
    );
    n.pause().await;
    let pin = new_pin()?;
    n.say(
        "SO holder",
        "Types the unblock key with its checksum and a new PIN; the agent computes the cryptogram itself:",
    );
    let result = agent
        .unblock_so_token(UnblockSoTokenRequest {
            reader: reader_name.to_owned(),
            so_unblock_key: Some(TypedCode {
                hex: so.shown.hex.clone(),
                checksum: so.shown.checksum.clone(),
            }),
            algorithm: ProtoAlgorithm::Aes128 as i32,
            expected_kcv: so.kcv.clone(),
            new_pin: pin.to_string(),
            pin_policy: None,
        })
        .await
        .map_err(failed("the agent unblocking the SO token"))?;
    n.show(&result.message);
    if UnblockOutcome::try_from(result.outcome) != Ok(UnblockOutcome::Success) {
        return Err(DemoError::Failed(format!(
            "the SO token was not unblocked: {}",
            result.message
        )));
    }
    verify(n, reader, &pin)
}

/// The card checks the new PIN (VERIFY): the proof that the unblock took.
fn verify(n: &Narrator, reader: &SimReader, pin: &str) -> Result<(), DemoError> {
    if super::card::pin_verifies(reader, pin.as_bytes()) {
        n.say("card", "VERIFY with the new PIN: accepted.");
        Ok(())
    } else {
        Err(DemoError::Failed(
            "the card refused the new PIN after the unblock".into(),
        ))
    }
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(std::time::Duration::from_secs(30));
    request
}
