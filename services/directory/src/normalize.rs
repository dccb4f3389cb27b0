//! Text folding for uniqueness, search and security answers: Unicode compatibility
//! decomposition, accents dropped, lower case, runs of white space collapsed to one space.
//! "Zoë  ÅBERG" and "zoe aberg" fold to the same string.

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Separates fields in the search document (never part of folded text).
pub const FIELD_SEP: char = '\u{1f}';

/// Case- and accent-insensitive form of `s`.
pub fn fold(s: &str) -> String {
    // ASCII is its own decomposition: skip the normalizer (most of the time of bulk imports).
    if s.is_ascii() {
        fold_ascii(s)
    } else {
        fold_chars(s.nfkd(), s.len())
    }
}

/// [`fold_chars`] of ASCII text, a byte at a time: no combining marks, no special letters;
/// white space and control characters are the bytes up to the space, and DEL.
fn fold_ascii(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for b in s.bytes() {
        if b <= b' ' || b == 0x7f {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push(char::from(b.to_ascii_lowercase()));
    }
    out
}

fn fold_chars(chars: impl Iterator<Item = char>, len: usize) -> String {
    let mut out = String::with_capacity(len);
    let mut space = false;
    for c in chars {
        if is_combining_mark(c) {
            continue;
        }
        if c.is_whitespace() || c.is_control() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        match c {
            'ß' => out.push_str("ss"),
            'æ' | 'Æ' => out.push_str("ae"),
            'œ' | 'Œ' => out.push_str("oe"),
            'ø' | 'Ø' => out.push('o'),
            'ł' | 'Ł' => out.push('l'),
            'đ' | 'Đ' => out.push('d'),
            'þ' | 'Þ' => out.push_str("th"),
            'ı' => out.push('i'),
            c => out.extend(c.to_lowercase()),
        }
    }
    out
}

/// Folded form of a security answer: also drops punctuation, so "St. Louis" matches
/// "st louis".
pub fn fold_answer(s: &str) -> String {
    let kept: String = fold(s)
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Apostrophes and the marks typed for them (’ ‘ ʼ ʻ ` ′): the search treats them as nothing,
/// so "obrien" finds "O'Brien" and "o’brien" finds "O'Brien".
pub fn is_mark(c: char) -> bool {
    matches!(
        c,
        '\'' | '\u{2019}' | '\u{2018}' | '\u{02bc}' | '\u{02bb}' | '`' | '\u{2032}'
    )
}

/// `folded` without [`is_mark`] characters.
pub fn without_marks(folded: &str) -> std::borrow::Cow<'_, str> {
    if folded.contains(is_mark) {
        folded
            .chars()
            .filter(|c| !is_mark(*c))
            .collect::<String>()
            .into()
    } else {
        folded.into()
    }
}

/// A folded search query: without marks (see [`is_mark`]), unless it is nothing else (then
/// the marks themselves are searched).
pub fn query(folded: &str) -> String {
    match without_marks(folded) {
        bare if bare.trim().is_empty() => folded.to_owned(),
        bare => bare.trim().to_owned(),
    }
}

/// A card serial as searched: folded, without spaces, dashes and colons.
pub fn serial(s: &str) -> String {
    fold(s)
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | ':'))
        .collect()
}

/// Longest prefix match ranked as such; a longer query still matches as a substring.
pub const PREFIX_CHARS: usize = 16;

/// Characters that start a new word for prefix matching.
pub(crate) fn is_boundary(c: char) -> bool {
    matches!(
        c,
        ' ' | '.' | '@' | '-' | '_' | '/' | ',' | '\'' | '+' | FIELD_SEP
    )
}

/// The searchable document of a user: folded display name, username, email and card
/// serials, each field between separators (substring search runs over this). A name, username
/// or email with apostrophes (see [`is_mark`]) is there a second time without them, so that a
/// query, which has them dropped, finds it, while its word starts after them stay.
pub fn search_doc(display: &str, username: &str, email: &str, serials: &[String]) -> String {
    search_doc_of_folded(&fold(display), &fold(username), &fold(email), serials)
}

