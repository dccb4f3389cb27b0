//! Validation of a template spec: every violation found, with the path of the offending field
//! and a message that names the settings that contradict each other.

use std::collections::BTreeSet;

use cms_proto::common::v1::{CardProfile, DiversificationScheme, KeyAlgorithm, TotpAlgorithm};
use cms_proto::template::v1::{
    AuthMethod, AuthRequirement, CharacterClass, Combinator, PinPolicy, RateLimitScope, Severity,
    TemplateSpec, UnblockPolicy, Violation,
};

/// Longest template name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest free text (description, comment), in characters.
pub const MAX_TEXT_CHARS: usize = 4_000;
/// Longest short identifier (role, label key or value, key reference), in characters.
pub const MAX_SHORT_CHARS: usize = 256;
/// Most entries in a list (roles, labels, questions, rate limits).
pub const MAX_LIST: usize = 64;
/// Longest PIN a card takes (minidriver); PIV allows 8.
pub const MAX_PIN_LENGTH: u32 = 127;
pub const PIV_PIN_MIN: u32 = 6;
/// Most PIN tries a card's retry counter holds (a 4-bit counter on PIV and minidriver cards).
pub const MAX_PIN_TRIES: u32 = 15;
pub const PIV_PIN_MAX: u32 = 8;

#[derive(Default)]
pub(crate) struct Findings(pub Vec<Violation>);

impl Findings {
    pub fn error(&mut self, field: &str, code: &str, message: impl Into<String>) {
        self.push(field, code, message, Severity::Error);
    }

    pub fn warning(&mut self, field: &str, code: &str, message: impl Into<String>) {
        self.push(field, code, message, Severity::Warning);
    }

    fn push(&mut self, field: &str, code: &str, message: impl Into<String>, severity: Severity) {
        self.0.push(Violation {
            field: field.to_owned(),
            code: code.to_owned(),
            message: message.into(),
            severity: severity as i32,
        });
    }

    /// A one-line text field (name, role, reference, question): as `text`, and no line
    /// break or tab, which would forge or break the lines it is shown in.
    fn line(&mut self, field: &str, value: &str, max: usize, required: bool) {
        self.text(field, value, max, required);
        if value.contains(['\n', '\r', '\t']) {
            self.error(
                field,
                "NOT_ONE_LINE",
                format!("{field} contains a line break or tab; it must be one line"),
            );
        }
    }

    /// A text field: not too long, no control characters but line breaks and tabs;
    /// `required` refuses empty.
    fn text(&mut self, field: &str, value: &str, max: usize, required: bool) {
        if required && value.trim().is_empty() {
            self.error(field, "REQUIRED", format!("{field} is required"));
        }
        let chars = value.chars().count();
        if chars > max {
            self.error(
                field,
                "TOO_LONG",
                format!("{field} has {chars} characters; at most {max} are allowed"),
            );
        }
        if value
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            self.error(
                field,
                "CONTROL_CHARACTER",
                format!("{field} contains a control character"),
            );
        }
    }

    fn list(&mut self, field: &str, values: &[String]) {
        if values.len() > MAX_LIST {
            self.error(
                field,
                "TOO_MANY",
                format!(
                    "{field} has {} entries; at most {MAX_LIST} are allowed",
                    values.len()
                ),
            );
        }
        let mut seen = BTreeSet::new();
        for (i, v) in values.iter().enumerate() {
            self.line(&format!("{field}[{i}]"), v, MAX_SHORT_CHARS, true);
            if !seen.insert(v.as_str()) {
                self.warning(
                    &format!("{field}[{i}]"),
                    "DUPLICATE",
                    format!("{field} lists {v:?} more than once"),
                );
            }
        }
    }
}

fn seconds(d: Option<&prost_types::Duration>) -> Option<i64> {
    d.map(|d| d.seconds)
}

/// Set and longer than zero.
fn positive(d: Option<&prost_types::Duration>) -> bool {
    d.is_some_and(|d| d.seconds > 0 || (d.seconds == 0 && d.nanos > 0))
}

fn duration(f: &mut Findings, field: &str, d: Option<&prost_types::Duration>, max_secs: i64) {
    if let Some(d) = d {
        if !(-999_999_999..=999_999_999).contains(&d.nanos) {
            f.error(
                field,
                "INVALID_DURATION",
                format!(
                    "{field}.nanos is {}; it must be within -999999999 to 999999999",
                    d.nanos
                ),
            );
        } else if d.seconds < 0 || d.nanos < 0 {
            f.error(field, "NEGATIVE_DURATION", format!("{field} is negative"));
        } else if d.seconds > max_secs {
            f.error(
                field,
                "DURATION_TOO_LONG",
                format!(
                    "{field} is {} s; at most {max_secs} s is allowed",
                    d.seconds
                ),
            );
        }
    }
}

