//! The new PIN is checked before the card is touched: against the template's PIN policy (from
//! the request, else the agent's `[cards.pin_policy]`) and the card's own length limits. The
//! message lists every rule broken, never the PIN.

use cms_proto::agent::v1::{UnblockOutcome, UnblockResult};
use cms_proto::common::v1::ErrorReason;
use cms_proto::template::v1::PinPolicy;

use super::outcome::result;
use crate::card::profile::Profile;

/// Checks `pin` for a card of `profile`; `policy` is the one in force (if any).
pub fn check(pin: &str, policy: Option<&PinPolicy>, profile: Profile) -> Result<(), UnblockResult> {
    let mut broken: Vec<String> = Vec::new();
    let (min, max) = profile.pin_length_limits();
    let len = pin.chars().count();
    if pin.is_empty() {
        broken.push("no new PIN was entered".into());
    } else if len < min || len > max {
        broken.push(format!("this card takes PINs of {min} to {max} characters"));
    }
    if !pin.is_ascii() {
        broken.push("the PIN must be printable ASCII".into());
    }
    if let Some(policy) = policy {
        for violation in cms_template::pin::check(policy, pin, "") {
            if !broken.contains(&violation.message) {
                broken.push(violation.message);
            }
        }
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(result(
            UnblockOutcome::PinRejected,
            ErrorReason::PinPolicyViolation,
            format!(
                "the new PIN was refused: {}; the card was not touched",
                broken.join("; ")
            ),
        ))
    }
}

/// The policy in force: the request's, else the configured one.
pub fn in_force<'a>(
    request: Option<&'a PinPolicy>,
    configured: Option<&'a PinPolicy>,
) -> Option<&'a PinPolicy> {
    request.or(configured)
}

/// A plain-language summary of a policy, for the CLI to show when a PIN is refused.
pub fn describe(policy: Option<&PinPolicy>, profile: Profile) -> String {
    let (min, max) = profile.pin_length_limits();
    let Some(p) = policy else {
        return format!("{min} to {max} printable ASCII characters");
    };
    let mut parts = vec![format!(
        "{} to {} characters",
        p.min_length.max(min as u32),
        p.max_length.min(max as u32)
    )];
    use cms_proto::template::v1::CharacterClass as C;
    let name = |c: &i32| match C::try_from(*c) {
        Ok(C::Digit) => "digits",
        Ok(C::Lower) => "lower-case letters",
        Ok(C::Upper) => "upper-case letters",
        Ok(C::Symbol) => "symbols",
        _ => "?",
    };
    if !p.allowed_classes.is_empty() {
        let names: Vec<&str> = p.allowed_classes.iter().map(name).collect();
        parts.push(format!("made of {}", names.join(", ")));
    }
    for required in &p.required_classes {
        parts.push(format!("with at least one of {}", name(required)));
    }
    if p.forbid_trivial {
        parts.push("not one repeated character nor a plain sequence".into());
    }
    if p.max_repeated_characters > 0 {
        parts.push(format!(
            "no character more than {} times in a row",
            p.max_repeated_characters
        ));
    }
    if p.max_sequence_length > 0 {
        parts.push(format!(
            "no ascending or descending run longer than {}",
            p.max_sequence_length
        ));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cms_proto::template::v1::CharacterClass;

    fn digits_policy() -> PinPolicy {
        PinPolicy {
            min_length: 6,
            max_length: 8,
            allowed_classes: vec![CharacterClass::Digit as i32],
            forbid_trivial: true,
            max_sequence_length: 3,
            ..PinPolicy::default()
        }
    }

    #[test]
    fn policy_and_card_limits() {
        check("482915", Some(&digits_policy()), Profile::Piv).unwrap();
        let r = check("123456", Some(&digits_policy()), Profile::Piv).unwrap_err();
        assert_eq!(r.outcome, UnblockOutcome::PinRejected as i32);
        assert!(!r.message.contains("123456"), "{}", r.message);
        // A PIV card takes at most 8 characters whatever the policy says.
        let r = check("482915037", None, Profile::Piv).unwrap_err();
        assert!(r.message.contains("6 to 8"), "{}", r.message);
        check("4829", None, Profile::Minidriver).unwrap();
        assert!(check("", None, Profile::Minidriver).is_err());
    }

    #[test]
    fn description_names_the_rules() {
        let text = describe(Some(&digits_policy()), Profile::Piv);
        assert!(text.contains("6 to 8") && text.contains("digits"), "{text}");
    }
}
