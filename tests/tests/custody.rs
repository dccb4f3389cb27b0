//! Key custody through its gRPC API, in-process on loopback listeners with real mTLS and an
//! SQLite file (one test on a real PostgreSQL): the shared vectors after a key ceremony, and
//! every refusal.

use cms_cardcrypto::KeyAlgorithm;
use cms_kit::client::Channel;
use cms_launcher::layout::Peers;
use cms_proto::common::v1::{
    ActorKind, AuthContext, DiversificationScheme, ErrorReason, Flow, KeyAlgorithm as Alg,
    TypedCode,
};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::*;
use cms_tests::custody::{hex, import, upper};
use cms_tests::inproc::{self, Running};
use cms_tests::pki::TestPki;
use tonic::Code;

const VECTORS: &str = include_str!("../../services/cardcrypto/tests/data/diversification.json");

struct Harness {
    _dir: tempfile::TempDir,
    pki: TestPki,
    server: Running,
    client: CustodyServiceClient<Channel>,
}

async fn custody(tweak: impl FnOnce(&mut cms_custody::Config)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut config: cms_custody::Config = inproc::config(dir.path(), "custody", &Peers::default());
    tweak(&mut config);
    let server = Running::start(config, cms_custody::run).await;
    let client = CustodyServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        server.grpc,
        pki.id("custody"),
    ));
    Harness {
        _dir: dir,
        pki,
        server,
        client,
    }
}

fn auth() -> Option<AuthContext> {
    Some(AuthContext {
        actor_kind: ActorKind::Operator as i32,
        actor_id: "helpdesk-7".into(),
        flow: Flow::OfflineHelpdesk as i32,
        request_id: "req-1".into(),
        ..Default::default()
    })
}

fn request(
    reference: &str,
    version: u32,
    card: &[u8],
    challenge: &[u8],
    scheme: DiversificationScheme,
    admin: Alg,
) -> ComputeCryptogramRequest {
    ComputeCryptogramRequest {
        card_id: card.to_vec(),
        challenge: challenge.to_vec(),
        master_key_reference: reference.into(),
        master_key_version: version,
        scheme: scheme as i32,
        admin_key_algorithm: admin as i32,
        auth: auth(),
        challenge_code: None,
    }
}

fn reason(status: &tonic::Status) -> ErrorReason {
    let detail = cms_custody::error::detail(status).expect("status carries an ErrorDetail");
    ErrorReason::try_from(detail.reason).unwrap()
}

