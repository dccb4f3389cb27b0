//! The index of the helpdesk search: users in page order, and which users have which grams.
//!
//! * `users.sort_rank`: a sparse number per user whose order is the page order (display key,
//!   username key, id). A new user takes a number between its neighbours'; where there is no
//!   room left, a few neighbours are renumbered ([`place`]).
//! * `search_postings`: for each gram of the search documents (three characters in a row, a
//!   word start and its first one, three or four characters, where word boundaries all count
//!   as one character; or a word boundary as it is, with two characters before and one after
//!   it; see [`doc_grams`]) the sort ranks of the users that have it, ascending, in
//!   chunks of a few hundred delta-coded ranks; `search_grams` holds how many users have each
//!   gram.
//!
//! A search takes the rarest grams of the query, intersects their lists a window of ranks at a
//! time from where the page starts, and checks those candidates against the text itself. The
//! candidates come in page order, so it reads about a page of users whatever the number of
//! matches, and the rarest list bounds the work when matches are few.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend,
    IsolationLevel, SqliteTransactionMode, TransactionOptions, TransactionTrait, Value,
};

use crate::Error;
use crate::normalize::{self, FIELD_SEP};
use crate::util::Sql;

/// Sort ranks are in `1..SPACE`.
pub const SPACE: i64 = 1 << 48;
/// The gap left between neighbours when there is room to spare (appending, bulk loads).
const STEP: i64 = 1 << 24;
/// The least gap between neighbours a renumbering leaves.
const RELABEL_GAP: i64 = 1 << 12;
/// Neighbours on each side first renumbered with a user that finds no room.
const RELABEL_FIRST: usize = 8;
/// Most bytes of delta-coded ranks in a chunk; a fuller chunk is split into chunks of about
/// `CHUNK_FILL`. Searches pay mostly per row read, so chunks are as large as a row can be
/// while PostgreSQL still keeps it inline (about 2 KiB; larger values go to TOAST, a second
/// lookup each). On SQLite (4 KiB pages) such a row spills into an overflow page of its own,
/// mostly empty, which imports write too; chunks under 1,000 bytes stay whole in the B-tree
/// page, but searches that read whole lists (exact card serials) read twice the rows, and
/// were a third slower (p99 11.3 against 6.4 ms on 1,000,000 users), for an import 10% faster.
const CHUNK_MAX: usize = 1_900;
const CHUNK_FILL: usize = 1_300;
/// Grams whose lists are changed per round of statements.
const GRAM_BATCH: usize = 4_096;
/// Rows per multi-row INSERT (4 parameters each).
const INSERT_ROWS: usize = 1_000;
/// Keys placed per lookup statement.
const PLACE_BATCH: usize = 500;

/// A gram: up to four characters, 21 bits each, first character highest (`NO_CHAR` for the
/// missing ones), and the top bit for a word start before them (`WORD`).
pub type Gram = u128;
const NO_CHAR: u128 = 0x1F_FFFF;
const WORD: Gram = 1 << 127;
const SLOTS: usize = 4;

fn pack(chars: &[char]) -> Gram {
    (0..SLOTS).fold(0, |g, i| {
        (g << 21) | chars.get(i).map_or(NO_CHAR, |c| u128::from(u32::from(*c)))
    })
}

fn gram_text(g: Gram) -> String {
    let word = (g & WORD != 0).then_some(FIELD_SEP);
    let chars = (0..SLOTS)
        .rev()
        .map(|i| (g >> (21 * i)) & NO_CHAR)
        .filter(|c| *c != NO_CHAR)
        .filter_map(|c| char::from_u32(u32::try_from(c).ok()?));
    word.into_iter().chain(chars).collect()
}

