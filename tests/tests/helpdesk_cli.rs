//! `cmsctl helpdesk` and `cmsctl approvals` the way operators use them: real processes over
//! mTLS (`cms serve …`), the system set up through the gateway as the dev operator (a master key
//! from a key ceremony, so the test knows each card's admin key and hence the right response).
//! Each command succeeds, answers one bad input with a one-line error and its exit code
//! (`cmsctl --help`: 2 input, 3 refused, 4 not found, 5 unavailable), and prints `--json` in
//! the proto3 JSON mapping.

use std::process::Output;

use cms_cardcrypto::{KeyAlgorithm, SecretKey};
use cms_launcher::demo::{access, setup};
use cms_proto::common::v1::CardProfile;
use cms_proto::directory::v1::Credential;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;
use cms_proto::template::v1::{PinPolicy, PukConfig};
use cms_tests::cluster::Cluster;

const MASTER_KEY: &str = "mk-cli";

struct Scene {
    cluster: Cluster,
    master: SecretKey,
    master_version: u32,
    user_id: String,
    /// A card whose template lets the helpdesk answer offline without approval.
    card: Credential,
    /// A card whose template asks for dual control.
    dual_card: Credential,
    /// A PIV card (offline: its PUK is read to the user).
    piv_card: Credential,
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cmsctl <args>` as operator `who` (pki/operator-<who>.pem), `stdin` as its input.
fn ctl(scene: &Scene, who: &str, args: &[&str], stdin: &str) -> Output {
    let pki = scene.cluster.layout.pki();
    let tls = pki.tls_settings(&format!("operator/{who}"));
    let mut all: Vec<String> = vec![
        "--cert".into(),
        tls.cert.display().to_string(),
        "--key".into(),
        tls.key.display().to_string(),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    tokio::task::block_in_place(|| scene.cluster.cmsctl_with_input(&all, stdin))
}

fn ok(scene: &Scene, who: &str, args: &[&str]) -> String {
    let out = ctl(scene, who, args, "");
    assert!(out.status.success(), "cmsctl {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(scene: &Scene, who: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let stdout = ok(scene, who, &all);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("cmsctl {args:?}: {e}: {stdout}"))
}

/// A failing command: its exit code and its one-line error (the whole of stderr).
fn fails(scene: &Scene, who: &str, args: &[&str], stdin: &str) -> (i32, String) {
    let out = ctl(scene, who, args, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr).trim_end().to_owned();
    assert!(!out.status.success(), "cmsctl {args:?}: {}", text(&out));
    assert_eq!(stderr.lines().count(), 1, "cmsctl {args:?}: {}", text(&out));
    assert!(
        stderr.starts_with("cmsctl: error: "),
        "cmsctl {args:?}: {stderr}"
    );
    for dump in ["Status {", "MetadataMap", "details:"] {
        assert!(!stderr.contains(dump), "debug dump in {stderr}");
    }
    (out.status.code().unwrap_or(-1), stderr)
}

/// A command line clap refuses: exit code 2 and clap's usage message.
fn usage_error(scene: &Scene, who: &str, args: &[&str]) -> String {
    let out = ctl(scene, who, args, "");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "cmsctl {args:?}: {}",
        text(&out)
    );
    assert!(stderr.starts_with("error: "), "cmsctl {args:?}: {stderr}");
    stderr
}

fn upper(bytes: &[u8]) -> String {
    data_encoding::HEXUPPER.encode(bytes)
}

async fn scene() -> Scene {
    let cluster = Cluster::start(|_| String::new()).await;
    let layout = &cluster.layout;
    let gateway = cluster.grpc("gateway");
    let mut admin =
        AdminServiceClient::new(access::operator_channel(layout, gateway, "admin").unwrap());
    let master = SecretKey::new(KeyAlgorithm::Aes128, &[0x5Au8; 16].map(|b| b ^ 0x13)).unwrap();
    let master_version = setup::import_master_key(&mut admin, MASTER_KEY, &master)
        .await
        .unwrap();
    let (template, template_version) =
        setup::create_template(&mut admin, setup::template_spec(MASTER_KEY))
            .await
            .unwrap();
    let mut dual = setup::template_spec(MASTER_KEY);
    dual.name = "Dual control card".into();
    let ops = dual
        .unblock_policy
        .as_mut()
        .and_then(|p| p.operator_policy.as_mut())
        .unwrap();
    ops.dual_control = true;
    ops.approval_ttl = Some(prost_types::Duration {
        seconds: 600,
        nanos: 0,
    });
    let (dual_template, dual_version) = setup::create_template(&mut admin, dual).await.unwrap();
    let mut piv = setup::template_spec(MASTER_KEY);
    piv.name = "PIV card".into();
    piv.card_profile = CardProfile::Piv as i32;
    piv.puk = Some(PukConfig {
        master_key_reference: MASTER_KEY.into(),
        length: 8,
        rotate_after_online_use: true,
        rotate_after_offline_exposure: true,
    });
    piv.pin_policy = Some(PinPolicy {
        max_length: 8,
        ..piv.pin_policy.unwrap()
    });
    piv.unblock_policy
        .as_mut()
        .and_then(|p| p.operator_policy.as_mut())
        .unwrap()
        .puk_read_roles = vec!["helpdesk".into()];
    let (piv_template, piv_version) = setup::create_template(&mut admin, piv).await.unwrap();
    let user = setup::create_user(&mut admin, "demo.user").await.unwrap();
    let mut register = async |card_id: [u8; 16], template_id: &str, version: u32| {
        let profile = if template_id == piv_template {
            CardProfile::Piv
        } else {
            CardProfile::Minidriver
        };
        setup::register_card(
            &mut admin,
            &setup::CardRecord {
                user_id: user.id.clone(),
                profile,
                card_id: card_id.to_vec(),
                serial: upper(&card_id),
                template_id: template_id.to_owned(),
                template_version: version,
                master_key_version: master_version,
            },
        )
        .await
        .unwrap()
    };
    let card = register([0x11; 16], &template, template_version).await;
    let dual_card = register([0x22; 16], &dual_template, dual_version).await;
    let piv_card = register([0x33; 16], &piv_template, piv_version).await;
    for (name, roles) in [
        ("helpdesk", &["helpdesk"][..]),
        ("approver", &["approver"][..]),
        ("editor", &["template-admin"][..]),
    ] {
        access::ensure_operator_cert(layout, name).unwrap();
        setup::create_operator(&mut admin, name, roles)
            .await
            .unwrap();
    }
    Scene {
        cluster,
        master,
        master_version,
        user_id: user.id,
        card,
        dual_card,
        piv_card,
    }
}

impl Scene {
    /// A fresh challenge (custody refuses a repeated one) and the response the card expects.
    fn challenge(&self, card: &Credential, seed: u8) -> (Vec<u8>, Vec<u8>) {
        let challenge: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(31) ^ seed).collect();
        let admin_key = setup::admin_key(&self.master, &card.card_id, self.master_version).unwrap();
        let response = cms_cardcrypto::response(&admin_key, &challenge).unwrap();
        (challenge, response.to_vec())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helpdesk_commands_answer_refuse_and_print_json() {
    let mut s = scene().await;
    let user = s.user_id.clone();
    let user = user.as_str();
    let card = s.card.id.clone();
    let card = card.as_str();

    // search: a table, and the JSON mapping; an unknown status is an input error.
    let table = ok(&s, "helpdesk", &["helpdesk", "search", "dana"]);
    assert!(
        table.contains("demo.user") && table.contains(user),
        "{table}"
    );
    let found = json(&s, "helpdesk", &["helpdesk", "search", "demo"]);
    assert_eq!(
        found["results"][0]["user"]["username"], "demo.user",
        "{found}"
    );
    let (code, err) = fails(
        &s,
        "helpdesk",
        &["helpdesk", "search", "x", "--status", "asleep"],
        "",
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--status \"asleep\""), "{err}");
    // Without the helpdesk role: refused.
    let (code, err) = fails(&s, "editor", &["helpdesk", "search", "dana"], "");
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("permission denied"), "{err}");

    // cards: what the operator may do with each card.
    let cards = ok(&s, "helpdesk", &["helpdesk", "cards", user]);
    assert!(cards.contains(card), "{cards}");
    assert!(cards.contains("offline-response"), "{cards}");
    let view = json(&s, "helpdesk", &["helpdesk", "cards", user]);
    let ids: Vec<&str> = view["cards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["credential"]["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&card), "{view}");
    let (code, err) = fails(
        &s,
        "helpdesk",
        &["helpdesk", "cards", "0190b6a4-0000-7000-8000-000000000000"],
        "",
    );
    assert_eq!(code, 4, "{err}");

    // offline-response with the challenge as options: the card's response and its checksum.
    let (challenge, expected) = s.challenge(&s.card, 1);
    let hex = cms_cardcrypto::format_groups(&challenge);
    let checksum = cms_cardcrypto::checksum(&challenge);
    let out = ok(
        &s,
        "helpdesk",
        &[
            "helpdesk",
            "offline-response",
            "--user",
            user,
            "--card",
            card,
            "--challenge",
            &hex,
            "--checksum",
            &checksum,
        ],
    );
    assert!(
        out.contains(&format!(
            "{}   checksum {}",
            cms_cardcrypto::format_groups(&expected),
            cms_cardcrypto::checksum(&expected)
        )),
        "{out}"
    );
    // Asked for on standard input (lower case, dashes), and as JSON.
    let (challenge, expected) = s.challenge(&s.card, 2);
    let typed = format!(
        "{}\n{}\n",
        upper(&challenge).to_lowercase().replace("00", "0-0"),
        cms_cardcrypto::checksum(&challenge).to_lowercase()
    );
    let out = ctl(
        &s,
        "helpdesk",
        &[
            "--json",
            "helpdesk",
            "offline-response",
            "--user",
            user,
            "--card",
            card,
        ],
        &typed,
    );
    assert!(out.status.success(), "{}", text(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        answer["response"]["hex"],
        cms_cardcrypto::format_groups(&expected),
        "{answer}"
    );
    assert_eq!(
        answer["response"]["checksum"],
        cms_cardcrypto::checksum(&expected)
    );
    assert!(
        !answer["request_id"].as_str().unwrap_or_default().is_empty(),
        "{answer}"
    );
    // From the Windows unblock screen: no checksum to type.
    let (challenge, expected) = s.challenge(&s.card, 5);
    let out = ok(
        &s,
        "helpdesk",
        &[
            "helpdesk",
            "offline-response",
            "--user",
            user,
            "--card",
            card,
            "--windows",
            "--challenge",
            &upper(&challenge),
        ],
    );
    assert!(
        out.contains(&cms_cardcrypto::format_groups(&expected)),
        "{out}"
    );
    // A typing error in the checksum: refused here, nothing sent.
    let (challenge, _) = s.challenge(&s.card, 3);
    let wrong = format!(
        "{:04X}",
        u16::from_str_radix(&cms_cardcrypto::checksum(&challenge), 16).unwrap() ^ 0x0100
    );
    let (code, err) = fails(
        &s,
        "helpdesk",
        &[
            "helpdesk",
            "offline-response",
            "--user",
            user,
            "--card",
            card,
        ],
        &format!("{}\n{wrong}\n", upper(&challenge)),
    );
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err,
        "cmsctl: error: challenge: the checksum does not match the code; check both for a typing error; nothing was sent"
    );
    assert!(!err.contains(&upper(&challenge)), "{err}");
    // Dual control: no response without an approval.
    let (challenge, _) = s.challenge(&s.dual_card, 4);
    let (code, err) = fails(
        &s,
        "helpdesk",
        &[
            "helpdesk",
            "offline-response",
            "--user",
            user,
            "--card",
            &s.dual_card.id,
            "--challenge",
            &upper(&challenge),
            "--checksum",
            &cms_cardcrypto::checksum(&challenge),
        ],
        "",
    );
    assert_eq!(code, 3, "{err}");

    // puk: the PIV card's PUK with its checksum, exposed from now on; a minidriver card has
    // none.
    let piv = s.piv_card.id.as_str();
    let out = ok(
        &s,
        "helpdesk",
        &["helpdesk", "puk", "--user", user, "--card", piv],
    );
    assert!(out.contains("PUK (read it to the user): "), "{out}");
    assert!(out.contains("is now exposed"), "{out}");
    let puk = json(
        &s,
        "helpdesk",
        &["helpdesk", "puk", "--user", user, "--card", piv],
    );
    let digits = puk["puk"].as_str().unwrap();
    assert!(
        digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()),
        "{puk}"
    );
    cms_cardcrypto::parse_with_checksum(
        puk["puk_code"]["hex"].as_str().unwrap(),
        puk["puk_code"]["checksum"].as_str().unwrap(),
        &[8],
    )
    .unwrap();
    assert_eq!(puk["exposed"], true, "{puk}");
    let (code, err) = fails(
        &s,
        "helpdesk",
        &["helpdesk", "puk", "--user", user, "--card", card],
        "",
    );
    assert_eq!(code, 3, "{err}");

    // one-time-code: shown once; for an unknown user, not found.
    let out = ok(
        &s,
        "helpdesk",
        &["helpdesk", "one-time-code", "--user", user],
    );
    assert!(out.contains("one-time code"), "{out}");
    let (code, err) = fails(
        &s,
        "helpdesk",
        &[
            "helpdesk",
            "one-time-code",
            "--user",
            "0190b6a4-0000-7000-8000-000000000000",
        ],
        "",
    );
    assert_eq!(code, 4, "{err}");

    // Custody down behind the gateway: a plain sentence, exit 5.
    s.cluster
        .service("custody")
        .stop(std::time::Duration::from_secs(10))
        .await;
    let (challenge, _) = s.challenge(&s.card, 6);
    let (code, err) = fails(
        &s,
        "helpdesk",
        &[
            "helpdesk",
            "offline-response",
            "--user",
            user,
            "--card",
            card,
            "--challenge",
            &upper(&challenge),
            "--checksum",
            &cms_cardcrypto::checksum(&challenge),
        ],
        "",
    );
    assert_eq!(code, 5, "{err}");
    assert!(err.contains(": unavailable now; try again later"), "{err}");

    // The gateway gone: a plain sentence, exit 5.
    s.cluster
        .service("gateway")
        .stop(std::time::Duration::from_secs(10))
        .await;
    let (code, err) = fails(&s, "helpdesk", &["helpdesk", "search", "dana"], "");
    assert_eq!(code, 5, "{err}");
    assert!(
        err.starts_with("cmsctl: error: cannot reach the gateway at ")
            && err.ends_with("is it running?"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_requested_listed_decided_and_cancelled() {
    let s = scene().await;
    let user = s.user_id.as_str();
    let dual = s.dual_card.id.as_str();
    let request = |reason: &str| {
        json(
            &s,
            "helpdesk",
            &[
                "approvals",
                "request",
                "--action",
                "offline-response",
                "--user",
                user,
                "--card",
                dual,
                "--reason",
                reason,
            ],
        )
    };

    let first = request("caller verified by phone");
    let id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(first["state"], "APPROVAL_STATE_PENDING", "{first}");
    assert_eq!(first["action"], "HELPDESK_ACTION_OFFLINE_RESPONSE");
    let err = usage_error(
        &s,
        "helpdesk",
        &[
            "approvals",
            "request",
            "--action",
            "teleport",
            "--user",
            user,
            "--card",
            dual,
            "--reason",
            "x",
        ],
    );
    assert!(err.contains("teleport"), "{err}");

    // The approver sees it; the requester cannot decide it.
    let table = ok(&s, "approver", &["approvals", "list"]);
    assert!(table.contains(&id), "{table}");
    let listed = json(&s, "approver", &["approvals", "list"]);
    assert!(
        listed["approvals"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == id.as_str()),
        "{listed}"
    );
    let (code, err) = fails(&s, "helpdesk", &["approvals", "approve", &id], "");
    assert_eq!(code, 3, "{err}");
    let approved = json(
        &s,
        "approver",
        &["approvals", "approve", &id, "--comment", "ok"],
    );
    assert_eq!(approved["state"], "APPROVAL_STATE_APPROVED", "{approved}");
    let shown = ok(&s, "helpdesk", &["approvals", "show", &id]);
    assert!(shown.contains("approved"), "{shown}");

    // The approval lets the response through, once.
    let (challenge, expected) = s.challenge(&s.dual_card, 9);
    let args = [
        "helpdesk",
        "offline-response",
        "--user",
        user,
        "--card",
        dual,
        "--approval",
        &id,
    ];
    let typed = format!(
        "{}\n{}\n",
        upper(&challenge),
        cms_cardcrypto::checksum(&challenge)
    );
    let out = ctl(&s, "helpdesk", &args, &typed);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&cms_cardcrypto::format_groups(&expected)),
        "{}",
        text(&out)
    );
    let (challenge, _) = s.challenge(&s.dual_card, 10);
    let typed = format!(
        "{}\n{}\n",
        upper(&challenge),
        cms_cardcrypto::checksum(&challenge)
    );
    let (code, err) = fails(&s, "helpdesk", &args, &typed);
    assert_eq!(code, 3, "a used approval: {err}");

    // Rejected, and cancelled by the requester.
    let second = request("second call");
    let second_id = second["id"].as_str().unwrap();
    let err = usage_error(&s, "approver", &["approvals", "reject", second_id]);
    assert!(err.contains("--reason"), "{err}");
    let rejected = ok(
        &s,
        "approver",
        &["approvals", "reject", second_id, "--reason", "not verified"],
    );
    assert!(rejected.contains("rejected"), "{rejected}");
    let third = request("third call");
    let third_id = third["id"].as_str().unwrap();
    let (code, err) = fails(&s, "approver", &["approvals", "cancel", third_id], "");
    assert_eq!(code, 3, "only the requester cancels: {err}");
    let cancelled = json(&s, "helpdesk", &["approvals", "cancel", third_id]);
    assert_eq!(
        cancelled["state"], "APPROVAL_STATE_CANCELLED",
        "{cancelled}"
    );
    let (code, err) = fails(
        &s,
        "helpdesk",
        &["approvals", "show", "0190b6a4-0000-7000-8000-000000000000"],
        "",
    );
    assert_eq!(code, 4, "{err}");
}
