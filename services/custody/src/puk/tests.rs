//! The PUK RPCs on a real Custody (soft keystore, in-memory SQLite), without the network.

use std::sync::Arc;

use cms_kit::{PeerIdentity, SpiffeId};
use cms_proto::custody::v1 as pb;
use cms_proto::custody::v1::PukPurpose;
use cms_proto::custody::v1::custody_service_server::CustodyService;
use tonic::Request;

use crate::config::{CallerScope, GuardSettings};
use crate::custody::{Custody, Options};
use crate::replica::Replica;

const GATEWAY: &str = "spiffe://cms.test/cms/gateway";
const OTHER: &str = "spiffe://cms.test/cms/service/reports";

fn online() -> pb::ReleasePivPukRequest {
    super::checks::tests::online()
}

/// Custody behind its API adapter, as a client sees it (less the network).
async fn custody(dir: &std::path::Path) -> Replica {
    let db = crate::store::test_database_in(dir).await;
    let scope = |identity: &str, release_puk| CallerScope {
        identity: identity.parse().unwrap(),
        key_references: vec!["*".into()],
        admin: release_puk,
        release_puk,
    };
    let custody = Custody::open(Options {
        db,
        keystore: Arc::new(crate::keystore::SoftKeystore),
        callers: vec![scope(GATEWAY, true), scope(OTHER, false)],
        guards: GuardSettings {
            per_card_limit: 100,
            ..GuardSettings::default()
        },
        dev_seal_file: Some(dir.join("seal.key")),
        audit_head_file: Some(dir.join("audit.head")),
        fence: None,
        unsealed: None,
        health: Default::default(),
    })
    .await
    .unwrap();
    let custody = Replica::active(custody);
    custody
        .generate_master_key(from(
            GATEWAY,
            pb::GenerateMasterKeyRequest {
                reference: "puk".into(),
                algorithm: cms_proto::common::v1::KeyAlgorithm::Aes128 as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    custody
}

fn from<T>(identity: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(PeerIdentity {
        spiffe_id: identity.parse::<SpiffeId>().unwrap(),
        remote_addr: None,
    });
    request
}

fn status_of(custody: &Replica, card: &[u8]) -> impl Future<Output = pb::PukStatus> {
    let request = from(
        GATEWAY,
        pb::GetPukStatusRequest {
            card_id: card.to_vec(),
            master_key_reference: "puk".into(),
        },
    );
    async move {
        custody
            .get_puk_status(request)
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
    }
}

#[tokio::test]
async fn one_release_per_session_even_when_racing() {
    let dir = tempfile::tempdir().unwrap();
    let custody = Arc::new(custody(dir.path()).await);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let custody = custody.clone();
        tasks.push(tokio::spawn(async move {
            custody
                .release_piv_puk(from(GATEWAY, online()))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut released = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(release) => released.push(release),
            Err(status) => assert_eq!(status.code(), tonic::Code::AlreadyExists),
        }
    }
    assert_eq!(released.len(), 1, "exactly one release in the session");
    let release = &released[0];
    assert_eq!((release.puk_version, release.next_puk_version), (3, 4));
    assert_ne!(release.puk, release.next_puk);
    // Custody now knows the card at the version the request named.
    let state = status_of(&custody, b"card-0001").await;
    assert_eq!((state.puk_version, state.exposed), (3, false));
}

#[tokio::test]
async fn exposure_rotation_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let custody = custody(dir.path()).await;
    let offline = || pb::ReleasePivPukRequest {
        purpose: PukPurpose::OfflineHelpdesk as i32,
        session_id: String::new(),
        ..online()
    };
    let err = custody
        .get_puk_status(from(
            GATEWAY,
            pb::GetPukStatusRequest {
                card_id: b"card-0001".to_vec(),
                master_key_reference: "puk".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let first = custody
        .release_piv_puk(from(GATEWAY, offline()))
        .await
        .unwrap()
        .into_inner();
    assert!(first.exposed && first.next_puk.is_empty());
    let exposed = status_of(&custody, b"card-0001").await;
    assert!(exposed.exposed);
    // A second read-out keeps the first exposure time and gives the same PUK.
    let again = custody
        .release_piv_puk(from(GATEWAY, offline()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.puk, first.puk);
    assert_eq!(status_of(&custody, b"card-0001").await, exposed);

    // Another version than custody's is refused, naming custody's.
    let stale = pb::ReleasePivPukRequest {
        puk_version: 2,
        ..offline()
    };
    let err = custody
        .release_piv_puk(from(GATEWAY, stale))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("version 3"), "{}", err.message());

    // Rotation: only to version + 1.
    let confirm = |version| {
        from(
            GATEWAY,
            pb::ConfirmPukRotationRequest {
                card_id: b"card-0001".to_vec(),
                new_puk_version: version,
                master_key_reference: "puk".into(),
                auth: online().auth,
            },
        )
    };
    // A confirmation that does not say who asks is refused before anything else.
    let mut anonymous = confirm(4);
    anonymous.get_mut().auth = None;
    let err = custody.confirm_puk_rotation(anonymous).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("auth.actor_kind"),
        "{}",
        err.message()
    );
    for wrong in [3, 5] {
        let err = custody
            .confirm_puk_rotation(confirm(wrong))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("version 3") && err.message().contains("version 4"),
            "{}",
            err.message()
        );
    }
    let rotated = custody
        .confirm_puk_rotation(confirm(4))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!((rotated.puk_version, rotated.exposed), (4, false));
    assert!(rotated.exposed_at.is_none() && rotated.rotated_at.is_some());

    // The online release at the new version hands out what was "next" before.
    let online_at_4 = pb::ReleasePivPukRequest {
        puk_version: 4,
        session_id: "s-2".into(),
        ..online()
    };
    let released = custody
        .release_piv_puk(from(GATEWAY, online_at_4))
        .await
        .unwrap()
        .into_inner();
    assert!(!released.exposed);
    assert_ne!(released.puk, first.puk);

    // A caller without release_puk is refused by name, on every PUK RPC.
    let err = custody
        .release_piv_puk(from(OTHER, offline()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains(OTHER), "{}", err.message());
    let err = custody
        .confirm_puk_rotation(from(OTHER, confirm(5).into_inner()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = custody
        .get_puk_status(from(
            OTHER,
            pb::GetPukStatusRequest {
                card_id: b"card-0001".to_vec(),
                master_key_reference: "puk".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}
