//! The product's central scene end to end. A user's card with a blocked PIN sits in a reader of
//! the real PC/SC stack (pcscd + vpcd, the harness in tests/src/pcsc.rs); the card agent runs
//! as a process beside it; the system (template, directory, custody, gateway) runs as real
//! processes over mTLS. The agent reads the challenge from the card, the helpdesk operator gets
//! the cryptogram through the gateway's HelpdeskService, the agent applies it with a new PIN,
//! and the card accepts the new PIN (VERIFY through OpenSC).
//!
//! And `cms demo`: it runs through its walk-through to "The demo system is up." without a
//! terminal, and stops cleanly on SIGINT.
//!
//! Needs root, pcscd, vsmartcard-vpcd and opensc (tests/run.sh installs them), and the
//! `cms`, `cms-agent` and `cms-vcard` binaries.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cms_agent::client::Api;
use cms_cardcrypto::{KeyAlgorithm, SecretKey};
use cms_launcher::demo::{access, card, setup};
use cms_launcher::layout::{Layout, Peers, Ports};
use cms_proto::agent::v1::{ApplyResponseRequest, UnblockOutcome};
use cms_proto::common::v1::Flow;
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;
use cms_proto::gateway::v1::helpdesk_service_client::HelpdeskServiceClient;
use cms_tests::cluster::Cluster;
use cms_tests::pcsc::{CardInReader, Pcscd};
use tempfile::TempDir;

const NEW_PIN: &str = "482915";