/// An enum field: `None` (and a violation) when it is unset ("is required") or a number
/// this version does not know ("unknown"), which are different mistakes.
fn known<E: TryFrom<i32> + Copy + PartialEq>(
    f: &mut Findings,
    field: &str,
    value: i32,
    unspecified: E,
    required: &str,
) -> Option<E> {
    match E::try_from(value) {
        Ok(v) if v == unspecified => {
            f.error(field, "REQUIRED", required);
            None
        }
        Ok(v) => Some(v),
        Err(_) => {
            f.error(
                field,
                "UNKNOWN",
                format!("{field} is {value}, which is not a known value"),
            );
            None
        }
    }
}

/// Every violation of `spec`. The spec is acceptable when none has severity ERROR.
pub fn validate(spec: &TemplateSpec) -> Vec<Violation> {
    let mut f = Findings::default();
    f.line("name", &spec.name, MAX_NAME_CHARS, true);
    f.text("description", &spec.description, MAX_TEXT_CHARS, false);
    if spec.labels.len() > MAX_LIST {
        f.error(
            "labels",
            "TOO_MANY",
            format!(
                "labels has {} entries; at most {MAX_LIST} are allowed",
                spec.labels.len()
            ),
        );
    }
    for (k, v) in &spec.labels {
        f.line("labels.key", k, MAX_SHORT_CHARS, true);
        f.line(&format!("labels[{k}]"), v, MAX_SHORT_CHARS, false);
    }

    let profile = known(
        &mut f,
        "card_profile",
        spec.card_profile,
        CardProfile::Unspecified,
        "card_profile is required: CARD_PROFILE_MINIDRIVER or CARD_PROFILE_PIV",
    )
    .unwrap_or(CardProfile::Unspecified);
    admin_key(&mut f, spec);
    puk(&mut f, spec, profile);
    match &spec.unblock_policy {
        Some(policy) => unblock(&mut f, policy, profile),
        None => f.error("unblock_policy", "REQUIRED", "unblock_policy is required"),
    }
    match &spec.pin_policy {
        Some(pin) => pin_policy(&mut f, pin, profile),
        None => f.error("pin_policy", "REQUIRED", "pin_policy is required"),
    }
    f.0
}

fn admin_key(f: &mut Findings, spec: &TemplateSpec) {
    let Some(key) = &spec.admin_key else {
        f.error("admin_key", "REQUIRED", "admin_key is required");
        return;
    };
    let algorithm = known(
        f,
        "admin_key.algorithm",
        key.algorithm,
        KeyAlgorithm::Unspecified,
        "admin_key.algorithm is required (3DES or AES-128/192/256)",
    )
    .unwrap_or(KeyAlgorithm::Unspecified);
    let scheme = known(
        f,
        "admin_key.diversification_scheme",
        key.diversification_scheme,
        DiversificationScheme::Unspecified,
        "admin_key.diversification_scheme is required",
    )
    .unwrap_or(DiversificationScheme::Unspecified);
    let des = matches!(algorithm, KeyAlgorithm::Tdes2key | KeyAlgorithm::Tdes3key);
    let aes = matches!(
        algorithm,
        KeyAlgorithm::Aes128 | KeyAlgorithm::Aes192 | KeyAlgorithm::Aes256
    );
    match scheme {
        DiversificationScheme::GpEmv | DiversificationScheme::GpVisa2 if aes => f.error(
            "admin_key.diversification_scheme",
            "SCHEME_ALGORITHM_MISMATCH",
            format!(
                "admin_key.diversification_scheme {} is a 3DES scheme but admin_key.algorithm is {}",
                scheme.as_str_name(),
                algorithm.as_str_name()
            ),
        ),
        DiversificationScheme::GpKdf3 | DiversificationScheme::Sp800108Cmac if des => f.error(
            "admin_key.diversification_scheme",
            "SCHEME_ALGORITHM_MISMATCH",
            format!(
                "admin_key.diversification_scheme {} is an AES scheme but admin_key.algorithm is {}",
                scheme.as_str_name(),
                algorithm.as_str_name()
            ),
        ),
        _ => {}
    }
    f.line(
        "admin_key.master_key_reference",
        &key.master_key_reference,
        MAX_SHORT_CHARS,
        true,
    );
}

fn puk(f: &mut Findings, spec: &TemplateSpec, profile: CardProfile) {
    match (&spec.puk, profile) {
        (None, CardProfile::Piv) => f.error(
            "puk",
            "REQUIRED",
            "puk is required for card_profile CARD_PROFILE_PIV (the PIN is reset with a derived PUK)",
        ),
        (Some(puk), CardProfile::Piv) => {
            f.line("puk.master_key_reference", &puk.master_key_reference, MAX_SHORT_CHARS, true);
            if puk.length != 0 && !(6..=8).contains(&puk.length) {
                f.error(
                    "puk.length",
                    "PUK_LENGTH_OUT_OF_RANGE",
                    format!("puk.length is {}; PIV allows 6 to 8 (0 means 8)", puk.length),
                );
            }
            if !puk.rotate_after_offline_exposure {
                f.warning(
                    "puk.rotate_after_offline_exposure",
                    "PUK_NOT_ROTATED",
                    "a PUK read out offline stays valid: puk.rotate_after_offline_exposure is off",
                );
            }
        }
        (Some(_), _) => f.warning(
            "puk",
            "IGNORED",
            "puk is ignored unless card_profile is CARD_PROFILE_PIV",
        ),
        (None, _) => {}
    }
}

