//! Key custody on the `pkcs11` backend against SoftHSM2: every shared vector through the RPC
//! after a key ceremony, a key generated inside the HSM (never readable, its KCV and its
//! cryptograms checked against the token independently), a restart that finds the objects
//! again (and refuses a key whose object is gone), and start-up refusals that name the
//! config key (the `cms-custody` binary).
//!
//! One SoftHSM2 token directory for the whole binary (see cms_tests::softhsm), one token per
//! test: every test calls `hsm()` first.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cms_cardcrypto::{KeyAlgorithm, Scheme, SecretKey};
use cms_custody::keystore::{cryptoki, derived_block};
use cms_kit::client::Channel;
use cms_launcher::layout::{Layout, Peers, Ports};
use cms_proto::common::v1::{
    ActorKind, AuthContext, DiversificationScheme, Flow, KeyAlgorithm as Alg, TypedCode,
};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::*;
use cms_tests::custody::{self as shared, hex, kcv, proto_alg, upper};
use cms_tests::inproc::{self, Running};
use cms_tests::pki::{TRUST_DOMAIN, TestPki};
use cms_tests::softhsm::{self, SoftHsm};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use tonic::Code;

const VECTORS: &str = include_str!("../../services/cardcrypto/tests/data/diversification.json");

/// Every token this binary uses (SoftHSM2 only sees tokens that exist when it is loaded).
const TOKENS: &[&str] = &["vectors", "generated", "restart", "config"];

fn hsm() -> &'static SoftHsm {
    softhsm::process(TOKENS)
}

/// The shared key ceremony, on this backend: the new version must live in the HSM.
async fn import(
    client: &mut CustodyServiceClient<Channel>,
    reference: &str,
    alg: KeyAlgorithm,
    key: &[u8],
) -> u32 {
    let key_info = shared::import(client, reference, alg, key).await;
    assert_eq!(key_info.backend, Backend::Pkcs11 as i32);
    key_info.version
}

struct Harness {
    _dir: tempfile::TempDir,
    server: Running,
    client: CustodyServiceClient<Channel>,
}

/// Custody in-process on the pkcs11 backend with `token`.
async fn custody(token: &str, tweak: impl FnOnce(&mut cms_custody::Config)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut config: cms_custody::Config = inproc::config(dir.path(), "custody", &Peers::default());
    config.keystore = hsm().keystore(token);
    tweak(&mut config);
    let server = Running::start(config, cms_custody::run).await;
    let client = CustodyServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        server.grpc,
        pki.id("custody"),
    ));
    Harness {
        _dir: dir,
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

/// A session of this test process on `token`, logged in: looks at the token beside custody.
fn token_session(token: &str) -> Session {
    let context = Pkcs11::new(softhsm::module()).unwrap();
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = context
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| context.get_token_info(*s).unwrap().label() == token)
        .expect("token");
    let session = context.open_rw_session(slot).unwrap();
    let pin = AuthPin::from(hsm().token(token).pin());
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
    session
}

/// The one master-key object of `reference` `version`.
fn master_object(session: &Session, reference: &str, version: u32) -> ObjectHandle {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(format!("cms-mk:{reference}:{version}").into_bytes()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1, "{reference} v{version}: one object");
    found[0]
}

fn boolean(session: &Session, object: ObjectHandle, attribute: AttributeType) -> bool {
    match session
        .get_attributes(object, &[attribute])
        .unwrap()
        .as_slice()
    {
        [
            Attribute::Token(b)
            | Attribute::Private(b)
            | Attribute::Sensitive(b)
            | Attribute::Extractable(b)
            | Attribute::AlwaysSensitive(b)
            | Attribute::NeverExtractable(b)
            | Attribute::Local(b)
            | Attribute::Modifiable(b)
            | Attribute::Decrypt(b)
            | Attribute::Wrap(b),
        ] => *b,
        other => panic!("{attribute:?}: {other:?}"),
    }
}

