//! The agent service's local API on its Unix socket (no certificate), with the in-process
//! virtual card: the socket's permissions, the offline flow over gRPC, reader events, and the
//! `cms-agent` commands in script mode (stdin lines, --json) against the running agent.

mod agent_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use agent_common::*;
use cms_agent::Config;
use cms_agent::card::sim::SimReaders;
use cms_agent::client::Api;
use cms_launcher::layout::Peers;
use cms_proto::agent::v1::{ApplyResponseRequest, ReaderEventKind, UnblockOutcome};
use cms_proto::common::v1::{CardProfile, TypedCode};
use cms_tests::inproc::{self, Running};
use tokio_stream::StreamExt;

const NEW_PIN: &str = "482915";

async fn start_agent(dir: &std::path::Path, card: &TestCard) -> (Running, std::path::PathBuf) {
    let peers = Peers {
        // Nothing listens there: the link retries in the background; the local API works.
        gateway: Some("127.0.0.1:1".parse().unwrap()),
        ..Peers::default()
    };
    cms_tests::pki::TestPki::new(dir);
    let mut config: Config = inproc::config(dir, "agent", &peers);
    config.server.shutdown_grace_ms = 500;
    let socket = config.local_api.socket_path(&config.data_dir);
    let readers: Arc<dyn cms_agent::card::readers::Readers> =
        Arc::new(SimReaders::default().with(READER, card.reader.clone()));
    let running = Running::start(config, move |c, l, s| {
        cms_agent::run_with_readers(c, l, s, readers)
    })
    .await;
    (running, socket)
}

#[tokio::test]
async fn offline_unblock_and_events_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let card = minidriver_card(Alg::Tdes);
    let (running, socket) = start_agent(dir.path(), &card).await;
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let mut api = Api::socket(&socket).await.unwrap();
    let readers = api.readers().await.unwrap();
    assert_eq!(readers.len(), 1);
    assert!(readers[0].card_present);
    let info = api.card("").await.unwrap();
    assert_eq!(info.profile, CardProfile::Minidriver as i32);

    let challenge = api.challenge(READER).await.unwrap();
    let response = respond(&card.admin_key, challenge.challenge.as_ref().unwrap());
    let result = api
        .apply(ApplyResponseRequest {
            session_handle: challenge.session_handle,
            response: Some(response),
            new_pin: NEW_PIN.into(),
            pin_policy: None,
        })
        .await
        .unwrap();
    assert_eq!(
        result.outcome,
        UnblockOutcome::Success as i32,
        "{}",
        result.message
    );
    assert!(pin_verifies(&card.reader, NEW_PIN.as_bytes()));

    // Reader events: the current state first, then a removal and an insertion.
    let mut events = api.watch(true).await.unwrap();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event within 5 s")
            .expect("stream open")
            .expect("event")
            .event
            .unwrap()
    };
    assert_eq!(next().await.kind, ReaderEventKind::ReaderAdded as i32);
    let inserted = next().await;
    assert_eq!(inserted.kind, ReaderEventKind::CardInserted as i32);
    card.reader.remove();
    assert_eq!(next().await.kind, ReaderEventKind::CardRemoved as i32);
    card.reader.insert();
    let inserted = next().await;
    assert_eq!(inserted.kind, ReaderEventKind::CardInserted as i32);
    assert_eq!(inserted.card.unwrap().card_id, card.card_id);

    // The watch stream is still open: shutdown waits the grace period for it, no longer.
    let stopping = tokio::time::timeout(Duration::from_secs(5), running.stop());
    stopping
        .await
        .expect("shutdown within the grace period")
        .unwrap();
    drop(events);
    assert!(!socket.exists(), "the socket is removed at shutdown");
}

