//! `cms-agent unblock` and `cms-agent so-unblock`: the offline flows, interactive on a terminal
//! and scriptable (answers as stdin lines, or flags, and `--json`).

use std::process::ExitCode;
use std::time::SystemTime;

use cms_agent::client::Api;
use cms_agent::unblock::codes;
use cms_proto::agent::v1::{
    ApplyResponseRequest, UnblockOutcome, UnblockResult, UnblockSoTokenRequest,
    UnblockWithPukRequest,
};
use cms_proto::common::v1::{CardProfile, KeyAlgorithm as ProtoAlgorithm, TypedCode};
use serde_json::json;

use super::prompt::Prompt;
use super::{Connect, connect, one_line, output};

#[derive(Debug, clap::Args)]
pub struct UnblockArgs {
    #[command(flatten)]
    connect: Connect,
    /// Reader name (default: the only reader holding a card; asked when several do).
    #[arg(long)]
    reader: Option<String>,
    /// Print the challenge and its session, then exit; answer later with --session (needs a
    /// running agent: the session lives in it).
    #[arg(long)]
    challenge_only: bool,
    /// Answer the open challenge session printed by --challenge-only.
    #[arg(long)]
    session: Option<String>,
    /// The response read out by the helpdesk (else asked).
    #[arg(long)]
    response: Option<String>,
    /// The response's 4-character checksum (else asked).
    #[arg(long)]
    checksum: Option<String>,
    /// PIV cards: the PUK's checksum (else asked). The PUK itself is always asked (hidden on a
    /// terminal, one stdin line from a script): a flag would show it in the process list.
    #[arg(long)]
    puk_checksum: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct SoUnblockArgs {
    #[command(flatten)]
    connect: Connect,
    /// Reader name (default: the only reader holding a card).
    #[arg(long)]
    reader: Option<String>,
    /// Algorithm of the unblock key (3des-2key, 3des-3key, aes-128, aes-192, aes-256); default:
    /// told from the key's length and the card.
    #[arg(long)]
    algorithm: Option<cms_cardcrypto::KeyAlgorithm>,
    /// KCV recorded at initialisation (6 hex characters): checked before the card is touched.
    #[arg(long, default_value = "")]
    kcv: String,
}

fn finish(result: &UnblockResult, as_json: bool) -> ExitCode {
    output::result(result, as_json);
    if result.outcome == UnblockOutcome::Success as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The reader to use: the named one, the only one with a card, or the person's choice.
async fn choose_reader(
    api: &mut Api,
    named: Option<&str>,
    prompt: &Prompt,
) -> Result<String, String> {
    if let Some(name) = named {
        return Ok(name.to_owned());
    }
    let readers = api.readers().await.map_err(|s| one_line(&s))?;
    let with_card: Vec<String> = readers
        .into_iter()
        .filter(|r| r.card_present)
        .map(|r| r.name)
        .collect();
    match with_card.len() {
        0 => Err("no card in any reader: insert the card".into()),
        1 => Ok(with_card[0].clone()),
        _ if prompt.interactive() => loop {
            for (i, name) in with_card.iter().enumerate() {
                eprintln!("  {}. {name}", i + 1);
            }
            let answer = prompt.line("Which reader? ")?;
            match answer.trim().parse::<usize>() {
                Ok(n) if (1..=with_card.len()).contains(&n) => return Ok(with_card[n - 1].clone()),
                _ => eprintln!("Type a number from 1 to {}.", with_card.len()),
            }
        },
        _ => Err("several readers hold a card: name one with --reader".into()),
    }
}

pub async fn unblock(args: UnblockArgs) -> Result<ExitCode, String> {
    let prompt = Prompt::new();
    let mut api = connect(&args.connect).await?;
    let json = args.connect.json;
    if let Some(session) = &args.session {
        return answer(&mut api, &args, &prompt, session.clone(), None).await;
    }
    let reader = choose_reader(&mut api, args.reader.as_deref(), &prompt).await?;
    let card = api.card(&reader).await.map_err(|s| one_line(&s))?;
    match CardProfile::try_from(card.profile) {
        Ok(CardProfile::Piv) => return puk(&mut api, &args, &prompt, &reader).await,
        Ok(CardProfile::Minidriver) => {}
        _ => return Err("the card in the reader is not a supported card".into()),
    }
    let challenge = api.challenge(&reader).await.map_err(|s| one_line(&s))?;
    let shown = challenge.challenge.clone().unwrap_or_default();
    let expires_in = challenge
        .expires_at
        .as_ref()
        .and_then(|t| SystemTime::try_from(*t).ok())
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .map_or(0, |d| d.as_secs());
    if json {
        println!(
            "{}",
            json!({"challenge": shown.hex, "checksum": shown.checksum, "session": challenge.session_handle, "expires_in_seconds": expires_in})
        );
    } else {
        println!(
            "Challenge for the helpdesk:  {}   checksum {}",
            shown.hex, shown.checksum
        );
        println!(
            "It stays valid for {} minutes; keep the card in the reader.",
            expires_in.div_ceil(60)
        );
    }
    if args.challenge_only {
        if !api.sessions_outlive_process() {
            let _ = api.cancel(&challenge.session_handle).await;
            return Err("--challenge-only needs a running agent (its socket): the challenge dies with this process".into());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let length = cms_cardcrypto::parse_hex(&shown.hex, &[])
        .map(|b| b.len())
        .unwrap_or(0);
    let handle = challenge.session_handle.clone();
    let outcome = answer(&mut api, &args, &prompt, handle.clone(), Some(length)).await;
    if !matches!(outcome, Ok(ExitCode::SUCCESS)) {
        let _ = api.cancel(&handle).await;
    }
    outcome
}

/// Reads the response (checked as typed) and the new PIN, and applies them.
async fn answer(
    api: &mut Api,
    args: &UnblockArgs,
    prompt: &Prompt,
    handle: String,
    length: Option<usize>,
) -> Result<ExitCode, String> {
    let json = args.connect.json;
    let mut typed = (args.response.clone(), args.checksum.clone());
    let mut response = loop {
        let hex = match typed.0.take() {
            Some(r) => zeroize::Zeroizing::new(r),
            None => prompt.line("Response from the helpdesk: ")?,
        };
        let checksum = match typed.1.take() {
            Some(c) => zeroize::Zeroizing::new(c),
            None => prompt.line("Its checksum: ")?,
        };
        let code = TypedCode {
            hex: hex.to_string(),
            checksum: checksum.to_string(),
        };
        // Checked as typed, before anything goes to the agent or the card.
        match length.map(|n| codes::response(Some(&code), n)) {
            Some(Err(refused)) => {
                if prompt.interactive() {
                    prompt.say(&refused.message);
                    continue;
                }
                return Ok(finish(&refused, json));
            }
            _ => break code,
        }
    };
    loop {
        let pin = prompt.new_pin()?;
        let result = api
            .apply(ApplyResponseRequest {
                session_handle: handle.clone(),
                response: Some(response.clone()),
                new_pin: pin.to_string(),
                pin_policy: None,
            })
            .await
            .map_err(|s| one_line(&s))?;
        let outcome = UnblockOutcome::try_from(result.outcome).unwrap_or_default();
        if prompt.interactive() {
            match outcome {
                UnblockOutcome::PinRejected => {
                    prompt.say(&result.message);
                    continue;
                }
                UnblockOutcome::ChecksumMismatch | UnblockOutcome::InvalidCode => {
                    prompt.say(&result.message);
                    response = TypedCode {
                        hex: prompt.line("Response from the helpdesk: ")?.to_string(),
                        checksum: prompt.line("Its checksum: ")?.to_string(),
                    };
                    continue;
                }
                _ => {}
            }
        }
        return Ok(finish(&result, json));
    }
}

async fn puk(
    api: &mut Api,
    args: &UnblockArgs,
    prompt: &Prompt,
    reader: &str,
) -> Result<ExitCode, String> {
    let json = args.connect.json;
    prompt.say("This is a PIV card: its PIN is reset with the PUK the helpdesk reads out.");
    let mut typed = (None::<String>, args.puk_checksum.clone());
    let (puk, checksum) = loop {
        let puk = match typed.0.take() {
            Some(p) => zeroize::Zeroizing::new(p),
            None => prompt.secret("PUK: ")?,
        };
        let checksum = match typed.1.take() {
            Some(c) => zeroize::Zeroizing::new(c),
            None => prompt.line("Its checksum: ")?,
        };
        match codes::puk(&puk, &checksum) {
            Ok(_) => break (puk, checksum),
            Err(refused) if prompt.interactive() => prompt.say(&refused.message),
            Err(refused) => return Ok(finish(&refused, json)),
        }
    };
    loop {
        let pin = prompt.new_pin()?;
        let result = api
            .unblock_with_puk(UnblockWithPukRequest {
                reader: reader.into(),
                expected_card_id: Vec::new(),
                puk: puk.to_string(),
                puk_checksum: checksum.to_string(),
                new_pin: pin.to_string(),
                pin_policy: None,
            })
            .await
            .map_err(|s| one_line(&s))?;
        if prompt.interactive() && result.outcome == UnblockOutcome::PinRejected as i32 {
            prompt.say(&result.message);
            continue;
        }
        return Ok(finish(&result, json));
    }
}

fn proto_algorithm(a: cms_cardcrypto::KeyAlgorithm) -> ProtoAlgorithm {
    use cms_cardcrypto::KeyAlgorithm as K;
    match a {
        K::Tdes2Key => ProtoAlgorithm::Tdes2key,
        K::Tdes3Key => ProtoAlgorithm::Tdes3key,
        K::Aes128 => ProtoAlgorithm::Aes128,
        K::Aes192 => ProtoAlgorithm::Aes192,
        K::Aes256 => ProtoAlgorithm::Aes256,
    }
}

pub async fn so_unblock(args: SoUnblockArgs) -> Result<ExitCode, String> {
    let prompt = Prompt::new();
    let json = args.connect.json;
    let mut api = connect(&args.connect).await?;
    let reader = choose_reader(&mut api, args.reader.as_deref(), &prompt).await?;
    let card = api.card(&reader).await.map_err(|s| one_line(&s))?;
    if card.profile != CardProfile::Minidriver as i32 {
        return Err("the card in the reader is not an SO token (a minidriver-profile card)".into());
    }
    let key = loop {
        let text = prompt.secret("SO unblock key (all groups, then the checksum): ")?;
        let code = TypedCode {
            hex: text.to_string(),
            checksum: String::new(),
        };
        // Checked as typed: length, hex, checksum and KCV, before the card.
        let checked = codes::so_key(Some(&code), args.algorithm, card.challenge_length as usize)
            .and_then(|key| codes::check_kcv(&key, &args.kcv));
        match checked {
            Ok(()) => break code,
            Err(refused) if prompt.interactive() => prompt.say(&refused.message),
            Err(refused) => return Ok(finish(&refused, json)),
        }
    };
    loop {
        let pin = prompt.new_pin()?;
        let result = api
            .unblock_so_token(UnblockSoTokenRequest {
                reader: reader.clone(),
                so_unblock_key: Some(key.clone()),
                algorithm: args
                    .algorithm
                    .map_or(ProtoAlgorithm::Unspecified, proto_algorithm)
                    as i32,
                expected_kcv: args.kcv.clone(),
                new_pin: pin.to_string(),
                pin_policy: None,
            })
            .await
            .map_err(|s| one_line(&s))?;
        if prompt.interactive() && result.outcome == UnblockOutcome::PinRejected as i32 {
            prompt.say(&result.message);
            continue;
        }
        return Ok(finish(&result, json));
    }
}
