//! The agent against the virtual card through the real PC/SC stack (pcscd + vpcd, the harness in
//! tests/src/pcsc.rs): the `cms-agent` service runs as a process pointed at the test's pcscd, with
//! no gateway and no custody; the test talks to it over its Unix socket. Responses are computed
//! from the shared vectors' master keys, as custody would.
//!
//! Needs root, pcscd and vsmartcard-vpcd (tests/run.sh installs them), and the `cms-agent` and
//! `cms-vcard` binaries (`cargo build -p cms-agent -p cms-vcard`).

mod agent_common;

use std::path::PathBuf;
use std::process::{Child, Stdio};

use std::time::{Duration, Instant};

use agent_common::*;
use cms_agent::client::Api;
use cms_card::sim::state::CardState;
use cms_launcher::layout::{Layout, Peers, Ports};
use cms_proto::agent::v1::{
    ApplyResponseRequest, UnblockOutcome, UnblockResult, UnblockSoTokenRequest,
    UnblockWithPukRequest,
};
use cms_proto::common::v1::{CardProfile, TypedCode};
use cms_tests::pcsc::{CardInReader, Pcscd};
use tempfile::TempDir;

const NEW_PIN: &str = "482915";

/// The agent service as a process on the test's pcscd; killed on drop.
struct AgentProcess {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `cms-agent` binary beside the test executable, or `$CMS_AGENT_BIN` (a release build for
/// the benchmark).
fn agent_binary() -> PathBuf {
    std::env::var_os("CMS_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| cms_tests::binary("cms-agent"))
}

fn start_agent(pcscd: &Pcscd) -> AgentProcess {
    let dir = tempfile::tempdir().unwrap();
    cms_tests::pki::TestPki::new(dir.path());
    let layout = Layout::new(dir.path(), cms_tests::pki::TRUST_DOMAIN).unwrap();
    layout.create_dirs().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let peers = Peers {
        // Nothing listens there: the gateway is "down"; the offline flows need none.
        gateway: Some("127.0.0.1:1".parse().unwrap()),
        ..Peers::default()
    };
    let text = layout
        .service_config(
            "agent",
            Ports {
                grpc: any,
                ops: any,
            },
            &peers,
            "",
        )
        .unwrap();
    let config: cms_agent::Config = cms_kit::config::from_toml(&text).unwrap();
    let socket = config.local_api.socket_path(&config.data_dir);
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, text).unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let child = pcscd
        .client(agent_binary())
        .arg("--config")
        .arg(&file)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent did not open its socket: {}",
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    AgentProcess {
        child,
        socket,
        _dir: dir,
    }
}

/// A card file written from `state`, in a reader of the shared pcscd, and an agent.
struct Setup {
    // Dropped in this order: the agent lets go of the card before the card leaves the reader.
    agent: AgentProcess,
    card: CardInReader,
    _dir: TempDir,
}

fn setup(state: &CardState) -> Setup {
    let pcscd = Pcscd::shared();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("card.toml");
    state.save(&file).unwrap();
    let card = pcscd.insert(&file);
    let agent = start_agent(&pcscd);
    Setup {
        card,
        agent,
        _dir: dir,
    }
}

impl Setup {
    async fn api(&self) -> Api {
        Api::socket(&self.agent.socket).await.unwrap()
    }

    fn state(&self) -> CardState {
        CardState::load(self.card.card_file()).unwrap()
    }

    /// EXTERNAL AUTHENTICATE commands that carried a response.
    fn responses_sent(&self) -> usize {
        self.card
            .apdus()
            .iter()
            .filter(|e| e.ins == EXTERNAL_AUTHENTICATE && e.lc > 0)
            .count()
    }
}

async fn challenge(api: &mut Api, reader: &str) -> (String, TypedCode) {
    let c = api.challenge(reader).await.unwrap();
    (c.session_handle, c.challenge.unwrap())
}

async fn apply(api: &mut Api, handle: &str, response: TypedCode) -> UnblockResult {
    api.apply(ApplyResponseRequest {
        session_handle: handle.into(),
        response: Some(response),
        new_pin: NEW_PIN.into(),
        pin_policy: None,
    })
    .await
    .unwrap()
}

fn outcome(r: &UnblockResult) -> UnblockOutcome {
    UnblockOutcome::try_from(r.outcome).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_unblock_at_the_card_3des_and_aes() {
    for alg in [Alg::Tdes, Alg::Aes] {
        let (state, admin_key) = minidriver_state(alg);
        let s = setup(&state);
        let reader = s.card.reader();
        let mut api = s.api().await;
        let info = api.card(&reader).await.unwrap();
        assert_eq!(info.profile, CardProfile::Minidriver as i32);
        assert_eq!(info.card_id, state.card_id);
        assert!(info.pin_blocked);
        let (handle, shown) = challenge(&mut api, &reader).await;
        let r = apply(&mut api, &handle, respond(&admin_key, &shown)).await;
        assert_eq!(
            outcome(&r),
            UnblockOutcome::Success,
            "{alg:?}: {}",
            r.message
        );
        // The new PIN is the card's PIN now, with its tries restored.
        let after = s.state();
        assert_eq!(&after.pin[..], NEW_PIN.as_bytes());
        assert_eq!(after.pin_tries, 3);
        assert_eq!(after.admin_tries, 5);
        let info = api.card(&reader).await.unwrap();
        assert_eq!(info.pin_tries_left, Some(3));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_responses_count_down_then_block_the_card() {
    let (state, admin_key) = minidriver_state(Alg::Tdes);
    let s = setup(&state);
    let reader = s.card.reader();
    let mut api = s.api().await;
    for attempt in 1..=5u8 {
        let (handle, shown) = challenge(&mut api, &reader).await;
        let r = apply(&mut api, &handle, wrong(&respond(&admin_key, &shown))).await;
        let left = 5 - attempt;
        assert_eq!(
            s.state().admin_tries,
            left,
            "the card's counter dropped by one"
        );
        if left > 1 {
            assert_eq!(outcome(&r), UnblockOutcome::WrongResponse);
            assert!(
                r.message.contains(&format!("{left} tries left")),
                "{}",
                r.message
            );
        } else if left == 1 {
            assert!(r.message.contains("1 try left"), "{}", r.message);
        } else {
            assert_eq!(outcome(&r), UnblockOutcome::AdminBlocked, "{}", r.message);
            assert!(
                r.message.contains("cannot be unblocked any more"),
                "{}",
                r.message
            );
        }
    }
    let err = api.challenge(&reader).await.unwrap_err();
    assert!(
        err.message().contains("cannot be unblocked any more"),
        "{err}"
    );
    assert!(api.card(&reader).await.unwrap().admin_blocked);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checksum_typo_never_reaches_the_card() {
    let (state, admin_key) = minidriver_state(Alg::Aes);
    let s = setup(&state);
    let reader = s.card.reader();
    let mut api = s.api().await;
    let (handle, shown) = challenge(&mut api, &reader).await;
    let good = respond(&admin_key, &shown);
    let mut typo = good.clone();
    typo.checksum = format!(
        "{:04X}",
        u16::from_str_radix(&good.checksum, 16).unwrap() ^ 0x0100
    );
    let r = apply(&mut api, &handle, typo).await;
    assert_eq!(
        outcome(&r),
        UnblockOutcome::ChecksumMismatch,
        "{}",
        r.message
    );
    assert_eq!(
        s.responses_sent(),
        0,
        "no EXTERNAL AUTHENTICATE with a response in the APDU log"
    );
    assert_eq!(s.state().admin_tries, 5);
    // The challenge survived: the card saw nothing since GET CHALLENGE.
    let r = apply(&mut api, &handle, good).await;
    assert_eq!(outcome(&r), UnblockOutcome::Success, "{}", r.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_card_removed_between_challenge_and_response_voids_the_challenge() {
    let (state, admin_key) = minidriver_state(Alg::Tdes);
    let s = setup(&state);
    let reader = s.card.reader();
    let mut api = s.api().await;
    let (handle, shown) = challenge(&mut api, &reader).await;
    s.card.remove();
    assert_eq!(s.card.control("insert"), "ok");
    let r = apply(&mut api, &handle, respond(&admin_key, &shown)).await;
    assert_eq!(outcome(&r), UnblockOutcome::CardRemoved, "{}", r.message);
    assert!(r.message.contains("start again"), "{}", r.message);
    assert_eq!(s.responses_sent(), 0);
    assert_eq!(s.state().admin_tries, 5);
    let (handle, shown) = challenge(&mut api, &reader).await;
    let r = apply(&mut api, &handle, respond(&admin_key, &shown)).await;
    assert_eq!(outcome(&r), UnblockOutcome::Success, "{}", r.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn piv_puk_unblock_3des_and_aes() {
    for alg in [Alg::Tdes, Alg::Aes] {
        let (state, puk) = piv_state(alg);
        let s = setup(&state);
        let reader = s.card.reader();
        let mut api = s.api().await;
        let info = api.card(&reader).await.unwrap();
        assert_eq!(info.profile, CardProfile::Piv as i32);
        assert_eq!(info.card_id, state.card_id);
        let request = |puk: &[u8], checksum: String| UnblockWithPukRequest {
            reader: reader.clone(),
            expected_card_id: state.card_id.clone(),
            puk: String::from_utf8(puk.to_vec()).unwrap(),
            puk_checksum: checksum,
            new_pin: NEW_PIN.into(),
            pin_policy: None,
        };
        let sum = cms_cardcrypto::checksum(&puk);
        let typo = format!("{:04X}", u16::from_str_radix(&sum, 16).unwrap() ^ 1);
        let r = api.unblock_with_puk(request(&puk, typo)).await.unwrap();
        assert_eq!(outcome(&r), UnblockOutcome::ChecksumMismatch);
        assert_eq!(s.state().puk_tries, 5);
        let r = api.unblock_with_puk(request(&puk, sum)).await.unwrap();
        assert_eq!(
            outcome(&r),
            UnblockOutcome::Success,
            "{alg:?}: {}",
            r.message
        );
        assert_eq!(&s.state().pin[..], NEW_PIN.as_bytes());
    }
}

/// An SO token: a minidriver card whose admin key is the SO unblock key shown at initialisation.
fn so_token(
    algorithm: cms_cardcrypto::KeyAlgorithm,
    alg: Alg,
) -> (CardState, cms_cardcrypto::SoUnblockKey) {
    use cms_cardcrypto::{KeyAlgorithm, SecretKey, SoUnblockKey};
    let mut seed = 11u8;
    let key = SoUnblockKey::generate(algorithm, &mut |b| {
        for x in b.iter_mut() {
            seed = seed.wrapping_mul(29).wrapping_add(101);
            *x = seed;
        }
    })
    .unwrap();
    let (mut state, _) = minidriver_state(alg);
    state.admin_key = match algorithm {
        KeyAlgorithm::Tdes2Key => {
            let b = key.key().expose_bytes();
            let mut k = b.to_vec();
            k.extend_from_slice(&b[..8]);
            SecretKey::new(KeyAlgorithm::Tdes3Key, &k).unwrap()
        }
        _ => key.key().clone(),
    };
    (state, key)
}

#[tokio::test(flavor = "multi_thread")]
async fn so_token_unblock_with_every_server_stopped() {
    use cms_cardcrypto::KeyAlgorithm;
    for (algorithm, alg) in [
        (KeyAlgorithm::Tdes2Key, Alg::Tdes),
        (KeyAlgorithm::Aes128, Alg::Aes),
    ] {
        let (state, key) = so_token(algorithm, alg);
        let s = setup(&state);
        let reader = s.card.reader();
        let mut api = s.api().await;
        let kcv = data_encoding::HEXUPPER.encode(&key.kcv());
        let r = api
            .unblock_so_token(UnblockSoTokenRequest {
                reader: reader.clone(),
                so_unblock_key: Some(TypedCode {
                    hex: key.display().to_string(),
                    checksum: String::new(),
                }),
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
            "{algorithm}: {}",
            r.message
        );
        assert_eq!(&s.state().pin[..], NEW_PIN.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reader_and_card_events_through_pcscd() {
    use cms_proto::agent::v1::ReaderEventKind as Kind;
    use tokio_stream::StreamExt;
    let (state, _) = minidriver_state(Alg::Tdes);
    let s = setup(&state);
    let reader = s.card.reader();
    let mut api = s.api().await;
    let mut events = api.watch(true).await.unwrap();
    // Events of this test's reader only (other tests use the other slot).
    let mut next = async || loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event within 10 s")
            .expect("stream open")
            .expect("event")
            .event
            .unwrap();
        if event.reader == reader {
            return event;
        }
    };
    assert_eq!(next().await.kind, Kind::ReaderAdded as i32);
    let inserted = next().await;
    assert_eq!(inserted.kind, Kind::CardInserted as i32);
    assert_eq!(
        inserted.card.unwrap().profile,
        CardProfile::Minidriver as i32
    );
    let card = &s.card;
    tokio::task::block_in_place(|| card.remove());
    assert_eq!(next().await.kind, Kind::CardRemoved as i32);
    assert_eq!(tokio::task::block_in_place(|| card.control("insert")), "ok");
    let inserted = next().await;
    assert_eq!(inserted.kind, Kind::CardInserted as i32);
    assert_eq!(inserted.card.unwrap().card_id, state.card_id);
}

#[test]
fn cli_reports_readers_and_a_missing_pcscd_in_one_line() {
    let pcscd = Pcscd::shared();
    let (state, _) = minidriver_state(Alg::Aes);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("card.toml");
    state.save(&file).unwrap();
    let card = pcscd.insert(&file);
    let out = pcscd
        .client(cms_tests::binary("cms-agent"))
        .args(["card", "--direct", "--json", "--reader", &card.reader()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", cms_tests::pcsc::text(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["profile"], "minidriver");
    assert_eq!(info["admin_tries_left"], 5);
    // pcscd not running (nothing at the socket): one line that says so.
    let out = std::process::Command::new(cms_tests::binary("cms-agent"))
        .env(
            cms_tests::pcsc::SOCKET_ENV,
            dir.path().join("no-pcscd.comm"),
        )
        .args(["readers", "--direct"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim(),
        "cms-agent: the smart-card service (pcscd) is not running"
    );
    // A reader that is not there.
    let out = pcscd
        .client(cms_tests::binary("cms-agent"))
        .args(["card", "--direct", "--reader", "No Such Reader 00 00"])
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim(), "cms-agent: the card reader is gone");
}

#[test]
fn cli_so_unblock_and_piv_unblock_in_script_mode() {
    use std::io::Write;
    let pcscd = Pcscd::shared();
    let dir = tempfile::tempdir().unwrap();
    let run = |card: &CardInReader, command: &str, input: String| {
        let mut child = pcscd
            .client(cms_tests::binary("cms-agent"))
            .args([command, "--direct", "--json", "--reader", &card.reader()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8(out.stdout.clone()).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or("{}"))
            .unwrap_or_else(|e| panic!("{e}: {}", cms_tests::pcsc::text(&out)));
        (out.status.code(), last)
    };

    // SO token: the key as shown at initialisation (groups, " - ", checksum), then the PIN.
    let (state, key) = so_token(cms_cardcrypto::KeyAlgorithm::Aes128, Alg::Aes);
    let file = dir.path().join("so.toml");
    state.save(&file).unwrap();
    let card = pcscd.insert(&file);
    let mut typo = key.display().to_string();
    let last = typo.pop().unwrap();
    typo.push(if last == '0' { '1' } else { '0' });
    let (code, result) = run(&card, "so-unblock", format!("{typo}\n{NEW_PIN}\n"));
    assert_eq!(
        (code, result["outcome"].as_str()),
        (Some(1), Some("checksum_mismatch")),
        "{result}"
    );
    assert_eq!(
        card.apdus()
            .iter()
            .filter(|e| e.ins == EXTERNAL_AUTHENTICATE && e.lc > 0)
            .count(),
        0
    );
    let (code, result) = run(
        &card,
        "so-unblock",
        format!("{}\n{NEW_PIN}\n", key.display().as_str()),
    );
    assert_eq!(
        (code, result["outcome"].as_str()),
        (Some(0), Some("success")),
        "{result}"
    );
    assert_eq!(&CardState::load(&file).unwrap().pin[..], NEW_PIN.as_bytes());
    drop(card);

    // PIV: `unblock` sees a PIV card and asks for the PUK and its checksum.
    let (state, puk) = piv_state(Alg::Tdes);
    let file = dir.path().join("piv.toml");
    state.save(&file).unwrap();
    let card = pcscd.insert(&file);
    let puk_text = String::from_utf8(puk.clone()).unwrap();
    let (code, result) = run(
        &card,
        "unblock",
        format!(
            "{puk_text}\n{}\n{NEW_PIN}\n",
            cms_cardcrypto::checksum(&puk)
        ),
    );
    assert_eq!(
        (code, result["outcome"].as_str()),
        (Some(0), Some("success")),
        "{result}"
    );
    assert_eq!(&CardState::load(&file).unwrap().pin[..], NEW_PIN.as_bytes());
}

/// Offline unblock at the card, from the typed response to the PIN reset, through pcscd+vpcd
/// (target: median <= 20 ms). `cargo test -p cms-tests --test agent_pcsc -- --ignored
/// --nocapture bench`, with CMS_AGENT_BIN and CMS_VCARD_BIN naming release builds of the two
/// processes on the path; AGENT_BENCH_ROUNDS sets the rounds (default 200).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark"]
async fn bench_offline_unblock() {
    let rounds: usize = std::env::var("AGENT_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200);
    let (state, admin_key) = minidriver_state(Alg::Aes);
    let s = setup(&state);
    let reader = s.card.reader();
    let mut api = s.api().await;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let (handle, shown) = challenge(&mut api, &reader).await;
        let response = respond(&admin_key, &shown);
        let start = Instant::now();
        let r = apply(&mut api, &handle, response).await;
        times.push(start.elapsed());
        assert_eq!(outcome(&r), UnblockOutcome::Success, "{}", r.message);
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "offline unblock at the card (ApplyResponse over the agent socket -> EXTERNAL AUTHENTICATE -> RESET RETRY COUNTER -> VERIFY -> disconnect with card reset), {} rounds: median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        times.len(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.9).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
    );
}
