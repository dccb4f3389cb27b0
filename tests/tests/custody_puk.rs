//! PIV PUKs through custody's gRPC API: in-process custody on loopback listeners with real
//! mTLS and an SQLite file, on the `soft` backend and on the `pkcs11` backend (SoftHSM2).
//!
//! * the whole life of a card's PUK on each backend: an online release hands out the current
//!   and the next PUK once per session, an offline read-out marks the version exposed, the
//!   rotation confirms version + 1 and clears the exposure, and every refusal has its code;
//! * both backends give the same PUKs as `cms_cardcrypto::derive_puk` for the same master key
//!   (AES and 3DES masters, several cards, versions and lengths), and its known answers;
//! * a release counts against the card's limit like a cryptogram does;
//! * the audit holds every release, rotation and refusal, and no PUK in any encoding.
//!
//! One SoftHSM2 token directory for the whole binary (see cms_tests::softhsm): every test
//! calls `hsm()` first.

use cms_cardcrypto::{KeyAlgorithm, PukInput, SecretKey, checksum, derive_puk};
use cms_kit::authz::IdentityPattern;
use cms_kit::client::Channel;
use cms_kit::pki::LeafSpec;
use cms_launcher::layout::Peers;
use cms_proto::common::v1::{
    ActorKind, AuthContext, DiversificationScheme, ErrorReason, Flow, KeyAlgorithm as Alg,
};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::*;
use cms_tests::custody::{self as shared, hex, upper};
use cms_tests::inproc::{self, Running};
use cms_tests::pki::TestPki;
use cms_tests::softhsm::{self, SoftHsm};
use tonic::Code;

/// Every token this binary uses (SoftHSM2 only sees tokens that exist when it is loaded).
const TOKENS: &[&str] = &["puk-flow", "puk-same"];
/// A service that may connect to custody and has a scope there, but not `release_puk`.
const REPORTS: &str = "service/reports";
const MASTER: &str = "404142434445464748494A4B4C4D4E4F";
const CARD: &str = "6F1D2B3C4D5E6F708192A3B4C5D6E7F8";

fn hsm() -> &'static SoftHsm {
    softhsm::process(TOKENS)
}