/// [`search_doc`] of display name, username and email already folded.
pub fn search_doc_of_folded(
    display: &str,
    username: &str,
    email: &str,
    serials: &[String],
) -> String {
    let mut doc = String::with_capacity(display.len() + username.len() + email.len() + 8);
    doc.push(FIELD_SEP);
    let mut fields = Vec::with_capacity(3 + 2 * serials.len());
    for field in [display, username, email] {
        fields.push(field.to_owned());
        if let std::borrow::Cow::Owned(bare) = without_marks(field) {
            fields.push(bare);
        }
    }
    for s in serials {
        let compact = serial(s);
        let folded = fold(s);
        if folded != compact {
            fields.push(folded);
        }
        fields.push(compact);
    }
    for field in fields {
        doc.push_str(&field);
        doc.push(FIELD_SEP);
    }
    doc
}

/// Every word start of the document, each after a separator: `prefix_doc LIKE '%<sep>q%'`
/// is a prefix match of some word (or of a whole field).
pub fn prefix_doc(doc: &str) -> String {
    let mut out = String::with_capacity(doc.len() * 2);
    let chars: Vec<char> = doc.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if *c == FIELD_SEP {
            continue;
        }
        let starts = i == 0 || is_boundary(chars[i - 1]);
        if starts {
            out.push(FIELD_SEP);
            // the rest of this field from this word on, at most PREFIX_CHARS of it
            for d in chars[i..].iter().take(PREFIX_CHARS) {
                if *d == FIELD_SEP {
                    break;
                }
                out.push(*d);
            }
        }
    }
    out.push(FIELD_SEP);
    out
}

/// The distinct word starts of a prefix document (the rows of the former `user_words` table,
/// rebuilt when migration m0002 is reverted).
pub fn words(prefix_doc: &str) -> Vec<String> {
    let set: std::collections::BTreeSet<&str> = prefix_doc
        .split(FIELD_SEP)
        .filter(|w| !w.is_empty())
        .collect();
    set.into_iter().map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_accents_and_spaces() {
        assert_eq!(fold("  Zoë   ÅBERG "), "zoe aberg");
        assert_eq!(fold("Straße"), "strasse");
        assert_eq!(fold("ＪＯＨＮ"), "john");
        assert_eq!(fold("Łukasz Øster"), "lukasz oster");
        assert_eq!(fold(" J.\tDOE\u{7f}x "), "j. doe x");
        assert_eq!(fold_answer("St. Louis!"), "st louis");
        assert_eq!(serial("SN-00 12:AB"), "sn0012ab");
    }

    #[test]
    fn ascii_folds_as_any_text() {
        let all: String = (0u8..128).map(char::from).collect();
        for text in [
            all.as_str(),
            " a\tB  c\x7f",
            "\x00X",
            "Jane.DOE@Example.com ",
        ] {
            assert_eq!(
                fold_ascii(text),
                fold_chars(text.chars(), text.len()),
                "{text:?}"
            );
        }
        for b in 0u8..128 {
            let text = format!("a{}b{}", char::from(b), char::from(b));
            assert_eq!(
                fold_ascii(&text),
                fold_chars(text.chars(), text.len()),
                "{b}"
            );
        }
    }

    #[test]
    fn documents() {
        let doc = search_doc(
            "Jane van Doe",
            "JDoe",
            "jane.doe@example.com",
            &["SN-1".into()],
        );
        assert_eq!(
            doc,
            "\u{1f}jane van doe\u{1f}jdoe\u{1f}jane.doe@example.com\u{1f}sn-1\u{1f}sn1\u{1f}"
        );
        let p = prefix_doc(&doc);
        for word in [
            "jane van",
            "van doe",
            "doe",
            "jdoe",
            "example.com",
            "com",
            "sn1",
        ] {
            assert!(p.contains(&format!("\u{1f}{word}")), "{word}: {p:?}");
        }
        assert!(!p.contains("\u{1f}oe"), "{p:?}");
    }

    #[test]
    fn apostrophes_are_searched_as_nothing() {
        let doc = search_doc("Seán O’Brien", "d'arcy", "", &[]);
        assert_eq!(
            doc,
            "\u{1f}sean o’brien\u{1f}sean obrien\u{1f}d'arcy\u{1f}darcy\u{1f}\u{1f}"
        );
        assert!(prefix_doc(&doc).contains("\u{1f}obrien"));
        assert!(prefix_doc(&doc).contains("\u{1f}arcy"));
        assert_eq!(query(&fold("O'Brien")), "obrien");
        assert_eq!(query(&fold("o’brien")), "obrien");
        assert_eq!(query("'"), "'");
        assert_eq!(query("a '"), "a");
    }
}
