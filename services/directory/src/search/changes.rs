//! Pending posting-list changes: ranks to add to and remove from each gram's list, gathered
//! in memory and written by [`super::store::apply`].

use super::grams::{Gram, GramMap, boundary_as_sep, doc_grams, each_gram};

/// Pending changes to the posting lists: ranks to add to and remove from each gram's list.
#[derive(Default)]
pub struct Changes {
    pub(super) adds: GramMap<Vec<i64>>,
    pub(super) removes: GramMap<Vec<i64>>,
}

impl Changes {
    pub fn add(&mut self, rank: i64, grams: &[Gram]) {
        for g in grams {
            self.adds.entry(*g).or_default().push(rank);
        }
    }

    /// Adds the grams of many documents (`(rank, search_doc)`) at once. Each list is allocated
    /// once at its final length: grown a rank at a time, the tens of thousands of lists of a
    /// bulk load kept the allocator busier than SQLite. Lists come out ascending when the
    /// ranks do ([`apply`] sorts them either way).
    pub fn add_docs<'a>(&mut self, docs: impl IntoIterator<Item = (i64, &'a str)>) {
        // First every document's grams as indexes into `grams`, counted; then the lists.
        let mut index: GramMap<usize> = GramMap::default();
        let mut grams: Vec<Gram> = Vec::new();
        let mut lens: Vec<usize> = Vec::new();
        let mut flat: Vec<u32> = Vec::new();
        let mut ends: Vec<(i64, usize)> = Vec::new();
        let (mut text, mut chars) = (Vec::new(), Vec::new());
        for (rank, doc) in docs {
            text.clear();
            text.extend(doc.chars());
            chars.clear();
            chars.extend(text.iter().copied().map(boundary_as_sep));
            // A gram twice in a document is listed twice here ([`apply`] drops the repeat).
            each_gram(&text, &chars, |g| {
                let i = *index.entry(g).or_insert_with(|| {
                    grams.push(g);
                    lens.push(0);
                    grams.len() - 1
                });
                lens[i] += 1;
                // Fewer distinct grams than `u32::MAX` (each takes a hash map entry).
                flat.push(u32::try_from(i).unwrap_or(u32::MAX));
            });
            ends.push((rank, flat.len()));
        }
        drop(index);
        let mut lists: Vec<Vec<i64>> = grams
            .iter()
            .zip(&lens)
            .map(|(g, n)| {
                let mut list = self.adds.remove(g).unwrap_or_default();
                list.reserve_exact(*n);
                list
            })
            .collect();
        let mut start = 0;
        for (rank, end) in ends {
            for i in &flat[start..end] {
                if let Some(list) = lists.get_mut(*i as usize) {
                    list.push(rank);
                }
            }
            start = end;
        }
        self.adds.extend(grams.into_iter().zip(lists));
    }

    /// Takes in the changes of `other` too.
    pub fn merge(&mut self, other: Changes) {
        for (mine, theirs) in [
            (&mut self.adds, other.adds),
            (&mut self.removes, other.removes),
        ] {
            for (g, ranks) in theirs {
                mine.entry(g).or_default().extend(ranks);
            }
        }
    }

    pub fn remove(&mut self, rank: i64, grams: &[Gram]) {
        for g in grams {
            self.removes.entry(*g).or_default().push(rank);
        }
    }

    /// A user's document and rank changed from `old` to `new` (only the difference when the
    /// rank stays).
    pub fn replace(&mut self, old: (i64, &str), new: (i64, &str)) {
        let (before, after) = (doc_grams(old.1), doc_grams(new.1));
        if old.0 == new.0 {
            let gone: Vec<Gram> = before
                .iter()
                .filter(|g| after.binary_search(g).is_err())
                .copied()
                .collect();
            let added: Vec<Gram> = after
                .iter()
                .filter(|g| before.binary_search(g).is_err())
                .copied()
                .collect();
            self.remove(old.0, &gone);
            self.add(new.0, &added);
        } else {
            self.remove(old.0, &before);
            self.add(new.0, &after);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::normalize;
    use crate::search::grams::pack;

    /// The bulk path gives every document the same grams as [`doc_grams`] (spans included).
    #[test]
    fn bulk_and_single_documents_agree() {
        let docs = [
            (
                7,
                normalize::search_doc("Søren Ström", "sstrom", "soren.strom@example.com", &[]),
            ),
            (
                9,
                normalize::search_doc("Jan van Doe", "jdoe", "jan.doe@x.org", &["SC 12-34".into()]),
            ),
        ];
        let mut bulk = Changes::default();
        bulk.add_docs(docs.iter().map(|(r, d)| (*r, d.as_str())));
        let mut single = Changes::default();
        for (r, d) in &docs {
            single.add(*r, &doc_grams(d));
        }
        let lists = |c: Changes| -> BTreeMap<Gram, Vec<i64>> {
            c.adds
                .into_iter()
                .map(|(g, mut ranks)| {
                    ranks.sort_unstable();
                    ranks.dedup();
                    (g, ranks)
                })
                .collect()
        };
        let (bulk, single) = (lists(bulk), lists(single));
        assert!(bulk.contains_key(&pack(&['e', 'n', '.', 's'])));
        assert_eq!(bulk, single);
    }
}
