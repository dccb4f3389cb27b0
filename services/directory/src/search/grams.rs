//! Grams: the keys of the posting lists, what a search document and a query are cut into.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::normalize::{self, FIELD_SEP};

/// A gram: up to four characters, 21 bits each, first character highest (`NO_CHAR` for the
/// missing ones), and the top bit for a word start before them (`WORD`); or a short gram
/// (`SHORT`, see [`short_gram`]).
pub type Gram = u128;
const NO_CHAR: u128 = 0x1F_FFFF;
pub(super) const WORD: Gram = 1 << 127;
const SLOTS: usize = 4;
/// A short gram: one or two characters as they are (boundaries too) that some word of the
/// document starts with, or, with `INNER`, that it has only inside words.
const SHORT: Gram = 1 << 126;
const INNER: Gram = 1 << 125;
/// The first character of a short gram's stored text, by `INNER`: control characters, which
/// no folded text has, so that no other gram's text starts so.
const SHORT_START: char = '\u{1e}';
const SHORT_INNER: char = '\u{1d}';
/// Longest query (in characters) searched by its short grams.
pub const SHORT_QUERY: usize = 2;

pub(super) fn pack(chars: &[char]) -> Gram {
    (0..SLOTS).fold(0, |g, i| {
        (g << 21) | chars.get(i).map_or(NO_CHAR, |c| u128::from(u32::from(*c)))
    })
}

pub(super) fn gram_text(g: Gram) -> String {
    let word = match (g & WORD != 0, g & SHORT != 0, g & INNER != 0) {
        (true, _, _) => Some(FIELD_SEP),
        (_, true, false) => Some(SHORT_START),
        (_, true, true) => Some(SHORT_INNER),
        _ => None,
    };
    let chars = (0..SLOTS)
        .rev()
        .map(|i| (g >> (21 * i)) & NO_CHAR)
        .filter(|c| *c != NO_CHAR)
        .filter_map(|c| char::from_u32(u32::try_from(c).ok()?));
    word.into_iter().chain(chars).collect()
}

pub(super) fn gram_of_text(text: &str) -> Option<Gram> {
    let chars: Vec<char> = text.chars().collect();
    match chars.as_slice() {
        [SHORT_START, short @ ..] if (1..=SHORT_QUERY).contains(&short.len()) => {
            Some(SHORT | pack(short))
        }
        [SHORT_INNER, short @ ..] if (1..=SHORT_QUERY).contains(&short.len()) => {
            Some(SHORT | INNER | pack(short))
        }
        two_or_three @ ([_, _] | [_, _, _]) => Some(pack(two_or_three)),
        [FIELD_SEP, word @ ..] if (3..=4).contains(&word.len()) => Some(WORD | pack(word)),
        span @ [_, _, _, _] => Some(pack(span)),
        _ => None,
    }
}

/// `text` with every word boundary as `FIELD_SEP`.
fn mapped(text: &[char]) -> Vec<char> {
    text.iter().copied().map(boundary_as_sep).collect()
}

/// `c`, or `FIELD_SEP` for a word boundary: grams see all boundaries as one character.
pub(super) fn boundary_as_sep(c: char) -> char {
    if normalize::is_boundary(c) {
        FIELD_SEP
    } else {
        c
    }
}

/// The grams of a search document, sorted and distinct: every three characters in a row, and
/// every boundary with the three and the four characters after it (word starts: a search for
/// three finds exactly the words that start so; the four tell "bara" from "barb"), its
/// [`span_grams`], and its [`short_grams`].
pub fn doc_grams(search_doc: &str) -> Vec<Gram> {
    let text: Vec<char> = search_doc.chars().collect();
    let mut out = Vec::with_capacity(text.len() * 2);
    each_gram(&text, &mapped(&text), |g| out.push(g));
    out.sort_unstable();
    out.dedup();
    out
}

/// Calls `f` with each gram of a document's `text` (see [`doc_grams`]), [`mapped`] as `m`, in
/// text order (the spans, then the short grams last), some more than once.
pub(super) fn each_gram(text: &[char], m: &[char], mut f: impl FnMut(Gram)) {
    for i in 0..m.len() {
        if m[i] == FIELD_SEP && i + 1 < m.len() {
            for n in [3, 4] {
                if i + n < m.len() {
                    f(WORD | pack(&m[i + 1..i + 1 + n]));
                }
            }
        }
        if i + 2 < m.len() {
            f(pack(&m[i..i + 3]));
        }
    }
    for (_, g) in spans(text) {
        f(g);
    }
    each_short_gram(text, f);
}

