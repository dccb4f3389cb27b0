//! One tier of a search: its candidates from the index in page order, window by window,
//! checked against the text in batches.

use sea_orm::{ConnectionTrait, DbBackend};

use super::filters::{Filters, push_after};
use super::rows;
use crate::Error;
use crate::entity::user;
use crate::normalize::{self, FIELD_SEP};
use crate::search;
use crate::util::{Sql, now_micros};

/// Chunks of the rarest list a search reads in its first window of ranks; a further window
/// is at most `WINDOW_GROWTH` times as large as the one before. Where the first window found
/// nothing (a card serial matches one user), the next reaches about as far as the matches
/// wanted need at most: one more round trip rather than several growing ones.
const WINDOW_CHUNKS: i64 = 1;
const WINDOW_GROWTH: i64 = 32;

/// Candidates checked at once while the lists have let through mostly not matches and another
/// list could still rule them out: reading that list costs less than checking hundreds.
const PROBE: usize = 64;

/// Chunks of the rarest list for the next window after one of `chunks`, for `missing` more
/// matches, `found` of them in the `read` chunks so far: as many as the matches so far say
/// they need (and half as many again), between `chunks` and `WINDOW_GROWTH` times `chunks`.
fn next_chunks(chunks: i64, read: i64, missing: usize, found: usize) -> i64 {
    let missing = i64::try_from(missing).unwrap_or(i64::MAX);
    let found = i64::try_from(found).unwrap_or(i64::MAX);
    let wanted = read.saturating_mul(missing) / found.saturating_add(1);
    wanted
        .saturating_add(wanted / 2)
        .clamp(chunks, chunks.saturating_mul(WINDOW_GROWTH))
}

/// Candidates that the lists an earlier tier read in full leave few enough to check them all
/// rather than read more lists.
const KNOWN_ENOUGH: usize = 256;

/// The least candidates a check must have found mostly not matches before the search reads
/// another list.
const MOSTLY_NOT: usize = 16;

/// What a search reads of the index once for both tiers: the length of each of the query's
/// gram lists, and the first and last sort rank (nothing for an empty query, which reads no
/// lists); and the lists a tier read in full, from the first rank to the last, for the next.
#[derive(Default)]
pub(super) struct IndexView {
    pub(super) counts: search::GramMap<i64>,
    first: i64,
    last: i64,
    full: search::GramMap<Vec<i64>>,
}

impl IndexView {
    pub(super) async fn read<C: ConnectionTrait>(db: &C, q: &str) -> Result<Self, Error> {
        if q.is_empty() {
            return Ok(Self::default());
        }
        let mut grams = search::query_grams(q, 0);
        grams.extend(search::query_grams(q, 1));
        grams.sort_unstable();
        grams.dedup();
        let (counts, first, last) = search::counts_and_span(db, &grams).await?;
        Ok(Self {
            counts,
            first,
            last,
            full: Default::default(),
        })
    }
}

/// The text conditions of `tier` for folded query `q` on `u`, as SQL.
fn push_text(sql: &mut Sql, q: &str, tier: u8) {
    let find = if sql.backend == DbBackend::Postgres {
        "strpos"
    } else {
        "instr"
    };
    let marker = format!("{FIELD_SEP}{q}");
    match (q.is_empty(), tier) {
        (true, _) => {}
        (false, 0) => {
            sql.push(&format!(" AND {find}(u.prefix_doc, "))
                .bind(marker)
                .push(") > 0");
        }
        (false, _) => {
            sql.push(&format!(" AND {find}(u.search_doc, "))
                .bind(q.to_owned())
                .push(&format!(") > 0 AND {find}(u.prefix_doc, "))
                .bind(marker)
                .push(") = 0");
        }
    }
}

