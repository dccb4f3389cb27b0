//! Checks a candidate PIN against a PIN policy. Messages describe the rule, never the PIN:
//! no character, position or substring of it appears in any violation.

use cms_proto::template::v1::{CharacterClass, PinPolicy, Violation};
use subtle::ConstantTimeEq;

use crate::policy::Findings;

fn class_of(c: char) -> Option<CharacterClass> {
    match c {
        '0'..='9' => Some(CharacterClass::Digit),
        'a'..='z' => Some(CharacterClass::Lower),
        'A'..='Z' => Some(CharacterClass::Upper),
        '!'..='~' => Some(CharacterClass::Symbol),
        _ => None,
    }
}

fn class_label(c: CharacterClass) -> &'static str {
    match c {
        CharacterClass::Digit => "digits",
        CharacterClass::Lower => "lower-case letters",
        CharacterClass::Upper => "upper-case letters",
        CharacterClass::Symbol => "symbols",
        CharacterClass::Unspecified => "unspecified",
    }
}

/// Whether `b` follows `a` in an ascending (`step` 1) or descending (`step` -1) run of digits
/// or letters (letters case-insensitively).
fn steps(a: char, b: char, step: i32) -> bool {
    let same_kind = (a.is_ascii_digit() && b.is_ascii_digit())
        || (a.is_ascii_alphabetic() && b.is_ascii_alphabetic());
    same_kind && (b.to_ascii_lowercase() as i32 - a.to_ascii_lowercase() as i32) == step
}

/// Length of the longest ascending or descending run.
fn longest_sequence(chars: &[char]) -> usize {
    let mut best = usize::from(!chars.is_empty());
    for step in [1, -1] {
        let mut run = 1;
        for w in chars.windows(2) {
            if steps(w[0], w[1], step) {
                run += 1;
                best = best.max(run);
            } else {
                run = 1;
            }
        }
    }
    best
}

/// Length of the longest run of one repeated character.
fn longest_repeat(chars: &[char]) -> usize {
    let mut best = usize::from(!chars.is_empty());
    let mut run = 1;
    for w in chars.windows(2) {
        if w[0] == w[1] {
            run += 1;
            best = best.max(run);
        } else {
            run = 1;
        }
    }
    best
}

