//! Sort ranks: a sparse number per user whose order is the page order, placed between
//! neighbours and renumbered where there is no room left.

use sea_orm::ConnectionTrait;

use super::changes::Changes;
use super::{json, pg};
use crate::Error;
use crate::util::Sql;

/// Sort ranks are in `1..SPACE`.
pub const SPACE: i64 = 1 << 48;
/// The gap left between neighbours when there is room to spare (appending, bulk loads).
const STEP: i64 = 1 << 24;
/// The least gap between neighbours a renumbering leaves.
const RELABEL_GAP: i64 = 1 << 12;
/// Neighbours on each side first renumbered with a user that finds no room.
const RELABEL_FIRST: usize = 8;
/// Keys placed per lookup statement.
const PLACE_BATCH: usize = 500;

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
