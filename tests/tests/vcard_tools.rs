//! Independent PC/SC clients against the virtual card, through real pcscd + vpcd: if
//! yubico-piv-tool and OpenSC accept it as a card, the agent's card code is tested against
//! something that behaves like real cards.
//!
//! Needs root, pcscd, vsmartcard-vpcd, opensc and yubico-piv-tool (tests/run.sh installs them)
//! and the `cms-vcard` binary (`cargo build -p cms-vcard`).

use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use cms_card::StatusWord;
use cms_card::sim::state::CardState;
use cms_card::sim::{ATR_MINIDRIVER, ATR_PIV};
use cms_tests::pcsc::{CardInReader, Pcscd, new_card, text};
use tempfile::TempDir;

const DEFAULT_KEY: &str = "010203040506070801020304050607080102030405060708";
const NEW_KEY: &str = "0F0E0D0C0B0A09080F0E0D0C0B0A09080F0E0D0C0B0A0908";
const AES_KEY: &str = "00112233445566778899AABBCCDDEEFF";

/// A card file in a temp dir, and the card in a reader of the shared pcscd.
struct Setup {
    _dir: TempDir,
    card: CardInReader,
}

fn insert(args: &[&str]) -> Setup {
    let pcscd: Arc<Pcscd> = Pcscd::shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("card.toml");
    new_card(&file, args);
    let card = pcscd.insert(&file);
    Setup { _dir: dir, card }
}

fn piv_card() -> Setup {
    insert(&[
        "--profile",
        "piv",
        "--card-id",
        "00112233445566778899AABBCCDDEEFF",
        "--serial",
        "4242",
    ])
}