/// The users of candidate sort ranks `ranks` (ascending) that meet `conditions`, at most
/// `missing`, in rank order.
async fn check<C: ConnectionTrait>(
    db: &C,
    ranks: &[i64],
    conditions: &(dyn Fn(&mut Sql) + Sync),
    missing: usize,
) -> Result<Vec<user::Model>, Error> {
    let backend = db.get_database_backend();
    let mut sql = Sql::new(backend);
    let ranks: Vec<String> = ranks.iter().map(i64::to_string).collect();
    if backend == DbBackend::Postgres {
        // A lateral subquery with a LIMIT is never pulled up into a join: each candidate is
        // looked up in the array's order, and the outer LIMIT stops at the first matches
        // instead of reading and sorting every candidate.
        sql.push("SELECT ")
            .push(&rows::select_list())
            .push(" FROM unnest(string_to_array(")
            .bind(ranks.join(","))
            .push(
                ", ',')::bigint[]) AS c(r) CROSS JOIN LATERAL \
                 (SELECT * FROM users x WHERE x.sort_rank = c.r LIMIT 1) u WHERE 1 = 1",
            );
    } else {
        sql.push("SELECT ")
            .push(&rows::select_list())
            .push(" FROM json_each(")
            .bind(format!("[{}]", ranks.join(",")))
            .push(") AS c CROSS JOIN users u ON u.sort_rank = c.value WHERE 1 = 1");
    }
    conditions(&mut sql);
    // No ORDER BY: both walk the candidates in the array's order (ascending rank, the outer
    // loop) and stop at the limit, where a sort would first read every candidate. Sorted
    // below all the same.
    sql.push(" LIMIT ")
        .bind(i64::try_from(missing).unwrap_or(i64::MAX));
    let mut found = rows::fetch(db, sql).await?;
    found.sort_by_key(|m| m.sort_rank);
    Ok(found)
}

/// The first sort rank after keyset `after` (`None`: from the first).
async fn start_rank<C: ConnectionTrait>(
    db: &C,
    after: Option<&[String; 3]>,
) -> Result<Option<i64>, Error> {
    let Some([display, username, id]) = after else {
        return Ok(None);
    };
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("SELECT sort_rank FROM users WHERE (display_key, username_key, id) <= (")
        .bind(display.clone())
        .push(", ")
        .bind(username.clone())
        .push(", ")
        .bind(id.clone())
        .push(") AND sort_rank > 0 ORDER BY display_key DESC, username_key DESC, id DESC LIMIT 1");
    Ok(match db.query_one_raw(sql.statement()).await? {
        Some(row) => Some(row.try_get::<i64>("", "sort_rank")? + 1),
        None => None,
    })
}

/// Candidates to check next for `missing` more matches, after `passed` of `checked` passed:
/// enough for the matches at the rate seen so far (and half as many again), so that one
/// statement usually finishes the page without reading rows far past it.
fn check_batch(missing: usize, checked: usize, passed: usize) -> usize {
    let expected = missing.saturating_mul(checked + 1) / (passed + 1);
    (expected + expected / 2).clamp(32, 512)
}

/// The users of one search tier, in page order: those whose prefix document has a word start
/// `q` (tier 0) or whose search document has `q` elsewhere (tier 1), after `after`.
///
/// The candidates come from the search index in page order (see [`crate::search`]), so this
/// reads about `need` users however many match; one or two characters read one list, of
/// exactly their matches (see [`search::is_short`]). An empty query walks the (display name,
/// username, id) index instead.
pub(super) async fn search_tier<C: ConnectionTrait>(
    db: &C,
    view: &mut IndexView,
    q: &str,
    tier: u8,
    filters: &Filters,
    after: Option<&[String; 3]>,
    need: usize,
) -> Result<Vec<user::Model>, Error> {
    if tier == 0 && q.chars().count() > normalize::PREFIX_CHARS {
        return Ok(Vec::new()); // longer than any stored word start: only substring matches
    }
    let now = now_micros();
    let conditions = |sql: &mut Sql| {
        push_text(sql, q, tier);
        filters.push(sql, now);
        push_after(sql, after);
    };
    let grams = if q.is_empty() {
        Vec::new()
    } else {
        search::query_grams(q, tier)
    };
    if grams.is_empty() {
        return walk_names(db, &conditions, need).await;
    }
    let Some(plan) = plan_lists(view, q, tier, &grams) else {
        return Ok(Vec::new());
    };
    let from = start_rank(db, after).await?.unwrap_or(view.first);
    let mut scan = Scan::new(plan, view, from, need);
    scan.run(db, view, &conditions).await?;
    Ok(scan.finish(view))
}