fn methods_of(req: &AuthRequirement) -> BTreeSet<AuthMethod> {
    req.groups
        .iter()
        .flat_map(|g| g.methods.iter())
        .filter_map(|m| AuthMethod::try_from(*m).ok())
        .filter(|m| *m != AuthMethod::Unspecified)
        .collect()
}

fn unblock(f: &mut Findings, p: &UnblockPolicy, profile: CardProfile) {
    const U: &str = "unblock_policy";
    if p.challenge_response_enforced && p.online_unblock_allowed {
        f.error(
            &format!("{U}.challenge_response_enforced"),
            "CONTRADICTORY_FLOWS",
            "unblock_policy.challenge_response_enforced contradicts unblock_policy.online_unblock_allowed: enforcing challenge/response refuses online unblock",
        );
    }
    if p.challenge_response_enforced && !p.offline_challenge_response_allowed {
        f.error(
            &format!("{U}.challenge_response_enforced"),
            "CONTRADICTORY_FLOWS",
            "unblock_policy.challenge_response_enforced requires unblock_policy.offline_challenge_response_allowed",
        );
    }
    if !p.online_unblock_allowed && !p.offline_challenge_response_allowed {
        f.error(
            U,
            "NO_UNBLOCK_FLOW",
            "neither unblock_policy.online_unblock_allowed nor unblock_policy.offline_challenge_response_allowed is set: cards could never be unblocked",
        );
    }
    if p.user_may_choose && !(p.online_unblock_allowed && p.offline_challenge_response_allowed) {
        f.error(
            &format!("{U}.user_may_choose"),
            "CONTRADICTORY_FLOWS",
            "unblock_policy.user_may_choose needs both unblock_policy.online_unblock_allowed and unblock_policy.offline_challenge_response_allowed",
        );
    }
    if p.offline_self_service_allowed && !p.self_service_enabled {
        f.error(
            &format!("{U}.offline_self_service_allowed"),
            "CONTRADICTORY_SELF_SERVICE",
            "unblock_policy.offline_self_service_allowed needs unblock_policy.self_service_enabled",
        );
    }
    if p.offline_self_service_allowed && !p.offline_challenge_response_allowed {
        f.error(
            &format!("{U}.offline_self_service_allowed"),
            "CONTRADICTORY_FLOWS",
            "unblock_policy.offline_self_service_allowed needs unblock_policy.offline_challenge_response_allowed",
        );
    }
    if p.cryptogram_by_email_allowed && !p.offline_self_service_allowed {
        f.error(
            &format!("{U}.cryptogram_by_email_allowed"),
            "CONTRADICTORY_DELIVERY",
            "unblock_policy.cryptogram_by_email_allowed needs unblock_policy.offline_self_service_allowed (only an offline self-service response can be mailed)",
        );
    }
    if p.self_service_enabled && p.challenge_response_enforced && !p.offline_self_service_allowed {
        f.error(
            &format!("{U}.self_service_enabled"),
            "CONTRADICTORY_SELF_SERVICE",
            "unblock_policy.self_service_enabled with unblock_policy.challenge_response_enforced needs unblock_policy.offline_self_service_allowed: online self-service is refused",
        );
    }
    if p.self_service_enabled && !positive(p.self_service_session_ttl.as_ref()) {
        f.error(
            &format!("{U}.self_service_session_ttl"),
            "REQUIRED",
            "unblock_policy.self_service_enabled needs a positive unblock_policy.self_service_session_ttl: sessions would never expire",
        );
    }
    duration(
        f,
        &format!("{U}.self_service_session_ttl"),
        p.self_service_session_ttl.as_ref(),
        24 * 3600,
    );

    let ops = p.operator_policy.clone().unwrap_or_default();
    let op = format!("{U}.operator_policy");
    f.list(&format!("{op}.unblock_roles"), &ops.unblock_roles);
    f.list(&format!("{op}.puk_read_roles"), &ops.puk_read_roles);
    f.list(
        &format!("{op}.one_time_code_roles"),
        &ops.one_time_code_roles,
    );
    f.list(&format!("{op}.approver_roles"), &ops.approver_roles);
    if p.offline_challenge_response_allowed && ops.unblock_roles.is_empty() {
        f.error(
            &format!("{op}.unblock_roles"),
            "NO_OPERATOR_ROLE",
            "unblock_policy.offline_challenge_response_allowed is set but unblock_policy.operator_policy.unblock_roles is empty: no helpdesk operator could answer a challenge",
        );
    }
    if !p.self_service_enabled && ops.unblock_roles.is_empty() {
        f.error(
            &format!("{op}.unblock_roles"),
            "NO_OPERATOR_ROLE",
            "unblock_policy.self_service_enabled is off and unblock_policy.operator_policy.unblock_roles is empty: nobody could unblock a card",
        );
    }
    if ops.dual_control && ops.approver_roles.is_empty() {
        f.error(
            &format!("{op}.dual_control"),
            "NO_APPROVER_ROLE",
            "unblock_policy.operator_policy.dual_control is on but unblock_policy.operator_policy.approver_roles is empty",
        );
    }
    if ops.dual_control
        && !ops.approver_roles.is_empty()
        && ops
            .approver_roles
            .iter()
            .all(|r| ops.unblock_roles.contains(r))
    {
        f.error(
            &format!("{op}.approver_roles"),
            "APPROVER_IS_UNBLOCKER",
            "unblock_policy.operator_policy.dual_control is on but every approver role may also unblock: two operators of the same role would control each other; name a separate approver role",
        );
    }
    if ops.dual_control {
        match ops.approval_ttl.as_ref() {
            Some(ttl) if ttl.seconds == 0 && ttl.nanos > 0 => f.error(
                &format!("{op}.approval_ttl"),
                "TOO_SHORT",
                "unblock_policy.operator_policy.approval_ttl is under a second: no approval could be used in time",
            ),
            ttl if !positive(ttl) => f.error(
                &format!("{op}.approval_ttl"),
                "REQUIRED",
                "unblock_policy.operator_policy.dual_control needs a positive unblock_policy.operator_policy.approval_ttl",
            ),
            _ => {}
        }
    }
    duration(
        f,
        &format!("{op}.approval_ttl"),
        ops.approval_ttl.as_ref(),
        7 * 24 * 3600,
    );
    if profile == CardProfile::Piv
        && p.offline_challenge_response_allowed
        && ops.puk_read_roles.is_empty()
    {
        f.warning(
            &format!("{op}.puk_read_roles"),
            "NO_PUK_READ_ROLE",
            "offline unblock of a PIV card needs a PUK read-out, but unblock_policy.operator_policy.puk_read_roles is empty",
        );
    }

    let mut scopes = BTreeSet::new();
    for (i, limit) in p.rate_limits.iter().enumerate() {
        let field = format!("{U}.rate_limits[{i}]");
        let scope = known(
            f,
            &format!("{field}.scope"),
            limit.scope,
            RateLimitScope::Unspecified,
            &format!("{field}.scope is required"),
        );
        if let Some(scope) = scope
            && !scopes.insert(limit.scope)
        {
            f.error(
                &format!("{field}.scope"),
                "DUPLICATE_RATE_LIMIT",
                format!("{field}.scope {} is limited twice", scope.as_str_name()),
            );
        }
        if limit.max_count == 0 {
            f.error(
                &format!("{field}.max_count"),
                "ZERO_RATE_LIMIT",
                format!("{field}.max_count is 0: nothing would ever be allowed"),
            );
        }
        if seconds(limit.window.as_ref()).unwrap_or(0) <= 0 {
            f.error(
                &format!("{field}.window"),
                "REQUIRED",
                format!("{field}.window must be positive"),
            );
        }
        duration(
            f,
            &format!("{field}.window"),
            limit.window.as_ref(),
            366 * 24 * 3600,
        );
    }
    if p.rate_limits.len() > MAX_LIST {
        f.error(
            &format!("{U}.rate_limits"),
            "TOO_MANY",
            "too many rate limits",
        );
    }

    user_auth(f, p, &ops);
}