fn run(card: &CardInReader, program: &str, args: &[&str]) -> Output {
    card.client(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// yubico-piv-tool on the card's reader.
fn ykpiv(card: &CardInReader, args: &[&str]) -> Output {
    let reader = card.reader();
    let mut all = vec!["-r", reader.as_str()];
    all.extend_from_slice(args);
    run(card, "yubico-piv-tool", &all)
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", text(&out));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn state(card: &CardInReader) -> CardState {
    CardState::load(card.card_file()).expect("card file")
}

#[test]
fn yubico_piv_tool_reads_the_status() {
    let setup = piv_card();
    let out = ok(ykpiv(&setup.card, &["-a", "status"]));
    assert!(out.contains("Version:\t5.4.3"), "{out}");
    assert!(out.contains("Serial Number:\t4242"), "{out}");
    // The CHUID carries the card id as its GUID (tag 34).
    assert!(
        out.contains("341000112233445566778899aabbccddeeff"),
        "{out}"
    );
    assert!(out.contains("CCC:\tf015"), "{out}");
    assert!(out.contains("PIN tries left:\t3"), "{out}");
}

#[test]
fn yubico_piv_tool_verifies_and_changes_pin_and_puk_and_unblocks() {
    let setup = piv_card();
    let card = &setup.card;
    ok(ykpiv(card, &["-a", "verify-pin", "-P", "123456"]));
    ok(ykpiv(
        card,
        &["-a", "change-pin", "-P", "123456", "-N", "654321"],
    ));
    ok(ykpiv(card, &["-a", "verify-pin", "-P", "654321"]));
    // Three wrong PINs block it.
    for left in [2, 1, 0] {
        let out = ykpiv(card, &["-a", "verify-pin", "-P", "000000"]);
        assert!(!out.status.success());
        assert_eq!(state(card).pin_tries, left);
    }
    assert!(
        !ykpiv(card, &["-a", "verify-pin", "-P", "654321"])
            .status
            .success()
    );
    ok(ykpiv(
        card,
        &["-a", "unblock-pin", "-P", "12345678", "-N", "111111"],
    ));
    ok(ykpiv(card, &["-a", "verify-pin", "-P", "111111"]));
    ok(ykpiv(
        card,
        &["-a", "change-puk", "-P", "12345678", "-N", "87654321"],
    ));
    // The old PUK is gone (and costs a try), the new one works.
    assert!(
        !ykpiv(
            card,
            &["-a", "unblock-pin", "-P", "12345678", "-N", "222222"]
        )
        .status
        .success()
    );
    assert_eq!(state(card).puk_tries, 4);
    ok(ykpiv(
        card,
        &["-a", "unblock-pin", "-P", "87654321", "-N", "222222"],
    ));
    assert_eq!(state(card).puk_tries, 5);
    ok(ykpiv(card, &["-a", "verify-pin", "-P", "222222"]));
}

#[test]
fn yubico_piv_tool_authenticates_with_the_management_key() {
    let setup = piv_card();
    let card = &setup.card;
    // set-mgm-key authenticates with the factory key, then sets a new one.
    ok(ykpiv(card, &["-a", "set-mgm-key", "-n", NEW_KEY]));
    let after = state(card);
    assert_eq!(
        cms_cardcrypto::format_groups(after.admin_key.expose_bytes()).replace(' ', ""),
        NEW_KEY
    );
    // An operation that needs the management key, with the new key.
    let with_new = format!("--key={NEW_KEY}");
    ok(ykpiv(card, &[&with_new, "-a", "set-ccc"]));
    // The old key is refused and costs a try.
    let with_old = format!("--key={DEFAULT_KEY}");
    assert!(!ykpiv(card, &[&with_old, "-a", "set-ccc"]).status.success());
    assert_eq!(state(card).admin_tries, 4);
    let general_authenticate: Vec<_> = card.apdus().into_iter().filter(|e| e.ins == 0x87).collect();
    assert!(general_authenticate.len() >= 6, "{general_authenticate:?}");
}

#[test]
fn opensc_tool_lists_the_reader_and_reads_the_atr() {
    let pcscd = Pcscd::shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let (piv_file, md_file) = (dir.path().join("piv.toml"), dir.path().join("md.toml"));
    new_card(&piv_file, &["--profile", "piv"]);
    new_card(
        &md_file,
        &[
            "--profile",
            "minidriver",
            "--admin-key",
            AES_KEY,
            "--algorithm",
            "aes-128",
        ],
    );
    // Both cards at once (both slots leased together), so both readers show a card.
    let mut cards = pcscd.insert_all(&[&piv_file, &md_file]).into_iter();
    let piv = cards.next().expect("piv");
    let minidriver = cards.next().expect("minidriver");
    let out = ok(run(&piv, "opensc-tool", &["-l"]));
    for card in [&piv, &minidriver] {
        let line = out
            .lines()
            .find(|line| line.ends_with(&card.reader()))
            .unwrap_or_else(|| panic!("reader missing: {out}"));
        assert!(line.contains("Yes"), "no card in {line}");
    }
    for (card, atr) in [(&piv, &ATR_PIV[..]), (&minidriver, &ATR_MINIDRIVER[..])] {
        let reader = card.reader();
        let out = ok(run(card, "opensc-tool", &["-r", &reader, "-a"]));
        let expected = atr
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(out.trim(), expected);
    }
}

fn key_file(dir: &Path, hex: &str) -> std::path::PathBuf {
    let path = dir.join("management.key");
    std::fs::write(&path, format!("{hex}\n")).expect("key file");
    path
}

/// `piv-tool -A M:9B:<alg>`: OpenSC's GENERAL AUTHENTICATE (mutual: witness and challenge) with
/// the key from $PIV_EXT_AUTH_KEY. (OpenSC 0.23's external variant, `A:`, has a length check
/// that fails against any card answering `7C 0A 81 08 …`; fixed upstream later.)
fn piv_tool_authenticate(card: &CardInReader, algorithm: &str, key: &Path) -> Output {
    let reader = card.reader();
    card.client("piv-tool")
        .env("PIV_EXT_AUTH_KEY", key)
        .args(["-r", &reader, "-A", &format!("M:9B:{algorithm}")])
        .output()
        .expect("run piv-tool")
}

#[test]
fn opensc_piv_tool_authenticates_with_the_management_key_3des_and_aes() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let tdes = piv_card();
        ok(piv_tool_authenticate(
            &tdes.card,
            "03",
            &key_file(dir.path(), DEFAULT_KEY),
        ));
    }
    // One card at a time: a test holding one slot while waiting for another can deadlock.
    let aes = insert(&[
        "--profile",
        "piv",
        "--admin-key",
        AES_KEY,
        "--algorithm",
        "aes-128",
    ]);
    ok(piv_tool_authenticate(
        &aes.card,
        "08",
        &key_file(dir.path(), AES_KEY),
    ));
    // A wrong key is refused and costs a try.
    let wrong = "FFEEDDCCBBAA99887766554433221100";
    assert!(
        !piv_tool_authenticate(&aes.card, "08", &key_file(dir.path(), wrong))
            .status
            .success()
    );
    assert_eq!(state(&aes.card).admin_tries, 4);
    let last = aes
        .card
        .apdus()
        .into_iter()
        .rev()
        .find(|e| e.ins == 0x87)
        .expect("GA");
    assert_eq!(last.sw, StatusWord::tries_remaining(4));
}

#[test]
fn opensc_pkcs15_tool_lists_the_pins() {
    let setup = piv_card();
    let reader = setup.card.reader();
    let out = ok(run(
        &setup.card,
        "pkcs15-tool",
        &["-r", &reader, "--list-pins"],
    ));
    assert!(out.contains("PIN [PIN]"), "{out}");
    assert!(out.contains("PIN [PIV PUK]"), "{out}");
    assert!(out.contains("Reference      : 128 (0x80)"), "{out}");
}

