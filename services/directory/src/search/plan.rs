//! The query plan: which of a query's lists a search reads, and their intersection.

use super::grams::{Gram, GramMap, WORD, extent, grams_in_order};

/// Most lists a search intersects, and how much longer than the rarest of the query's lists
/// another may be and still be read (the word-start gram of a prefix search, which the search
/// depends on, up to `WORD_SPREAD`). Reading a list costs a window's share of its chunks;
/// a candidate that a list would have ruled out costs a user row read and checked, far more.
const SEARCH_LISTS: usize = 4;
const SEARCH_SPREAD: i64 = 16;
const WORD_SPREAD: i64 = 32;

/// The lists a search for folded `q` in `tier` reads, given each list's length (absent:
/// empty). Grams that overlap in the query occur together (in the same words) and rule out
/// little besides each other, and a character of the query that no list covers is not looked
/// for at all. So after the rarest word-start gram of a prefix search, the rarest grams are
/// taken that cover at least two characters not yet covered, then those that cover one, then
/// the rarest others. Lists already `known` (read in full by an earlier tier of the search)
/// cost nothing: they are all taken first, and only lists that cover more are added to them.
/// Empty when some gram has no list: nothing matches.
pub fn lists_to_read(q: &str, tier: u8, counts: &GramMap<i64>, known: &[Gram]) -> Lists {
    let len = |g: &Gram| counts.get(g).copied().unwrap_or(0);
    let ordered = grams_in_order(q, tier);
    let mut sized: Vec<(i64, usize, Gram)> = Vec::with_capacity(ordered.len());
    for (at, g) in ordered {
        if !sized.iter().any(|(_, _, s)| *s == g) {
            sized.push((len(&g), at, g));
        }
    }
    sized.sort_unstable();
    let Some(rarest) = sized.first().map(|(n, _, _)| *n).filter(|n| *n > 0) else {
        return Lists::default();
    };
    let within: Vec<(usize, Gram)> = sized
        .iter()
        .filter(|(n, _, _)| *n <= rarest.saturating_mul(SEARCH_SPREAD))
        .map(|(_, at, g)| (*at, *g))
        .collect();
    let word = sized
        .iter()
        .find(|(n, _, g)| g & WORD != 0 && *n <= rarest.saturating_mul(WORD_SPREAD))
        .map(|(_, at, g)| (*at, *g));
    let reach = |(at, g): (usize, Gram)| at..at + extent(g);
    // A gram within the characters of a chosen one is in every document that one is in.
    let implied = |chosen: &[(usize, Gram)], gram: (usize, Gram)| {
        let r = reach(gram);
        chosen.iter().any(|c| {
            let c = reach(*c);
            c.start <= r.start && r.end <= c.end
        })
    };
    let mut covered = vec![false; q.chars().count() + 2];
    let mut chosen: Vec<(usize, Gram)> = Vec::with_capacity(SEARCH_LISTS + known.len());
    let mut take = |gram: (usize, Gram), least_new: usize, free: bool| {
        let span = reach(gram).start..reach(gram).end.min(covered.len());
        let new = covered[span.clone()].iter().filter(|c| !**c).count();
        let room = chosen.len() < SEARCH_LISTS + known.len();
        let fresh = !chosen.iter().any(|(_, g)| *g == gram.1) && !implied(&chosen, gram);
        if fresh && (free || room && new >= least_new) {
            covered[span].iter_mut().for_each(|c| *c = true);
            chosen.push(gram);
        }
    };
    for (_, at, g) in sized.iter().filter(|(_, _, g)| known.contains(g)) {
        take((*at, *g), 0, true);
    }
    if let Some(word) = word {
        take(word, 0, false);
    }
    let passes: &[usize] = if known.is_empty() {
        &[2, 1, 0]
    } else {
        &[2, 1]
    };
    for least_new in passes {
        for gram in &within {
            take(*gram, *least_new, false);
        }
    }
    let spare = sized
        .iter()
        .map(|(_, at, g)| (*at, *g))
        .filter(|gram| !chosen.contains(gram) && !implied(&chosen, *gram))
        .map(|(_, g)| g)
        .collect();
    Lists {
        read: chosen.into_iter().map(|(_, g)| g).collect(),
        spare,
    }
}

/// The lists a search reads ([`lists_to_read`]), and those it may add when its candidates turn
/// out to be mostly not matches, rarest first.
#[derive(Debug, Default)]
pub struct Lists {
    pub read: Vec<Gram>,
    pub spare: Vec<Gram>,
}

/// The ranks in every one of `lists` (each ascending), ascending.
pub fn intersect(mut lists: Vec<&[i64]>) -> Vec<i64> {
    lists.sort_by_key(|l| l.len());
    let Some((first, rest)) = lists.split_first() else {
        return Vec::new();
    };
    let mut cursors = vec![0usize; rest.len()];
    let mut out = Vec::new();
    'next: for r in *first {
        for (list, at) in rest.iter().zip(cursors.iter_mut()) {
            *at += skip_below(&list[*at..], *r);
            if list.get(*at) != Some(r) {
                continue 'next;
            }
        }
        out.push(*r);
    }
    out
}