/// The `cms-agent` service as a process on the test's pcscd, without a gateway (the offline
/// flow needs none); killed on drop.
struct AgentProcess {
    child: Child,
    socket: PathBuf,
    dir: TempDir,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(pcscd: &Pcscd) -> AgentProcess {
    let dir = tempfile::tempdir().unwrap();
    cms_tests::pki::TestPki::new(dir.path());
    let layout = Layout::new(dir.path(), cms_tests::pki::TRUST_DOMAIN).unwrap();
    layout.create_dirs().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let peers = Peers {
        // Nothing listens there: the user's PC has no connection to the CMS.
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
        .client(cms_tests::binary("cms-agent"))
        .arg("--config")
        .arg(&file)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let agent = AgentProcess { child, socket, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent did not open its socket: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent
}

impl AgentProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

/// VERIFY of the user PIN through OpenSC: the card's status word.
fn verify_pin(card: &CardInReader, pin: &str) -> String {
    let data = data_encoding::HEXUPPER.encode(pin.as_bytes());
    let apdu = format!("00 20 00 80 {:02X} {data}", pin.len());
    let out = card
        .client("opensc-tool")
        .args(["-r", &card.reader(), "-s", &apdu])
        .output()
        .expect("run opensc-tool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helpdesk_unblocks_a_card_in_a_real_reader_through_the_gateway() {
    cms_tests::pcsc::require();
    let cluster = Cluster::start(|_| String::new()).await;
    let layout = &cluster.layout;
    let gateway = cluster.grpc("gateway");
    let mut admin =
        AdminServiceClient::new(access::operator_channel(layout, gateway, "admin").unwrap());

    // Issued: a master key from a key ceremony, the template, the user, the card (personalised
    // with its diversified admin key and a PIN the user has forgotten), a helpdesk operator.
    let master = SecretKey::new(KeyAlgorithm::Aes128, &[0x3Cu8; 16].map(|b| b ^ 0x5A)).unwrap();
    let version = setup::import_master_key(&mut admin, "mk-scene", &master)
        .await
        .unwrap();
    let (template, template_version) =
        setup::create_template(&mut admin, setup::template_spec("mk-scene"))
            .await
            .unwrap();
    let user = setup::create_user(&mut admin, "demo.user").await.unwrap();
    let card_id: Vec<u8> = (0x40..0x50).collect();
    let card_dir = tempfile::tempdir().unwrap();
    let card_file = card_dir.path().join("card.toml");
    card::write_blocked_card(
        &card_file,
        &card_id,
        7,
        setup::admin_key(&master, &card_id, version).unwrap(),
    )
    .unwrap();
    let credential = setup::register_card(
        &mut admin,
        &setup::CardRecord {
            user_id: user.id.clone(),
            profile: cms_proto::common::v1::CardProfile::Minidriver,
            card_id: card_id.clone(),
            serial: data_encoding::HEXUPPER.encode(&card_id),
            template_id: template,
            template_version,
            master_key_version: version,
        },
    )
    .await
    .unwrap();
    access::ensure_operator_cert(layout, access::HELPDESK).unwrap();
    setup::create_operator(&mut admin, access::HELPDESK, &["helpdesk"])
        .await
        .unwrap();

    let pcscd = Pcscd::shared();
    let card = pcscd.insert(&card_file);
    let agent = start_agent(&pcscd);
    let mut api = Api::socket(&agent.socket).await.unwrap();
    let reader = card.reader();

    // The user: the agent shows the card's challenge.
    let info = api.card(&reader).await.unwrap();
    assert!(info.pin_blocked, "{info:?}");
    assert_eq!(info.card_id, card_id);
    let started = api.challenge(&reader).await.unwrap();
    let challenge = started.challenge.clone().unwrap();

    // The operator: types it in; the gateway answers with the response and its checksum.
    let mut helpdesk = HelpdeskServiceClient::new(
        access::operator_channel(layout, gateway, access::HELPDESK).unwrap(),
    );
    let answer = helpdesk
        .compute_offline_response(gw::ComputeOfflineResponseRequest {
            user_id: user.id.clone(),
            credential_id: credential.id.clone(),
            challenge: Some(challenge.clone()),
            flow: Flow::OfflineHelpdesk as i32,
            approval_id: String::new(),
            ticket_reference: "T-1".into(),
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let response = answer.response.unwrap();
    let bytes = cms_cardcrypto::parse_with_checksum(&response.hex, &response.checksum, &[16])
        .expect("a response with a valid checksum");
    let expected = cms_cardcrypto::response(
        &setup::admin_key(&master, &card_id, version).unwrap(),
        &cms_cardcrypto::parse_hex(&challenge.hex, &[16]).unwrap(),
    )
    .unwrap();
    assert_eq!(&bytes[..], &expected[..]);

    // The user: types the response and a new PIN; the card takes them.
    let result = api
        .apply(ApplyResponseRequest {
            session_handle: started.session_handle,
            response: Some(response),
            new_pin: NEW_PIN.into(),
            pin_policy: None,
        })
        .await
        .unwrap();
    assert_eq!(
        UnblockOutcome::try_from(result.outcome),
        Ok(UnblockOutcome::Success),
        "{}\nagent: {}",
        result.message,
        agent.log()
    );
    drop(api);

    // The new PIN verifies on the card (and the old one does not any more).
    let out = verify_pin(&card, NEW_PIN);
    assert!(out.contains("SW1=0x90, SW2=0x00"), "{out}");
    let out = verify_pin(&card, "forgotten-1");
    assert!(out.contains("SW1=0x63"), "{out}");
    drop(agent);
    drop(card);
    cluster.stop().await;
}

#[test]
fn cms_demo_walks_through_and_stops_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let mut child = Command::new(cms_tests::binary("cms"))
        .arg("demo")
        .arg("--data-dir")
        .arg(&data)
        .arg("--base-port")
        .arg(cms_tests::free_base_port(15).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cms demo");
    let stdout = child.stdout.take().unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut output = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match seen.recv_timeout(left) {
            Ok(line) => {
                let up = line.starts_with("The demo system is up.");
                output.push(line);
                if up {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "cms demo did not come up:\n{}\nstderr: {}",
                    output.join("\n"),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    let text = output.join("\n");
    assert_eq!(
        text.matches("VERIFY with the new PIN: accepted.").count(),
        2,
        "{text}"
    );
    assert!(text.contains("challenge "), "{text}");
    assert!(text.contains("response "), "{text}");
    assert!(text.contains("helpdesk search dana"), "{text}");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "cms demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Everything it printed until its standard output closed.
    let rest: Vec<String> = seen.iter().collect();
    assert!(status.success(), "{status}: {}", rest.join("\n"));
    assert!(rest.iter().any(|l| l == "stopped"), "{}", rest.join("\n"));
}

#[test]
fn cms_demo_leaves_a_directory_it_did_not_make_alone() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let out = Command::new(cms_tests::binary("cms"))
        .arg("demo")
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--base-port")
        .arg(cms_tests::free_base_port(15).to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run cms demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("was not made by `cms demo`; it is left alone"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
}