/// A master-key object as custody must leave it: on the token, private, sensitive, never
/// readable.
fn assert_locked_in(session: &Session, object: ObjectHandle) {
    for (attribute, wanted) in [
        (AttributeType::Token, true),
        (AttributeType::Private, true),
        (AttributeType::Sensitive, true),
        (AttributeType::Extractable, false),
        (AttributeType::Modifiable, false),
        (AttributeType::Decrypt, false),
        (AttributeType::Wrap, false),
    ] {
        assert_eq!(boolean(session, object, attribute), wanted, "{attribute:?}");
    }
    // A sensitive attribute is not returned at all (CKR_ATTRIBUTE_SENSITIVE).
    let value = session
        .get_attributes(object, &[AttributeType::Value])
        .unwrap();
    assert!(
        !value.iter().any(|a| matches!(a, Attribute::Value(_))),
        "the key value was readable"
    );
}

fn token_kcv(session: &Session, object: ObjectHandle, alg: KeyAlgorithm) -> String {
    let zero = vec![0u8; alg.block_len()];
    let out = match alg {
        // Derive-only: the block through a derivation (as any PIN holder can on SoftHSM2).
        KeyAlgorithm::Tdes2Key => derived_block(session, object, &zero).unwrap().to_vec(),
        KeyAlgorithm::Tdes3Key => session.encrypt(&Mechanism::Des3Ecb, object, &zero).unwrap(),
        _ => session.encrypt(&Mechanism::AesEcb, object, &zero).unwrap(),
    };
    upper(&out[..3])
}