fn gram_of_text(text: &str) -> Option<Gram> {
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
fn boundary_as_sep(c: char) -> char {
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
fn each_gram(text: &[char], m: &[char], mut f: impl FnMut(Gram)) {
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
fn span_grams(search_doc: &str) -> Vec<Gram> {
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
fn grams_in_order(q: &str, tier: u8) -> Vec<(usize, Gram)> {
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
fn extent(g: Gram) -> usize {
    let chars = (0..SLOTS)
        .filter(|i| (g >> (21 * i)) & NO_CHAR != NO_CHAR)
        .count();
    chars + usize::from(g & WORD != 0)
}

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

/// Bytes of the LEB128 form of `d`.
fn delta_len(d: i64) -> usize {
    let bits = 64 - u64::try_from(d).unwrap_or(0).leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// `ranks` (ascending) after the first, as LEB128 deltas.
fn encode(ranks: &[i64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ranks.len() * 4);
    for w in ranks.windows(2) {
        let mut d = u64::try_from(w[1] - w[0]).unwrap_or(0);
        loop {
            let byte = (d & 0x7f) as u8;
            d >>= 7;
            if d == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
    }
    out
}

fn decode(lo: i64, data: &[u8]) -> Vec<i64> {
    let mut out = Vec::with_capacity(data.len() / 3 + 1);
    decode_into(lo, data, i64::MIN..i64::MAX, &mut out);
    out
}

/// Appends the ranks of the chunk starting at `lo` that are in `range` to `out` (ascending).
fn decode_into(lo: i64, data: &[u8], range: std::ops::Range<i64>, out: &mut Vec<i64>) {
    if range.contains(&lo) {
        out.push(lo);
    }
    let (mut value, mut shift, mut last) = (0u64, 0u32, lo);
    for byte in data {
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            last += i64::try_from(value).unwrap_or(0);
            if last >= range.end {
                return;
            }
            if last >= range.start {
                out.push(last);
            }
            (value, shift) = (0, 0);
        } else {
            shift += 7;
        }
    }
}

/// `ranks` (ascending) cut into chunks: one when it fits in `CHUNK_MAX` bytes, else chunks of
/// about `CHUNK_FILL` (room to grow before the next split).
fn pieces(ranks: Vec<i64>) -> Vec<Vec<i64>> {
    let size: usize = ranks.windows(2).map(|w| delta_len(w[1] - w[0])).sum();
    if size <= CHUNK_MAX {
        return vec![ranks];
    }
    let mut out = Vec::with_capacity(size / CHUNK_FILL + 1);
    let mut piece: Vec<i64> = Vec::new();
    let mut bytes = 0;
    for r in ranks {
        if let Some(last) = piece.last() {
            let d = delta_len(r - last);
            if bytes + d > CHUNK_FILL {
                out.push(std::mem::take(&mut piece));
                bytes = 0;
            } else {
                bytes += d;
            }
        }
        piece.push(r);
    }
    out.push(piece);
    out
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

/// A JSON array parameter (read with `json_each` / `jsonb_array_elements`).
fn json(value: serde_json::Value) -> Value {
    Value::from(value.to_string())
}

fn pg(db: &impl ConnectionTrait) -> bool {
    db.get_database_backend() == DbBackend::Postgres
}

/// Begins a transaction that changes users' search documents or sort ranks: on SQLite one
/// that takes the write lock at once (two that first read, then write, would deadlock), on
/// PostgreSQL one holding the index's advisory lock, so that such writers take turns. Either
/// waits for the lock as long as SQLite's busy timeout, then fails as busy.
pub async fn write_txn(db: &DatabaseConnection) -> Result<DatabaseTransaction, Error> {
    if pg(db) {
        let txn = db.begin().await?;
        txn.execute_unprepared(LOCK_TIMEOUT).await?;
        let key = cms_kit::db::advisory_lock_key("cms-directory/search-index");
        let mut sql = Sql::new(DbBackend::Postgres);
        sql.push("SELECT pg_advisory_xact_lock(")
            .bind(key)
            .push(")");
        txn.execute_raw(sql.statement()).await?;
        Ok(txn)
    } else {
        Ok(db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?)
    }
}

/// After a large write (an import): on SQLite, copies the WAL into the database and truncates
/// it, so that it does not stay the size of the import until a checkpoint long after (SQLite's
/// automatic checkpoints never shrink the file). A failure is logged only: the write is done.
pub async fn checkpoint(db: &DatabaseConnection) {
    if pg(db) {
        return;
    }
    if let Err(e) = db
        .execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
        .await
    {
        tracing::warn!(error = %e, "WAL checkpoint after an import failed");
    }
}

/// How long a PostgreSQL writer waits for a lock (SQLite's busy timeout: `cms_kit::db`).
const LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '5s'";

/// Begins a transaction for a search: its statements see one snapshot.
pub async fn read_txn(db: &DatabaseConnection) -> Result<DatabaseTransaction, Error> {
    Ok(if pg(db) {
        db.begin_with_config(
            Some(IsolationLevel::RepeatableRead),
            Some(AccessMode::ReadOnly),
        )
        .await?
    } else {
        db.begin().await?
    })
}

/// Pending changes to the posting lists: ranks to add to and remove from each gram's list.
#[derive(Default)]
pub struct Changes {
    adds: GramMap<Vec<i64>>,
    removes: GramMap<Vec<i64>>,
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

/// A stored chunk of a posting list.
struct Chunk {
    lo: i64,
    ranks: Vec<i64>,
}

/// How many users have each of `grams` (absent: none).
pub async fn counts<C: ConnectionTrait>(db: &C, grams: &[Gram]) -> Result<GramMap<i64>, Error> {
    Ok(counts_and_ranks(db, grams, false).await?.0)
}

/// [`counts`] of `grams`, and the first and last sort rank (1 and 0 without users), in one
/// statement: what a search reads of the index before its first window.
pub async fn counts_and_span<C: ConnectionTrait>(
    db: &C,
    grams: &[Gram],
) -> Result<(GramMap<i64>, i64, i64), Error> {
    counts_and_ranks(db, grams, true).await
}

async fn counts_and_ranks<C: ConnectionTrait>(
    db: &C,
    grams: &[Gram],
    span: bool,
) -> Result<(GramMap<i64>, i64, i64), Error> {
    let texts: Vec<String> = grams.iter().map(|g| gram_text(*g)).collect();
    let mut sql = Sql::new(db.get_database_backend());
    if pg(db) {
        // An array built once (an InitPlan) lets the planner look each gram up in the index;
        // `IN (SELECT …)` hash-joins a scan of the whole table.
        sql.push(
            "SELECT 0 AS k, gram, n FROM search_grams WHERE gram = ANY(ARRAY(SELECT jsonb_array_elements_text(",
        )
        .bind(json(texts.into()))
        .push("::jsonb)))");
    } else {
        sql.push(
            "SELECT 0 AS k, gram, n FROM search_grams WHERE gram IN (SELECT value FROM json_each(",
        )
        .bind(json(texts.into()))
        .push("))");
    }
    if span {
        // Two subqueries: each is one index lookup (MIN and MAX together would scan).
        sql.push(
            " UNION ALL SELECT 1, NULL, COALESCE((SELECT MIN(sort_rank) FROM users WHERE sort_rank > 0), 1) \
             UNION ALL SELECT 2, NULL, COALESCE((SELECT MAX(sort_rank) FROM users), 0)",
        );
    }
    let (mut out, mut first, mut last) = (GramMap::default(), 1, 0);
    for row in db.query_all_raw(sql.statement()).await? {
        let n: i64 = row.try_get("", "n")?;
        match row.try_get::<i32>("", "k")? {
            1 => first = n,
            2 => last = n,
            _ => {
                let text: String = row.try_get("", "gram")?;
                if let Some(g) = gram_of_text(&text) {
                    out.insert(g, n);
                }
            }
        }
    }
    Ok((out, first, last))
}

/// The grams whose text starts with short query `q` (its word boundaries as one), and how many
/// users have each; `None` when `q` is empty or ends in the last character there is. Every
/// document with `q` in a field has one of them: a three-character gram starts at each
/// character, and a field is followed at least by its separator.
pub async fn grams_starting<C: ConnectionTrait>(
    db: &C,
    q: &str,
) -> Result<Option<Vec<(Gram, i64)>>, Error> {
    let low: String = q.chars().map(boundary_as_sep).collect();
    let mut chars: Vec<char> = low.chars().collect();
    let Some(next) = chars.pop().and_then(|c| char::from_u32(u32::from(c) + 1)) else {
        return Ok(None);
    };
    chars.push(next);
    let high: String = chars.into_iter().collect();
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("SELECT gram, n FROM search_grams WHERE gram >= ")
        .bind(low)
        .push(" AND gram < ")
        .bind(high);
    let mut out = Vec::new();
    for row in db.query_all_raw(sql.statement()).await? {
        let text: String = row.try_get("", "gram")?;
        if let Some(g) = gram_of_text(&text) {
            out.push((g, row.try_get::<i64>("", "n")?));
        }
    }
    Ok(Some(out))
}

/// The ranks from `from` on that are in any of the lists of `grams`, ascending and distinct.
pub async fn union_from<C: ConnectionTrait>(
    db: &C,
    grams: &[Gram],
    from: i64,
) -> Result<Vec<i64>, Error> {
    let probes: Vec<(Gram, i64, i64)> = grams.iter().map(|g| (*g, from, i64::MAX)).collect();
    let mut out: Vec<i64> = load(db, &probes)
        .await?
        .into_values()
        .flatten()
        .flat_map(|c| c.ranks)
        .filter(|r| *r >= from)
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Reads the chunks of `gram` that cover ranks `a..=b` (and the first chunk when all start
/// after `a`), for each `(gram, a, b)`.
async fn load<C: ConnectionTrait>(
    db: &C,
    probes: &[(Gram, i64, i64)],
) -> Result<GramMap<Vec<Chunk>>, Error> {
    let mut out: GramMap<Vec<Chunk>> = GramMap::default();
    for batch in probes.chunks(2_000) {
        let list: Vec<serde_json::Value> = batch
            .iter()
            .map(|(g, a, b)| serde_json::json!([gram_text(*g), a, b]))
            .collect();
        let mut sql = Sql::new(db.get_database_backend());
        if pg(db) {
            sql.push("WITH j AS (SELECT v->>0 AS g, (v->>1)::bigint AS a, (v->>2)::bigint AS b FROM jsonb_array_elements(")
                .bind(json(list.into()))
                .push("::jsonb) v), ");
        } else {
            sql.push(
                "WITH j AS (SELECT value->>0 AS g, value->>1 AS a, value->>2 AS b FROM json_each(",
            )
            .bind(json(list.into()))
            .push(")), ");
        }
        sql.push(
            "s AS (SELECT g, b, COALESCE(\
                 (SELECT MAX(lo) FROM search_postings WHERE gram = j.g AND lo <= j.a), \
                 (SELECT MIN(lo) FROM search_postings WHERE gram = j.g)) AS start FROM j) \
             SELECT p.gram, p.lo, p.data FROM s JOIN search_postings p \
             ON p.gram = s.g AND p.lo >= s.start AND p.lo <= ",
        );
        sql.push(if pg(db) {
            "GREATEST(s.b, s.start)"
        } else {
            "MAX(s.b, s.start)"
        });
        for row in db.query_all_raw(sql.statement()).await? {
            let text: String = row.try_get("", "gram")?;
            let Some(g) = gram_of_text(&text) else {
                continue;
            };
            let lo: i64 = row.try_get("", "lo")?;
            let data: Vec<u8> = row.try_get("", "data")?;
            out.entry(g).or_default().push(Chunk {
                lo,
                ranks: decode(lo, &data),
            });
        }
    }
    for chunks in out.values_mut() {
        chunks.sort_by_key(|c| c.lo);
        chunks.dedup_by_key(|c| c.lo);
    }
    Ok(out)
}

/// Users per read while filling the index.
const FILL_BATCH: i64 = 50_000;

/// Adds every ranked user's search document to the (empty) posting lists.
pub async fn fill<C: ConnectionTrait>(db: &C) -> Result<(), Error> {
    fill_with(db, |changes, docs| {
        changes.add_docs(docs.iter().map(|(rank, doc)| (*rank, doc.as_str())));
    })
    .await
}

/// Adds the span grams (see [`spans`]) of every ranked user's search document to posting
/// lists built before there were any.
pub async fn fill_spans<C: ConnectionTrait>(db: &C) -> Result<(), Error> {
    fill_with(db, |changes, docs| {
        for (rank, doc) in docs {
            changes.add(*rank, &span_grams(doc));
        }
    })
    .await
}

/// Reads every ranked user's search document, a batch at a time, and writes the posting
/// changes `add` makes of each batch.
async fn fill_with<C: ConnectionTrait>(
    db: &C,
    add: fn(&mut Changes, &[(i64, String)]),
) -> Result<(), Error> {
    let mut after = 0i64;
    loop {
        let mut sql = Sql::new(db.get_database_backend());
        sql.push("SELECT sort_rank, search_doc FROM users WHERE sort_rank > ")
            .bind(after)
            .push(" ORDER BY sort_rank LIMIT ")
            .bind(FILL_BATCH);
        let rows = db.query_all_raw(sql.statement()).await?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = last.try_get("", "sort_rank")?;
        let mut docs = Vec::with_capacity(rows.len());
        for row in &rows {
            let rank: i64 = row.try_get("", "sort_rank")?;
            let doc: String = row.try_get("", "search_doc")?;
            docs.push((rank, doc));
        }
        drop(rows);
        let mut changes = Changes::default();
        add(&mut changes, &docs);
        drop(docs);
        apply(db, changes).await?;
    }
}

/// Writes `changes` to the posting lists: each changed chunk is read, merged and written back
/// (split when it grew too large, dropped when emptied).
pub async fn apply<C: ConnectionTrait>(db: &C, changes: Changes) -> Result<(), Error> {
    let Changes {
        mut adds,
        mut removes,
    } = changes;
    let mut grams: Vec<Gram> = adds.keys().chain(removes.keys()).copied().collect();
    grams.sort_unstable();
    grams.dedup();
    // In the order of the stored keys (the gram's text), so that chunks are written in key
    // order: into an empty table that appends instead of splitting pages all over.
    grams.sort_by_cached_key(|g| gram_text(*g));
    for batch in grams.chunks(GRAM_BATCH) {
        let stored = counts(db, batch).await?;
        let mut probes = Vec::new();
        let mut work = Vec::with_capacity(batch.len());
        for g in batch {
            let mut add = adds.remove(g).unwrap_or_default();
            let mut remove = removes.remove(g).unwrap_or_default();
            add.sort_unstable();
            add.dedup();
            remove.sort_unstable();
            remove.dedup();
            if stored.get(g).is_some_and(|n| *n > 0) {
                let mut all: Vec<i64> = add.iter().chain(&remove).copied().collect();
                all.sort_unstable();
                match all.as_slice() {
                    [] => {}
                    few if few.len() <= 8 => probes.extend(few.iter().map(|r| (*g, *r, *r))),
                    many => probes.push((*g, many[0], many[many.len() - 1])),
                }
            }
            work.push((*g, add, remove));
        }
        let mut loaded = load(db, &probes).await?;
        let mut deletes: Vec<(Gram, i64)> = Vec::new();
        let mut inserts: Vec<(Gram, Vec<i64>)> = Vec::new();
        let mut deltas: Vec<(Gram, i64)> = Vec::new();
        for (g, add, remove) in work {
            let chunks = loaded.remove(&g).unwrap_or_default();
            if chunks.is_empty() {
                // Nothing stored yet (removing what is not there changes nothing).
                if !add.is_empty() {
                    deltas.push((g, add.len() as i64));
                    inserts.extend(pieces(add).into_iter().map(|p| (g, p)));
                }
                continue;
            }
            // Each change goes to the chunk with the greatest start at or before it (the first
            // chunk for ranks before every chunk).
            let target = |r: &i64| chunks.partition_point(|c| c.lo <= *r).saturating_sub(1);
            let mut groups: BTreeMap<usize, (Vec<i64>, Vec<i64>)> = BTreeMap::new();
            for r in &add {
                groups.entry(target(r)).or_default().0.push(*r);
            }
            for r in &remove {
                groups.entry(target(r)).or_default().1.push(*r);
            }
            let mut delta = 0i64;
            for (i, (add, remove)) in groups {
                let chunk = &chunks[i];
                let before = chunk.ranks.len();
                let kept: Vec<i64> = chunk
                    .ranks
                    .iter()
                    .copied()
                    .filter(|r| remove.binary_search(r).is_err())
                    .collect();
                let mut merged = kept;
                merged.extend(add);
                merged.sort_unstable();
                merged.dedup();
                delta += merged.len() as i64 - before as i64;
                deletes.push((g, chunk.lo));
                if !merged.is_empty() {
                    inserts.extend(pieces(merged).into_iter().map(|p| (g, p)));
                }
            }
            deltas.push((g, delta));
        }
        write(db, &deletes, &inserts, &deltas).await?;
    }
    Ok(())
}

async fn write<C: ConnectionTrait>(
    db: &C,
    deletes: &[(Gram, i64)],
    inserts: &[(Gram, Vec<i64>)],
    deltas: &[(Gram, i64)],
) -> Result<(), Error> {
    let backend = db.get_database_backend();
    for batch in deletes.chunks(5_000) {
        let list: Vec<serde_json::Value> = batch
            .iter()
            .map(|(g, lo)| serde_json::json!([gram_text(*g), lo]))
            .collect();
        let mut sql = Sql::new(backend);
        if pg(db) {
            sql.push("DELETE FROM search_postings p USING jsonb_array_elements(")
                .bind(json(list.into()))
                .push("::jsonb) v WHERE p.gram = v->>0 AND p.lo = (v->>1)::bigint");
        } else {
            sql.push("DELETE FROM search_postings WHERE (gram, lo) IN (SELECT value->>0, value->>1 FROM json_each(")
                .bind(json(list.into()))
                .push("))");
        }
        db.execute_raw(sql.statement()).await?;
    }
    let statements = inserts.chunks(INSERT_ROWS).map(|batch| {
        let mut sql = Sql::new(backend);
        sql.push("INSERT INTO search_postings (gram, lo, n, data) VALUES ");
        for (i, (g, ranks)) in batch.iter().enumerate() {
            let row: [Value; 4] = [
                gram_text(*g).into(),
                ranks[0].into(),
                (ranks.len() as i64).into(),
                encode(ranks).into(),
            ];
            sql.tuple(i == 0, row);
        }
        sql.statement()
    });
    run_overlapped(db, statements, &mut |_| {}).await?;
    let deltas: Vec<&(Gram, i64)> = deltas.iter().filter(|(_, d)| *d != 0).collect();
    for batch in deltas.chunks(INSERT_ROWS) {
        let mut sql = Sql::new(backend);
        sql.push("INSERT INTO search_grams (gram, n) VALUES ");
        for (i, (g, d)) in batch.iter().enumerate() {
            sql.tuple(i == 0, [gram_text(*g).into(), (*d).into()]);
        }
        sql.push(" ON CONFLICT (gram) DO UPDATE SET n = search_grams.n + excluded.n");
        db.execute_raw(sql.statement()).await?;
    }
    Ok(())
}

/// Runs `statements` in turn, each built (by the iterator) while the database runs the one
/// before: the CPU work of the next statement overlaps with SQLite's (on its own thread) or
/// PostgreSQL's. `ran` gets how many have run after each.
pub(crate) async fn run_overlapped<C: ConnectionTrait>(
    db: &C,
    mut statements: impl Iterator<Item = sea_orm::Statement> + Send,
    ran: &mut (dyn FnMut(usize) + Send),
) -> Result<(), Error> {
    let mut next = statements.next();
    let mut count = 0;
    while let Some(current) = next {
        let (done, following) =
            futures_util::future::join(db.execute_raw(current), async { statements.next() }).await;
        done?;
        count += 1;
        ran(count);
        next = following;
    }
    Ok(())
}

/// The ranks of each list of `grams` from `a` on, ascending, and where they end: after
/// `chunks` chunks of `rarest`'s list (the one holding `a` the first), or at `end`. So a
/// window holds about as many ranks of the rarest list wherever those are dense or sparse in
/// page order (the users who match a query often share a first name, so they cluster).
pub async fn window<C: ConnectionTrait>(
    db: &C,
    grams: &[Gram],
    rarest: Gram,
    a: i64,
    chunks: i64,
    end: i64,
) -> Result<(GramMap<Vec<i64>>, i64), Error> {
    let texts: HashMap<String, Gram> = grams.iter().map(|g| (gram_text(*g), *g)).collect();
    let mut sql = Sql::new(db.get_database_backend());
    // Where each list's window starts (the chunk holding `a`) is found first, once per gram:
    // as a condition of the join it was evaluated for every chunk before it, so each window
    // re-read its lists from their beginning.
    let (open, close) = if pg(db) {
        ("jsonb_array_elements_text(", "::jsonb) g(value)")
    } else {
        ("json_each(", ") g")
    };
    sql.push(
        "WITH s AS MATERIALIZED (SELECT g.value AS g, COALESCE((SELECT MAX(x.lo) \
              FROM search_postings x WHERE x.gram = g.value AND x.lo <= ",
    )
    .bind(a)
    .push("), ")
    .bind(a)
    .push(") AS start FROM ")
    .push(open)
    .bind(json(texts.keys().cloned().collect::<Vec<_>>().into()))
    .push(close)
    .push(
        "), e AS MATERIALIZED (SELECT COALESCE((SELECT x.lo FROM search_postings x WHERE x.gram = ",
    )
    .bind(gram_text(rarest))
    .push(" AND x.lo > ")
    .bind(a)
    // The chunk holding `a` counts as the first; when `a` is before the list's first chunk,
    // that one does (else the window would hold none of the list).
    .push(" ORDER BY x.lo LIMIT 1 OFFSET (")
    .bind(chunks.saturating_sub(1).max(0))
    .push(" + CASE WHEN EXISTS (SELECT 1 FROM search_postings y WHERE y.gram = ")
    .bind(gram_text(rarest))
    .push(" AND y.lo <= ")
    .bind(a)
    .push(") THEN 0 ELSE 1 END)), ")
    .bind(end)
    .push(") AS b) ");
    // The end in a row of its own, and the chunks.
    sql.push(
        "SELECT NULL AS gram, NULL AS lo, NULL AS data, e.b FROM e UNION ALL \
         SELECT p.gram, p.lo, p.data, NULL FROM e CROSS JOIN s \
         JOIN search_postings p ON p.gram = s.g AND p.lo >= s.start AND p.lo < e.b",
    );
    let rows = db.query_all_raw(sql.statement()).await?;
    let mut b = end;
    for row in &rows {
        if let Some(to) = row.try_get::<Option<i64>>("", "b")? {
            b = to;
        }
    }
    let mut lists: GramMap<Vec<i64>> = GramMap::default();
    for row in &rows {
        let Some(text) = row.try_get::<Option<String>>("", "gram")? else {
            continue;
        };
        let Some(gram) = texts.get(&text) else {
            continue;
        };
        let lo: i64 = row.try_get("", "lo")?;
        let data: Vec<u8> = row.try_get("", "data")?;
        decode_into(lo, &data, a..b, lists.entry(*gram).or_default());
    }
    for list in lists.values_mut() {
        list.sort_unstable();
    }
    Ok((lists, b))
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
            *at += list[*at..].partition_point(|x| x < r);
            if list.get(*at) != Some(r) {
                continue 'next;
            }
        }
        out.push(*r);
    }
    out
}

/// The position of a user in page order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub display: String,
    pub username: String,
    pub id: String,
}

/// Ranks for users with `keys` (ascending, none of them yet ranked), in order: each between
/// the ranks of its neighbours in page order. Where a gap is too small, the users around it
/// are renumbered (with their postings moved through `changes`).
pub async fn place<C: ConnectionTrait>(
    db: &C,
    keys: &[Key],
    changes: &mut Changes,
) -> Result<Vec<i64>, Error> {
    let gaps = neighbours(db, keys).await?;
    let mut ranks = vec![0i64; keys.len()];
    let mut crowded = Vec::new();
    let mut i = 0;
    while i < keys.len() {
        let j = i + gaps[i..].iter().take_while(|g| **g == gaps[i]).count();
        match spread(gaps[i], j - i) {
            Some(assigned) => ranks[i..j].copy_from_slice(&assigned),
            None => crowded.push(i),
        }
        i = j;
    }
    let mut done = vec![false; keys.len()];
    for start in crowded {
        if !done[start] {
            relabel(db, &gaps, start, &mut ranks, &mut done, changes).await?;
        }
    }
    Ok(ranks)
}

/// The ranks of the ranked users just before and after each key (`None`: no such user).
async fn neighbours<C: ConnectionTrait>(
    db: &C,
    keys: &[Key],
) -> Result<Vec<(Option<i64>, Option<i64>)>, Error> {
    let mut out = Vec::with_capacity(keys.len());
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("SELECT EXISTS (SELECT 1 FROM users WHERE sort_rank > 0) AS ranked");
    let ranked = match db.query_one_raw(sql.statement()).await? {
        Some(row) => row.try_get::<bool>("", "ranked")?,
        None => false,
    };
    if !ranked {
        out.resize(keys.len(), (None, None));
        return Ok(out);
    }
    for batch in keys.chunks(PLACE_BATCH) {
        let list: Vec<serde_json::Value> = batch
            .iter()
            .map(|k| serde_json::json!([k.display, k.username, k.id]))
            .collect();
        let mut sql = Sql::new(db.get_database_backend());
        let (a, b, c) = if pg(db) {
            ("v->>0", "v->>1", "v->>2")
        } else {
            ("j.value->>0", "j.value->>1", "j.value->>2")
        };
        let side = |op: &str, dir: &str| {
            format!(
                "(SELECT u.sort_rank FROM users u WHERE (u.display_key, u.username_key, u.id) {op} ({a}, {b}, {c}) \
                 AND u.sort_rank > 0 ORDER BY u.display_key {dir}, u.username_key {dir}, u.id {dir} LIMIT 1)"
            )
        };
        sql.push(&format!(
            "SELECT {} AS pred, {} AS succ FROM ",
            side("<", "DESC"),
            side(">", "ASC")
        ));
        if pg(db) {
            sql.push("jsonb_array_elements(")
                .bind(json(list.into()))
                .push("::jsonb) WITH ORDINALITY AS t(v, i) ORDER BY i");
        } else {
            sql.push("json_each(")
                .bind(json(list.into()))
                .push(") j ORDER BY j.key");
        }
        for row in db.query_all_raw(sql.statement()).await? {
            out.push((
                row.try_get::<Option<i64>>("", "pred")?,
                row.try_get::<Option<i64>>("", "succ")?,
            ));
        }
    }
    if out.len() != keys.len() {
        return Err(Error::Internal(
            "search index: lost keys while placing users".into(),
        ));
    }
    Ok(out)
}

/// `m` ranks in the gap between `pred` and `succ`, evenly spread (at most `STEP` apart at the
/// ends), or `None` when they do not fit.
fn spread((pred, succ): (Option<i64>, Option<i64>), m: usize) -> Option<Vec<i64>> {
    let m = i64::try_from(m).ok()?;
    let (lo, hi) = (pred.unwrap_or(0), succ.unwrap_or(SPACE));
    let mut step = (hi - lo) / (m + 1);
    if pred.is_none() || succ.is_none() {
        step = step.min(STEP);
    }
    if step < 1 {
        return None;
    }
    let first = match (pred, succ) {
        (None, None) => (SPACE - step * (m - 1)) / 2,
        (None, Some(_)) => hi - step * m,
        (Some(_), _) => lo + step,
    };
    Some((0..m).map(|j| first + step * j).collect())
}

/// `n` ranks evenly apart (`STEP`, or less when that does not fit), around the middle.
pub fn even_ranks(n: usize) -> Vec<i64> {
    spread((None, None), n).unwrap_or_default()
}

struct Ranked {
    num: i64,
    rank: i64,
    doc: String,
}

async fn ranked_side<C: ConnectionTrait>(
    db: &C,
    from: i64,
    before: bool,
    limit: usize,
) -> Result<Vec<Ranked>, Error> {
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("SELECT num, sort_rank, search_doc FROM users WHERE sort_rank > 0 AND sort_rank ")
        .push(if before { "<= " } else { ">= " })
        .bind(from)
        .push(" ORDER BY sort_rank ")
        .push(if before { "DESC" } else { "ASC" })
        .push(" LIMIT ")
        .bind(limit as i64);
    let mut out = Vec::new();
    for row in db.query_all_raw(sql.statement()).await? {
        out.push(Ranked {
            num: row.try_get("", "num")?,
            rank: row.try_get("", "sort_rank")?,
            doc: row.try_get("", "search_doc")?,
        });
    }
    Ok(out)
}

/// Renumbers the ranked users around the gap of `keys[start]`, with every pending key whose
/// gap lies among them, evenly; widens the window until the gaps are at least `RELABEL_GAP`.
async fn relabel<C: ConnectionTrait>(
    db: &C,
    gaps: &[(Option<i64>, Option<i64>)],
    start: usize,
    ranks: &mut [i64],
    done: &mut [bool],
    changes: &mut Changes,
) -> Result<(), Error> {
    let (pred, succ) = gaps[start];
    let mut k = RELABEL_FIRST;
    loop {
        let mut left = match pred {
            Some(p) => ranked_side(db, p, true, k + 1).await?,
            None => Vec::new(),
        };
        let mut right = match succ {
            Some(s) => ranked_side(db, s, false, k + 1).await?,
            None => Vec::new(),
        };
        let lo = if left.len() > k {
            left.pop().map_or(0, |r| r.rank)
        } else {
            0
        };
        let hi = if right.len() > k {
            right.pop().map_or(SPACE, |r| r.rank)
        } else {
            SPACE
        };
        left.reverse();
        let members: Vec<Ranked> = left.into_iter().chain(right).collect();
        // Pending keys in this window, by the rank of the user after their gap.
        let inside: Vec<usize> = (0..gaps.len())
            .filter(|i| {
                let (p, s) = gaps[*i];
                p.unwrap_or(0) >= lo && s.unwrap_or(SPACE) <= hi
            })
            .collect();
        let total = (members.len() + inside.len()) as i64;
        let step = (hi - lo) / (total + 1);
        let everything = lo == 0 && hi == SPACE;
        if step < RELABEL_GAP && !(everything && step >= 1) {
            if everything {
                return Err(Error::Internal("search index: no sort ranks left".into()));
            }
            k *= 4;
            continue;
        }
        // Page order: before each ranked user, the pending keys of the gap it closes; the
        // keys of the last gap (up to `hi`) after them all.
        let mut next = lo;
        let mut moved = Vec::with_capacity(members.len());
        let mut pending = inside.into_iter().peekable();
        for m in &members {
            while let Some(i) = pending.next_if(|i| gaps[*i].1 == Some(m.rank)) {
                next += step;
                ranks[i] = next;
                done[i] = true;
            }
            next += step;
            moved.push((m.num, next));
            changes.replace((m.rank, &m.doc), (next, &m.doc));
        }
        for i in pending {
            next += step;
            ranks[i] = next;
            done[i] = true;
        }
        set_ranks(db, &moved).await?;
        return Ok(());
    }
}

/// Sets users' sort ranks (by row number), through temporary negative ranks so that no two
/// rows ever hold the same rank in between.
pub async fn set_ranks<C: ConnectionTrait>(db: &C, moved: &[(i64, i64)]) -> Result<(), Error> {
    for batch in moved.chunks(5_000) {
        let list: Vec<serde_json::Value> = batch
            .iter()
            .map(|(n, r)| serde_json::json!([n, r]))
            .collect();
        let list = json(list.into());
        for temporary in [true, false] {
            let value = if temporary { "-u.num" } else { "r.rank" };
            let mut sql = Sql::new(db.get_database_backend());
            if pg(db) {
                sql.push(&format!("UPDATE users u SET sort_rank = {value} FROM (SELECT (v->>0)::bigint AS num, (v->>1)::bigint AS rank FROM jsonb_array_elements("))
                    .bind(list.clone())
                    .push("::jsonb) v) r WHERE u.num = r.num");
            } else {
                let value = if temporary { "-users.num" } else { "r.rank" };
                sql.push(&format!("UPDATE users SET sort_rank = {value} FROM (SELECT value->>0 AS num, value->>1 AS rank FROM json_each("))
                    .bind(list.clone())
                    .push(")) r WHERE users.num = r.num");
            }
            db.execute_raw(sql.statement()).await?;
        }
    }
    Ok(())
}

/// Gives a ranked user that is about to take a new place in page order a temporary rank
/// (`-num`), so that [`place`] does not count it as a neighbour.
pub async fn unrank<C: ConnectionTrait>(db: &C, num: i64) -> Result<(), Error> {
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("UPDATE users SET sort_rank = -num WHERE num = ")
        .bind(num);
    db.execute_raw(sql.statement()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_round_trips() {
        let ranks = vec![5, 6, 200, 1 << 40, (1 << 40) + 3, SPACE - 1];
        assert_eq!(decode(5, &encode(&ranks)), ranks);
        assert_eq!(decode(9, &encode(&[9])), vec![9]);
        let many: Vec<i64> = (0..4_000).map(|i| i * 7 + 1).collect();
        let parts = pieces(many.clone());
        assert!(parts.len() > 1, "{}", parts.len());
        assert!(parts.iter().all(|p| encode(p).len() <= CHUNK_FILL));
        assert_eq!(parts.concat(), many);
        let wide: Vec<i64> = (0..400).map(|i| i << 40).collect();
        assert!(
            pieces(wide.clone())
                .iter()
                .all(|p| encode(p).len() <= CHUNK_FILL)
        );
        assert_eq!(pieces(wide.clone()).concat(), wide);
        assert_eq!(delta_len(127), 1);
        assert_eq!(delta_len(128), 2);
    }

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

    #[test]
    fn spreading_in_gaps() {
        assert_eq!(spread((Some(10), Some(14)), 3), Some(vec![11, 12, 13]));
        assert_eq!(spread((Some(10), Some(13)), 3), None);
        assert_eq!(
            spread((Some(10), None), 2),
            Some(vec![10 + STEP, 10 + 2 * STEP])
        );
        let middle = spread((None, None), 3).unwrap();
        assert!(middle.windows(2).all(|w| w[1] - w[0] == STEP) && middle[1] == SPACE / 2);
        assert_eq!(spread((None, Some(STEP * 4)), 1), Some(vec![STEP * 3]));
    }
}
