//! Sealing with custody replicas: the gateway hands each Unseal share and each Seal to every
//! custody instance (`backends.custody.instances`).
//!
//! The whole system runs as processes, custody on PostgreSQL with custodian shares (no dev seal
//! file), and a second custody process on the same database stands by. Through the gateway
//! (`cmsctl custody seal` / `unseal`): Seal seals both; the threshold of shares unseals both,
//! the standby's status saying so; after the active one is SIGKILLed the standby takes over and
//! serves cryptograms with no new unseal.

use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use cms_kit::client::Channel;
use cms_launcher::layout::{Layout, Peers, Ports};
use cms_launcher::supervise;
use cms_proto::common::v1::{ActorKind, AuthContext, DiversificationScheme, KeyAlgorithm};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::*;
use cms_tests::cluster::Cluster;
use cms_tests::inproc;
use cms_tests::pki::{TRUST_DOMAIN, TestPki};
use cms_tests::postgres::Postgres;
use tokio::process::{Child, Command};

type Client = CustodyServiceClient<Channel>;

/// Custody's config without the dev seal file (shares unseal it), on `url`.
fn on_postgres(config: String, url: &str) -> String {
    let kept: Vec<&str> = config
        .lines()
        .filter(|l| !l.trim_start().starts_with("dev_seal_file"))
        .collect();
    format!("{}\n\n[database]\nurl = {url:?}\n", kept.join("\n"))
}

