//! The scene the console tests share: the whole system as real processes, the gp-emv vector's
//! master key in custody, a template with offline unblock (under dual control, or not), the
//! user Alice with the vector's card, and two operators with their certificates in the dev PKI
//! (`helpdesk1`: helpdesk in Finance; `approver1`: approver and auditor).

// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

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

const VECTORS: &str = include_str!("../agent_common/diversification.json");
const MASTER_KEY: &str = "mk-console";

pub struct Desk {
    pub cluster: Cluster,
    /// The gp-emv entry of the shared vectors.
    pub vector: serde_json::Value,
    pub user: User,
    pub card: Credential,
}

impl Desk {
    pub async fn start(dual_control: bool) -> Self {
        let cluster = Cluster::start(|name| {
            if name == "gateway" {
                "[operators]\ncache_ttl_ms = 200\n".to_owned()
            } else {
                String::new()
            }
        })
        .await;
        let vectors: serde_json::Value = serde_json::from_str(VECTORS).expect("vectors");
        let vector = vectors
            .as_array()
            .expect("array")
            .iter()
            .find(|v| v["scheme"] == "gp-emv")
            .expect("a gp-emv vector")
            .clone();
        let s = |k: &str| vector[k].as_str().expect(k).to_owned();

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

        let mut admin = AdminServiceClient::new(cms_tests::inproc::channel(
            cluster.pki.tls("operator/admin"),
            cluster.grpc("gateway"),
            cluster.pki.id("gateway"),
        ));
        let mut spec = cms_template::sample::minidriver("Console offline");
        let key = spec.admin_key.as_mut().expect("admin key");
        key.master_key_reference = MASTER_KEY.into();
        key.algorithm = Alg::Tdes2key as i32;
        let policy = spec.unblock_policy.as_mut().expect("unblock policy");
        policy.rate_limits.clear();
        policy
            .operator_policy
            .as_mut()
            .expect("operator policy")
            .dual_control = dual_control;
        let template = admin
            .create_template(gw::CreateTemplateRequest {
                spec: Some(spec),
                change_comment: "console test".into(),
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
        let card = directory
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
            .expect("card")
            .into_inner()
            .credential
            .expect("card");
        let desk = Self {
            cluster,
            vector,
            user,
            card,
        };
        desk.operator("helpdesk1", &["helpdesk"], &["Finance"])
            .await;
        desk.operator("approver1", &["approver", "auditor"], &[])
            .await;
        // The gateway re-reads operator accounts after 200 ms here.
        tokio::time::sleep(Duration::from_millis(400)).await;
        desk
    }

    /// A vector field (`challenge`, `response_checksum`, …).
    pub fn code(&self, field: &str) -> String {
        self.vector[field].as_str().expect(field).to_owned()
    }

    /// An operator account and its certificate, `pki/operator-<name>.pem`.
    async fn operator(&self, name: &str, roles: &[&str], org_units: &[&str]) {
        let cluster = &self.cluster;
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
        cluster.pki.issue(
            &format!("operator-{name}"),
            &LeafSpec::new(cluster.pki.id(&format!("operator/{name}")), 30),
        );
    }
}

/// Upper-case hex in groups of 4, as people read codes.
pub fn groups(flat: &str) -> String {
    flat.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect::<Vec<_>>()
        .join(" ")
}
