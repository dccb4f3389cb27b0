//! Valid template specs, for tests and examples.

use cms_proto::common::v1::{CardProfile, DiversificationScheme, KeyAlgorithm, TotpAlgorithm};
use cms_proto::template::v1::{
    AdminKeyConfig, AuthMethod, AuthMethodGroup, AuthRequirement, CharacterClass, Combinator,
    OneTimeCodeSettings, OperatorPolicy, PinPolicy, PukConfig, RateLimit, RateLimitScope,
    SecurityQuestionsSettings, TemplateSpec, TotpSettings, UnblockPolicy, UserAuthPolicy,
};

fn secs(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

/// A minidriver 3DES template with self-service (TOTP or a helpdesk code, plus 2 of 3
/// security questions) and offline helpdesk challenge/response.
pub fn minidriver(name: &str) -> TemplateSpec {
    TemplateSpec {
        name: name.to_owned(),
        description: "Employee minidriver card".into(),
        card_profile: CardProfile::Minidriver as i32,
        admin_key: Some(AdminKeyConfig {
            algorithm: KeyAlgorithm::Tdes3key as i32,
            diversification_scheme: DiversificationScheme::GpEmv as i32,
            master_key_reference: "mk-minidriver".into(),
            master_key_version: 0,
        }),
        puk: None,
        unblock_policy: Some(UnblockPolicy {
            self_service_enabled: true,
            online_unblock_allowed: true,
            offline_challenge_response_allowed: true,
            challenge_response_enforced: false,
            user_may_choose: true,
            user_auth: Some(UserAuthPolicy {
                requirement: Some(AuthRequirement {
                    combinator: Combinator::AllOf as i32,
                    groups: vec![
                        AuthMethodGroup {
                            combinator: Combinator::AnyOf as i32,
                            methods: vec![
                                AuthMethod::Totp as i32,
                                AuthMethod::HelpdeskOneTimeCode as i32,
                            ],
                        },
                        AuthMethodGroup {
                            combinator: Combinator::AllOf as i32,
                            methods: vec![AuthMethod::SecurityQuestions as i32],
                        },
                    ],
                }),
                security_questions: Some(SecurityQuestionsSettings {
                    asked: 3,
                    required_correct: 2,
                    min_enrolled: 5,
                    min_answer_length: 3,
                    suggested_questions: vec![
                        "First pet's name?".into(),
                        "Town where you were born?".into(),
                        "First school?".into(),
                    ],
                    allow_custom_questions: true,
                }),
                totp: Some(TotpSettings {
                    algorithm: TotpAlgorithm::Sha1 as i32,
                    digits: 6,
                    period_seconds: 30,
                    allowed_skew_steps: 1,
                    issuer: "CMS".into(),
                }),
                one_time_code: Some(OneTimeCodeSettings {
                    validity: secs(900),
                    length: 8,
                }),
                max_failed_attempts: 5,
                lockout: secs(900),
            }),
            operator_policy: Some(OperatorPolicy {
                unblock_roles: vec!["helpdesk".into()],
                puk_read_roles: vec![],
                one_time_code_roles: vec!["helpdesk".into()],
                dual_control: false,
                approver_roles: vec!["approver".into()],
                approval_ttl: secs(600),
            }),
            rate_limits: vec![RateLimit {
                scope: RateLimitScope::UnblocksPerCard as i32,
                max_count: 5,
                window: secs(86_400),
            }],
            cryptogram_by_email_allowed: false,
            offline_self_service_allowed: true,
            self_service_session_ttl: secs(600),
        }),
        pin_policy: Some(PinPolicy {
            min_length: 6,
            max_length: 16,
            allowed_classes: vec![
                CharacterClass::Digit as i32,
                CharacterClass::Lower as i32,
                CharacterClass::Upper as i32,
            ],
            required_classes: vec![CharacterClass::Digit as i32],
            forbid_trivial: true,
            max_repeated_characters: 3,
            max_sequence_length: 4,
            must_differ_from_previous: true,
            pin_tries: 5,
        }),
        labels: [("department".to_owned(), "it".to_owned())].into(),
    }
}

/// A PIV (YubiKey-style) AES template: operator-only, challenge/response enforced, dual control.
pub fn piv(name: &str) -> TemplateSpec {
    let mut spec = minidriver(name);
    spec.description = "Administrator PIV token".into();
    spec.card_profile = CardProfile::Piv as i32;
    spec.admin_key = Some(AdminKeyConfig {
        algorithm: KeyAlgorithm::Aes128 as i32,
        diversification_scheme: DiversificationScheme::Sp800108Cmac as i32,
        master_key_reference: "mk-piv".into(),
        master_key_version: 0,
    });
    spec.puk = Some(PukConfig {
        master_key_reference: "mk-piv-puk".into(),
        length: 8,
        rotate_after_online_use: true,
        rotate_after_offline_exposure: true,
    });
    spec.unblock_policy = Some(UnblockPolicy {
        self_service_enabled: false,
        online_unblock_allowed: false,
        offline_challenge_response_allowed: true,
        challenge_response_enforced: true,
        user_may_choose: false,
        user_auth: None,
        operator_policy: Some(OperatorPolicy {
            unblock_roles: vec!["helpdesk".into()],
            puk_read_roles: vec!["helpdesk".into()],
            one_time_code_roles: vec![],
            dual_control: true,
            approver_roles: vec!["approver".into()],
            approval_ttl: secs(600),
        }),
        rate_limits: vec![],
        cryptogram_by_email_allowed: false,
        offline_self_service_allowed: false,
        self_service_session_ttl: None,
    });
    spec.pin_policy = Some(PinPolicy {
        min_length: 6,
        max_length: 8,
        allowed_classes: vec![CharacterClass::Digit as i32],
        required_classes: vec![],
        forbid_trivial: true,
        max_repeated_characters: 2,
        max_sequence_length: 3,
        must_differ_from_previous: true,
        pin_tries: 3,
    });
    spec.labels.clear();
    spec
}
