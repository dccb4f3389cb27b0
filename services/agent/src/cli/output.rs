//! What the commands print: plain lines for people, JSON objects for scripts. Never a PIN,
//! response, PUK or key.

use cms_proto::agent::v1::{
    CardInfo, Reader, ReaderEvent, ReaderEventKind, UnblockOutcome, UnblockResult,
};
use cms_proto::common::v1::CardProfile;
use data_encoding::HEXUPPER;
use serde_json::json;

pub fn readers(readers: &[Reader], as_json: bool) {
    if as_json {
        let list: Vec<_> = readers
            .iter()
            .map(|r| json!({"name": r.name, "card_present": r.card_present, "atr": HEXUPPER.encode(&r.atr), "in_use": r.in_use}))
            .collect();
        println!("{}", json!({ "readers": list }));
        return;
    }
    if readers.is_empty() {
        println!("no card reader is connected");
    }
    for r in readers {
        let state = match (r.card_present, r.in_use) {
            (false, _) => "no card".to_owned(),
            (true, false) => format!("card present (ATR {})", HEXUPPER.encode(&r.atr)),
            (true, true) => "card present, in use by another application".to_owned(),
        };
        println!("{}: {state}", r.name);
    }
}

pub fn profile_name(profile: i32) -> &'static str {
    match CardProfile::try_from(profile) {
        Ok(CardProfile::Minidriver) => "minidriver",
        Ok(CardProfile::Piv) => "piv",
        _ => "unsupported",
    }
}

pub fn card(card: &CardInfo, as_json: bool) {
    if as_json {
        println!(
            "{}",
            json!({
                "reader": card.reader,
                "profile": profile_name(card.profile),
                "card_id": HEXUPPER.encode(&card.card_id),
                "serial": card.serial,
                "atr": HEXUPPER.encode(&card.atr),
                "pin_tries_left": card.pin_tries_left,
                "pin_blocked": card.pin_blocked,
                "admin_tries_left": card.admin_tries_left,
                "admin_blocked": card.admin_blocked,
                "challenge_length": card.challenge_length,
                "description": card.description,
            })
        );
        return;
    }
    let admin = if card.profile == CardProfile::Piv as i32 {
        "PUK"
    } else {
        "admin key"
    };
    let tries = |t: Option<u32>| t.map_or("unknown".to_owned(), |t| t.to_string());
    println!("reader:      {}", card.reader);
    println!("card:        {}", card.description);
    println!("card id:     {}", HEXUPPER.encode(&card.card_id));
    if !card.serial.is_empty() && card.serial != HEXUPPER.encode(&card.card_id) {
        println!("serial:      {}", card.serial);
    }
    println!(
        "PIN:         {}",
        if card.pin_blocked {
            "blocked".to_owned()
        } else {
            format!("{} tries left", tries(card.pin_tries_left))
        }
    );
    println!(
        "{admin}:{} {}",
        " ".repeat(12usize.saturating_sub(admin.len() + 1)),
        if card.admin_blocked {
            "blocked: this card cannot be unblocked any more".to_owned()
        } else {
            format!("{} tries left", tries(card.admin_tries_left))
        }
    );
}

pub fn event(event: &ReaderEvent, as_json: bool) {
    let kind = match ReaderEventKind::try_from(event.kind) {
        Ok(ReaderEventKind::ReaderAdded) => "reader-added",
        Ok(ReaderEventKind::ReaderRemoved) => "reader-removed",
        Ok(ReaderEventKind::CardInserted) => "card-inserted",
        Ok(ReaderEventKind::CardRemoved) => "card-removed",
        _ => "unknown",
    };
    if as_json {
        let profile = event.card.as_ref().map(|c| profile_name(c.profile));
        println!(
            "{}",
            json!({"event": kind, "reader": event.reader, "profile": profile})
        );
    } else {
        println!("{kind}: {}", event.reader);
    }
}

pub fn outcome_name(result: &UnblockResult) -> &'static str {
    UnblockOutcome::try_from(result.outcome)
        .map(|o| o.as_str_name())
        .unwrap_or("UNBLOCK_OUTCOME_UNSPECIFIED")
}

pub fn result(result: &UnblockResult, as_json: bool) {
    if as_json {
        println!(
            "{}",
            json!({
                "outcome": outcome_name(result).trim_start_matches("UNBLOCK_OUTCOME_").to_ascii_lowercase(),
                "message": result.message,
                "pin_tries_left": result.pin_tries_left,
                "admin_tries_left": result.admin_tries_left,
            })
        );
    } else {
        println!("{}", result.message);
    }
}