#[tokio::test]
async fn every_shared_vector_through_the_rpc_after_a_component_import() {
    let mut h = custody(|_| {}).await;
    let vectors: Vec<serde_json::Value> = serde_json::from_str(VECTORS).unwrap();
    for (i, v) in vectors.iter().enumerate() {
        let s = |k: &str| v[k].as_str().unwrap().to_owned();
        let master = hex(&s("master_key"));
        let admin_len = hex(&s("admin_key")).len();
        let (scheme, master_alg, admin_alg) = match s("scheme").as_str() {
            "gp-emv" => (
                DiversificationScheme::GpEmv,
                KeyAlgorithm::Tdes2Key,
                Alg::Tdes3key,
            ),
            "gp-visa2" => (
                DiversificationScheme::GpVisa2,
                KeyAlgorithm::Tdes2Key,
                Alg::Tdes3key,
            ),
            other => {
                let scheme = if other == "gp-kdf3" {
                    DiversificationScheme::GpKdf3
                } else {
                    DiversificationScheme::Sp800108Cmac
                };
                let alg = KeyAlgorithm::aes_for_len(master.len()).unwrap();
                let admin = match admin_len {
                    16 => Alg::Aes128,
                    24 => Alg::Aes192,
                    _ => Alg::Aes256,
                };
                (scheme, alg, admin)
            }
        };
        let reference = format!("vector-{i}");
        let wanted_version = v["key_version"].as_u64().unwrap() as u32;
        // Earlier versions of the same reference hold other keys (rotation keeps them).
        let mut version = 0;
        while version < wanted_version {
            let key = if version + 1 == wanted_version {
                master.clone()
            } else {
                vec![0x11; master.len()]
            };
            version = import(&mut h.client, &reference, master_alg, &key)
                .await
                .version;
        }
        let answer = h
            .client
            .compute_cryptogram(request(
                &reference,
                version,
                &hex(&s("card_id")),
                &hex(&s("challenge")),
                scheme,
                admin_alg,
            ))
            .await
            .unwrap_or_else(|e| panic!("vector {i}: {e:?}"))
            .into_inner();
        assert_eq!(upper(&answer.response), s("response"), "vector {i}");
        assert_eq!(
            answer.response_checksum,
            s("response_checksum"),
            "vector {i}"
        );
        assert!(answer.audit_sequence > 0);

        // The same challenge typed by a person, with its checksum, on a new card.
        let mut typed = request(&reference, version, b"another-card", &[], scheme, admin_alg);
        typed.challenge_code = Some(TypedCode {
            hex: s("challenge").to_lowercase(),
            checksum: s("challenge_checksum"),
        });
        h.client.compute_cryptogram(typed).await.unwrap();
    }
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn refusals_are_distinct_and_clear() {
    let mut h = custody(|c| c.guards.per_card_limit = 3).await;
    let key = hex("404142434445464748494A4B4C4D4E4F");
    let v = import(&mut h.client, "mk", KeyAlgorithm::Aes128, &key)
        .await
        .version;
    let card = b"card-0001";
    let good = |challenge: &[u8]| {
        request(
            "mk",
            v,
            card,
            challenge,
            DiversificationScheme::Sp800108Cmac,
            Alg::Aes128,
        )
    };
    let challenge = [7u8; 16];
    h.client.compute_cryptogram(good(&challenge)).await.unwrap();

    // Wrong challenge length.
    let err = h
        .client
        .compute_cryptogram(good(&[1u8; 8]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("16-byte challenge"),
        "{}",
        err.message()
    );
    // Non-hex and bad checksum in a typed challenge; messages never echo the code.
    let mut typed = good(&[]);
    typed.challenge_code = Some(TypedCode {
        hex: "0011 2233 4455 6677 8899 AABB CCDD EEGG".into(),
        checksum: "0000".into(),
    });
    let err = h
        .client
        .compute_cryptogram(typed.clone())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::InvalidArgument, ErrorReason::CodeNotHex)
    );
    assert!(!err.message().contains("EEGG"), "{}", err.message());
    typed.challenge_code = Some(TypedCode {
        hex: "00112233445566778899AABBCCDDEEFF".into(),
        checksum: "0000".into(),
    });
    let err = h.client.compute_cryptogram(typed).await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::InvalidArgument, ErrorReason::CodeChecksumMismatch)
    );
    // Unknown key version and unknown reference.
    let err = h
        .client
        .compute_cryptogram(request(
            "mk",
            9,
            card,
            &challenge,
            DiversificationScheme::Sp800108Cmac,
            Alg::Aes128,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::NotFound, ErrorReason::NotFound)
    );
    assert!(err.message().contains("mk version 9"), "{}", err.message());
    // Repeated (card, challenge).
    let err = h
        .client
        .compute_cryptogram(good(&challenge))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::AlreadyExists, ErrorReason::ReplayedChallenge)
    );
    // Per-card limit (3 here): two more fresh challenges, then refused.
    h.client.compute_cryptogram(good(&[8u8; 16])).await.unwrap();
    h.client.compute_cryptogram(good(&[9u8; 16])).await.unwrap();
    let err = h
        .client
        .compute_cryptogram(good(&[10u8; 16]))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::ResourceExhausted, ErrorReason::CardLimitReached)
    );
    assert!(err.message().contains("limit of 3"), "{}", err.message());
    // Another card is not affected.
    h.client
        .compute_cryptogram(request(
            "mk",
            v,
            b"card-0002",
            &challenge,
            DiversificationScheme::Sp800108Cmac,
            Alg::Aes128,
        ))
        .await
        .unwrap();

    // A caller that is allowed to connect but has no scope here.
    let other = CustodyServiceClient::new(inproc::channel(
        h.pki.tls("operator/admin"),
        h.server.grpc,
        h.pki.id("custody"),
    ));
    let err = other
        .clone()
        .compute_cryptogram(good(&[11u8; 16]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Sealed.
    h.client.seal(SealRequest::default()).await.unwrap();
    let err = h
        .client
        .compute_cryptogram(good(&[12u8; 16]))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::FailedPrecondition, ErrorReason::CustodySealed)
    );

    // No secret in any audit record: the challenges and responses never appear.
    let audit = h
        .client
        .query_audit(QueryAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(audit.records.len() >= 10);
    let dump = format!("{:?}", audit.records);
    assert!(!dump.contains("07070707"), "challenge bytes in the audit");
    assert!(
        audit
            .records
            .iter()
            .any(|r| r.outcome == AuditOutcome::Refused as i32)
    );
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_self_test_refuses_all_work() {
    let mut h = custody(|c| c.guards.fail_self_test = true).await;
    let status = h
        .client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!status.self_test.unwrap().passed);
    let err = h
        .client
        .generate_master_key(GenerateMasterKeyRequest {
            reference: "mk".into(),
            algorithm: Alg::Aes128 as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::FailedPrecondition, ErrorReason::CustodySelfTestFailed)
    );
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn shares_unseal_and_keys_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let config = || {
        let mut c: cms_custody::Config = inproc::config(dir.path(), "custody", &Peers::default());
        c.seal.dev_seal_file = None;
        c
    };
    let connect = |server: &Running| {
        CustodyServiceClient::new(inproc::channel(
            pki.tls("gateway"),
            server.grpc,
            pki.id("custody"),
        ))
    };
    let server = Running::start(config(), cms_custody::run).await;
    let mut client = connect(&server);
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.seal_state, SealState::Uninitialised as i32);
    let shares = client
        .init_seal(InitSealRequest {
            threshold: 2,
            share_count: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .shares;
    assert_eq!(shares.len(), 3);
    let key = hex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F");
    let version = import(&mut client, "mk", KeyAlgorithm::Aes256, &key)
        .await
        .version;
    let req = |challenge: u8| {
        request(
            "mk",
            version,
            b"card",
            &[challenge; 16],
            DiversificationScheme::Sp800108Cmac,
            Alg::Aes256,
        )
    };
    let before = client
        .compute_cryptogram(req(1))
        .await
        .unwrap()
        .into_inner()
        .response;
    server.stop().await.unwrap();

    // Restarted: sealed until two custodians give their shares.
    let server = Running::start(config(), cms_custody::run).await;
    let mut client = connect(&server);
    let err = client.compute_cryptogram(req(2)).await.unwrap_err();
    assert_eq!(reason(&err), ErrorReason::CustodySealed);
    // A mistyped share is caught by its checksum and changes nothing.
    let mut typo = shares[0].clone();
    typo.checksum = if typo.checksum == "0000" {
        "0001".into()
    } else {
        "0000".into()
    };
    let err = client
        .unseal(UnsealRequest {
            share: Some(typo),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let first = client
        .unseal(UnsealRequest {
            share: Some(shares[2].clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (first.seal_state, first.progress),
        (SealState::Sealed as i32, 1)
    );
    let second = client
        .unseal(UnsealRequest {
            share: Some(shares[0].clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.seal_state, SealState::Unsealed as i32);
    // The same key answers the same way (a new challenge: the old one was used).
    let again = client.compute_cryptogram(req(1)).await.unwrap_err();
    assert_eq!(reason(&again), ErrorReason::ReplayedChallenge);
    let after = client
        .compute_cryptogram(req(3))
        .await
        .unwrap()
        .into_inner()
        .response;
    assert_ne!(before, after);
    assert_eq!(after.len(), 16);
    server.stop().await.unwrap();
}

/// Custody on a real PostgreSQL: cryptograms are audited, the per-card limit and the replay
/// refusal hold, and they still hold after a restart (rebuilt from the audit records).
#[tokio::test]
async fn guards_and_audit_hold_on_postgres_across_a_restart() {
    let pg = cms_tests::postgres::Postgres::shared();
    let url = pg.create_database();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let config = || {
        let mut c: cms_custody::Config = inproc::config(dir.path(), "custody", &Peers::default());
        c.database.url = Some(url.clone());
        c.guards.per_card_limit = 2;
        c
    };
    let connect = |server: &Running| {
        CustodyServiceClient::new(inproc::channel(
            pki.tls("gateway"),
            server.grpc,
            pki.id("custody"),
        ))
    };
    let ask = |challenge: u8| {
        request(
            "pg",
            1,
            b"card-on-postgres",
            &[challenge; 16],
            DiversificationScheme::Sp800108Cmac,
            Alg::Aes128,
        )
    };
    let server = Running::start(config(), cms_custody::run).await;
    let mut client = connect(&server);
    assert_eq!(
        import(&mut client, "pg", KeyAlgorithm::Aes128, &[0x42; 16])
            .await
            .version,
        1
    );
    for challenge in [1, 2] {
        client.compute_cryptogram(ask(challenge)).await.unwrap();
    }
    let replay = client.compute_cryptogram(ask(1)).await.unwrap_err();
    assert_eq!(reason(&replay), ErrorReason::ReplayedChallenge);
    let limit = client.compute_cryptogram(ask(3)).await.unwrap_err();
    assert_eq!(limit.code(), Code::ResourceExhausted, "{limit:?}");
    server.stop().await.unwrap();

    let server = Running::start(config(), cms_custody::run).await;
    let mut client = connect(&server);
    let again = client.compute_cryptogram(ask(4)).await.unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted, "{again:?}");
    let other_card = ComputeCryptogramRequest {
        card_id: b"another-card".to_vec(),
        ..ask(1)
    };
    client.compute_cryptogram(other_card).await.unwrap();
    let verdict = client
        .verify_audit(VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verdict.ok, "{}", verdict.reason);
    assert!(verdict.records_checked >= 7, "{verdict:?}");
    server.stop().await.unwrap();
}

/// gRPC health follows custody's state: its API is NOT_SERVING until custody can answer
/// cryptograms (uninitialised, sealed, half unsealed), SERVING once unsealed, and NOT_SERVING
/// again once sealed; the server itself stays SERVING throughout.
#[tokio::test]
async fn health_follows_the_seal() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut config: cms_custody::Config = inproc::config(dir.path(), "custody", &Peers::default());
    config.seal.dev_seal_file = None;
    let server = Running::start(config, cms_custody::run).await;
    let channel = || inproc::channel(pki.tls("gateway"), server.grpc, pki.id("custody"));
    let mut client = CustodyServiceClient::new(channel());
    let health = HealthClient::new(channel());
    let status = |service: &'static str| {
        let mut health = health.clone();
        async move {
            let answer = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health answers")
                .into_inner();
            ServingStatus::try_from(answer.status).unwrap()
        }
    };
    const API: &str = "cms.custody.v1.CustodyService";

    assert_eq!(
        status(API).await,
        ServingStatus::NotServing,
        "uninitialised"
    );
    assert_eq!(status("").await, ServingStatus::Serving, "the server is up");
    let shares = client
        .init_seal(InitSealRequest {
            threshold: 2,
            share_count: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .shares;
    assert_eq!(status(API).await, ServingStatus::Serving, "initialised");

    client.seal(SealRequest::default()).await.unwrap();
    assert_eq!(status(API).await, ServingStatus::NotServing, "sealed");
    let unseal = |share: &Share| UnsealRequest {
        share: Some(share.clone()),
        ..Default::default()
    };
    client.unseal(unseal(&shares[0])).await.unwrap();
    assert_eq!(
        status(API).await,
        ServingStatus::NotServing,
        "1 of 2 shares"
    );
    client.unseal(unseal(&shares[2])).await.unwrap();
    assert_eq!(status(API).await, ServingStatus::Serving, "unsealed");

    client.seal(SealRequest::default()).await.unwrap();
    assert_eq!(status(API).await, ServingStatus::NotServing, "sealed again");
    assert_eq!(status("").await, ServingStatus::Serving);
    server.stop().await.unwrap();
}

/// A custody that failed its self-test serves nothing, even unsealed: health says so.
#[tokio::test]
async fn health_is_not_serving_after_a_failed_self_test() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let h = custody(|c| c.guards.fail_self_test = true).await;
    let answer = HealthClient::new(inproc::channel(
        h.pki.tls("gateway"),
        h.server.grpc,
        h.pki.id("custody"),
    ))
    .check(HealthCheckRequest {
        service: "cms.custody.v1.CustodyService".into(),
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(answer.status, ServingStatus::NotServing as i32);
    h.server.stop().await.unwrap();
}
