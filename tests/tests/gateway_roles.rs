//! AdminService admits an operator only with an active directory account holding a role the
//! call needs; cmsctl says why in one line. All real processes over mTLS (`cms serve …`).

use std::process::Output;
use std::time::Duration;

use cms_kit::pki::LeafSpec;
use cms_kit::tls::TlsSettings;
use cms_proto::common::v1::KeyAlgorithm;
use cms_proto::directory::v1::{
    CreateOperatorRequest, Operator, OperatorStatus, UpdateOperatorRequest,
};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;
use cms_tests::cluster::Cluster;
use tonic::Code;

/// Operator accounts are re-read after 200 ms, so a change shows within the test.
async fn cluster() -> Cluster {
    Cluster::start(|name| {
        if name == "gateway" {
            "[operators]\ncache_ttl_ms = 200\n".into()
        } else {
            String::new()
        }
    })
    .await
}

/// A certificate for `spiffe://cms.test/cms/operator/<name>` from the cluster's CA.
fn operator_cert(cluster: &Cluster, name: &str) -> TlsSettings {
    let id = cluster.pki.id(&format!("operator/{name}"));
    cluster
        .pki
        .issue(&format!("operator-{name}"), &LeafSpec::new(id, 30))
}

/// Creates an operator account in the directory (as the gateway does its calls).
async fn create_account(cluster: &Cluster, name: &str, roles: &[&str]) -> Operator {
    let mut directory =
        cms_launcher::bootstrap::directory_client(&cluster.layout, cluster.grpc("directory"))
            .expect("directory client");
    directory
        .create_operator(CreateOperatorRequest {
            operator: Some(Operator {
                username: name.into(),
                roles: roles.iter().map(|r| (*r).to_owned()).collect(),
                ..Default::default()
            }),
            auth: None,
        })
        .await
        .expect("create operator")
        .into_inner()
        .operator
        .expect("operator")
}

async fn disable_account(cluster: &Cluster, operator: &Operator) {
    let mut directory =
        cms_launcher::bootstrap::directory_client(&cluster.layout, cluster.grpc("directory"))
            .expect("directory client");
    directory
        .update_operator(UpdateOperatorRequest {
            operator: Some(Operator {
                id: operator.id.clone(),
                status: OperatorStatus::Disabled as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["status".into()],
            }),
            auth: None,
        })
        .await
        .expect("disable operator");
}

fn admin_client(
    cluster: &Cluster,
    tls: TlsSettings,
) -> AdminServiceClient<cms_kit::client::Channel> {
    AdminServiceClient::new(cms_tests::inproc::channel(
        tls,
        cluster.grpc("gateway"),
        cluster.pki.id("gateway"),
    ))
}