/// The short gram of folded query `q` (one or two characters) in `tier`: its list holds
/// exactly the users that tier finds, those with `q` at a word start (tier 0), and those with
/// `q` only inside words (tier 1). The text is as it is: no boundary stands for another.
fn short_gram(q: &[char], tier: u8) -> Gram {
    SHORT | if tier == 0 { 0 } else { INNER } | pack(q)
}

/// Whether folded query `q` is searched by its short grams (one or two characters).
pub fn is_short(q: &str) -> bool {
    (1..=SHORT_QUERY).contains(&q.chars().count())
}

/// Calls `f` with the short gram of every one and two characters of each field of a
/// document's `text`, once each: of tier 0 when one of them starts a word (follows a
/// boundary, as the prefix document's word starts do), else of tier 1.
fn each_short_gram(text: &[char], mut f: impl FnMut(Gram)) {
    let mut seen: Vec<(Gram, bool)> = Vec::with_capacity(text.len() * 2);
    for i in 0..text.len() {
        if text[i] == FIELD_SEP {
            continue;
        }
        let starts = i == 0 || normalize::is_boundary(text[i - 1]);
        seen.push((pack(&text[i..=i]), starts));
        if text.get(i + 1).is_some_and(|c| *c != FIELD_SEP) {
            seen.push((pack(&text[i..i + 2]), starts));
        }
    }
    // Sorted, a gram's last entry says whether any of its places starts a word.
    seen.sort_unstable();
    for (k, (g, starts)) in seen.iter().enumerate() {
        if seen.get(k + 1).is_none_or(|(next, _)| next != g) {
            f(SHORT | if *starts { 0 } else { INNER } | g);
        }
    }
}

/// The short grams of a search document (see [`each_short_gram`]), for adding them to an
/// index built without them.
pub(super) fn short_grams(search_doc: &str) -> Vec<Gram> {
    let text: Vec<char> = search_doc.chars().collect();
    let mut out = Vec::with_capacity(text.len() * 2);
    each_short_gram(&text, |g| out.push(g));
    out
}