/// The users that meet `conditions` in page order, at most `need`, walking the (display
/// name, username, id) index: for the empty query (every user).
async fn walk_names<C: ConnectionTrait>(
    db: &C,
    conditions: &(dyn Fn(&mut Sql) + Sync),
    need: usize,
) -> Result<Vec<user::Model>, Error> {
    let backend = db.get_database_backend();
    let mut sql = Sql::new(backend);
    // SQLite is told to walk the name index: left alone it may scan and sort everything.
    sql.push("SELECT ")
        .push(&rows::select_list())
        .push(if backend == DbBackend::Postgres {
            " FROM users u WHERE 1 = 1"
        } else {
            " FROM users u INDEXED BY users_order WHERE 1 = 1"
        });
    conditions(&mut sql);
    sql.push(" ORDER BY u.display_key, u.username_key, u.id LIMIT ")
        .bind(i64::try_from(need).unwrap_or(i64::MAX));
    // Keys compare bytewise in both databases (COLLATE "C" on PostgreSQL), as here.
    let mut found = rows::fetch(db, sql).await?;
    found.sort_by(|a, b| {
        (&a.display_key, &a.username_key, &a.id).cmp(&(&b.display_key, &b.username_key, &b.id))
    });
    Ok(found)
}

/// The lists a tier intersects: the rarest (see [`search::lists_to_read`]), with those an
/// earlier tier read in full (which it does not read again), or only those when they leave
/// few candidates; `None` when some gram has no list (nothing matches).
fn plan_lists(
    view: &IndexView,
    q: &str,
    tier: u8,
    grams: &[search::Gram],
) -> Option<search::Lists> {
    let known: Vec<search::Gram> = grams
        .iter()
        .filter(|g| view.full.contains_key(*g))
        .copied()
        .collect();
    let few = |lists: Vec<&[i64]>| search::intersect(lists).len() <= KNOWN_ENOUGH;
    let plan = if !known.is_empty() && few(known.iter().map(|g| view.full[g].as_slice()).collect())
    {
        search::Lists {
            read: known,
            spare: Vec::new(),
        }
    } else {
        search::lists_to_read(q, tier, &view.counts, &known)
    };
    (!plan.read.is_empty()).then_some(plan)
}

/// The walk of one tier through the index: window by window from where the page starts, the
/// candidates of the lists in rank order, checked against the text in batches.
struct Scan {
    /// The lists intersected, and those of them read from the database (not known in full).
    lists: Vec<search::Gram>,
    to_read: Vec<search::Gram>,
    /// The list that sizes the windows (the rarest read).
    rarest: Option<search::Gram>,
    spare: std::vec::IntoIter<search::Gram>,
    from: i64,
    end: i64,
    /// Chunks of `rarest` in the next window, and read so far.
    chunks: i64,
    read: i64,
    /// Every list read so far was read from the first rank on, and only once.
    whole: bool,
    seen: search::GramMap<Vec<i64>>,
    out: Vec<user::Model>,
    checked: usize,
    need: usize,
}

impl Scan {
    fn new(plan: search::Lists, view: &IndexView, from: i64, need: usize) -> Self {
        let to_read: Vec<search::Gram> = plan
            .read
            .iter()
            .filter(|g| !view.full.contains_key(*g))
            .copied()
            .collect();
        let rarest = to_read
            .iter()
            .min_by_key(|g| view.counts.get(*g).copied().unwrap_or(0))
            .copied();
        Self {
            lists: plan.read,
            to_read,
            rarest,
            spare: plan.spare.into_iter(),
            from,
            end: view.last + 1,
            chunks: WINDOW_CHUNKS,
            read: 0,
            whole: from == view.first,
            seen: Default::default(),
            out: Vec::with_capacity(need),
            checked: 0,
            need,
        }
    }