/// Key generation and an audit query, each as `tls`: their status codes (Ok or the error)
/// and the messages.
async fn generate_and_query(
    cluster: &Cluster,
    tls: TlsSettings,
    reference: &str,
) -> [(Code, String); 2] {
    let mut client = admin_client(cluster, tls);
    let generated = client
        .generate_master_key(gw::GenerateMasterKeyRequest {
            reference: reference.into(),
            algorithm: KeyAlgorithm::Aes128 as i32,
            description: String::new(),
        })
        .await;
    let queried = client.query_audit(gw::QueryAuditRequest::default()).await;
    let outcome = |r: Result<(), tonic::Status>| match r {
        Ok(()) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    };
    [outcome(generated.map(|_| ())), outcome(queried.map(|_| ()))]
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn cmsctl_as(cluster: &Cluster, tls: &TlsSettings, args: &[&str]) -> Output {
    let cert = tls.cert.display().to_string();
    let key = tls.key.display().to_string();
    let mut all = vec!["--cert", &cert, "--key", &key];
    all.extend_from_slice(args);
    tokio::task::block_in_place(|| cluster.cmsctl(&all))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_an_active_account_with_the_role() {
    let cluster = cluster().await;
    let unregistered = operator_cert(&cluster, "helpdesk1");
    let disabled = operator_cert(&cluster, "former");
    let helpdesk = operator_cert(&cluster, "helpdesk2");
    let custodian = operator_cert(&cluster, "custodian1");
    let auditor = operator_cert(&cluster, "auditor1");
    let former = create_account(&cluster, "former", &["admin"]).await;
    disable_account(&cluster, &former).await;
    create_account(&cluster, "helpdesk2", &["helpdesk", "approver"]).await;
    create_account(&cluster, "custodian1", &["key-custodian"]).await;
    create_account(&cluster, "auditor1", &["auditor"]).await;

    for (tls, reason) in [
        (unregistered, "has no operator account"),
        (disabled, "is disabled"),
        (helpdesk.clone(), "needs the key-custodian or admin role"),
    ] {
        let [generated, queried] = generate_and_query(&cluster, tls, "denied").await;
        assert_eq!(generated.0, Code::PermissionDenied, "{generated:?}");
        assert!(generated.1.contains(reason), "{generated:?}");
        assert_eq!(queried.0, Code::PermissionDenied, "{queried:?}");
    }
    let [_, queried] = generate_and_query(&cluster, helpdesk.clone(), "denied").await;
    assert!(
        queried
            .1
            .contains("needs the admin or auditor role (it has: helpdesk, approver)"),
        "{queried:?}"
    );

    // Nothing was generated by the refused calls.
    let mut admin = admin_client(&cluster, cluster.pki.tls("operator/admin"));
    let keys = admin
        .list_master_keys(gw::ListMasterKeysRequest::default())
        .await
        .expect("list keys as admin")
        .into_inner()
        .keys;
    assert!(keys.iter().all(|k| k.reference != "denied"), "{keys:?}");

    // The dev admin (its account made by the harness, as `cms up` makes it) may do both.
    let [generated, queried] =
        generate_and_query(&cluster, cluster.pki.tls("operator/admin"), "by-admin").await;
    assert_eq!(
        (generated.0, queried.0),
        (Code::Ok, Code::Ok),
        "{generated:?} {queried:?}"
    );

    // A key custodian administers keys but does not read the audit; an auditor the reverse.
    let [generated, queried] = generate_and_query(&cluster, custodian, "by-custodian").await;
    assert_eq!(
        (generated.0, queried.0),
        (Code::Ok, Code::PermissionDenied),
        "{generated:?} {queried:?}"
    );
    let [generated, queried] = generate_and_query(&cluster, auditor, "by-auditor").await;
    assert_eq!(
        (generated.0, queried.0),
        (Code::PermissionDenied, Code::Ok),
        "{generated:?} {queried:?}"
    );

    // Status needs an account, but no particular role.
    let mut client = admin_client(&cluster, helpdesk.clone());
    client
        .get_system_status(gw::GetSystemStatusRequest {})
        .await
        .expect("status as helpdesk");

    // cmsctl: one line naming the reason, non-zero exit, no debug dump of the status.
    let out = cmsctl_as(
        &cluster,
        &helpdesk,
        &[
            "keys",
            "generate",
            "--reference",
            "x",
            "--algorithm",
            "aes-128",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 3: refused (cmsctl --help lists the exit codes).
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("cmsctl: error: gateway at ")
            && stderr.contains(
                ": permission denied: operator \"helpdesk2\" may not administer key custody"
            ),
        "{stderr}"
    );
    for dump in ["MetadataMap", "details:", "metadata:", "Status {", "code:"] {
        assert!(!stderr.contains(dump), "{dump} in {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_disabled_in_the_directory_is_refused_after_the_cache_time() {
    let mut cluster = cluster().await;
    let tls = operator_cert(&cluster, "custodian2");
    let account = create_account(&cluster, "custodian2", &["key-custodian"]).await;
    let [generated, _] = generate_and_query(&cluster, tls.clone(), "before").await;
    assert_eq!(generated.0, Code::Ok, "{generated:?}");

    disable_account(&cluster, &account).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let [generated, _] = generate_and_query(&cluster, tls, "after").await;
    assert_eq!(generated.0, Code::PermissionDenied, "{generated:?}");
    assert!(generated.1.contains("is disabled"), "{generated:?}");

    // Directory down: administration fails closed; status still answers from the last accounts.
    cluster
        .service("directory")
        .stop(Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admin = cluster.pki.tls("operator/admin");
    let [generated, queried] = generate_and_query(&cluster, admin.clone(), "directory-down").await;
    for outcome in [&generated, &queried] {
        assert_eq!(outcome.0, Code::Unavailable, "{outcome:?}");
        assert!(
            outcome
                .1
                .contains("cannot check the caller's operator account"),
            "{outcome:?}"
        );
    }
    admin_client(&cluster, admin)
        .get_system_status(gw::GetSystemStatusRequest {})
        .await
        .expect("status with the directory down");
}

/// `cms operator add`: the first accounts of an installation, made with the gateway's
/// certificate directly in the directory.
fn cms_operator_add(cluster: &Cluster, args: &[&str]) -> Output {
    std::process::Command::new(cms_tests::binary("cms"))
        .args(["operator", "add", "--data-dir"])
        .arg(cluster.dir.path())
        .args(args)
        .output()
        .expect("cms operator add")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cms_operator_add_creates_an_account_the_gateway_then_admits() {
    let cluster = cluster().await;
    let auditor = operator_cert(&cluster, "auditor2");
    let out = cmsctl_as(&cluster, &auditor, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));

    let out = tokio::task::block_in_place(|| {
        cms_operator_add(&cluster, &["auditor2", "--role", "superuser"])
    });
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--role \"superuser\": use one of"),
        "{}",
        text(&out)
    );

    let out = tokio::task::block_in_place(|| {
        cms_operator_add(&cluster, &["auditor2", "--role", "auditor"])
    });
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("created the operator account \"auditor2\" with roles [auditor]"),
        "{}",
        text(&out)
    );
    let out = tokio::task::block_in_place(|| {
        cms_operator_add(&cluster, &["auditor2", "--role", "admin"])
    });
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("exists (active, roles [auditor]); left as it is"),
        "{}",
        text(&out)
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = cmsctl_as(&cluster, &auditor, &["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cmsctl_as(
        &cluster,
        &auditor,
        &[
            "keys",
            "generate",
            "--reference",
            "x",
            "--algorithm",
            "aes-128",
        ],
    );
    assert!(text(&out).contains("permission denied"), "{}", text(&out));
}
