//! The helpdesk web console in a real browser: Debian's headless Chromium driven by
//! playwright-core (tests/browser/console.mjs) against the whole system as real processes.
//! Operator 1 (helpdesk) and operator 2 (approver, auditor) present their certificates as the
//! PKCS#12 files `cms up` writes; the scene is an offline unblock under dual control, with
//! the unblock tab driven by keyboard only and an axe-core scan of every page. Screenshots
//! and the axe reports stay in target/tmp/console-browser/.
//!
//! Needs `chromium`, `node` and `npm ci --prefix tests/browser` (tests/deps.sh and
//! tests/run.sh do both); nothing is downloaded while the test runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cms_cardcrypto::KeyAlgorithm;
use cms_kit::pki::LeafSpec;
use cms_proto::common::v1::{CardProfile, KeyAlgorithm as Alg};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::directory::v1::{
    CreateOperatorRequest, CreateUserRequest, Credential, Operator, OperatorScope,
    RegisterCredentialRequest, User,
};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;
use cms_tests::cluster::Cluster;
use cms_tests::custody::{hex, import};

const VECTORS: &str = include_str!("agent_common/diversification.json");
const MASTER_KEY: &str = "mk-console";

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return path.into();
    }
    // Debian's /usr/bin/chromium is a wrapper script; the binary is beside it.
    ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no chromium: install Debian's chromium (tests/deps.sh does)"))
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