/// The standby: a second custody process on its own layout (with a copy of the PKI).
async fn spawn_standby(cluster: &Cluster, url: &str) -> (Child, SocketAddr) {
    let layout = Layout::new(&cluster.dir.path().join("b"), TRUST_DOMAIN).unwrap();
    layout.create_dirs().unwrap();
    let copy = layout.data_dir.join("pki");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(cluster.layout.data_dir.join("pki")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let ports = Ports {
        grpc: any,
        ops: any,
    };
    let config = layout
        .service_config("custody", ports, &Peers::default(), "")
        .unwrap();
    std::fs::write(layout.config_path("custody"), on_postgres(config, url)).unwrap();
    let announce = layout.announce_path("custody");
    let log = std::fs::File::create(layout.log_path("custody")).unwrap();
    let mut process = Command::new(cms_tests::binary("cms"))
        .args(["serve", "custody", "--config"])
        .arg(layout.config_path("custody"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = process.try_wait().unwrap() {
            panic!(
                "standby custody exited ({status}):\n{}",
                supervise::tail(&layout.log_path("custody"), 20)
            );
        }
        if let Some((grpc, _ops)) = cms_kit::server::read_announce(&announce) {
            return (process, grpc);
        }
        assert!(Instant::now() < deadline, "custody did not announce itself");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn connect(pki: &TestPki, addr: SocketAddr) -> Client {
    CustodyServiceClient::new(inproc::channel(pki.tls("gateway"), addr, pki.id("custody")))
}

async fn status(client: &mut Client) -> GetStatusResponse {
    client
        .get_status(GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
}

fn json(output: Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "cmsctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The seal state per instance address in a `--json` answer.
fn per_instance(answer: &serde_json::Value) -> Vec<(String, String, String)> {
    answer["instances"]
        .as_array()
        .unwrap_or_else(|| panic!("no instances in {answer}"))
        .iter()
        .map(|i| {
            (
                i["address"].as_str().unwrap_or_default().to_owned(),
                i["role"].as_str().unwrap_or_default().to_owned(),
                i["seal_state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn cryptogram(request_id: &str) -> ComputeCryptogramRequest {
    ComputeCryptogramRequest {
        card_id: request_id.as_bytes().to_vec(),
        challenge: vec![7; 16],
        master_key_reference: "mk".into(),
        master_key_version: 1,
        scheme: DiversificationScheme::Sp800108Cmac as i32,
        admin_key_algorithm: KeyAlgorithm::Aes128 as i32,
        auth: Some(AuthContext {
            actor_kind: ActorKind::Service as i32,
            request_id: request_id.into(),
            ..Default::default()
        }),
        challenge_code: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_and_seal_reach_every_custody_instance() {
    let pg = Postgres::shared();
    let url = pg.create_database();
    let custody_url = url.clone();
    let mut cluster = Cluster::start_with(move |name, text| match name {
        "custody" => on_postgres(text, &custody_url),
        _ => text,
    })
    .await;
    let a_addr = cluster.grpc("custody");
    let mut a = connect(&cluster.pki, a_addr);
    let shares = a
        .init_seal(InitSealRequest {
            threshold: 2,
            share_count: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .shares;
    a.generate_master_key(GenerateMasterKeyRequest {
        reference: "mk".into(),
        algorithm: KeyAlgorithm::Aes128 as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let before = a.compute_cryptogram(cryptogram("on-a")).await.unwrap();

    // The standby, and a gateway that knows both instances.
    let (mut standby, b_addr) = spawn_standby(&cluster, &url).await;
    let mut b = connect(&cluster.pki, b_addr);
    let path = cluster.layout.config_path("gateway");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("[backends.custody]\n"), "{text}");
    let text = text.replacen(
        "[backends.custody]\n",
        &format!("[backends.custody]\ninstances = [\"{a_addr}\", \"{b_addr}\"]\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    cluster.restart("gateway").await;

    // Seal: both sealed.
    let sealed = json(cluster.cmsctl(&["--json", "custody", "seal", "--reason", "test"]));
    let mut listed = per_instance(&sealed);
    listed.sort();
    let mut expected = vec![
        (
            a_addr.to_string(),
            "REPLICA_ROLE_ACTIVE".to_owned(),
            "SEAL_STATE_SEALED".to_owned(),
        ),
        (
            b_addr.to_string(),
            "REPLICA_ROLE_STANDBY".to_owned(),
            "SEAL_STATE_SEALED".to_owned(),
        ),
    ];
    expected.sort();
    assert_eq!(listed, expected, "{sealed}");
    assert_eq!(status(&mut a).await.seal_state, SealState::Sealed as i32);
    assert_eq!(status(&mut b).await.seal_state, SealState::Sealed as i32);

    // Unseal with the threshold of shares: both unsealed.
    let give = |share: &Share| {
        json(cluster.cmsctl_with_input(
            &[
                "--json",
                "custody",
                "unseal",
                "--index",
                &share.index.to_string(),
            ],
            &format!("{}\n{}\n", share.value, share.checksum),
        ))
    };
    let first = give(&shares[0]);
    assert_eq!(first["seal_state"], "SEAL_STATE_SEALED", "{first}");
    for (_, _, state) in per_instance(&first) {
        assert_eq!(state, "SEAL_STATE_SEALED", "{first}");
    }
    let second = give(&shares[2]);
    assert_eq!(second["seal_state"], "SEAL_STATE_UNSEALED", "{second}");
    for (_, _, state) in per_instance(&second) {
        assert_eq!(state, "SEAL_STATE_UNSEALED", "{second}");
    }
    assert_eq!(status(&mut a).await.seal_state, SealState::Unsealed as i32);
    let standby_status = status(&mut b).await;
    assert_eq!(
        standby_status.seal_state,
        SealState::Unsealed as i32,
        "{standby_status:?}"
    );
    assert!(
        standby_status.detail.contains("standby"),
        "{standby_status:?}"
    );

    // The active one dies: the standby takes over, unsealed, with no new unseal.
    cluster.service("custody").process.start_kill().unwrap();
    let killed = Instant::now();
    let answer = loop {
        match b.compute_cryptogram(cryptogram("on-b")).await {
            Ok(answer) => break answer.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    killed.elapsed() < Duration::from_secs(15),
                    "the standby did not serve: {status:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!answer.response.is_empty());
    assert!(!before.into_inner().response.is_empty());
    assert_eq!(status(&mut b).await.seal_state, SealState::Unsealed as i32);

    standby.start_kill().unwrap();
    let _ = standby.wait().await;
    cluster.stop().await;
}
