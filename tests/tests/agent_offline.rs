//! The agent's offline flows through the in-process virtual card (no pcscd, no servers):
//! challenge/response with a response computed from a shared-vectors master key, the checks
//! before the card, PIV with the PUK, and the System Owner token.

mod agent_common;

use std::time::Duration;

use agent_common::*;
use cms_agent::{Agent, CardSettings};
use cms_proto::agent::v1::{
    ApplyResponseRequest, CancelChallengeRequest, GetCardInfoRequest, GetChallengeRequest,
    UnblockOutcome, UnblockResult, UnblockSoTokenRequest, UnblockWithPukRequest,
};
use cms_proto::common::v1::{CardProfile, TypedCode};
use cms_proto::template::v1::{CharacterClass, PinPolicy};

const NEW_PIN: &str = "482915";

fn outcome(r: &UnblockResult) -> UnblockOutcome {
    UnblockOutcome::try_from(r.outcome).unwrap()
}

async fn challenge(agent: &Agent) -> (String, TypedCode) {
    let c = agent
        .cards()
        .get_challenge(GetChallengeRequest::default())
        .await
        .unwrap();
    (c.session_handle, c.challenge.unwrap())
}

async fn apply(agent: &Agent, handle: &str, response: TypedCode, pin: &str) -> UnblockResult {
    agent
        .cards()
        .apply_response(ApplyResponseRequest {
            session_handle: handle.into(),
            response: Some(response),
            new_pin: pin.into(),
            pin_policy: None,
        })
        .await
}

fn count(card: &TestCard, ins: u8) -> usize {
    log(&card.reader).iter().filter(|e| e.ins == ins).count()
}

#[tokio::test]
async fn offline_unblock_with_3des_and_aes() {
    for alg in [Alg::Tdes, Alg::Aes] {
        let card = minidriver_card(alg);
        let agent = agent(&card);
        let (handle, shown) = challenge(&agent).await;
        // Shown in groups of 4 with its checksum.
        let groups: Vec<&str> = shown.hex.split(' ').collect();
        assert_eq!(
            groups.len(),
            if alg == Alg::Tdes { 4 } else { 8 },
            "{alg:?}"
        );
        assert!(groups.iter().all(|g| g.len() == 4));
        assert_eq!(shown.checksum.len(), 4);
        let result = apply(&agent, &handle, respond(&card.admin_key, &shown), NEW_PIN).await;
        assert_eq!(
            outcome(&result),
            UnblockOutcome::Success,
            "{alg:?}: {}",
            result.message
        );
        assert!(pin_verifies(&card.reader, NEW_PIN.as_bytes()));
        assert_eq!(admin_tries(&card.reader), 5);
    }
}

#[tokio::test]
async fn wrong_response_says_tries_left_and_five_block_the_card() {
    let card = minidriver_card(Alg::Tdes);
    let agent = agent(&card);
    for attempt in 1..=5u8 {
        let (handle, shown) = challenge(&agent).await;
        let result = apply(
            &agent,
            &handle,
            wrong(&respond(&card.admin_key, &shown)),
            NEW_PIN,
        )
        .await;
        let left = 5 - attempt;
        assert_eq!(admin_tries(&card.reader), left);
        if left > 0 {
            assert_eq!(outcome(&result), UnblockOutcome::WrongResponse);
            assert!(
                result.message.contains(&format!("{left} tries left"))
                    || result.message.contains("1 try left"),
                "{}",
                result.message
            );
            assert_eq!(result.admin_tries_left, Some(u32::from(left)));
            // The challenge died with the wrong response: the session is over.
            let again = apply(&agent, &handle, respond(&card.admin_key, &shown), NEW_PIN).await;
            assert_eq!(outcome(&again), UnblockOutcome::SessionLost);
        } else {
            assert_eq!(outcome(&result), UnblockOutcome::AdminBlocked);
            assert!(
                result.message.contains("cannot be unblocked any more"),
                "{}",
                result.message
            );
        }
    }
    // A blocked card gives no challenge any more, and says why.
    let err = agent
        .cards()
        .get_challenge(GetChallengeRequest::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("cannot be unblocked any more"),
        "{err}"
    );
    assert!(!pin_verifies(&card.reader, NEW_PIN.as_bytes()));
}