fn groups(flat: &str) -> String {
    flat.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn operator(cluster: &Cluster, name: &str, roles: &[&str], org_units: &[&str]) {
    let mut directory =
        cms_launcher::bootstrap::directory_client(&cluster.layout, cluster.grpc("directory"))
            .expect("directory client");
    directory
        .create_operator(CreateOperatorRequest {
            operator: Some(Operator {
                username: name.into(),
                display_name: format!("Operator {name}"),
                roles: roles.iter().map(|r| (*r).to_owned()).collect(),
                scope: Some(OperatorScope {
                    org_units: org_units.iter().map(|u| (*u).to_owned()).collect(),
                    template_ids: Vec::new(),
                }),
                ..Default::default()
            }),
            auth: None,
        })
        .await
        .unwrap_or_else(|e| panic!("operator {name}: {e:?}"));
    // Its certificate, in the dev PKI's directory as `cms pki init` would name it.
    cluster.pki.issue(
        &format!("operator-{name}"),
        &LeafSpec::new(cluster.pki.id(&format!("operator/{name}")), 30),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_unblocks_offline_in_the_browser_with_a_second_approver() {
    let node_modules = browser_dir().join("node_modules");
    assert!(
        node_modules.join("playwright-core").exists() && node_modules.join("axe-core").exists(),
        "run `npm ci --prefix tests/browser` first (tests/run.sh does)"
    );
    let chromium = chromium();

    let cluster = Cluster::start(|name| {
        if name == "gateway" {
            "[operators]\ncache_ttl_ms = 200\n".to_owned()
        } else {
            String::new()
        }
    })
    .await;
    let vectors: serde_json::Value = serde_json::from_str(VECTORS).expect("vectors");
    let v = vectors
        .as_array()
        .expect("array")
        .iter()
        .find(|v| v["scheme"] == "gp-emv")
        .expect("a gp-emv vector");
    let s = |k: &str| v[k].as_str().expect(k).to_owned();

    let mut custody = CustodyServiceClient::new(cms_tests::inproc::channel(
        cluster.pki.tls("gateway"),
        cluster.grpc("custody"),
        cluster.pki.id("custody"),
    ));
    import(
        &mut custody,
        MASTER_KEY,
        KeyAlgorithm::Tdes2Key,
        &hex(&s("master_key")),
    )
    .await;

    // A template with offline unblock under dual control, a user and the vector's card.
    let mut admin = AdminServiceClient::new(cms_tests::inproc::channel(
        cluster.pki.tls("operator/admin"),
        cluster.grpc("gateway"),
        cluster.pki.id("gateway"),
    ));
    let mut spec = cms_template::sample::minidriver("Console dual control");
    let key = spec.admin_key.as_mut().expect("admin key");
    key.master_key_reference = MASTER_KEY.into();
    key.algorithm = Alg::Tdes2key as i32;
    let policy = spec.unblock_policy.as_mut().expect("unblock policy");
    policy.rate_limits.clear();
    policy
        .operator_policy
        .as_mut()
        .expect("operator policy")
        .dual_control = true;
    let template = admin
        .create_template(gw::CreateTemplateRequest {
            spec: Some(spec),
            change_comment: "console browser test".into(),
        })
        .await
        .expect("template")
        .into_inner()
        .template
        .expect("template");
    let mut directory =
        cms_launcher::bootstrap::directory_client(&cluster.layout, cluster.grpc("directory"))
            .expect("directory client");
    let user = directory
        .create_user(CreateUserRequest {
            user: Some(User {
                username: "alice".into(),
                display_name: "Alice Vector".into(),
                email: "alice@example.com".into(),
                org_unit: "Finance/Payroll".into(),
                ..Default::default()
            }),
            auth: None,
        })
        .await
        .expect("user")
        .into_inner()
        .user
        .expect("user");
    directory
        .register_credential(RegisterCredentialRequest {
            credential: Some(Credential {
                user_id: user.id.clone(),
                card_id: hex(&s("card_id")),
                serial: "SER-VECTOR".into(),
                profile: CardProfile::Minidriver as i32,
                template_id: template.id.clone(),
                template_version: template.version,
                master_key_version: 1,
                ..Default::default()
            }),
            auth: None,
        })
        .await
        .expect("card");
    operator(&cluster, "helpdesk1", &["helpdesk"], &["Finance"]).await;
    operator(&cluster, "approver1", &["approver", "auditor"], &[]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    // The browser files, as `cms up` writes them.
    let certs =
        cms_launcher::browser_cert::ensure_operator_files(&cluster.pki.dev).expect("PKCS#12 files");
    let p12 = |name: &str| {
        certs
            .iter()
            .find(|c| c.p12.ends_with(format!("operator-{name}.p12")))
            .unwrap_or_else(|| panic!("no PKCS#12 for {name}: {certs:?}"))
    };
    let (helpdesk, approver) = (p12("helpdesk1"), p12("approver1"));

    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-browser");
    let _ = std::fs::remove_dir_all(&out_dir);
    let url = format!("https://localhost:{}/", cluster.grpc("gateway").port());
    let output = tokio::task::spawn_blocking({
        let (helpdesk_p12, helpdesk_pw) = (helpdesk.p12.clone(), helpdesk.password.clone());
        let (approver_p12, approver_pw) = (approver.p12.clone(), approver.password.clone());
        let ca = cluster.pki.dev.ca_path();
        let out_dir = out_dir.clone();
        let codes = [
            ("CHALLENGE", groups(&s("challenge"))),
            ("CHALLENGE_CHECKSUM", s("challenge_checksum")),
            ("RESPONSE", groups(&s("response"))),
            ("RESPONSE_CHECKSUM", s("response_checksum")),
        ];
        move || {
            Command::new("node")
                .arg(browser_dir().join("console.mjs"))
                .current_dir(browser_dir())
                // The proxy that presents the client certificate checks the gateway's
                // certificate against the dev CA.
                .env("NODE_EXTRA_CA_CERTS", ca)
                .env("CHROMIUM", chromium)
                .env("CONSOLE_URL", url)
                .env("OUT_DIR", out_dir)
                .env("HELPDESK_P12", helpdesk_p12)
                .env("HELPDESK_P12_PASSWORD", helpdesk_pw)
                .env("APPROVER_P12", approver_p12)
                .env("APPROVER_P12_PASSWORD", approver_pw)
                .env("USER_QUERY", "alice")
                .env("USER_DISPLAY_NAME", "Alice Vector")
                .env("CARD_SERIAL", "SER-VECTOR")
                .envs(codes)
                .output()
                .expect("node (Debian's nodejs) runs")
        }
    })
    .await
    .expect("browser run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "browser scene failed ({}):\n{stdout}\n{stderr}\nscreenshots in {}",
        output.status,
        out_dir.display()
    );
    for artifact in [
        "unblock.png",
        "unblock-200-percent.png",
        "audit.png",
        "axe-unblock.json",
    ] {
        assert!(out_dir.join(artifact).exists(), "{artifact} was not kept");
    }
    cluster.stop().await;
}
