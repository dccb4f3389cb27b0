//! What the demo sets up, all through the gateway's AdminService as the dev operator, the way
//! an administrator would with cmsctl: a master key brought in by a key ceremony, a card
//! template that allows the offline unblock, a user, the user's card, the helpdesk operators,
//! and the System Owner token.
//!
//! The master key is imported (not generated inside custody) because the demo also plays the
//! card personalisation bureau: it writes the per-card admin key into the virtual card, which
//! needs the master key once. The components are forgotten afterwards.

use std::time::Duration;

use cms_cardcrypto::{KeyAlgorithm, Scheme, SecretKey};
use cms_kit::client::Channel;
use cms_proto::common::v1::{
    CardProfile, DiversificationScheme, KeyAlgorithm as ProtoAlgorithm, TypedCode,
};
use cms_proto::directory::v1::{Credential, Operator, OperatorScope, User};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;
use cms_proto::template::v1::{
    AdminKeyConfig, AuthMethod, AuthMethodGroup, AuthRequirement, CharacterClass, Combinator,
    OneTimeCodeSettings, OperatorPolicy, PinPolicy, TemplateSpec, UnblockPolicy, UserAuthPolicy,
};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::DemoError;

/// Reference of the demo's master key in custody.
pub const MASTER_KEY: &str = "demo-mk";
/// The demo user's username.
pub const USERNAME: &str = "demo.user";
/// The demo card's serial number.
pub const CARD_SERIAL: &str = "DEMO-0001";
/// Label of the demo's System Owner token.
pub const SO_LABEL: &str = "demo-so-token";

type Admin = AdminServiceClient<Channel>;

/// A request with a deadline, as every call of the demo has.
fn call<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(30));
    request
}

fn rpc(step: &'static str) -> impl FnOnce(tonic::Status) -> DemoError {
    move |status| DemoError::Rpc {
        step,
        code: status.code(),
        message: status.message().to_owned(),
    }
}

/// `len` random bytes.
pub fn random(len: usize) -> Result<Zeroizing<Vec<u8>>, DemoError> {
    let mut bytes = Zeroizing::new(vec![0u8; len]);
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| DemoError::Failed("the system random generator failed".into()))?;
    Ok(bytes)
}

fn kcv(key: &[u8]) -> Result<String, DemoError> {
    let key = SecretKey::new(KeyAlgorithm::Aes128, key)
        .map_err(|e| DemoError::Failed(format!("master key: {e}")))?;
    Ok(data_encoding::HEXUPPER.encode(&key.kcv()))
}

/// Imports `master` (AES-128) under `reference` in a two-component key ceremony; returns the
/// version custody gave it.
pub async fn import_master_key(
    admin: &mut Admin,
    reference: &str,
    master: &SecretKey,
) -> Result<u32, DemoError> {
    let first = random(16)?;
    let second: Zeroizing<Vec<u8>> = Zeroizing::new(
        master
            .expose_bytes()
            .iter()
            .zip(first.iter())
            .map(|(k, c)| k ^ c)
            .collect(),
    );
    let begun = admin
        .begin_key_import(call(gw::BeginKeyImportRequest {
            reference: reference.to_owned(),
            algorithm: ProtoAlgorithm::Aes128 as i32,
            component_count: 2,
            description: "cms demo: imported for the virtual card's personalisation".into(),
            make_current: true,
        }))
        .await
        .map_err(rpc("beginning the key import"))?
        .into_inner();
    for component in [&first, &second] {
        admin
            .add_key_component(call(gw::AddKeyComponentRequest {
                import_id: begun.import_id.clone(),
                component: component.to_vec(),
                expected_kcv: kcv(component)?,
                custodian_label: "cms demo".into(),
            }))
            .await
            .map_err(rpc("giving a key component"))?;
    }
    let done = admin
        .finish_key_import(call(gw::FinishKeyImportRequest {
            import_id: begun.import_id,
            expected_kcv: kcv(master.expose_bytes())?,
        }))
        .await
        .map_err(rpc("finishing the key import"))?
        .into_inner();
    Ok(done.key.map(|k| k.version).unwrap_or(begun.version))
}