#[tokio::test]
async fn typos_and_bad_pins_never_reach_the_card() {
    let card = minidriver_card(Alg::Aes);
    let agent = agent(&card);
    let (handle, shown) = challenge(&agent).await;
    let good = respond(&card.admin_key, &shown);
    let mut typo = good.clone();
    typo.checksum = format!(
        "{:04X}",
        u16::from_str_radix(&good.checksum, 16).unwrap() ^ 1
    );
    let r = apply(&agent, &handle, typo, NEW_PIN).await;
    assert_eq!(
        outcome(&r),
        UnblockOutcome::ChecksumMismatch,
        "{}",
        r.message
    );
    let mut short = good.clone();
    short.hex.truncate(short.hex.len() - 5);
    assert_eq!(
        outcome(&apply(&agent, &handle, short, NEW_PIN).await),
        UnblockOutcome::InvalidCode
    );
    let mut not_hex = good.clone();
    not_hex.hex.replace_range(0..1, "G");
    assert_eq!(
        outcome(&apply(&agent, &handle, not_hex, NEW_PIN).await),
        UnblockOutcome::InvalidCode
    );
    // The PIN policy passed in the request refuses the PIN before EXTERNAL AUTHENTICATE.
    let policy = PinPolicy {
        min_length: 6,
        max_length: 8,
        allowed_classes: vec![CharacterClass::Digit as i32],
        forbid_trivial: true,
        ..PinPolicy::default()
    };
    let r = agent
        .cards()
        .apply_response(ApplyResponseRequest {
            session_handle: handle.clone(),
            response: Some(good.clone()),
            new_pin: "123456".into(),
            pin_policy: Some(policy),
        })
        .await;
    assert_eq!(outcome(&r), UnblockOutcome::PinRejected, "{}", r.message);
    assert!(!r.message.contains("123456"));
    assert_eq!(
        responses_sent(&card.reader),
        0,
        "no response reached the card"
    );
    assert_eq!(admin_tries(&card.reader), 5);
    // The session stayed open: the right response still works.
    let r = apply(&agent, &handle, good, NEW_PIN).await;
    assert_eq!(outcome(&r), UnblockOutcome::Success, "{}", r.message);
}

#[tokio::test]
async fn a_removed_card_voids_the_challenge() {
    let card = minidriver_card(Alg::Tdes);
    let agent = agent(&card);
    let (handle, shown) = challenge(&agent).await;
    card.reader.remove();
    card.reader.insert();
    let r = apply(&agent, &handle, respond(&card.admin_key, &shown), NEW_PIN).await;
    assert_eq!(outcome(&r), UnblockOutcome::CardRemoved, "{}", r.message);
    assert!(r.message.contains("start again"), "{}", r.message);
    assert_eq!(
        responses_sent(&card.reader),
        0,
        "nothing was sent to the card"
    );
    assert_eq!(admin_tries(&card.reader), 5);
    // A new challenge works.
    let (handle, shown) = challenge(&agent).await;
    let r = apply(&agent, &handle, respond(&card.admin_key, &shown), NEW_PIN).await;
    assert_eq!(outcome(&r), UnblockOutcome::Success, "{}", r.message);
}

#[tokio::test]
async fn cancel_and_timeout_end_the_session() {
    let card = minidriver_card(Alg::Tdes);
    let agent = agent(&card);
    let (handle, shown) = challenge(&agent).await;
    agent
        .cards()
        .cancel_challenge(&CancelChallengeRequest {
            session_handle: handle.clone(),
        })
        .await;
    let r = apply(&agent, &handle, respond(&card.admin_key, &shown), NEW_PIN).await;
    assert_eq!(outcome(&r), UnblockOutcome::SessionLost);

    let readers = cms_agent::card::sim::SimReaders::default().with(READER, card.reader.clone());
    let settings = CardSettings {
        challenge_timeout_ms: 200,
        ..CardSettings::default()
    };
    let agent = Agent::offline(std::sync::Arc::new(readers), &settings);
    let (handle, shown) = challenge(&agent).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = apply(&agent, &handle, respond(&card.admin_key, &shown), NEW_PIN).await;
    assert_eq!(outcome(&r), UnblockOutcome::SessionLost, "{}", r.message);
    // The session's transaction ended with the timeout: the card is free again.
    let (handle, shown) = challenge(&agent).await;
    let r = apply(&agent, &handle, respond(&card.admin_key, &shown), NEW_PIN).await;
    assert_eq!(outcome(&r), UnblockOutcome::Success, "{}", r.message);
    assert_eq!(admin_tries(&card.reader), 5);
}

#[tokio::test]
async fn card_info_of_both_profiles() {
    let card = minidriver_card(Alg::Aes);
    let info = agent(&card)
        .cards()
        .card_info(GetCardInfoRequest::default())
        .await
        .unwrap()
        .card
        .unwrap();
    assert_eq!(info.profile, CardProfile::Minidriver as i32);
    assert_eq!(info.card_id, card.card_id);
    assert_eq!(info.challenge_length, 16);
    // The product from the ATR's historical bytes, the profile from SELECT.
    assert_eq!(info.description, "CMS virtual card (minidriver)");
    assert_eq!(info.admin_tries_left, Some(5));
    assert!(info.pin_blocked);

    let card = piv_card(Alg::Tdes);
    let info = agent(&card)
        .cards()
        .card_info(GetCardInfoRequest::default())
        .await
        .unwrap()
        .card
        .unwrap();
    assert_eq!(info.profile, CardProfile::Piv as i32);
    assert_eq!(info.card_id, card.card_id);
    assert_eq!(info.serial, "1234567");
    assert_eq!(info.admin_tries_left, Some(5), "PUK tries");
    assert_eq!(info.pin_tries_left, Some(0));
}