#[test]
fn the_apdu_log_never_contains_pin_puk_or_key_bytes() {
    let setup = piv_card();
    let card = &setup.card;
    ok(ykpiv(
        card,
        &["-a", "change-pin", "-P", "123456", "-N", "135792"],
    ));
    ok(ykpiv(card, &["-a", "verify-pin", "-P", "135792"]));
    ok(ykpiv(
        card,
        &["-a", "unblock-pin", "-P", "12345678", "-N", "246813"],
    ));
    ok(ykpiv(card, &["-a", "set-mgm-key", "-n", NEW_KEY]));
    let log = std::fs::read(card.apdu_log()).expect("log");
    let log_text = String::from_utf8_lossy(&log).to_ascii_uppercase();
    for secret in ["123456", "135792", "246813", "12345678"] {
        let hex = data_encoding::HEXUPPER.encode(secret.as_bytes());
        assert!(!log_text.contains(secret), "{secret} in the log");
        assert!(!log_text.contains(&hex), "{secret} (hex) in the log");
        assert!(
            !log_text.contains(&hex[..8]),
            "{secret} (hex prefix) in the log"
        );
    }
    for key in [DEFAULT_KEY, NEW_KEY] {
        assert!(!log_text.contains(&key[..8]), "key bytes in the log");
    }
    // The commands are there, as headers.
    let verifies = card
        .apdus()
        .into_iter()
        .filter(|e| e.ins == 0x20 && e.lc == 8)
        .count();
    assert!(verifies >= 1);
}

#[test]
fn a_pulled_card_is_gone_and_comes_back_with_its_counters() {
    let setup = piv_card();
    let card = &setup.card;
    assert!(
        !ykpiv(card, &["-a", "verify-pin", "-P", "000000"])
            .status
            .success()
    );
    card.remove();
    let out = ok(run(card, "opensc-tool", &["-l"]));
    let line = out
        .lines()
        .find(|l| l.ends_with(&card.reader()))
        .expect("reader");
    assert!(line.contains("No"), "card still seen: {line}");
    assert!(!ykpiv(card, &["-a", "status"]).status.success());
    card.reinsert();
    let out = ok(ykpiv(card, &["-a", "status"]));
    assert!(out.contains("PIN tries left:\t2"), "{out}");
    let log = std::fs::read_to_string(card.apdu_log()).expect("log");
    assert!(log.contains("event removed"), "{log}");
}

#[test]
fn a_blocked_card_stays_blocked_when_its_process_restarts() {
    let pcscd = Pcscd::shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("card.toml");
    new_card(&file, &["--profile", "piv"]);
    {
        let card = pcscd.insert(&file);
        for _ in 0..5 {
            let _ = ykpiv(
                &card,
                &["-a", "unblock-pin", "-P", "00000000", "-N", "654321"],
            );
        }
        assert_eq!(state(&card).puk_tries, 0);
    }
    let card = pcscd.insert(&file);
    let out = ykpiv(
        &card,
        &["-a", "unblock-pin", "-P", "12345678", "-N", "654321"],
    );
    assert!(
        !out.status.success(),
        "a blocked PUK unblocked the PIN: {}",
        text(&out)
    );
    let last = card
        .apdus()
        .into_iter()
        .rev()
        .find(|e| e.ins == 0x2C)
        .expect("RESET RETRY COUNTER");
    assert_eq!(last.sw, StatusWord::AUTH_METHOD_BLOCKED);
}

/// Raw APDUs through OpenSC (`opensc-tool -s`, one connection): the card's answers, in order.
fn raw_apdus(card: &CardInReader, apdus: &[&str]) -> String {
    let reader = card.reader();
    let mut args = vec!["-r", reader.as_str()];
    for apdu in apdus {
        args.extend_from_slice(&["-s", apdu]);
    }
    ok(run(card, "opensc-tool", &args))
}

#[test]
fn minidriver_admin_key_counts_down_and_challenges_die_through_pcscd() {
    let setup = insert(&[
        "--profile",
        "minidriver",
        "--master-key",
        "404142434445464748494A4B4C4D4E4F",
        "--scheme",
        "gp-emv",
    ]);
    let card = &setup.card;
    let challenge = "00:84:00:00:08";
    let wrong_response = "00:82:00:01:08:00:00:00:00:00:00:00:00";
    // A challenge followed by another command is dead: no try spent.
    let out = raw_apdus(card, &[challenge, "00:CA:01:00:10", wrong_response]);
    assert!(out.contains("SW1=0x69, SW2=0x85"), "{out}");
    assert_eq!(state(card).admin_tries, 5);
    // Wrong responses cost a try each; the fifth blocks the admin key for good.
    for left in (0..5u8).rev() {
        let out = raw_apdus(card, &[challenge, wrong_response]);
        assert!(out.contains(&format!("SW1=0x63, SW2=0xC{left}")), "{out}");
        assert_eq!(state(card).admin_tries, left);
    }
    let out = raw_apdus(card, &[challenge, wrong_response]);
    assert!(out.contains("SW1=0x69, SW2=0x83"), "{out}");
    let last = card
        .apdus()
        .into_iter()
        .rev()
        .find(|e| e.ins == 0x82)
        .expect("EXTERNAL AUTHENTICATE");
    assert_eq!(last.sw, StatusWord::AUTH_METHOD_BLOCKED);
}