fn user_auth(f: &mut Findings, p: &UnblockPolicy, ops: &cms_proto::template::v1::OperatorPolicy) {
    const A: &str = "unblock_policy.user_auth";
    let auth = p.user_auth.clone().unwrap_or_default();
    let req = auth.requirement.clone().unwrap_or_default();
    let methods = methods_of(&req);
    if p.self_service_enabled && methods.is_empty() {
        f.error(
            &format!("{A}.requirement"),
            "NO_AUTH_METHOD",
            "unblock_policy.self_service_enabled is on but unblock_policy.user_auth.requirement names no method: anyone could unblock",
        );
    }
    if !p.self_service_enabled && !methods.is_empty() {
        f.warning(
            &format!("{A}.requirement"),
            "IGNORED",
            "unblock_policy.user_auth is ignored while unblock_policy.self_service_enabled is off",
        );
    }
    if !req.groups.is_empty() {
        known(
            f,
            &format!("{A}.requirement.combinator"),
            req.combinator,
            Combinator::Unspecified,
            "unblock_policy.user_auth.requirement.combinator is required (ALL_OF or ANY_OF)",
        );
    }
    for (i, group) in req.groups.iter().enumerate() {
        let field = format!("{A}.requirement.groups[{i}]");
        known(
            f,
            &format!("{field}.combinator"),
            group.combinator,
            Combinator::Unspecified,
            &format!("{field}.combinator is required (ALL_OF or ANY_OF)"),
        );
        if group.methods.is_empty() {
            f.error(
                &format!("{field}.methods"),
                "EMPTY_GROUP",
                format!("{field} has no method"),
            );
        }
        let mut seen = BTreeSet::new();
        for (j, m) in group.methods.iter().enumerate() {
            let method = AuthMethod::try_from(*m).unwrap_or(AuthMethod::Unspecified);
            if *m == AuthMethod::Unspecified as i32 {
                f.error(
                    &format!("{field}.methods[{j}]"),
                    "REQUIRED",
                    format!("{field}.methods[{j}] is unset: name a method"),
                );
            } else if method == AuthMethod::Unspecified {
                f.error(
                    &format!("{field}.methods[{j}]"),
                    "UNKNOWN",
                    format!("{field}.methods[{j}] is {m}, which is not a known method"),
                );
            } else if !seen.insert(*m) {
                f.warning(
                    &format!("{field}.methods[{j}]"),
                    "DUPLICATE",
                    format!("{field} lists {} twice", method.as_str_name()),
                );
            }
        }
    }
    if methods.contains(&AuthMethod::SecurityQuestions) {
        let field = format!("{A}.security_questions");
        match &auth.security_questions {
            None => f.error(
                &field,
                "REQUIRED",
                "AUTH_METHOD_SECURITY_QUESTIONS is required but unblock_policy.user_auth.security_questions is not set",
            ),
            Some(q) => {
                if q.asked == 0 {
                    f.error(&format!("{field}.asked"), "REQUIRED", format!("{field}.asked must be at least 1"));
                }
                if q.required_correct == 0 {
                    f.error(
                        &format!("{field}.required_correct"),
                        "REQUIRED",
                        format!("{field}.required_correct must be at least 1"),
                    );
                }
                if q.required_correct > q.asked {
                    f.error(
                        &format!("{field}.required_correct"),
                        "REQUIRED_CORRECT_EXCEEDS_ASKED",
                        format!(
                            "{field}.required_correct ({}) exceeds {field}.asked ({})",
                            q.required_correct, q.asked
                        ),
                    );
                }
                if q.min_enrolled < q.asked {
                    f.error(
                        &format!("{field}.min_enrolled"),
                        "ASKED_EXCEEDS_ENROLLED",
                        format!(
                            "{field}.asked ({}) exceeds {field}.min_enrolled ({}): a user could not be asked that many questions",
                            q.asked, q.min_enrolled
                        ),
                    );
                }
                if q.suggested_questions.is_empty() && !q.allow_custom_questions {
                    f.error(
                        &format!("{field}.suggested_questions"),
                        "NO_QUESTIONS",
                        format!("{field}.suggested_questions is empty and {field}.allow_custom_questions is off: users could not enrol"),
                    );
                }
                if !q.allow_custom_questions
                    && (q.suggested_questions.len() as u64) < u64::from(q.min_enrolled)
                {
                    f.error(
                        &format!("{field}.suggested_questions"),
                        "TOO_FEW_QUESTIONS",
                        format!(
                            "{field}.min_enrolled ({}) exceeds the number of {field}.suggested_questions ({}) and custom questions are off",
                            q.min_enrolled,
                            q.suggested_questions.len()
                        ),
                    );
                }
                if q.min_answer_length < 3 {
                    f.warning(
                        &format!("{field}.min_answer_length"),
                        "WEAK_ANSWERS",
                        format!("{field}.min_answer_length below 3 allows trivial answers"),
                    );
                }
                let mut asked_before = BTreeSet::new();
                for (i, text) in q.suggested_questions.iter().enumerate() {
                    let entry = format!("{field}.suggested_questions[{i}]");
                    f.line(&entry, text, 500, true);
                    // The same question twice would let one answer count twice.
                    let key = text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
                    if !asked_before.insert(key) {
                        f.error(&entry, "DUPLICATE", format!("{entry} repeats an earlier question: {text:?}"));
                    }
                }
                if q.suggested_questions.len() > MAX_LIST {
                    f.error(&format!("{field}.suggested_questions"), "TOO_MANY", "too many suggested questions");
                }
            }
        }
    }
    if methods.contains(&AuthMethod::Totp) {
        let field = format!("{A}.totp");
        match &auth.totp {
            None => f.error(
                &field,
                "REQUIRED",
                "AUTH_METHOD_TOTP is required but unblock_policy.user_auth.totp is not set",
            ),
            Some(t) => {
                known(
                    f,
                    &format!("{field}.algorithm"),
                    t.algorithm,
                    TotpAlgorithm::Unspecified,
                    &format!("{field}.algorithm is required (SHA1, SHA256 or SHA512)"),
                );
                if t.digits != 6 && t.digits != 8 {
                    f.error(
                        &format!("{field}.digits"),
                        "TOTP_DIGITS",
                        format!(
                            "{field}.digits is {}; RFC 6238 authenticators use 6 or 8",
                            t.digits
                        ),
                    );
                }
                if !(15..=300).contains(&t.period_seconds) {
                    f.error(
                        &format!("{field}.period_seconds"),
                        "TOTP_PERIOD",
                        format!(
                            "{field}.period_seconds is {}; allowed 15 to 300 (usually 30)",
                            t.period_seconds
                        ),
                    );
                }
                if t.allowed_skew_steps > 2 {
                    f.error(
                        &format!("{field}.allowed_skew_steps"),
                        "TOTP_SKEW",
                        format!(
                            "{field}.allowed_skew_steps is {}; at most 2 is allowed",
                            t.allowed_skew_steps
                        ),
                    );
                }
                f.line(
                    &format!("{field}.issuer"),
                    &t.issuer,
                    MAX_SHORT_CHARS,
                    false,
                );
            }
        }
    }
    if methods.contains(&AuthMethod::HelpdeskOneTimeCode) {
        let field = format!("{A}.one_time_code");
        match &auth.one_time_code {
            None => f.error(
                &field,
                "REQUIRED",
                "AUTH_METHOD_HELPDESK_ONE_TIME_CODE is required but unblock_policy.user_auth.one_time_code is not set",
            ),
            Some(c) => {
                if !(6..=32).contains(&c.length) {
                    f.error(
                        &format!("{field}.length"),
                        "CODE_LENGTH",
                        format!("{field}.length is {}; allowed 6 to 32", c.length),
                    );
                }
                if seconds(c.validity.as_ref()).unwrap_or(0) <= 0 {
                    f.error(&format!("{field}.validity"), "REQUIRED", format!("{field}.validity must be positive"));
                }
                duration(f, &format!("{field}.validity"), c.validity.as_ref(), 24 * 3600);
            }
        }
        if ops.one_time_code_roles.is_empty() {
            f.error(
                "unblock_policy.operator_policy.one_time_code_roles",
                "NO_OPERATOR_ROLE",
                "AUTH_METHOD_HELPDESK_ONE_TIME_CODE is required but unblock_policy.operator_policy.one_time_code_roles is empty: nobody could issue a code",
            );
        }
    }
    if methods.contains(&AuthMethod::OperatorApproval) && ops.approver_roles.is_empty() {
        f.error(
            "unblock_policy.operator_policy.approver_roles",
            "NO_APPROVER_ROLE",
            "AUTH_METHOD_OPERATOR_APPROVAL is required but unblock_policy.operator_policy.approver_roles is empty",
        );
    }
    if p.self_service_enabled && auth.max_failed_attempts == 0 {
        f.error(
            &format!("{A}.max_failed_attempts"),
            "REQUIRED",
            "unblock_policy.user_auth.max_failed_attempts must be at least 1 when self-service is on (unlimited guessing otherwise)",
        );
    }
    duration(
        f,
        &format!("{A}.lockout"),
        auth.lockout.as_ref(),
        30 * 24 * 3600,
    );
}

