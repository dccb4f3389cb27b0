//! Custody's key lifecycle and error model through its gRPC API (in-process, real mTLS, an
//! SQLite file; SoftHSM2 for the backend tests): the current version is never retired, a
//! scheme and admin key that do not fit are the caller's error, the key ceremony refuses
//! degenerate keys, cryptograms and PUK releases need an authorization context, refusals carry
//! reasons that tell them apart, there is one System Owner token, and pkcs11 master keys carry
//! only the attributes their scheme needs.
//!
//! One SoftHSM2 token directory for the whole binary (see cms_tests::softhsm): every test
//! calls `hsm()` first.

use cms_cardcrypto::KeyAlgorithm;
use cms_custody::keystore::cryptoki;
use cms_kit::client::Channel;
use cms_launcher::layout::Peers;
use cms_proto::common::v1::{
    ActorKind, AuthContext, DiversificationScheme, ErrorReason, Flow, KeyAlgorithm as Alg,
    TypedCode,
};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::*;
use cms_tests::custody::{hex, import, kcv, proto_alg};
use cms_tests::inproc::{self, Running};
use cms_tests::pki::TestPki;
use cms_tests::softhsm::{self, SoftHsm};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use tonic::Code;

/// Every token this binary uses (SoftHSM2 only sees tokens that exist when it is loaded).
const TOKENS: &[&str] = &["keys-backend", "keys-attributes"];
const MASTER: &str = "404142434445464748494A4B4C4D4E4F";

fn hsm() -> &'static SoftHsm {
    softhsm::process(TOKENS)
}

type Client = CustodyServiceClient<Channel>;

struct Harness {
    dir: tempfile::TempDir,
    pki: TestPki,
    server: Running,
    client: Client,
}

fn config(dir: &std::path::Path) -> cms_custody::Config {
    inproc::config(dir, "custody", &Peers::default())
}

async fn custody(tweak: impl FnOnce(&mut cms_custody::Config)) -> Harness {
    let _ = hsm();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut config = config(dir.path());
    tweak(&mut config);
    let server = Running::start(config, cms_custody::run).await;
    let client = CustodyServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        server.grpc,
        pki.id("custody"),
    ));
    Harness {
        dir,
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
        request_id: "req-keys".into(),
        ..Default::default()
    })
}

fn cryptogram(
    reference: &str,
    card: &[u8],
    challenge: &[u8],
    scheme: DiversificationScheme,
    admin: Alg,
) -> ComputeCryptogramRequest {
    ComputeCryptogramRequest {
        card_id: card.to_vec(),
        challenge: challenge.to_vec(),
        master_key_reference: reference.into(),
        master_key_version: 1,
        scheme: scheme as i32,
        admin_key_algorithm: admin as i32,
        auth: auth(),
        challenge_code: None,
    }
}

fn aes(reference: &str, card: &[u8], challenge: &[u8]) -> ComputeCryptogramRequest {
    cryptogram(
        reference,
        card,
        challenge,
        DiversificationScheme::Sp800108Cmac,
        Alg::Aes128,
    )
}

/// Reason and field of a custody refusal.
fn detail(status: &tonic::Status) -> (ErrorReason, String) {
    let detail = cms_custody::error::detail(status).expect("status carries an ErrorDetail");
    (ErrorReason::try_from(detail.reason).unwrap(), detail.field)
}