    async fn run<C: ConnectionTrait>(
        &mut self,
        db: &C,
        view: &IndexView,
        conditions: &(dyn Fn(&mut Sql) + Sync),
    ) -> Result<(), Error> {
        while self.from < self.end && self.out.len() < self.need {
            let (candidates, to) = self.candidates(db, view).await?;
            if let Some(next) = self.check_all(db, view, &candidates, conditions).await? {
                // The lists read so far are not all whole from here on (nor read once).
                self.whole = false;
                self.from = next;
                continue;
            }
            self.read += self.chunks;
            self.chunks = next_chunks(
                self.chunks,
                self.read,
                self.need - self.out.len(),
                self.out.len(),
            );
            self.from = to;
        }
        Ok(())
    }

    /// The candidates of the next window (in every list), and where the window ends.
    async fn candidates<C: ConnectionTrait>(
        &mut self,
        db: &C,
        view: &IndexView,
    ) -> Result<(Vec<i64>, i64), Error> {
        let (from, end) = (self.from, self.end);
        let (window, to) = match self.rarest {
            Some(rarest) => {
                search::window(db, &self.to_read, rarest, from, self.chunks, end).await?
            }
            None => (Default::default(), end),
        };
        let slices = self
            .lists
            .iter()
            .map(|g| match (window.get(g), view.full.get(g)) {
                (Some(ranks), _) => ranks.as_slice(),
                (None, Some(ranks)) => {
                    let a = ranks.partition_point(|r| *r < from);
                    &ranks[a..a + ranks[a..].partition_point(|r| *r < to)]
                }
                (None, None) => &[],
            });
        let candidates = search::intersect(slices.collect());
        for (g, ranks) in window {
            self.seen.entry(g).or_default().extend(ranks);
        }
        Ok((candidates, to))
    }

    /// Checks `candidates` in batches until the page is full; `Some(rank)` when they turned
    /// out mostly not matches and a spare list was added: the scan goes on from `rank`.
    async fn check_all<C: ConnectionTrait>(
        &mut self,
        db: &C,
        view: &IndexView,
        candidates: &[i64],
        conditions: &(dyn Fn(&mut Sql) + Sync),
    ) -> Result<Option<i64>, Error> {
        let mut rest = candidates;
        while !rest.is_empty() && self.out.len() < self.need {
            let missing = self.need - self.out.len();
            let mut batch = check_batch(missing, self.checked, self.out.len());
            if self.spare.len() > 0 && self.out.len() * 4 < self.checked {
                batch = batch.min(PROBE);
            }
            let (now, later) = rest.split_at(batch.min(rest.len()));
            self.checked += now.len();
            let found = check(db, now, conditions, missing).await?;
            let passed = found.len();
            self.out.extend(found);
            rest = later;
            // Mostly not matches: the lists let through what another one rules out (the
            // users "joseph s…strom" in a search for "eph.stro" have all of "ph.s", "eph",
            // "str" and "tro", but not ".st"). Read that one as well, from here on.
            if self.out.len() < self.need
                && now.len() >= MOSTLY_NOT
                && passed * 4 < now.len()
                && let (Some(gram), Some(last)) = (self.spare.next(), now.last())
            {
                self.lists.push(gram);
                if !view.full.contains_key(&gram) {
                    self.to_read.push(gram);
                    // Windows are sized by a list they read (none yet when every list was
                    // known).
                    self.rarest = self.rarest.or(Some(gram));
                }
                return Ok(Some(last + 1));
            }
        }
        Ok(None)
    }

    /// The users found; the lists read whole are kept in `view` for the next tier.
    fn finish(mut self, view: &mut IndexView) -> Vec<user::Model> {
        if self.whole && self.from >= self.end {
            for g in self.to_read {
                view.full
                    .insert(g, self.seen.remove(&g).unwrap_or_default());
            }
        }
        self.out.truncate(self.need);
        self.out
    }
}