fn class_name(c: i32) -> &'static str {
    match CharacterClass::try_from(c) {
        Ok(CharacterClass::Digit) => "DIGIT",
        Ok(CharacterClass::Lower) => "LOWER",
        Ok(CharacterClass::Upper) => "UPPER",
        Ok(CharacterClass::Symbol) => "SYMBOL",
        _ => "UNSPECIFIED",
    }
}

fn pin_policy(f: &mut Findings, p: &PinPolicy, profile: CardProfile) {
    const P: &str = "pin_policy";
    if p.min_length < 4 {
        f.error(
            &format!("{P}.min_length"),
            "PIN_MIN_LENGTH",
            format!("{P}.min_length is {}; at least 4 is required", p.min_length),
        );
    }
    if p.max_length > MAX_PIN_LENGTH {
        f.error(
            &format!("{P}.max_length"),
            "PIN_MAX_LENGTH",
            format!(
                "{P}.max_length is {}; cards take at most {MAX_PIN_LENGTH}",
                p.max_length
            ),
        );
    }
    if p.min_length > p.max_length {
        f.error(
            &format!("{P}.min_length"),
            "MIN_LENGTH_EXCEEDS_MAX_LENGTH",
            format!(
                "{P}.min_length ({}) exceeds {P}.max_length ({})",
                p.min_length, p.max_length
            ),
        );
    }
    if profile == CardProfile::Piv && (p.min_length < PIV_PIN_MIN || p.max_length > PIV_PIN_MAX) {
        f.error(
            P,
            "PIV_PIN_LENGTH",
            format!(
                "card_profile CARD_PROFILE_PIV takes PINs of {PIV_PIN_MIN} to {PIV_PIN_MAX} characters but {P}.min_length is {} and {P}.max_length is {}",
                p.min_length, p.max_length
            ),
        );
    }
    if p.allowed_classes.is_empty() {
        f.error(
            &format!("{P}.allowed_classes"),
            "REQUIRED",
            format!("{P}.allowed_classes is empty: no PIN could be chosen"),
        );
    }
    for (i, c) in p
        .allowed_classes
        .iter()
        .chain(&p.required_classes)
        .enumerate()
    {
        known(
            f,
            &format!("{P}.classes[{i}]"),
            *c,
            CharacterClass::Unspecified,
            &format!("{P}.classes[{i}] is unset: name a character class"),
        );
    }
    for c in &p.required_classes {
        if !p.allowed_classes.contains(c) {
            f.error(
                &format!("{P}.required_classes"),
                "REQUIRED_CLASS_NOT_ALLOWED",
                format!(
                    "{P}.required_classes has {} which {P}.allowed_classes does not allow",
                    class_name(*c)
                ),
            );
        }
    }
    let required: BTreeSet<i32> = p.required_classes.iter().copied().collect();
    if required.len() as u32 > p.max_length {
        f.error(
            &format!("{P}.required_classes"),
            "TOO_MANY_REQUIRED_CLASSES",
            format!(
                "{P}.required_classes needs {} different characters but {P}.max_length is {}",
                required.len(),
                p.max_length
            ),
        );
    }
    if p.forbid_trivial && p.max_sequence_length == 1 {
        f.warning(
            &format!("{P}.max_sequence_length"),
            "STRICT",
            "pin_policy.max_sequence_length 1 forbids any two neighbouring digits such as \"12\"",
        );
    }
    if p.pin_tries == 0 || p.pin_tries > MAX_PIN_TRIES {
        f.error(
            &format!("{P}.pin_tries"),
            "PIN_TRIES",
            format!(
                "{P}.pin_tries is {}; cards take 1 to {MAX_PIN_TRIES} (PIV and minidriver counters hold at most 15)",
                p.pin_tries
            ),
        );
    } else if p.pin_tries < 3 {
        f.warning(
            &format!("{P}.pin_tries"),
            "PIN_TRIES",
            format!(
                "{P}.pin_tries is {}; a typing slip would block the card",
                p.pin_tries
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    fn codes(spec: &TemplateSpec) -> Vec<(String, String)> {
        validate(spec)
            .into_iter()
            .filter(|v| v.severity == Severity::Error as i32)
            .map(|v| (v.field, v.code))
            .collect()
    }

    #[test]
    fn samples_are_valid() {
        assert_eq!(codes(&sample::minidriver("a")), vec![]);
        assert_eq!(codes(&sample::piv("b")), vec![]);
    }

    #[test]
    fn contradictions_are_named() {
        let mut spec = sample::minidriver("x");
        let p = spec.unblock_policy.as_mut().unwrap();
        p.challenge_response_enforced = true;
        p.online_unblock_allowed = true;
        let violations = validate(&spec);
        let v = violations
            .iter()
            .find(|v| v.code == "CONTRADICTORY_FLOWS")
            .expect("contradiction found");
        assert!(
            v.message.contains("challenge_response_enforced"),
            "{}",
            v.message
        );
        assert!(
            v.message.contains("online_unblock_allowed"),
            "{}",
            v.message
        );
    }

    #[test]
    fn questions_and_pin_lengths() {
        let mut spec = sample::minidriver("x");
        let q = spec
            .unblock_policy
            .as_mut()
            .unwrap()
            .user_auth
            .as_mut()
            .unwrap()
            .security_questions
            .as_mut()
            .unwrap();
        q.required_correct = 4;
        q.asked = 3;
        let pin = spec.pin_policy.as_mut().unwrap();
        pin.min_length = 9;
        pin.max_length = 8;
        let c = codes(&spec);
        assert!(
            c.iter()
                .any(|(_, code)| code == "REQUIRED_CORRECT_EXCEEDS_ASKED"),
            "{c:?}"
        );
        assert!(
            c.iter()
                .any(|(_, code)| code == "MIN_LENGTH_EXCEEDS_MAX_LENGTH"),
            "{c:?}"
        );
    }

    #[test]
    fn scheme_must_fit_algorithm() {
        let mut spec = sample::minidriver("x");
        spec.admin_key.as_mut().unwrap().diversification_scheme =
            DiversificationScheme::Sp800108Cmac as i32;
        let c = codes(&spec);
        assert!(
            c.iter()
                .any(|(_, code)| code == "SCHEME_ALGORITHM_MISMATCH"),
            "{c:?}"
        );
    }

    #[test]
    fn piv_needs_puk_and_short_pins() {
        let mut spec = sample::piv("x");
        spec.puk = None;
        spec.pin_policy.as_mut().unwrap().max_length = 12;
        let c = codes(&spec);
        assert!(c.contains(&("puk".into(), "REQUIRED".into())), "{c:?}");
        assert!(c.iter().any(|(_, code)| code == "PIV_PIN_LENGTH"), "{c:?}");
    }

    /// The rules a tester found missing (issue 13): each refused with its field and code.
    fn refused(spec: &TemplateSpec, field: &str, code: &str) {
        let c = codes(spec);
        assert!(
            c.contains(&(field.to_owned(), code.to_owned())),
            "expected {field} {code}, got {c:?}"
        );
    }

    fn policy(spec: &mut TemplateSpec) -> &mut UnblockPolicy {
        spec.unblock_policy.as_mut().unwrap()
    }

    #[test]
    fn totp_without_an_algorithm_is_refused() {
        let mut spec = sample::minidriver("x");
        let totp = policy(&mut spec)
            .user_auth
            .as_mut()
            .unwrap()
            .totp
            .as_mut()
            .unwrap();
        totp.algorithm = TotpAlgorithm::Unspecified as i32;
        refused(&spec, "unblock_policy.user_auth.totp.algorithm", "REQUIRED");
    }

    #[test]
    fn self_service_needs_a_session_ttl() {
        for ttl in [None, Some(prost_types::Duration::default())] {
            let mut spec = sample::minidriver("x");
            policy(&mut spec).self_service_session_ttl = ttl;
            refused(&spec, "unblock_policy.self_service_session_ttl", "REQUIRED");
        }
    }

    #[test]
    fn duration_nanos_must_be_in_range() {
        let mut spec = sample::minidriver("x");
        policy(&mut spec).self_service_session_ttl = Some(prost_types::Duration {
            seconds: 600,
            nanos: 1_000_000_000,
        });
        refused(
            &spec,
            "unblock_policy.self_service_session_ttl",
            "INVALID_DURATION",
        );
    }

    #[test]
    fn single_line_fields_refuse_line_breaks_and_tabs() {
        let mut spec = sample::minidriver("two\nlines");
        refused(&spec, "name", "NOT_ONE_LINE");
        spec.name = "tab\there".into();
        refused(&spec, "name", "NOT_ONE_LINE");
        spec.name = "ok".into();
        policy(&mut spec)
            .operator_policy
            .as_mut()
            .unwrap()
            .unblock_roles = vec!["help\ndesk".into()];
        refused(
            &spec,
            "unblock_policy.operator_policy.unblock_roles[0]",
            "NOT_ONE_LINE",
        );
        // A description may have several lines.
        let mut spec = sample::minidriver("ok");
        spec.description = "line one\nline two".into();
        assert_eq!(codes(&spec), vec![]);
    }

    #[test]
    fn pin_tries_must_be_what_a_card_holds() {
        for tries in [0, 16, 255] {
            let mut spec = sample::minidriver("x");
            spec.pin_policy.as_mut().unwrap().pin_tries = tries;
            refused(&spec, "pin_policy.pin_tries", "PIN_TRIES");
        }
        let mut spec = sample::minidriver("x");
        spec.pin_policy.as_mut().unwrap().pin_tries = 15;
        assert_eq!(codes(&spec), vec![]);
    }

    #[test]
    fn dual_control_needs_an_approver_role_that_does_not_unblock() {
        let mut spec = sample::minidriver("x");
        let ops = policy(&mut spec).operator_policy.as_mut().unwrap();
        ops.dual_control = true;
        ops.approver_roles = vec!["helpdesk".into()];
        refused(
            &spec,
            "unblock_policy.operator_policy.approver_roles",
            "APPROVER_IS_UNBLOCKER",
        );
        let ops = policy(&mut spec).operator_policy.as_mut().unwrap();
        ops.approver_roles = vec!["helpdesk".into(), "approver".into()];
        assert_eq!(codes(&spec), vec![]);
    }

    #[test]
    fn suggested_questions_must_differ() {
        let mut spec = sample::minidriver("x");
        let q = policy(&mut spec)
            .user_auth
            .as_mut()
            .unwrap()
            .security_questions
            .as_mut()
            .unwrap();
        q.suggested_questions.push("first  PET's name?".into());
        refused(
            &spec,
            "unblock_policy.user_auth.security_questions.suggested_questions[3]",
            "DUPLICATE",
        );
    }

    #[test]
    fn unknown_enum_values_are_unknown_not_missing() {
        let mut spec = sample::minidriver("x");
        spec.card_profile = 99;
        spec.admin_key.as_mut().unwrap().algorithm = 42;
        policy(&mut spec).rate_limits[0].scope = 77;
        spec.pin_policy.as_mut().unwrap().allowed_classes.push(9);
        refused(&spec, "card_profile", "UNKNOWN");
        refused(&spec, "admin_key.algorithm", "UNKNOWN");
        refused(&spec, "unblock_policy.rate_limits[0].scope", "UNKNOWN");
        refused(&spec, "pin_policy.classes[3]", "UNKNOWN");
        let c = codes(&spec);
        assert!(!c.iter().any(|(_, code)| code == "REQUIRED"), "{c:?}");
        let mut spec = sample::minidriver("x");
        let totp = policy(&mut spec)
            .user_auth
            .as_mut()
            .unwrap()
            .totp
            .as_mut()
            .unwrap();
        totp.algorithm = 12;
        refused(&spec, "unblock_policy.user_auth.totp.algorithm", "UNKNOWN");
    }

    #[test]
    fn an_approval_ttl_under_a_second_is_too_short() {
        let mut spec = sample::minidriver("x");
        let ops = policy(&mut spec).operator_policy.as_mut().unwrap();
        ops.dual_control = true;
        ops.approval_ttl = Some(prost_types::Duration {
            seconds: 0,
            nanos: 500_000_000,
        });
        refused(
            &spec,
            "unblock_policy.operator_policy.approval_ttl",
            "TOO_SHORT",
        );
        let c = codes(&spec);
        assert!(
            !c.contains(&(
                "unblock_policy.operator_policy.approval_ttl".into(),
                "REQUIRED".into()
            )),
            "{c:?}"
        );
    }
}