/// The grams of one word-start character (the boundary before it and it, boundaries all as
/// one) that documents had before short grams: for taking migration 5 back.
pub(super) fn first_char_grams(search_doc: &str) -> Vec<Gram> {
    let text: Vec<char> = search_doc.chars().collect();
    let m = mapped(&text);
    let mut out: Vec<Gram> = (0..m.len().saturating_sub(1))
        .filter(|i| m[*i] == FIELD_SEP)
        .map(|i| pack(&m[i..i + 2]))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The grams that span a word boundary in a search document, sorted and distinct (see
/// [`spans`]).
pub(super) fn span_grams(search_doc: &str) -> Vec<Gram> {
    let text: Vec<char> = search_doc.chars().collect();
    let mut out: Vec<Gram> = spans(&text).map(|(_, g)| g).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Each word boundary of `text` with the two characters before it and the one after, as they
/// are (not mapped), and where that starts: "en.s" of "soren.strom". Substrings that cross
/// words (the dot of an email address) mostly differ in the few characters around the
/// boundary, and the three-character grams there are among the most common of all ("et␟s"
/// would be every "…net" domain before a serial "SC…"). A boundary two characters after
/// another is left out: ".a.b" is the word start gram of "a.b" already.
fn spans(text: &[char]) -> impl Iterator<Item = (usize, Gram)> + '_ {
    let boundary = |i: usize| normalize::is_boundary(text[i]);
    (2..text.len().saturating_sub(1))
        .filter(move |i| boundary(*i) && !boundary(i - 2))
        .map(|i| (i - 2, pack(&text[i - 2..i + 2])))
}

/// The grams every document matching folded query `q` in `tier` has (0: `q` starts a word,
/// else anywhere); for one or two characters, their short gram (the matches exactly); empty
/// for an empty query.
pub fn query_grams(q: &str, tier: u8) -> Vec<Gram> {
    let mut out: Vec<Gram> = grams_in_order(q, tier)
        .into_iter()
        .map(|(_, g)| g)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// [`query_grams`] with the position of their first character in the query (the boundary a
/// prefix search starts with at 0), ordered by it.
pub(super) fn grams_in_order(q: &str, tier: u8) -> Vec<(usize, Gram)> {
    if is_short(q) {
        let q: Vec<char> = q.chars().collect();
        return vec![(0, short_gram(&q, tier))];
    }
    let mut text = Vec::with_capacity(q.len() + 1);
    if tier == 0 {
        text.push(FIELD_SEP);
    }
    text.extend(q.chars());
    let m = mapped(&text);
    let mut out: Vec<(usize, Gram)> = m.windows(3).map(pack).enumerate().collect();
    out.extend(spans(&text));
    if tier == 0 {
        for n in [3, 4] {
            if m.len() > n {
                out.push((0, WORD | pack(&m[1..=n])));
            }
        }
    }
    out.sort_by_key(|(at, _)| *at);
    out
}

/// How many characters of the query gram `g` stands for (with the boundary before a word
/// start).
pub(super) fn extent(g: Gram) -> usize {
    let chars = (0..SLOTS)
        .filter(|i| (g >> (21 * i)) & NO_CHAR != NO_CHAR)
        .count();
    chars + usize::from(g & WORD != 0)
}

/// Hashes grams (already well spread integers) with one multiplication: bulk loads put tens of
/// millions of ranks into maps keyed by gram.
#[derive(Default)]
pub struct GramHasher(u64);

impl Hasher for GramHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, n: u128) {
        // Both halves folded into one word, then spread.
        let folded = (n as u64) ^ ((n >> 64) as u64).rotate_left(29);
        self.0 = (folded ^ (folded >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub type GramMap<V> = HashMap<Gram, V, BuildHasherDefault<GramHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grams_of_documents_and_queries() {
        let doc = normalize::search_doc("Jane van Doe", "JDoe", "jane.doe@example.com", &[]);
        let grams = doc_grams(&doc);
        for (q, tier) in [
            ("doe", 0),
            ("d", 0),
            ("va", 0),
            ("e.d", 1),
            ("ane", 1),
            ("jane.doe@", 0),
        ] {
            let needed = query_grams(q, tier);
            assert!(!needed.is_empty(), "{q}");
            assert!(needed.iter().all(|g| grams.binary_search(g).is_ok()), "{q}");
        }
        // "oe" starts no word: the word-start gram is missing.
        assert!(
            query_grams("oe", 0)
                .iter()
                .any(|g| grams.binary_search(g).is_err())
        );
        // One or two characters: one short gram, of the tier the document has them in.
        assert_eq!(
            query_grams("an", 1),
            vec![SHORT | INNER | pack(&['a', 'n'])]
        );
        assert!(grams.contains(&(SHORT | INNER | pack(&['a', 'n']))));
        assert!(!grams.contains(&(SHORT | pack(&['a', 'n']))));
        assert!(grams.contains(&(SHORT | pack(&['v', 'a']))));
        assert!(!grams.contains(&(SHORT | INNER | pack(&['v', 'a']))));
        // "e" starts "example", and is inside "jane": a word start only.
        assert!(grams.contains(&(SHORT | pack(&['e']))));
        assert!(!grams.contains(&(SHORT | INNER | pack(&['e']))));
        // Boundaries are as they are: "@e" (after "doe": inside a word) but no ".e", and no
        // gram across fields.
        assert!(grams.contains(&(SHORT | INNER | pack(&['@', 'e']))));
        assert!(grams.contains(&(SHORT | pack(&['e', 'x']))));
        assert!(!grams.contains(&(SHORT | pack(&['.', 'e']))));
        assert!(!grams.contains(&(SHORT | INNER | pack(&['.', 'e']))));
        assert!(!grams.contains(&(SHORT | INNER | pack(&['e', FIELD_SEP]))));
        for g in [
            pack(&['a', FIELD_SEP]),
            pack(&['ø', 'b', 'c']),
            pack(&[FIELD_SEP, 'b', 'c']),
            WORD | pack(&['x', 'y', 'z']),
            WORD | pack(&['w', 'x', 'y', 'z']),
            SHORT | pack(&['@']),
            SHORT | INNER | pack(&['a', FIELD_SEP]),
            SHORT | INNER | pack(&['.', '.']),
        ] {
            assert_eq!(gram_of_text(&gram_text(g)), Some(g));
        }
        // A word start of three characters or more is one gram of its own.
        assert!(query_grams("van", 0).contains(&(WORD | pack(&['v', 'a', 'n']))));
        assert!(grams.contains(&(WORD | pack(&['v', 'a', 'n']))));
        assert!(!grams.contains(&(WORD | pack(&['a', 'n', 'e']))));
        // Four characters of a word start tell "jane" from "jan…" words.
        assert!(grams.contains(&(WORD | pack(&['j', 'a', 'n', 'e']))));
        assert!(
            query_grams("janx", 0)
                .iter()
                .any(|g| grams.binary_search(g).is_err())
        );
    }
}