async fn audit(client: &mut Client) -> Vec<AuditRecord> {
    client
        .query_audit(QueryAuditRequest {
            page: Some(cms_proto::common::v1::PageRequest {
                page_size: 1000,
                page_token: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records
}

async fn versions(client: &mut Client, reference: &str) -> Vec<(u32, MasterKeyState)> {
    client
        .list_master_keys(ListMasterKeysRequest {
            reference: reference.into(),
            include_retired: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .keys
        .iter()
        .map(|k| (k.version, MasterKeyState::try_from(k.state).unwrap()))
        .collect()
}

fn retire(reference: &str, version: u32) -> RetireMasterKeyVersionRequest {
    RetireMasterKeyVersionRequest {
        reference: reference.into(),
        version,
        ..Default::default()
    }
}

#[tokio::test]
async fn the_current_version_of_a_master_key_is_never_retired() {
    let mut h = custody(|_| {}).await;
    import(&mut h.client, "mk", KeyAlgorithm::Aes128, &hex(MASTER)).await;
    let err = h.client.retire_master_key_version(retire("mk", 1)).await;
    let err = err.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("the current version cannot be retired"),
        "{}",
        err.message()
    );
    assert_eq!(
        versions(&mut h.client, "mk").await,
        [(1, MasterKeyState::Current)]
    );

    // After a rotation the old version may go; the new one, now current, may not.
    h.client
        .rotate_master_key(RotateMasterKeyRequest {
            reference: "mk".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    h.client
        .retire_master_key_version(retire("mk", 1))
        .await
        .unwrap();
    let err = h
        .client
        .retire_master_key_version(retire("mk", 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        versions(&mut h.client, "mk").await,
        [(1, MasterKeyState::Retired), (2, MasterKeyState::Current)]
    );
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_scheme_and_an_admin_key_algorithm_that_do_not_fit_are_the_callers_error() {
    let mut h = custody(|_| {}).await;
    import(
        &mut h.client,
        "mk-3des",
        KeyAlgorithm::Tdes2Key,
        &hex(MASTER),
    )
    .await;
    import(&mut h.client, "mk-aes", KeyAlgorithm::Aes128, &hex(MASTER)).await;
    for (reference, scheme, admin, challenge_len, names) in [
        (
            "mk-3des",
            DiversificationScheme::GpEmv,
            Alg::Aes128,
            16,
            ["gp-emv", "aes-128"],
        ),
        (
            "mk-3des",
            DiversificationScheme::GpVisa2,
            Alg::Aes256,
            16,
            ["gp-visa2", "aes-256"],
        ),
        (
            "mk-aes",
            DiversificationScheme::Sp800108Cmac,
            Alg::Tdes3key,
            8,
            ["sp800-108-cmac", "3des-3key"],
        ),
    ] {
        let err = h
            .client
            .compute_cryptogram(cryptogram(
                reference,
                b"card-1",
                &vec![5; challenge_len],
                scheme,
                admin,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(
            detail(&err),
            (ErrorReason::InvalidArgument, "admin_key_algorithm".into())
        );
        for name in names {
            assert!(err.message().contains(name), "{name}: {}", err.message());
        }
    }
    h.server.stop().await.unwrap();
}

/// A key ceremony with these components; the finish confirms the KCV of their XOR.
async fn ceremony(
    client: &mut Client,
    reference: &str,
    alg: KeyAlgorithm,
    components: &[Vec<u8>],
) -> Result<MasterKeyVersion, tonic::Status> {
    let begun = client
        .begin_key_import(BeginKeyImportRequest {
            reference: reference.into(),
            algorithm: proto_alg(alg) as i32,
            component_count: components.len() as u32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut combined = vec![0u8; alg.key_len()];
    for component in components {
        let given = client
            .add_key_component(AddKeyComponentRequest {
                import_id: begun.import_id.clone(),
                component: component.clone(),
                expected_kcv: kcv(alg, component),
                ..Default::default()
            })
            .await;
        if let Err(e) = given {
            let _ = client
                .abort_key_import(AbortKeyImportRequest {
                    import_id: begun.import_id.clone(),
                    ..Default::default()
                })
                .await;
            return Err(e);
        }
        for (c, b) in combined.iter_mut().zip(component) {
            *c ^= b;
        }
    }
    let finished = client
        .finish_key_import(FinishKeyImportRequest {
            import_id: begun.import_id.clone(),
            expected_kcv: kcv(alg, &combined),
            ..Default::default()
        })
        .await?;
    Ok(finished.into_inner().key.unwrap())
}

/// Two components whose XOR is `key`.
fn split(key: &[u8]) -> Vec<Vec<u8>> {
    let first: Vec<u8> = (0..key.len())
        .map(|i| (i as u8).wrapping_mul(29) ^ 0xA7)
        .collect();
    let second = key.iter().zip(&first).map(|(k, c)| k ^ c).collect();
    vec![first, second]
}

#[tokio::test]
async fn the_key_ceremony_refuses_degenerate_keys() {
    let mut h = custody(|_| {}).await;
    let tdes = KeyAlgorithm::Tdes2Key;
    let random = hex("0123456789ABCDEF");
    let cases: Vec<(&str, KeyAlgorithm, Vec<Vec<u8>>, &str)> = vec![
        (
            "an all-zero component",
            KeyAlgorithm::Aes128,
            vec![vec![0; 16], hex(MASTER)],
            "component 1 is all zeros",
        ),
        (
            "a repeated component",
            KeyAlgorithm::Aes128,
            vec![hex(MASTER), vec![0x33; 16], hex(MASTER)],
            "component 3 is the same as a component given before",
        ),
        (
            "components that cancel out",
            KeyAlgorithm::Aes256,
            {
                let a = vec![0x3C; 32];
                let b: Vec<u8> = (0..32).collect();
                let c = a.iter().zip(&b).map(|(x, y)| x ^ y).collect();
                vec![a, b, c]
            },
            "all zeros",
        ),
        (
            "a 2-key 3DES key with K1 = K2",
            tdes,
            split(&[random.clone(), random.clone()].concat()),
            "two of its DES keys are equal",
        ),
        (
            "K1 = K2 up to parity bits",
            tdes,
            split(&[random.clone(), hex("0022446688AACCEE")].concat()),
            "two of its DES keys are equal",
        ),
        (
            "a weak DES half",
            tdes,
            split(&[hex("FEFEFEFEFEFEFEFE"), random.clone()].concat()),
            "weak or semi-weak",
        ),
        (
            "a semi-weak DES half",
            tdes,
            split(&[random.clone(), hex("01FE01FE01FE01FE")].concat()),
            "weak or semi-weak",
        ),
    ];
    for (n, (what, alg, components, says)) in cases.into_iter().enumerate() {
        let reference = format!("degenerate-{n}");
        let err = ceremony(&mut h.client, &reference, alg, &components)
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert_eq!(
            detail(&err),
            (ErrorReason::InvalidArgument, "component".into()),
            "{what}"
        );
        assert!(err.message().contains(says), "{what}: {}", err.message());
        assert!(
            versions(&mut h.client, &reference).await.is_empty(),
            "{what}: nothing stored"
        );
    }
    // A sound key from the same kind of ceremony is taken.
    let good = ceremony(
        &mut h.client,
        "sound",
        tdes,
        &split(&[random, hex("FEDCBA9876543210")].concat()),
    )
    .await
    .unwrap();
    assert_eq!(good.version, 1);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn cryptograms_and_puk_releases_need_an_authorization_context() {
    let mut h = custody(|_| {}).await;
    import(&mut h.client, "mk", KeyAlgorithm::Aes128, &hex(MASTER)).await;
    let without = |auth: Option<AuthContext>| ComputeCryptogramRequest {
        auth,
        ..aes("mk", b"card-1", &[1; 16])
    };
    let no_kind = AuthContext {
        request_id: "req-1".into(),
        ..Default::default()
    };
    let no_request_id = AuthContext {
        actor_kind: ActorKind::User as i32,
        actor_id: "user-1".into(),
        ..Default::default()
    };
    for (auth, field) in [
        (None, "auth.actor_kind"),
        (Some(no_kind), "auth.actor_kind"),
        (Some(no_request_id), "auth.request_id"),
    ] {
        let err = h
            .client
            .compute_cryptogram(without(auth))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(detail(&err), (ErrorReason::InvalidArgument, field.into()));
    }
    // The same request with a context is answered: the refusals used up nothing.
    h.client
        .compute_cryptogram(aes("mk", b"card-1", &[1; 16]))
        .await
        .unwrap();

    let release = |auth: Option<AuthContext>| ReleasePivPukRequest {
        card_id: b"card-puk".to_vec(),
        auth,
        purpose: PukPurpose::OfflineHelpdesk as i32,
        master_key_reference: "mk".into(),
        master_key_version: 1,
        puk_version: 1,
        puk_length: 8,
        ..Default::default()
    };
    let err = h.client.release_piv_puk(release(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        detail(&err),
        (ErrorReason::InvalidArgument, "auth.actor_kind".into())
    );
    h.client.release_piv_puk(release(auth())).await.unwrap();

    // Every refusal is in the audit.
    let refused = audit(&mut h.client)
        .await
        .into_iter()
        .filter(|r| r.outcome == AuditOutcome::Refused as i32)
        .map(|r| AuditEvent::try_from(r.event).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(
        refused,
        [
            AuditEvent::Cryptogram,
            AuditEvent::Cryptogram,
            AuditEvent::Cryptogram,
            AuditEvent::PukRelease
        ]
    );
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn typed_codes_and_limits_have_reasons_that_tell_them_apart() {
    let mut h = custody(|c| c.guards.per_card_limit = 2).await;
    import(&mut h.client, "mk", KeyAlgorithm::Aes128, &hex(MASTER)).await;
    import(
        &mut h.client,
        "mk-3des",
        KeyAlgorithm::Tdes2Key,
        &hex(MASTER),
    )
    .await;
    let typed = |reference: &str, scheme, admin, hex: &str, checksum: &str| {
        let mut request = cryptogram(reference, b"card-typed", &[], scheme, admin);
        request.challenge_code = Some(TypedCode {
            hex: hex.into(),
            checksum: checksum.into(),
        });
        request
    };
    // A missing or short checksum is missing, not mismatched.
    for checksum in ["", " ", "9D7"] {
        let err = h
            .client
            .compute_cryptogram(typed(
                "mk-3des",
                DiversificationScheme::GpEmv,
                Alg::Tdes3key,
                "1603 EBDF 1C8A 2E72",
                checksum,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            detail(&err),
            (ErrorReason::CodeChecksumMissing, "challenge_code".into()),
            "{checksum:?}: {err:?}"
        );
    }
    // A typed code that is a challenge, but not one this admin key answers.
    let sixteen = "00112233445566778899AABBCCDDEEFF";
    let sum = cms_cardcrypto::checksum(&hex(sixteen));
    let err = h
        .client
        .compute_cryptogram(typed(
            "mk-3des",
            DiversificationScheme::GpEmv,
            Alg::Tdes3key,
            sixteen,
            &sum,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        detail(&err),
        (ErrorReason::CodeWrongLength, "challenge_code".into())
    );
    assert!(
        err.message().contains("32 hex digits, expected 16"),
        "{}",
        err.message()
    );

    // The per-card limit (2), counted over cryptograms and PUK releases together.
    h.client
        .compute_cryptogram(aes("mk", b"card-limit", &[1; 16]))
        .await
        .unwrap();
    h.client
        .release_piv_puk(ReleasePivPukRequest {
            card_id: b"card-limit".to_vec(),
            auth: auth(),
            purpose: PukPurpose::OfflineHelpdesk as i32,
            master_key_reference: "mk".into(),
            master_key_version: 1,
            puk_version: 1,
            puk_length: 8,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = h
        .client
        .compute_cryptogram(aes("mk", b"card-limit", &[2; 16]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(detail(&err).0, ErrorReason::CardLimitReached);
    assert!(
        err.message().contains("limit of 2") && err.message().contains("PUK releases"),
        "{}",
        err.message()
    );
    h.server.stop().await.unwrap();

    // The caller's rate: its own reason.
    let mut h = custody(|c| {
        c.guards.caller_burst = 1;
        c.guards.caller_rate_per_sec = 0.001;
    })
    .await;
    import(&mut h.client, "mk", KeyAlgorithm::Aes128, &hex(MASTER)).await;
    h.client
        .compute_cryptogram(aes("mk", b"card-rate", &[1; 16]))
        .await
        .unwrap();
    let err = h
        .client
        .compute_cryptogram(aes("mk", b"card-rate", &[2; 16]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(detail(&err).0, ErrorReason::RateLimited);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_made_by_the_other_backend_says_so() {
    let Harness {
        dir,
        pki,
        server,
        mut client,
    } = custody(|_| {}).await;
    import(&mut client, "mk", KeyAlgorithm::Aes128, &hex(MASTER)).await;
    server.stop().await.unwrap();

    // The same database and seal, now on the pkcs11 backend.
    let mut config = config(dir.path());
    config.keystore = hsm().keystore("keys-backend");
    let server = Running::start(config, cms_custody::run).await;
    let mut client = CustodyServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        server.grpc,
        pki.id("custody"),
    ));
    let err = client
        .compute_cryptogram(aes("mk", b"card-1", &[1; 16]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(detail(&err).0, ErrorReason::KeyFromOtherBackend);
    assert!(
        err.message()
            .contains("made by the soft keystore backend, and this custody runs the pkcs11"),
        "{}",
        err.message()
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn there_is_one_system_owner_token_per_installation() {
    let mut h = custody(|_| {}).await;
    let init = |label: &str| InitSoTokenRequest {
        label: label.into(),
        algorithm: Alg::Aes128 as i32,
        share_count: 3,
        share_threshold: 2,
        auth: auth(),
        ..Default::default()
    };
    let first = h
        .client
        .init_so_token(init("so-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.shares.len(), 3);
    for label in ["so-b", "so-a"] {
        let err = h.client.init_so_token(init(label)).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{label}: {err:?}");
        assert!(
            err.message().contains("one per installation"),
            "{}",
            err.message()
        );
    }
    let info = h
        .client
        .get_so_token_info(GetSoTokenInfoRequest::default())
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.label, "so-a");
    // Its audit record says the algorithm and the shares (never the key or a share).
    let records: Vec<AuditRecord> = audit(&mut h.client)
        .await
        .into_iter()
        .filter(|r| r.event == AuditEvent::SoTokenInit as i32)
        .collect();
    // The one that was made, and the two refused attempts (refused calls are records too).
    let made: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.outcome == AuditOutcome::Success as i32)
        .collect();
    assert_eq!(made.len(), 1);
    let refused = records
        .iter()
        .filter(|r| r.outcome == AuditOutcome::Refused as i32)
        .count();
    assert_eq!(refused, 2);
    let records = made;
    let attribute = |k: &str| records[0].attributes.get(k).map(String::as_str);
    assert_eq!(attribute("algorithm"), Some("aes-128"));
    assert_eq!(attribute("share_count"), Some("3"));
    assert_eq!(attribute("threshold"), Some("2"));
    let said = format!("{:?}", records[0]);
    assert!(
        said.contains("aes-128") && said.contains("3 shares") && said.contains("2 needed"),
        "{said}"
    );
    h.server.stop().await.unwrap();
}

/// A session of this test process on `token`, logged in with the PIN custody uses: what
/// anyone holding the token PIN can do outside custody.
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

fn master_object(session: &Session, reference: &str) -> ObjectHandle {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(format!("cms-mk:{reference}:1").into_bytes()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1, "{reference}: one object");
    found[0]
}

/// (CKA_ENCRYPT, CKA_DERIVE, CKA_SIGN, CKA_COPYABLE, CKA_MODIFIABLE) of `object`.
fn uses(session: &Session, object: ObjectHandle) -> [bool; 5] {
    let wanted = [
        AttributeType::Encrypt,
        AttributeType::Derive,
        AttributeType::Sign,
        AttributeType::Copyable,
        AttributeType::Modifiable,
    ];
    let got = session.get_attributes(object, &wanted).unwrap();
    wanted.map(|attribute| {
        got.iter()
            .find_map(|a| match (a, attribute) {
                (Attribute::Encrypt(b), AttributeType::Encrypt)
                | (Attribute::Derive(b), AttributeType::Derive)
                | (Attribute::Sign(b), AttributeType::Sign)
                | (Attribute::Copyable(b), AttributeType::Copyable)
                | (Attribute::Modifiable(b), AttributeType::Modifiable) => Some(*b),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{attribute:?} not returned"))
    })
}

#[tokio::test]
async fn pkcs11_master_keys_carry_only_what_their_scheme_needs() {
    let token = "keys-attributes";
    let mut h = custody(|c| {
        c.keystore = hsm().keystore(token);
        c.guards.per_card_limit = 100;
    })
    .await;
    for (reference, alg) in [
        ("gen-3des", KeyAlgorithm::Tdes2Key),
        ("gen-3des3", KeyAlgorithm::Tdes3Key),
        ("gen-aes", KeyAlgorithm::Aes128),
    ] {
        h.client
            .generate_master_key(GenerateMasterKeyRequest {
                reference: reference.into(),
                algorithm: proto_alg(alg) as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    import(
        &mut h.client,
        "imp-3des",
        KeyAlgorithm::Tdes2Key,
        &hex(MASTER),
    )
    .await;
    let session = token_session(token);
    //                     encrypt derive sign   copy   modify
    for (reference, wanted) in [
        // The GP schemes derive inside the HSM: derive only.
        ("gen-3des", [false, true, false, false, false]),
        ("imp-3des", [false, true, false, false, false]),
        // No scheme derives from a 3-key 3DES key; the PUK PRF encrypts with it.
        ("gen-3des3", [true, false, false, false, false]),
        // The AES schemes' CMAC (sign); the KCV (encrypt).
        ("gen-aes", [true, false, true, false, false]),
    ] {
        let object = master_object(&session, reference);
        assert_eq!(uses(&session, object), wanted, "{reference}");
    }
    // The PIN holder's C_Encrypt with a GP master key is refused by the token.
    for reference in ["gen-3des", "imp-3des"] {
        let err = session
            .encrypt(
                &Mechanism::Des3Ecb,
                master_object(&session, reference),
                &[0u8; 8],
            )
            .unwrap_err();
        assert!(
            matches!(err, P11Error::Pkcs11(RvError::KeyFunctionNotPermitted, _)),
            "{reference}: {err}"
        );
    }

    // Custody still does all it did with a derive-only key: the key check value (above,
    // from the import), the shared gp-emv vector, and a PUK (cms_cardcrypto's known answer).
    let answer = h
        .client
        .compute_cryptogram(cryptogram(
            "imp-3des",
            &hex("00010203040506070809"),
            &hex("1603EBDF1C8A2E72"),
            DiversificationScheme::GpEmv,
            Alg::Tdes3key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cms_tests::custody::upper(&answer.response),
        "9CB2DC8314AFA496"
    );
    let puk = h
        .client
        .release_piv_puk(ReleasePivPukRequest {
            card_id: hex("6F1D2B3C4D5E6F708192A3B4C5D6E7F8"),
            auth: auth(),
            purpose: PukPurpose::OfflineHelpdesk as i32,
            master_key_reference: "imp-3des".into(),
            master_key_version: 1,
            puk_version: 1,
            puk_length: 8,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(puk.puk, b"24326921");
    // A generated derive-only key answers too.
    h.client
        .compute_cryptogram(cryptogram(
            "gen-3des",
            b"card-1",
            &[4; 8],
            DiversificationScheme::GpVisa2,
            Alg::Tdes2key,
        ))
        .await
        .unwrap();
    h.server.stop().await.unwrap();
}