/// How many ranks at the start of `list` (ascending) are below `r`, by galloping: steps of
/// 1, 2, 4, … then a binary search within the last step. Lists of similar length advance a
/// few ranks per step, where a binary search over the whole rest cost its logarithm every
/// time (most of an intersection's time for lists of thousands).
fn skip_below(list: &[i64], r: i64) -> usize {
    let mut bound = 1;
    while bound < list.len() && list[bound] < r {
        bound *= 2;
    }
    let from = bound / 2;
    let to = (bound + 1).min(list.len());
    from + list[from..to].partition_point(|x| *x < r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::{self, FIELD_SEP};
    use crate::search::grams::{doc_grams, gram_of_text, gram_text, pack, query_grams, span_grams};

    #[test]
    fn intersections_are_those_of_sets() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        for _ in 0..200 {
            let lists: Vec<Vec<i64>> = (0..1 + next() % 4)
                .map(|_| {
                    let density = 1 + next() % 8;
                    let mut l: Vec<i64> = (0..2_000).filter(|_| next() % density == 0).collect();
                    l.dedup();
                    l
                })
                .collect();
            let expected: Vec<i64> = lists[0]
                .iter()
                .filter(|r| lists.iter().all(|l| l.binary_search(r).is_ok()))
                .copied()
                .collect();
            assert_eq!(
                intersect(lists.iter().map(Vec::as_slice).collect()),
                expected
            );
        }
        assert!(intersect(Vec::new()).is_empty());
        assert_eq!(intersect(vec![&[1, 5, 9], &[]]), Vec::<i64>::new());
        for r in [0, 1, 2, 5, 8, 9, 10] {
            let list = [1, 2, 2, 5, 9];
            assert_eq!(
                skip_below(&list, r),
                list.partition_point(|x| *x < r),
                "{r}"
            );
        }
    }

    #[test]
    fn grams_across_word_boundaries() {
        let soren = normalize::search_doc("Søren Ström", "sstrom", "soren.strom@example.com", &[]);
        let jan = normalize::search_doc("Jan Ström", "jstrom", "jan.strom@example.com", &[]);
        let (soren, jan) = (doc_grams(&soren), doc_grams(&jan));
        let en_strom = pack(&['e', 'n', '.', 's']);
        assert!(query_grams("en.strom", 1).contains(&en_strom));
        assert!(query_grams("en.strom", 1).iter().all(|g| soren.contains(g)));
        // The three character grams of "en.strom" are all in "jan ström" (with "karen" or
        // any other "…en" word elsewhere), the span is not.
        assert!(!jan.contains(&en_strom));
        assert_eq!(gram_of_text(&gram_text(en_strom)), Some(en_strom));
        // A boundary two characters after another is a word start gram (".a.b"), not a span.
        let grams = query_grams("xy.a.bc", 1);
        assert!(grams.contains(&pack(&['x', 'y', '.', 'a'])));
        assert!(!grams.contains(&pack(&['.', 'a', '.', 'b'])));
        // Only the spans, for adding them to an index built without them.
        let spans = span_grams("soren.strom");
        assert_eq!(spans, vec![en_strom]);
        // Spans keep the boundary as it is: "en s" of a display name is not "en.s".
        let karen = normalize::search_doc("Karen Strom", "kstrom", "ks@example.com", &[]);
        assert!(!doc_grams(&karen).contains(&en_strom));

        // The lists cover the query: "ly.s" is the rarest, but only "␟st" has its last "t".
        let counts = |q: &str, rare: Gram| -> GramMap<i64> {
            query_grams(q, 1)
                .into_iter()
                .map(|g| {
                    (
                        g,
                        if g == rare {
                            3_000
                        } else {
                            15_000 + (g % 1_000) as i64
                        },
                    )
                })
                .collect()
        };
        let ly_s = pack(&['l', 'y', '.', 's']);
        let lists = lists_to_read("berly.st", 1, &counts("berly.st", ly_s), &[]).read;
        assert_eq!(lists[0], ly_s);
        assert!(lists.contains(&pack(&[FIELD_SEP, 's', 't'])), "{lists:?}");
        assert!(lists.len() <= SEARCH_LISTS);
        // A gram without a list: nothing matches.
        let mut none = counts("berly.st", ly_s);
        none.remove(&ly_s);
        assert!(lists_to_read("berly.st", 1, &none, &[]).read.is_empty());
        // Lists read already are all taken, and fresh ones only for what they leave out.
        let (rly, erl) = (pack(&['r', 'l', 'y']), pack(&['e', 'r', 'l']));
        let known = [ly_s, rly, erl];
        let lists = lists_to_read("berly.st", 1, &counts("berly.st", ly_s), &known).read;
        assert!(known.iter().all(|g| lists[..3].contains(g)), "{lists:?}");
        assert!(lists.contains(&pack(&[FIELD_SEP, 's', 't'])), "{lists:?}");
        // "y.s" is in every document with "ly.s": never read beside it, nor spare.
        let y_s = pack(&['y', FIELD_SEP, 's']);
        let all = query_grams("berly.st", 1);
        let lists = lists_to_read("berly.st", 1, &counts("berly.st", ly_s), &all).read;
        assert!(lists.contains(&ly_s) && !lists.contains(&y_s), "{lists:?}");
        let choice = lists_to_read("berly.st", 1, &counts("berly.st", ly_s), &[]);
        assert!(!choice.read.contains(&y_s) && !choice.spare.contains(&y_s));
        assert!(choice.spare.iter().all(|g| !choice.read.contains(g)));
    }
}