/// Every rule of `policy` that `pin` breaks.
pub fn check(policy: &PinPolicy, pin: &str, previous: &str) -> Vec<Violation> {
    let mut f = Findings::default();
    let chars: Vec<char> = pin.chars().collect();
    let len = chars.len();
    if len < policy.min_length as usize {
        f.error(
            "",
            "PIN_TOO_SHORT",
            format!(
                "the PIN is too short: at least {} characters",
                policy.min_length
            ),
        );
    }
    if len > policy.max_length as usize {
        f.error(
            "",
            "PIN_TOO_LONG",
            format!(
                "the PIN is too long: at most {} characters",
                policy.max_length
            ),
        );
    }
    let allowed: Vec<CharacterClass> = policy
        .allowed_classes
        .iter()
        .filter_map(|c| CharacterClass::try_from(*c).ok())
        .collect();
    let mut present = Vec::new();
    let mut unprintable = false;
    let mut outside = false;
    for c in &chars {
        match class_of(*c) {
            None => unprintable = true,
            Some(class) => {
                if !allowed.contains(&class) {
                    outside = true;
                }
                if !present.contains(&class) {
                    present.push(class);
                }
            }
        }
    }
    if unprintable {
        f.error(
            "",
            "PIN_CHARACTER_NOT_ALLOWED",
            "the PIN contains a character that is not printable ASCII (spaces, accents and control characters are refused)",
        );
    }
    if outside {
        let names: Vec<&str> = allowed.iter().map(|c| class_label(*c)).collect();
        f.error(
            "",
            "PIN_CHARACTER_NOT_ALLOWED",
            format!(
                "the PIN contains a character outside the allowed classes ({})",
                names.join(", ")
            ),
        );
    }
    for required in &policy.required_classes {
        if let Ok(class) = CharacterClass::try_from(*required)
            && !present.contains(&class)
        {
            f.error(
                "",
                "PIN_MISSING_CLASS",
                format!(
                    "the PIN must contain at least one of: {}",
                    class_label(class)
                ),
            );
        }
    }
    if policy.forbid_trivial && len >= 2 {
        if longest_repeat(&chars) == len {
            f.error("", "PIN_TRIVIAL", "the PIN is one character repeated");
        } else if longest_sequence(&chars) == len {
            f.error(
                "",
                "PIN_TRIVIAL",
                "the PIN is an ascending or descending sequence",
            );
        }
    }
    if policy.max_repeated_characters > 0
        && longest_repeat(&chars) > policy.max_repeated_characters as usize
    {
        f.error(
            "",
            "PIN_TOO_MANY_REPEATS",
            format!(
                "the PIN repeats a character more than {} times in a row",
                policy.max_repeated_characters
            ),
        );
    }
    if policy.max_sequence_length > 0
        && longest_sequence(&chars) > policy.max_sequence_length as usize
    {
        f.error(
            "",
            "PIN_SEQUENCE_TOO_LONG",
            format!(
                "the PIN contains an ascending or descending run longer than {} characters",
                policy.max_sequence_length
            ),
        );
    }
    if policy.must_differ_from_previous
        && !previous.is_empty()
        && bool::from(pin.as_bytes().ct_eq(previous.as_bytes()))
    {
        f.error(
            "",
            "PIN_SAME_AS_PREVIOUS",
            "the new PIN must differ from the previous PIN",
        );
    }
    f.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    fn codes(pin: &str, previous: &str) -> Vec<String> {
        let policy = sample::minidriver("x").pin_policy.unwrap();
        let out = check(&policy, pin, previous);
        for v in &out {
            assert!(
                !v.message.contains(pin),
                "message echoes the PIN: {}",
                v.message
            );
        }
        out.into_iter().map(|v| v.code).collect()
    }

    #[test]
    fn good_pin_passes() {
        assert!(codes("k7Rq2m", "").is_empty());
        assert!(codes("k7Rq2m", "other1").is_empty());
    }

    #[test]
    fn each_rule() {
        assert_eq!(codes("a1b2", ""), ["PIN_TOO_SHORT"]);
        assert_eq!(codes("a1b2c3d4e5f6g7h8i", ""), ["PIN_TOO_LONG"]);
        assert_eq!(codes("abcXyz", ""), ["PIN_MISSING_CLASS"]);
        assert_eq!(codes("ab c12", ""), ["PIN_CHARACTER_NOT_ALLOWED"]);
        assert_eq!(codes("ab#c12", ""), ["PIN_CHARACTER_NOT_ALLOWED"]);
        assert_eq!(codes("é1abcX", ""), ["PIN_CHARACTER_NOT_ALLOWED"]);
        assert_eq!(codes("111111", ""), ["PIN_TRIVIAL", "PIN_TOO_MANY_REPEATS"]);
        assert_eq!(
            codes("123456", ""),
            ["PIN_TRIVIAL", "PIN_SEQUENCE_TOO_LONG"]
        );
        assert_eq!(
            codes("987654", ""),
            ["PIN_TRIVIAL", "PIN_SEQUENCE_TOO_LONG"]
        );
        assert_eq!(codes("x2345678", ""), ["PIN_SEQUENCE_TOO_LONG"]);
        assert_eq!(codes("x7aaaa", ""), ["PIN_TOO_MANY_REPEATS"]);
        assert_eq!(codes("k7Rq2m", "k7Rq2m"), ["PIN_SAME_AS_PREVIOUS"]);
    }

    #[test]
    fn runs() {
        let c: Vec<char> = "a1234b".chars().collect();
        assert_eq!(longest_sequence(&c), 4);
        let c: Vec<char> = "zyx9".chars().collect();
        assert_eq!(longest_sequence(&c), 3);
        let c: Vec<char> = "aab".chars().collect();
        assert_eq!(longest_repeat(&c), 2);
    }
}