#[tokio::test]
async fn cli_unblock_in_script_mode() {
    let dir = tempfile::tempdir().unwrap();
    let card = minidriver_card(Alg::Aes);
    let (running, socket) = start_agent(dir.path(), &card).await;
    let exe = cms_tests::binary("cms-agent");
    let socket_arg = socket.clone();
    let admin_key = card.admin_key.clone();
    let (first, result) = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(exe)
            .args(["unblock", "--json", "--socket"])
            .arg(&socket_arg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let shown: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let challenge = TypedCode {
            hex: shown["challenge"].as_str().unwrap().into(),
            checksum: shown["checksum"].as_str().unwrap().into(),
        };
        let response = respond(&admin_key, &challenge);
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}\n{}\n{NEW_PIN}", response.hex, response.checksum).unwrap();
        drop(stdin);
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{rest}");
        (shown, rest)
    })
    .await
    .unwrap();
    assert_eq!(first["challenge"].as_str().unwrap().split(' ').count(), 8);
    let result: serde_json::Value = serde_json::from_str(result.trim()).unwrap();
    assert_eq!(result["outcome"], "success", "{result}");
    assert!(pin_verifies(&card.reader, NEW_PIN.as_bytes()));

    // A checksum typo in script mode: refused before the card, exit status 1.
    let exe = cms_tests::binary("cms-agent");
    let before = responses_sent(&card.reader);
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(exe)
            .args(["unblock", "--json", "--socket"])
            .arg(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(
            stdin,
            "0011 2233 4455 6677 8899 AABB CCDD EEFF\n0000\n{NEW_PIN}"
        )
        .unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["outcome"], "checksum_mismatch", "{text}");
    assert_eq!(
        responses_sent(&card.reader),
        before,
        "no response reached the card"
    );
    assert_eq!(admin_tries(&card.reader), 5);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_virtual_card_from_the_config() {
    use cms_launcher::layout::{Layout, Ports};
    let dir = tempfile::tempdir().unwrap();
    cms_tests::pki::TestPki::new(dir.path());
    let (state, admin_key) = minidriver_state(Alg::Aes);
    let card_file = dir.path().join("card.toml");
    state.save(&card_file).unwrap();
    let layout = Layout::new(dir.path(), cms_tests::pki::TRUST_DOMAIN).unwrap();
    layout.create_dirs().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let peers = Peers {
        gateway: Some("127.0.0.1:1".parse().unwrap()),
        ..Peers::default()
    };
    let extra = format!(
        "[cards]\nvirtual_card = {:?}\n",
        card_file.display().to_string()
    );
    let text = layout
        .service_config(
            "agent",
            Ports {
                grpc: any,
                ops: any,
            },
            &peers,
            &extra,
        )
        .unwrap();
    let config_file = dir.path().join("agent.toml");
    std::fs::write(&config_file, &text).unwrap();

    // The service serves it...
    let config: Config = cms_kit::config::from_toml(&text).unwrap();
    let socket = config.local_api.socket_path(&config.data_dir);
    let running = Running::start(config, cms_agent::run).await;
    let mut api = Api::socket(&socket).await.unwrap();
    let readers = api.readers().await.unwrap();
    assert_eq!(readers[0].name, cms_agent::VIRTUAL_READER);
    let challenge = api.challenge("").await.unwrap();
    let result = api
        .apply(ApplyResponseRequest {
            session_handle: challenge.session_handle,
            response: Some(respond(&admin_key, challenge.challenge.as_ref().unwrap())),
            new_pin: NEW_PIN.into(),
            pin_policy: None,
        })
        .await
        .unwrap();
    assert_eq!(
        result.outcome,
        UnblockOutcome::Success as i32,
        "{}",
        result.message
    );
    drop(api);
    running.stop().await.unwrap();
    // ...persistently: the card file holds the new PIN.
    let after = cms_card::sim::CardState::load(&card_file).unwrap();
    assert_eq!(&after.pin[..], NEW_PIN.as_bytes());

    // And the commands use it directly with --config.
    let out = Command::new(cms_tests::binary("cms-agent"))
        .arg("--config")
        .arg(&config_file)
        .args(["card", "--direct", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["profile"], "minidriver");
    assert_eq!(info["pin_tries_left"], 3);
}