fn puk_request(card: &TestCard, puk: &[u8], checksum: &str) -> UnblockWithPukRequest {
    UnblockWithPukRequest {
        reader: READER.into(),
        expected_card_id: card.card_id.clone(),
        puk: String::from_utf8(puk.to_vec()).unwrap(),
        puk_checksum: checksum.into(),
        new_pin: NEW_PIN.into(),
        pin_policy: None,
    }
}

#[tokio::test]
async fn piv_unblock_with_the_puk() {
    for alg in [Alg::Tdes, Alg::Aes] {
        let card = piv_card(alg);
        let agent = agent(&card);
        let sum = cms_cardcrypto::checksum(&card.puk);
        // A checksum typo never reaches the card.
        let typo = format!("{:04X}", u16::from_str_radix(&sum, 16).unwrap() ^ 0x10);
        let r = agent
            .cards()
            .unblock_with_puk(puk_request(&card, &card.puk, &typo))
            .await
            .unwrap();
        assert_eq!(outcome(&r), UnblockOutcome::ChecksumMismatch);
        assert_eq!(count(&card, RESET_RETRY_COUNTER), 0);
        // A wrong PUK (with its own right checksum) costs one try and says how many are left.
        let mut other = card.puk.clone();
        other[0] = if other[0] == b'9' { b'0' } else { other[0] + 1 };
        let r = agent
            .cards()
            .unblock_with_puk(puk_request(
                &card,
                &other,
                &cms_cardcrypto::checksum(&other),
            ))
            .await
            .unwrap();
        assert_eq!(outcome(&r), UnblockOutcome::WrongResponse, "{}", r.message);
        assert!(r.message.contains("4 tries left"), "{}", r.message);
        // The PUK read out by the helpdesk resets the PIN.
        let r = agent
            .cards()
            .unblock_with_puk(puk_request(&card, &card.puk, &sum))
            .await
            .unwrap();
        assert_eq!(
            outcome(&r),
            UnblockOutcome::Success,
            "{alg:?}: {}",
            r.message
        );
        assert!(pin_verifies(&card.reader, NEW_PIN.as_bytes()));
        // A minidriver card is refused (it has no PUK).
        let md = minidriver_card(alg);
        let r = agent_common::agent(&md)
            .cards()
            .unblock_with_puk(puk_request(&md, &card.puk, &sum))
            .await
            .unwrap();
        assert_eq!(outcome(&r), UnblockOutcome::Unsupported);
    }
}

#[tokio::test]
async fn so_token_unblock_with_the_typed_key() {
    use cms_cardcrypto::{KeyAlgorithm, SoUnblockKey};
    for (algorithm, alg) in [
        (KeyAlgorithm::Tdes2Key, Alg::Tdes),
        (KeyAlgorithm::Aes128, Alg::Aes),
    ] {
        let mut seed = 3u8;
        let key = SoUnblockKey::generate(algorithm, &mut |b| {
            for x in b.iter_mut() {
                seed = seed.wrapping_mul(31).wrapping_add(17);
                *x = seed;
            }
        })
        .unwrap();
        // The SO token: a minidriver card whose admin key is the SO unblock key.
        let (mut state, _) = minidriver_state(alg);
        let card_key = match algorithm {
            // The card stores 3DES keys as 3-key (K1 K2 K1).
            KeyAlgorithm::Tdes2Key => {
                let b = key.key().expose_bytes();
                let mut k = b.to_vec();
                k.extend_from_slice(&b[..8]);
                cms_cardcrypto::SecretKey::new(KeyAlgorithm::Tdes3Key, &k).unwrap()
            }
            _ => key.key().clone(),
        };
        state.admin_key = card_key;
        let reader = cms_card::sim::SimReader::new(
            cms_card::sim::VirtualCard::new(state).with_log(cms_card::sim::ApduLog::memory()),
        );
        let card = TestCard {
            reader,
            admin_key: key.key().clone(),
            card_id: vec![],
            puk: vec![],
        };
        let agent = agent(&card);
        let kcv = data_encoding::HEXUPPER.encode(&key.kcv());
        let typed = TypedCode {
            hex: key.display().to_string(),
            checksum: String::new(),
        };
        // A wrong KCV: refused before the card.
        let r = agent
            .cards()
            .unblock_so_token(UnblockSoTokenRequest {
                reader: String::new(),
                so_unblock_key: Some(typed.clone()),
                algorithm: 0,
                expected_kcv: "000000".into(),
                new_pin: NEW_PIN.into(),
                pin_policy: None,
            })
            .await
            .unwrap();
        assert!(
            matches!(outcome(&r), UnblockOutcome::KcvMismatch),
            "{}",
            r.message
        );
        assert_eq!(responses_sent(&card.reader), 0, "refused before the card");
        let r = agent
            .cards()
            .unblock_so_token(UnblockSoTokenRequest {
                reader: String::new(),
                so_unblock_key: Some(typed),
                algorithm: 0,
                expected_kcv: kcv,
                new_pin: NEW_PIN.into(),
                pin_policy: None,
            })
            .await
            .unwrap();
        assert_eq!(
            outcome(&r),
            UnblockOutcome::Success,
            "{alg:?}: {}",
            r.message
        );
        assert!(pin_verifies(&card.reader, NEW_PIN.as_bytes()));
    }
}