#[derive(Clone, Copy, Debug)]
enum Keystore {
    Soft,
    Pkcs11(&'static str),
}

type Client = CustodyServiceClient<Channel>;

async fn import(client: &mut Client, reference: &str, alg: KeyAlgorithm, key: &[u8]) -> u32 {
    shared::import(client, reference, alg, key).await.version
}

struct Harness {
    _dir: tempfile::TempDir,
    pki: TestPki,
    server: Running,
    /// The gateway: every key, admin, `release_puk`.
    gateway: Client,
    /// REPORTS: every key, no `release_puk`.
    reports: Client,
}

async fn custody(keystore: Keystore, per_card_limit: u32) -> Harness {
    custody_with(keystore, |c| c.guards.per_card_limit = per_card_limit).await
}

async fn custody_with(keystore: Keystore, tweak: impl FnOnce(&mut cms_custody::Config)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut config: cms_custody::Config = inproc::config(dir.path(), "custody", &Peers::default());
    if let Keystore::Pkcs11(token) = keystore {
        config.keystore = hsm().keystore(token);
    }
    tweak(&mut config);
    let reports = IdentityPattern::Exact(pki.id(REPORTS));
    config.access.allow.push(reports.clone());
    config.callers.push(cms_custody::CallerScope {
        identity: reports,
        key_references: vec!["*".into()],
        admin: false,
        release_puk: false,
    });
    let server = Running::start(config, cms_custody::run).await;
    let connect =
        |tls| CustodyServiceClient::new(inproc::channel(tls, server.grpc, pki.id("custody")));
    let gateway = connect(pki.tls("gateway"));
    let reports = connect(pki.issue("service-reports", &LeafSpec::new(pki.id(REPORTS), 30)));
    Harness {
        _dir: dir,
        pki,
        server,
        gateway,
        reports,
    }
}

fn auth() -> Option<AuthContext> {
    Some(AuthContext {
        actor_kind: ActorKind::Operator as i32,
        actor_id: "helpdesk-7".into(),
        flow: Flow::OfflineHelpdesk as i32,
        request_id: "req-puk".into(),
        ..Default::default()
    })
}

fn online(reference: &str, card: &[u8], session: &str, puk_version: u32) -> ReleasePivPukRequest {
    ReleasePivPukRequest {
        card_id: card.to_vec(),
        auth: auth(),
        purpose: PukPurpose::OnlineSession as i32,
        session_id: session.into(),
        master_key_reference: reference.into(),
        master_key_version: 1,
        puk_version,
        puk_length: 8,
    }
}

fn offline(reference: &str, card: &[u8], puk_version: u32) -> ReleasePivPukRequest {
    ReleasePivPukRequest {
        purpose: PukPurpose::OfflineHelpdesk as i32,
        session_id: String::new(),
        ..online(reference, card, "", puk_version)
    }
}

fn confirm(reference: &str, card: &[u8], new_puk_version: u32) -> ConfirmPukRotationRequest {
    ConfirmPukRotationRequest {
        card_id: card.to_vec(),
        new_puk_version,
        auth: auth(),
        master_key_reference: reference.into(),
    }
}

fn status_request(reference: &str, card: &[u8]) -> GetPukStatusRequest {
    GetPukStatusRequest {
        card_id: card.to_vec(),
        master_key_reference: reference.into(),
    }
}

fn detail(status: &tonic::Status) -> (ErrorReason, String) {
    let detail = cms_custody::error::detail(status).expect("status carries an ErrorDetail");
    (ErrorReason::try_from(detail.reason).unwrap(), detail.field)
}

fn text(puk: &[u8]) -> &str {
    std::str::from_utf8(puk).unwrap()
}

/// The PUK `derive_puk` gives for `master` (the formula, outside custody).
fn formula(
    alg: KeyAlgorithm,
    master: &[u8],
    card: &[u8],
    puk_version: u32,
    digits: usize,
) -> String {
    let key = SecretKey::new(alg, master).unwrap();
    let input = PukInput {
        card_id: card,
        master_key_version: 1,
        puk_version,
        digits,
    };
    text(derive_puk(&key, &input).unwrap().expose_digits()).to_owned()
}

/// Standard and URL-safe base64, padded.
fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(alphabet[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Every way a PUK could be written down: its digits, the hex of its bytes (both cases),
/// base64 of its bytes (standard and URL-safe, with and without padding), and its checksum.
fn encodings(puk: &[u8]) -> Vec<String> {
    const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut forms = vec![text(puk).to_owned(), upper(puk), upper(puk).to_lowercase()];
    for alphabet in [STANDARD, URL_SAFE] {
        let encoded = base64(puk, alphabet);
        forms.push(encoded.trim_end_matches('=').to_owned());
        forms.push(encoded);
    }
    forms
}

/// The encodings of `puks` found in `record`, looking at each string field, each bytes field
/// (raw, and as hex) and the whole record as printed.
fn leaks(record: &AuditRecord, puks: &[Vec<u8>]) -> Vec<String> {
    let context = record.context.clone().unwrap_or_default();
    let mut fields: Vec<String> = vec![
        record.reason.clone(),
        record.caller_identity.clone(),
        record.master_key_reference.clone(),
        context.actor_id.clone(),
        context.on_behalf_of_user_id.clone(),
        context.approval_id.clone(),
        context.request_id.clone(),
        format!("{record:?}"),
    ];
    fields.extend(record.attributes.iter().map(|(k, v)| format!("{k}={v}")));
    // The 4-character checksum is looked for in the text fields only: in 64-character hex
    // hashes and the printed record a random match is likely (about 1 in 500 per field).
    let texts = fields.len();
    let bytes = [&context.card_id, &record.previous_hash, &record.hash];
    fields.extend(bytes.iter().map(|b| upper(b)));
    fields.extend(
        bytes
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
    );
    let mut found = Vec::new();
    for puk in puks {
        if bytes
            .iter()
            .any(|b| b.windows(puk.len()).any(|w| w == puk.as_slice()))
        {
            found.push(format!("record {}: raw bytes", record.sequence));
        }
        let sum = checksum(puk);
        if fields[..texts]
            .iter()
            .enumerate()
            .any(|(i, f)| i != 7 && f.contains(&sum))
        {
            found.push(format!("record {}: checksum {sum}", record.sequence));
        }
        for form in encodings(puk) {
            if fields.iter().any(|f| f.contains(&form)) {
                found.push(format!("record {}: {form}", record.sequence));
            }
        }
    }
    found
}

async fn audit(client: &mut Client) -> Vec<AuditRecord> {
    client
        .query_audit(QueryAuditRequest {
            page: Some(cms_proto::common::v1::PageRequest {
                page_size: 1000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records
}

fn count(records: &[AuditRecord], event: AuditEvent, outcome: AuditOutcome) -> usize {
    records
        .iter()
        .filter(|r| r.event == event as i32 && r.outcome == outcome as i32)
        .count()
}

/// A card's PUK from first release to rotation, and every refusal, on one backend.
async fn life_of_a_puk(keystore: Keystore) {
    let mut h = custody(keystore, 20).await;
    let gw = &mut h.gateway;
    let version = import(gw, "puk-aes", KeyAlgorithm::Aes128, &hex(MASTER)).await;
    assert_eq!(version, 1);
    let card = hex(CARD);
    let mut released: Vec<Vec<u8>> = Vec::new();

    // Custody has never seen the card.
    let err = gw
        .get_puk_status(status_request("puk-aes", &card))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Online: the current PUK and the next one, once per session.
    let first = gw
        .release_piv_puk(online("puk-aes", &card, "session-1", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(text(&first.puk), "69910623", "known answer ({keystore:?})");
    assert_eq!(
        text(&first.next_puk),
        "28367080",
        "known answer ({keystore:?})"
    );
    assert_eq!((first.puk_version, first.next_puk_version), (1, 2));
    assert_eq!(first.puk_checksum, checksum(&first.puk));
    assert!(!first.exposed);
    assert!(first.audit_sequence > 0);
    // The response's Debug (what a log line would show) holds neither PUK.
    let shown = format!("{first:?}");
    for secret in [&first.puk, &first.next_puk] {
        assert!(
            !shown.contains(text(secret)) && !shown.contains(&format!("{secret:?}")),
            "{shown}"
        );
    }
    released.extend([first.puk.clone(), first.next_puk.clone()]);
    let err = gw
        .release_piv_puk(online("puk-aes", &card, "session-1", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(detail(&err).0, ErrorReason::AlreadyExists);
    assert!(
        err.message().contains("one release per online session"),
        "{}",
        err.message()
    );
    let state = gw
        .get_puk_status(status_request("puk-aes", &card))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(state.card_id, card);
    assert_eq!((state.puk_version, state.exposed), (1, false));
    assert!(state.exposed_at.is_none() && state.rotated_at.is_none());
    // Another session of the same card is another release; the version, unrotated, was
    // handed out twice: it is exposed.
    let second = gw
        .release_piv_puk(online("puk-aes", &card, "session-2", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.puk, first.puk);
    assert!(second.exposed);
    let state = gw
        .get_puk_status(status_request("puk-aes", &card))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!((state.puk_version, state.exposed), (1, true));

    // Offline: the current PUK only, and the version is exposed from then on.
    let read_out = gw
        .release_piv_puk(offline("puk-aes", &card, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read_out.puk, first.puk);
    assert!(read_out.exposed);
    assert!(read_out.next_puk.is_empty() && read_out.next_puk_version == 0);
    let state = gw
        .get_puk_status(status_request("puk-aes", &card))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert!(state.exposed && state.exposed_at.is_some(), "{state:?}");
    // An online release of an exposed version says so.
    let exposed = gw
        .release_piv_puk(online("puk-aes", &card, "session-3", 1))
        .await
        .unwrap()
        .into_inner();
    assert!(exposed.exposed);

    // A version other than custody's is refused, naming custody's.
    let err = gw
        .release_piv_puk(offline("puk-aes", &card, 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("PUK version 1"), "{}", err.message());

    // Rotation: exactly version + 1; it clears the exposure.
    for wrong in [1, 3] {
        let err = gw
            .confirm_puk_rotation(confirm("puk-aes", &card, wrong))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(
            err.message().contains("version 1") && err.message().contains("version 2"),
            "{}",
            err.message()
        );
    }
    let rotated = gw
        .confirm_puk_rotation(confirm("puk-aes", &card, 2))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!((rotated.puk_version, rotated.exposed), (2, false));
    assert!(rotated.exposed_at.is_none() && rotated.rotated_at.is_some());
    let state = gw
        .get_puk_status(status_request("puk-aes", &card))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(state, rotated);
    // The card's PUK now is what was "next" before.
    let after = gw
        .release_piv_puk(online("puk-aes", &card, "session-4", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.puk, first.next_puk);
    assert!(!after.exposed);
    released.push(after.next_puk.clone());

    // A caller without release_puk, on each PUK RPC.
    let reports_id = h.pki.id(REPORTS).to_string();
    let err = h
        .reports
        .release_piv_puk(offline("puk-aes", &card, 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(&reports_id) && err.message().contains("release_puk"),
        "{}",
        err.message()
    );
    let err = h
        .reports
        .confirm_puk_rotation(confirm("puk-aes", &card, 3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = h
        .reports
        .get_puk_status(status_request("puk-aes", &card))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Bad requests: the field is named.
    let bad = [
        (
            ReleasePivPukRequest {
                puk_length: 5,
                ..offline("puk-aes", b"card-x", 1)
            },
            "puk_length",
        ),
        (
            ReleasePivPukRequest {
                puk_length: 9,
                ..offline("puk-aes", b"card-x", 1)
            },
            "puk_length",
        ),
        (
            ReleasePivPukRequest {
                purpose: PukPurpose::Unspecified as i32,
                ..offline("puk-aes", b"card-x", 1)
            },
            "purpose",
        ),
        (online("puk-aes", b"card-x", "", 1), "session_id"),
        (offline("puk-aes", b"", 1), "card_id"),
    ];
    for (request, field) in bad {
        let err = gw.release_piv_puk(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(detail(&err), (ErrorReason::InvalidArgument, field.into()));
    }
    // Unknown key version or reference.
    let err = gw
        .release_piv_puk(ReleasePivPukRequest {
            master_key_version: 9,
            ..offline("puk-aes", b"card-x", 1)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("puk-aes version 9"),
        "{}",
        err.message()
    );
    let err = gw
        .release_piv_puk(offline("no-such-key", b"card-x", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // A retired master key version (after a rotation: the current version is not retired).
    gw.rotate_master_key(RotateMasterKeyRequest {
        reference: "puk-aes".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    gw.retire_master_key_version(RetireMasterKeyVersionRequest {
        reference: "puk-aes".into(),
        version: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = gw
        .release_piv_puk(offline("puk-aes", b"card-x", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("retired"), "{}", err.message());
    // Sealed.
    gw.seal(SealRequest::default()).await.unwrap();
    let err = gw
        .release_piv_puk(online("puk-aes", &card, "session-5", 2))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), detail(&err).0),
        (Code::FailedPrecondition, ErrorReason::CustodySealed)
    );

    // The audit: every release, rotation and refusal, and no PUK in any form.
    let records = audit(gw).await;
    assert_eq!(
        count(&records, AuditEvent::PukRelease, AuditOutcome::Success),
        5,
        "online x4, offline x1"
    );
    assert_eq!(
        count(&records, AuditEvent::PukRotation, AuditOutcome::Success),
        1
    );
    // Session reuse, wrong version, 2 wrong rotations, 2 by REPORTS (status reads are not
    // audited), 5 bad requests, 2 unknown keys, retired, sealed.
    let refused = count(&records, AuditEvent::PukRelease, AuditOutcome::Refused)
        + count(&records, AuditEvent::PukRotation, AuditOutcome::Refused);
    assert_eq!(refused, 15, "{records:#?}");
    assert!(
        records
            .iter()
            .any(|r| r.outcome == AuditOutcome::Refused as i32
                && r.caller_identity == reports_id
                && r.reason.contains("release_puk"))
    );
    let release = records
        .iter()
        .find(|r| r.sequence == first.audit_sequence)
        .unwrap();
    assert_eq!(release.event, AuditEvent::PukRelease as i32);
    assert_eq!(release.context.as_ref().unwrap().card_id, card);
    assert_eq!(release.context.as_ref().unwrap().request_id, "req-puk");
    assert_eq!(
        (
            release.master_key_reference.as_str(),
            release.master_key_version
        ),
        ("puk-aes", 1)
    );
    let found: Vec<String> = records.iter().flat_map(|r| leaks(r, &released)).collect();
    assert!(found.is_empty(), "PUKs in the audit: {found:?}");
    let verified = gw
        .verify_audit(VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{}", verified.reason);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn life_of_a_puk_on_the_soft_backend() {
    let _ = hsm();
    life_of_a_puk(Keystore::Soft).await;
}

#[tokio::test]
async fn life_of_a_puk_on_the_pkcs11_backend() {
    let _ = hsm();
    life_of_a_puk(Keystore::Pkcs11("puk-flow")).await;
}

#[tokio::test]
async fn both_backends_give_the_formulas_puks() {
    let _ = hsm();
    let mut soft = custody(Keystore::Soft, 5).await;
    let mut hsm_custody = custody(Keystore::Pkcs11("puk-same"), 5).await;
    let aes256 = hex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F");
    let tdes3 = hex("404142434445464748494A4B4C4D4E4F5051525354555657");
    let keys = [
        ("puk-aes", KeyAlgorithm::Aes128, hex(MASTER)),
        ("puk-aes256", KeyAlgorithm::Aes256, aes256),
        ("puk-3des", KeyAlgorithm::Tdes2Key, hex(MASTER)),
        ("puk-3des3", KeyAlgorithm::Tdes3Key, tdes3),
    ];
    for (reference, alg, key) in &keys {
        assert_eq!(import(&mut soft.gateway, reference, *alg, key).await, 1);
        assert_eq!(
            import(&mut hsm_custody.gateway, reference, *alg, key).await,
            1
        );
    }
    // Cards of 1, 16 and 64 bytes; a fresh card per release (a card has one PUK version).
    let mut compared = 0;
    for (reference, alg, key) in &keys {
        for (i, (puk_version, digits)) in [(1, 8), (2, 6), (7, 7), (300, 8)].into_iter().enumerate()
        {
            let cards = [
                vec![u8::try_from(i).unwrap()],
                format!("card-{reference}-{i:09}").into_bytes(),
                vec![0xC0 | u8::try_from(i).unwrap(); 64],
            ];
            for card in cards {
                let mut request = online(reference, &card, &format!("s-{compared}"), puk_version);
                request.puk_length = digits;
                let a = soft
                    .gateway
                    .release_piv_puk(request.clone())
                    .await
                    .unwrap()
                    .into_inner();
                let b = hsm_custody
                    .gateway
                    .release_piv_puk(request)
                    .await
                    .unwrap()
                    .into_inner();
                let want = formula(*alg, key, &card, puk_version, digits as usize);
                let next = formula(*alg, key, &card, puk_version + 1, digits as usize);
                assert_eq!(text(&a.puk), want, "soft {reference} v{puk_version}");
                assert_eq!(text(&b.puk), want, "pkcs11 {reference} v{puk_version}");
                assert_eq!(text(&a.next_puk), next);
                assert_eq!(text(&b.next_puk), next);
                assert_eq!(a.puk_checksum, b.puk_checksum);
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 48);
    // And the formula's known answers, on both.
    let card = hex(CARD);
    for (reference, want) in [("puk-aes", "69910623"), ("puk-3des", "24326921")] {
        for client in [&mut soft.gateway, &mut hsm_custody.gateway] {
            let answer = client
                .release_piv_puk(offline(reference, &card, 1))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(text(&answer.puk), want, "{reference}");
        }
    }
    soft.server.stop().await.unwrap();
    hsm_custody.server.stop().await.unwrap();
}

#[tokio::test]
async fn releases_count_against_the_card_limit_with_cryptograms() {
    let _ = hsm();
    let mut h = custody(Keystore::Soft, 2).await;
    let gw = &mut h.gateway;
    import(gw, "mk", KeyAlgorithm::Aes128, &hex(MASTER)).await;
    let card = b"card-limited";
    gw.compute_cryptogram(ComputeCryptogramRequest {
        card_id: card.to_vec(),
        challenge: vec![7; 16],
        master_key_reference: "mk".into(),
        master_key_version: 1,
        scheme: DiversificationScheme::Sp800108Cmac as i32,
        admin_key_algorithm: Alg::Aes128 as i32,
        auth: auth(),
        challenge_code: None,
    })
    .await
    .unwrap();
    let released = gw
        .release_piv_puk(offline("mk", card, 1))
        .await
        .unwrap()
        .into_inner();
    let err = gw
        .release_piv_puk(online("mk", card, "session-1", 1))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), detail(&err).0),
        (Code::ResourceExhausted, ErrorReason::CardLimitReached),
        "{err:?}"
    );
    // The card's one release stands.
    let status = gw
        .get_puk_status(status_request("mk", card))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert!(status.exposed);
    // Another card is not affected; and the refused release did not take its session.
    gw.release_piv_puk(online("mk", b"card-other", "session-1", 1))
        .await
        .unwrap();
    let records = audit(gw).await;
    assert!(
        records
            .iter()
            .any(|r| r.event == AuditEvent::PukRelease as i32
                && r.outcome == AuditOutcome::Refused as i32
                && r.reason.contains("per-card limit"))
    );
    assert!(
        records
            .iter()
            .flat_map(|r| leaks(r, std::slice::from_ref(&released.puk)))
            .next()
            .is_none()
    );
    h.server.stop().await.unwrap();
}

/// Twenty releases race on one session of one card: one PUK leaves, the audit holds one
/// success and nineteen refusals, and the refusals took nothing of the card's budget.
#[tokio::test]
async fn racing_releases_on_one_session_leave_one_success_and_the_budget() {
    let _ = hsm();
    let mut h = custody(Keystore::Soft, 3).await;
    import(&mut h.gateway, "mk", KeyAlgorithm::Aes128, &hex(MASTER)).await;
    let card = b"card-race".as_slice();
    let mut racers = Vec::new();
    for _ in 0..20 {
        let mut gw = h.gateway.clone();
        racers.push(tokio::spawn(async move {
            gw.release_piv_puk(online("mk", card, "session-race", 1))
                .await
        }));
    }
    let mut released = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(_) => released += 1,
            Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{e:?}"),
        }
    }
    assert_eq!(released, 1);
    let records = audit(&mut h.gateway).await;
    assert_eq!(
        (
            count(&records, AuditEvent::PukRelease, AuditOutcome::Success),
            count(&records, AuditEvent::PukRelease, AuditOutcome::Refused)
        ),
        (1, 19),
        "only what happened"
    );
    // The budget of 3 had one use: two more releases pass, the third is over the limit.
    for _ in 0..2 {
        h.gateway
            .release_piv_puk(offline("mk", card, 1))
            .await
            .unwrap();
    }
    let err = h
        .gateway
        .release_piv_puk(offline("mk", card, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    h.server.stop().await.unwrap();
}

/// A version released online and not confirmed rotated within the session's lifetime is
/// exposed; so is a version handed to a second session.
#[tokio::test]
async fn an_online_release_not_rotated_in_time_exposes_the_version() {
    let _ = hsm();
    let mut h = custody_with(Keystore::Soft, |c| {
        c.guards.per_card_limit = 100;
        c.guards.puk_session_secs = 1;
    })
    .await;
    let gw = &mut h.gateway;
    import(gw, "mk", KeyAlgorithm::Aes128, &hex(MASTER)).await;
    let status = async |gw: &mut Client, card: &[u8]| {
        gw.get_puk_status(status_request("mk", card))
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
    };
    // Card 1: released in a session that ends without a rotation.
    let first = gw
        .release_piv_puk(online("mk", b"card-1", "session-1", 1))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.exposed);
    assert!(
        !status(gw, b"card-1").await.exposed,
        "the session may still rotate"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let lapsed = status(gw, b"card-1").await;
    assert!(lapsed.exposed && lapsed.exposed_at.is_some(), "{lapsed:?}");
    let second = gw
        .release_piv_puk(online("mk", b"card-1", "session-2", 1))
        .await
        .unwrap()
        .into_inner();
    assert!(
        second.exposed,
        "version 1 went to session-1 and was never rotated"
    );
    // The rotation clears it.
    let rotated = gw
        .confirm_puk_rotation(confirm("mk", b"card-1", 2))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert!(!rotated.exposed);

    // Card 2: a second session within the first one's lifetime gets an exposed version.
    gw.release_piv_puk(online("mk", b"card-2", "session-3", 1))
        .await
        .unwrap();
    let again = gw
        .release_piv_puk(online("mk", b"card-2", "session-4", 1))
        .await
        .unwrap()
        .into_inner();
    assert!(again.exposed);
    assert!(status(gw, b"card-2").await.exposed);
    h.server.stop().await.unwrap();
}

/// Versions leave room for the next; session ids are checked in bytes, without NUL, and an
/// online release records a fingerprint of its session id.
#[tokio::test]
async fn versions_and_session_ids_are_bounded_and_sessions_are_on_the_record() {
    let _ = hsm();
    let mut h = custody(Keystore::Soft, 100).await;
    let gw = &mut h.gateway;
    import(gw, "mk", KeyAlgorithm::Aes128, &hex(MASTER)).await;
    let err = gw
        .release_piv_puk(offline("mk", b"card-max", u32::MAX))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), detail(&err).1.as_str()),
        (Code::InvalidArgument, "puk_version"),
        "the last version could never be rotated away"
    );
    gw.release_piv_puk(offline("mk", b"card-max", u32::MAX - 1))
        .await
        .unwrap();
    let err = gw
        .confirm_puk_rotation(confirm("mk", b"card-max", u32::MAX))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let err = gw
        .release_piv_puk(online("mk", b"card-s", "session\0-1", 1))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), detail(&err).1.as_str()),
        (Code::InvalidArgument, "session_id")
    );
    let wide = "é".repeat(70); // 70 characters, 140 bytes
    let err = gw
        .release_piv_puk(online("mk", b"card-s", &wide, 1))
        .await
        .unwrap_err();
    assert!(err.message().contains("bytes"), "{}", err.message());

    let session = "session-on-record";
    let released = gw
        .release_piv_puk(online("mk", b"card-s", session, 1))
        .await
        .unwrap()
        .into_inner();
    let records = audit(gw).await;
    let record = records
        .iter()
        .find(|r| r.sequence == released.audit_sequence)
        .unwrap();
    let fingerprint = cms_custody::audit::events::id_fingerprint(session.as_bytes());
    assert_eq!(
        record.attributes.get("session_sha256"),
        Some(&fingerprint),
        "{record:?}"
    );
    assert_eq!(
        record
            .attributes
            .get("next_puk_version")
            .map(String::as_str),
        Some("2")
    );
    assert!(
        records.iter().all(|r| !format!("{r:?}").contains(session)),
        "the session id itself is not in the audit"
    );
    h.server.stop().await.unwrap();
}

#[test]
fn the_leak_check_finds_every_encoding() {
    let _ = hsm();
    // Guards the audit checks above: a PUK planted in any form in any field is found.
    let puk = b"69910623".to_vec();
    let planted = |set: &dyn Fn(&mut AuditRecord)| {
        let mut record = AuditRecord {
            sequence: 1,
            reason: "online session: puk version 1, next version 2".into(),
            ..Default::default()
        };
        set(&mut record);
        !leaks(&record, std::slice::from_ref(&puk)).is_empty()
    };
    assert!(!planted(&|_| {}));
    for form in encodings(&puk) {
        assert!(planted(&|r| r.reason = format!("x {form} y")), "{form}");
    }
    let sum = checksum(&puk);
    assert!(planted(&|r| r.reason = format!("checksum {sum}")));
    assert!(planted(&|r| {
        r.context = Some(AuthContext {
            approval_id: sum.clone(),
            ..Default::default()
        })
    }));
    assert_eq!(
        base64(
            b"69910623",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        ),
        "Njk5MTA2MjM="
    );
    assert!(planted(&|r| {
        r.context = Some(AuthContext {
            request_id: "3639393130363233".into(),
            ..Default::default()
        })
    }));
    assert!(planted(&|r| {
        r.context = Some(AuthContext {
            card_id: puk.clone(),
            ..Default::default()
        })
    }));
    assert!(planted(&|r| {
        r.attributes.insert("puk".into(), "Njk5MTA2MjM".into());
    }));
}