#[tokio::test]
async fn every_shared_vector_through_the_rpc_after_a_component_import() {
    let _ = hsm();
    let mut h = custody("vectors", |_| {}).await;
    let status = h
        .client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.backend, Backend::Pkcs11 as i32);
    assert!(status.self_test.unwrap().passed);
    let vectors: Vec<serde_json::Value> = serde_json::from_str(VECTORS).unwrap();
    let session = token_session("vectors");
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
            version = import(&mut h.client, &reference, master_alg, &key).await;
        }
        // The key is an HSM object now, and a locked-in one.
        let object = master_object(&session, &reference, version);
        assert_locked_in(&session, object);
        assert!(!boolean(&session, object, AttributeType::Local));
        assert_eq!(
            token_kcv(&session, object, master_alg),
            kcv(master_alg, &master)
        );

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
    let keys = h
        .client
        .list_master_keys(ListMasterKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(!keys.is_empty());
    assert!(keys.iter().all(|k| k.backend == Backend::Pkcs11 as i32));

    // The same refusal as the soft backend: a scheme that does not fit the master key.
    let err = h
        .client
        .compute_cryptogram(request(
            "vector-0",
            1,
            b"card",
            &[1; 16],
            DiversificationScheme::Sp800108Cmac,
            Alg::Aes128,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("sp800-108-cmac needs"), "{err:?}");
    h.server.stop().await.unwrap();
}

/// What the soft backend computes for a master key the test cannot read: the derivation's
/// block operations done by the token on the test's own session (a derivation with the
/// derive-only 3DES master key, C_Sign CKM_AES_CMAC with the AES one), the formula of shared/vectors on the
/// host.
fn expected_response(
    session: &Session,
    object: ObjectHandle,
    scheme: Scheme,
    card: &[u8],
    version: u32,
    admin: KeyAlgorithm,
    challenge: &[u8],
) -> Vec<u8> {
    let key = match scheme {
        Scheme::GpEmv | Scheme::GpVisa2 => {
            let d = cms_cardcrypto::gp_derivation_data(scheme, card).unwrap();
            let mut k = derived_block(session, object, &d).unwrap().to_vec();
            let k1 = k[..8].to_vec();
            k.extend_from_slice(&k1);
            SecretKey::new(KeyAlgorithm::Tdes3Key, &k).unwrap()
        }
        Scheme::GpKdf3 => {
            let mut k = Vec::new();
            for counter in 1..=admin.key_len().div_ceil(16) as u8 {
                let m = cms_cardcrypto::diversify::gp_kdf3_input(card, counter).unwrap();
                k.extend(session.sign(&Mechanism::AesCMac, object, &m).unwrap());
            }
            k.truncate(admin.key_len());
            SecretKey::new(admin, &k).unwrap()
        }
        Scheme::Sp800108Cmac => {
            let fixed =
                cms_cardcrypto::sp800_108_fixed_input(card, version, admin.key_len()).unwrap();
            let mut k = Vec::new();
            for counter in 1..=admin.key_len().div_ceil(16) as u32 {
                let mut m = counter.to_be_bytes().to_vec();
                m.extend_from_slice(&fixed);
                k.extend(session.sign(&Mechanism::AesCMac, object, &m).unwrap());
            }
            k.truncate(admin.key_len());
            SecretKey::new(admin, &k).unwrap()
        }
    };
    cms_cardcrypto::response(&key, challenge).unwrap().to_vec()
}

#[tokio::test]
async fn a_generated_key_never_leaves_the_hsm_and_answers_like_the_soft_formula() {
    let _ = hsm();
    // Replays allowed here, to show that the same request gets the same answer.
    let mut h = custody("generated", |c| {
        c.guards.replay_window_secs = 0;
        c.guards.per_card_limit = 100;
    })
    .await;
    let session = token_session("generated");
    let cases = [
        (
            "gen-3des",
            KeyAlgorithm::Tdes2Key,
            vec![
                (Scheme::GpEmv, KeyAlgorithm::Tdes3Key),
                (Scheme::GpVisa2, KeyAlgorithm::Tdes3Key),
                (Scheme::GpEmv, KeyAlgorithm::Tdes2Key),
            ],
        ),
        (
            "gen-aes128",
            KeyAlgorithm::Aes128,
            vec![
                (Scheme::GpKdf3, KeyAlgorithm::Aes128),
                (Scheme::Sp800108Cmac, KeyAlgorithm::Aes128),
                (Scheme::Sp800108Cmac, KeyAlgorithm::Aes256),
            ],
        ),
        (
            "gen-aes256",
            KeyAlgorithm::Aes256,
            vec![
                (Scheme::GpKdf3, KeyAlgorithm::Aes256),
                (Scheme::Sp800108Cmac, KeyAlgorithm::Aes192),
            ],
        ),
    ];
    for (reference, alg, schemes) in cases {
        let generated = h
            .client
            .generate_master_key(GenerateMasterKeyRequest {
                reference: reference.into(),
                algorithm: proto_alg(alg) as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
        assert_eq!(generated.backend, Backend::Pkcs11 as i32);
        let listed = h
            .client
            .list_master_keys(ListMasterKeysRequest {
                reference: reference.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .keys;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].kcv, generated.kcv);

        let object = master_object(&session, reference, generated.version);
        assert_locked_in(&session, object);
        // Made by the token itself, and never anything but sensitive and unextractable.
        for attribute in [
            AttributeType::Local,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
        ] {
            assert!(boolean(&session, object, attribute), "{attribute:?}");
        }
        assert_eq!(
            token_kcv(&session, object, alg),
            listed[0].kcv,
            "{reference}"
        );

        for (n, (scheme, admin)) in schemes.into_iter().enumerate() {
            let proto_scheme = match scheme {
                Scheme::GpEmv => DiversificationScheme::GpEmv,
                Scheme::GpVisa2 => DiversificationScheme::GpVisa2,
                Scheme::GpKdf3 => DiversificationScheme::GpKdf3,
                Scheme::Sp800108Cmac => DiversificationScheme::Sp800108Cmac,
            };
            let card = format!("card-{reference}-{n}").into_bytes();
            let challenge: Vec<u8> = (0..admin.block_len() as u8).map(|b| b ^ n as u8).collect();
            let ask = || {
                request(
                    reference,
                    generated.version,
                    &card,
                    &challenge,
                    proto_scheme,
                    proto_alg(admin),
                )
            };
            let first = h
                .client
                .compute_cryptogram(ask())
                .await
                .unwrap()
                .into_inner();
            tokio::time::sleep(Duration::from_millis(5)).await;
            let second = h
                .client
                .compute_cryptogram(ask())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(first.response, second.response, "{reference} {scheme}");
            let expected = expected_response(
                &session,
                object,
                scheme,
                &card,
                generated.version,
                admin,
                &challenge,
            );
            assert_eq!(
                upper(&first.response),
                upper(&expected),
                "{reference} {scheme} {admin}"
            );
        }
    }
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_restart_finds_the_objects_again_and_refuses_a_key_whose_object_is_gone() {
    let _ = hsm();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let config = || {
        let mut c: cms_custody::Config = inproc::config(dir.path(), "custody", &Peers::default());
        c.keystore = hsm().keystore("restart");
        c
    };
    let connect = |server: &Running| {
        CustodyServiceClient::new(inproc::channel(
            pki.tls("gateway"),
            server.grpc,
            pki.id("custody"),
        ))
    };
    let des = hex("404142434445464748494A4B4C4D4E4F");
    let aes = hex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F");
    let expected = |key: &[u8], alg, scheme, admin: KeyAlgorithm, challenge: &[u8]| {
        let master = SecretKey::new(alg, key).unwrap();
        let card_key =
            cms_cardcrypto::diversify(scheme, &master, b"card", 1, admin.key_len()).unwrap();
        cms_cardcrypto::response(&card_key, challenge)
            .unwrap()
            .to_vec()
    };

    let server = Running::start(config(), cms_custody::run).await;
    let mut client = connect(&server);
    assert_eq!(
        import(&mut client, "mk-3des", KeyAlgorithm::Tdes2Key, &des).await,
        1
    );
    assert_eq!(
        import(&mut client, "mk-aes", KeyAlgorithm::Aes256, &aes).await,
        1
    );
    let des_request = |challenge: u8| {
        request(
            "mk-3des",
            1,
            b"card",
            &[challenge; 8],
            DiversificationScheme::GpEmv,
            Alg::Tdes3key,
        )
    };
    let aes_request = |challenge: u8| {
        request(
            "mk-aes",
            1,
            b"card",
            &[challenge; 16],
            DiversificationScheme::Sp800108Cmac,
            Alg::Aes256,
        )
    };
    client.compute_cryptogram(des_request(1)).await.unwrap();
    client.compute_cryptogram(aes_request(1)).await.unwrap();
    server.stop().await.unwrap();

    // Restarted (dev seal file: unsealed at start): the rows lead to the same objects.
    let server = Running::start(config(), cms_custody::run).await;
    let mut client = connect(&server);
    let answer = client
        .compute_cryptogram(des_request(2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.response,
        expected(
            &des,
            KeyAlgorithm::Tdes2Key,
            Scheme::GpEmv,
            KeyAlgorithm::Tdes3Key,
            &[2; 8]
        )
    );
    let answer = client
        .compute_cryptogram(aes_request(2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.response,
        expected(
            &aes,
            KeyAlgorithm::Aes256,
            Scheme::Sp800108Cmac,
            KeyAlgorithm::Aes256,
            &[2; 16]
        )
    );
    server.stop().await.unwrap();

    // Someone deletes one object from the token: custody still starts, refuses that key
    // with a clear error and keeps serving the other.
    let session = token_session("restart");
    session
        .destroy_object(master_object(&session, "mk-3des", 1))
        .unwrap();
    let server = Running::start(config(), cms_custody::run).await;
    let mut client = connect(&server);
    let err = client.compute_cryptogram(des_request(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("cannot be opened"), "{err:?}");
    client.compute_cryptogram(aes_request(3)).await.unwrap();
    server.stop().await.unwrap();
}

// --- Start-up refusals of the binary ----------------------------------------------------

/// A valid custody config on the pkcs11 backend (token `config`), under a fresh temp dir.
fn valid() -> (tempfile::TempDir, Layout, String) {
    let dir = tempfile::tempdir().unwrap();
    TestPki::new(dir.path());
    let layout = Layout::new(dir.path(), TRUST_DOMAIN).unwrap();
    layout.create_dirs().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let text = layout
        .service_config(
            "custody",
            Ports {
                grpc: any,
                ops: any,
            },
            &Peers::default(),
            "",
        )
        .unwrap();
    let text = format!("{text}\n{}", hsm().keystore_toml("config"));
    (dir, layout, text)
}

fn custody_command(layout: &Layout, text: &str) -> Command {
    let path = layout.config_path("custody");
    std::fs::write(&path, text).unwrap();
    let (name, conf) = hsm().env();
    let mut command = Command::new(cms_tests::binary("cms-custody"));
    command.arg("--config").arg(&path).env(name, conf);
    command
}

/// Runs `cms-custody` with `text` and returns the one-line error, checking its shape.
fn fails_with(layout: &Layout, text: &str) -> String {
    let out = custody_command(layout, text).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    eprintln!("{last}");
    assert!(last.starts_with("cms-custody: error: "), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    last
}

fn replace_line(text: &str, key: &str, value: &str) -> String {
    text.lines()
        .map(|line| {
            if line.starts_with(&format!("{key} = ")) {
                format!("{key} = \"{value}\"")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_valid_pkcs11_config_starts() {
    // Guards the cases below: they fail for their own reason, not a broken base config.
    let _ = hsm();
    let (_dir, layout, text) = valid();
    let mut child = custody_command(&layout, &text)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let announce = layout.announce_path("custody");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while cms_kit::server::read_announce(&announce).is_none() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "valid config did not start"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "not serving after 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_wrong_pin_is_named() {
    let _ = hsm();
    let (dir, layout, text) = valid();
    let wrong = dir.path().join("wrong.pin");
    std::fs::write(&wrong, "not-the-pin\n").unwrap();
    let msg = fails_with(
        &layout,
        &replace_line(&text, "pin_file", &wrong.display().to_string()),
    );
    assert!(
        msg.contains("keystore.pin_file") && msg.contains("CKR_PIN_INCORRECT"),
        "{msg}"
    );
    assert!(
        !msg.contains("not-the-pin"),
        "the PIN itself is never shown: {msg}"
    );
}

#[test]
fn a_missing_pin_file_is_named() {
    let _ = hsm();
    let (_dir, layout, text) = valid();
    let msg = fails_with(
        &layout,
        &replace_line(&text, "pin_file", "/nonexistent/hsm.pin"),
    );
    assert!(
        msg.contains("keystore.pin_file") && msg.contains("/nonexistent/hsm.pin"),
        "{msg}"
    );
}

#[test]
fn a_missing_module_is_named() {
    let _ = hsm();
    let (_dir, layout, text) = valid();
    let msg = fails_with(
        &layout,
        &replace_line(&text, "module", "/nonexistent/libsofthsm2.so"),
    );
    assert!(
        msg.contains("keystore.module") && msg.contains("/nonexistent/libsofthsm2.so"),
        "{msg}"
    );
}

#[test]
fn a_file_that_is_not_a_pkcs11_module_is_named() {
    let _ = hsm();
    let (dir, layout, text) = valid();
    let junk = dir.path().join("junk.so");
    std::fs::write(&junk, "not a shared library").unwrap();
    let msg = fails_with(
        &layout,
        &replace_line(&text, "module", &junk.display().to_string()),
    );
    assert!(
        msg.contains("keystore.module") && msg.contains("cannot be loaded"),
        "{msg}"
    );
}

#[test]
fn a_missing_token_is_named() {
    let _ = hsm();
    let (_dir, layout, text) = valid();
    let msg = fails_with(
        &layout,
        &replace_line(&text, "token_label", "no-such-token"),
    );
    assert!(
        msg.contains("keystore.token_label") && msg.contains("no-such-token"),
        "{msg}"
    );
    // The tokens that are there, to spot a typo.
    assert!(msg.contains("\"config\""), "{msg}");
}

#[test]
fn a_pkcs11_backend_without_its_settings_is_named() {
    let _ = hsm();
    let (_dir, layout, text) = valid();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("module = "))
        .collect::<Vec<_>>()
        .join("\n");
    let msg = fails_with(&layout, &text);
    assert!(
        msg.contains("keystore.module") && msg.contains("required"),
        "{msg}"
    );
}

#[test]
fn the_pin_file_is_the_only_place_of_the_pin() {
    // The harness's own promise: a mode-0600 file, never the config text.
    let hsm = hsm();
    let (_dir, _layout, text) = valid();
    let token = hsm.token("config");
    assert!(!text.contains(&token.pin()));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token.pin_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0);
    assert!(Path::new(&token.pin_file).is_file());
}