fn seconds(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

/// The demo's card template: minidriver cards with AES-128 admin keys diversified by
/// SP 800-108 CMAC, unblocked online or offline through the helpdesk, no dual control;
/// self-service with a one-time code the helpdesk issues.
pub fn template_spec(master_key_reference: &str) -> TemplateSpec {
    TemplateSpec {
        name: "Demo minidriver card".into(),
        description: "cms demo: offline unblock through the helpdesk".into(),
        card_profile: CardProfile::Minidriver as i32,
        admin_key: Some(AdminKeyConfig {
            algorithm: ProtoAlgorithm::Aes128 as i32,
            diversification_scheme: DiversificationScheme::Sp800108Cmac as i32,
            master_key_reference: master_key_reference.to_owned(),
            master_key_version: 0,
        }),
        unblock_policy: Some(UnblockPolicy {
            self_service_enabled: true,
            self_service_session_ttl: seconds(600),
            online_unblock_allowed: true,
            offline_challenge_response_allowed: true,
            user_may_choose: true,
            user_auth: Some(UserAuthPolicy {
                requirement: Some(AuthRequirement {
                    combinator: Combinator::AllOf as i32,
                    groups: vec![AuthMethodGroup {
                        combinator: Combinator::AnyOf as i32,
                        methods: vec![AuthMethod::HelpdeskOneTimeCode as i32],
                    }],
                }),
                one_time_code: Some(OneTimeCodeSettings {
                    validity: seconds(900),
                    length: 8,
                }),
                max_failed_attempts: 5,
                lockout: seconds(900),
                ..Default::default()
            }),
            operator_policy: Some(OperatorPolicy {
                unblock_roles: vec!["helpdesk".into()],
                one_time_code_roles: vec!["helpdesk".into()],
                approver_roles: vec!["approver".into()],
                dual_control: false,
                ..Default::default()
            }),
            ..Default::default()
        }),
        pin_policy: Some(PinPolicy {
            min_length: 6,
            max_length: 16,
            allowed_classes: vec![
                CharacterClass::Digit as i32,
                CharacterClass::Lower as i32,
                CharacterClass::Upper as i32,
            ],
            forbid_trivial: true,
            pin_tries: 3,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates a template from `spec`; returns its id and version.
pub async fn create_template(
    admin: &mut Admin,
    spec: TemplateSpec,
) -> Result<(String, u32), DemoError> {
    let template = admin
        .create_template(call(gw::CreateTemplateRequest {
            spec: Some(spec),
            change_comment: "cms demo".into(),
        }))
        .await
        .map_err(rpc("creating the card template"))?
        .into_inner()
        .template
        .unwrap_or_default();
    Ok((template.id, template.version))
}

/// Creates the user; returns it.
pub async fn create_user(admin: &mut Admin, username: &str) -> Result<User, DemoError> {
    Ok(admin
        .create_user(call(gw::CreateUserRequest {
            user: Some(User {
                username: username.to_owned(),
                display_name: "Dana Demo".into(),
                email: "dana.demo@example.org".into(),
                phone: "+1 555 0100".into(),
                org_unit: "Demo".into(),
                ..Default::default()
            }),
        }))
        .await
        .map_err(rpc("creating the demo user"))?
        .into_inner()
        .user
        .unwrap_or_default())
}

/// What the directory must know of a card to register it.
#[derive(Clone, Debug)]
pub struct CardRecord {
    pub user_id: String,
    pub profile: CardProfile,
    pub card_id: Vec<u8>,
    pub serial: String,
    pub template_id: String,
    pub template_version: u32,
    pub master_key_version: u32,
}

/// Registers an issued card; returns its credential.
pub async fn register_card(admin: &mut Admin, card: &CardRecord) -> Result<Credential, DemoError> {
    Ok(admin
        .register_credential(call(gw::RegisterCredentialRequest {
            credential: Some(Credential {
                user_id: card.user_id.clone(),
                card_id: card.card_id.clone(),
                serial: card.serial.clone(),
                profile: card.profile as i32,
                template_id: card.template_id.clone(),
                template_version: card.template_version,
                master_key_version: card.master_key_version,
                label: "demo card".into(),
                ..Default::default()
            }),
        }))
        .await
        .map_err(rpc("registering the demo card"))?
        .into_inner()
        .credential
        .unwrap_or_default())
}

/// Creates an operator account with `roles` (its certificate names it by `username`).
pub async fn create_operator(
    admin: &mut Admin,
    username: &str,
    roles: &[&str],
) -> Result<Operator, DemoError> {
    Ok(admin
        .create_operator(call(gw::CreateOperatorRequest {
            operator: Some(Operator {
                username: username.to_owned(),
                display_name: format!("{username} (cms demo)"),
                roles: roles.iter().map(|r| (*r).to_owned()).collect(),
                scope: Some(OperatorScope::default()),
                ..Default::default()
            }),
        }))
        .await
        .map_err(rpc("creating an operator account"))?
        .into_inner()
        .operator
        .unwrap_or_default())
}

/// The System Owner token's unblock key, shown once by custody, and its KCV.
pub struct SoToken {
    pub key: SecretKey,
    pub shown: TypedCode,
    pub kcv: String,
}

/// Initialises the installation's SO token (AES-128) for the card `card_id`.
pub async fn init_so_token(admin: &mut Admin, card_id: &[u8]) -> Result<SoToken, DemoError> {
    let r = admin
        .init_so_token(call(gw::InitSoTokenRequest {
            label: SO_LABEL.into(),
            algorithm: ProtoAlgorithm::Aes128 as i32,
            share_count: 0,
            share_threshold: 0,
            card_id: card_id.to_vec(),
        }))
        .await
        .map_err(rpc("initialising the System Owner token"))?
        .into_inner();
    let shown = r
        .so_unblock_key
        .ok_or_else(|| DemoError::Failed("custody returned no SO unblock key".into()))?;
    let bytes = cms_cardcrypto::parse_with_checksum(&shown.hex, &shown.checksum, &[16])
        .map_err(|e| DemoError::Failed(format!("the SO unblock key custody returned: {e}")))?;
    let key = SecretKey::new(KeyAlgorithm::Aes128, &bytes)
        .map_err(|e| DemoError::Failed(format!("the SO unblock key: {e}")))?;
    Ok(SoToken {
        key,
        shown,
        kcv: r.kcv,
    })
}

/// The per-card admin key custody derives for a card of the demo template.
pub fn admin_key(
    master: &SecretKey,
    card_id: &[u8],
    master_key_version: u32,
) -> Result<SecretKey, DemoError> {
    cms_cardcrypto::diversify(
        Scheme::Sp800108Cmac,
        master,
        card_id,
        master_key_version,
        KeyAlgorithm::Aes128.key_len(),
    )
    .map_err(|e| DemoError::Failed(format!("diversifying the card's admin key: {e}")))
}
