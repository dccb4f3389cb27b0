//! Grams: the keys of the posting lists, what a search document and a query are cut into.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::normalize::{self, FIELD_SEP};

/// A gram: up to four characters, 21 bits each, first character highest (`NO_CHAR` for the
/// missing ones), and the top bit for a word start before them (`WORD`).
pub type Gram = u128;
const NO_CHAR: u128 = 0x1F_FFFF;
pub(super) const WORD: Gram = 1 << 127;
const SLOTS: usize = 4;

pub(super) fn pack(chars: &[char]) -> Gram {
    (0..SLOTS).fold(0, |g, i| {
        (g << 21) | chars.get(i).map_or(NO_CHAR, |c| u128::from(u32::from(*c)))
    })
}

pub(super) fn gram_text(g: Gram) -> String {
    let word = (g & WORD != 0).then_some(FIELD_SEP);
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
/// every boundary with the one, the three and the four characters after it (word starts: a
/// search for one finds exactly the words that start so; the four tell "bara" from "barb"),
/// and its [`span_grams`].
pub fn doc_grams(search_doc: &str) -> Vec<Gram> {
    let text: Vec<char> = search_doc.chars().collect();
    let mut out = Vec::with_capacity(text.len() * 2);
    each_gram(&text, &mapped(&text), |g| out.push(g));
    out.sort_unstable();
    out.dedup();
    out
}

/// Calls `f` with each gram of a document's `text` (see [`doc_grams`]), [`mapped`] as `m`, in
/// text order (the spans last), some more than once.
pub(super) fn each_gram(text: &[char], m: &[char], mut f: impl FnMut(Gram)) {
    for i in 0..m.len() {
        if m[i] == FIELD_SEP && i + 1 < m.len() {
            f(pack(&m[i..i + 2]));
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
/// else anywhere); empty when too short to narrow anything down (tier 1 under 3 characters).
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
    let mut text = Vec::with_capacity(q.len() + 1);
    if tier == 0 {
        text.push(FIELD_SEP);
    }
    text.extend(q.chars());
    let m = mapped(&text);
    let mut out: Vec<(usize, Gram)> = match m.len() {
        0 | 1 => Vec::new(),
        2 if tier == 0 => vec![(0, pack(&m))],
        2 => Vec::new(),
        _ => m.windows(3).map(pack).enumerate().collect(),
    };
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
        assert!(query_grams("an", 1).is_empty());
        for g in [
            pack(&['a', FIELD_SEP]),
            pack(&['ø', 'b', 'c']),
            pack(&[FIELD_SEP, 'b', 'c']),
            WORD | pack(&['x', 'y', 'z']),
            WORD | pack(&['w', 'x', 'y', 'z']),
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
