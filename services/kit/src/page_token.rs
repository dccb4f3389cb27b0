//! Opaque page tokens: the sort key of the last item returned, hex-encoded, tagged with the
//! listing's own version string so a token of one listing is refused by another.

use data_encoding::{HEXLOWER, HEXLOWER_PERMISSIVE};

pub fn encode(version: &str, parts: &[&str]) -> String {
    let mut raw = String::from(version);
    for p in parts {
        raw.push('\u{0}');
        raw.push_str(p);
    }
    HEXLOWER.encode(raw.as_bytes())
}

/// The `n` parts of a token made by [`encode`] with the same `version`; `None` for anything
/// else.
pub fn decode(version: &str, token: &str, n: usize) -> Option<Vec<String>> {
    if token.len() > 8_192 {
        return None;
    }
    let bytes = HEXLOWER_PERMISSIVE.decode(token.as_bytes()).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.split('\u{0}');
    if parts.next() != Some(version) {
        return None;
    }
    let parts: Vec<String> = parts.map(str::to_owned).collect();
    (parts.len() == n).then_some(parts)
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let t = super::encode("t1", &["a b", "ü"]);
        assert_eq!(super::decode("t1", &t, 2).unwrap(), ["a b", "ü"]);
        assert!(super::decode("t1", &t, 3).is_none());
        assert!(super::decode("d1", &t, 2).is_none());
        assert!(super::decode("t1", "zz", 1).is_none());
    }
}
