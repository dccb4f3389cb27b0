//! The stored lists: reading their counts, chunks and windows of ranks, and writing changes.

use std::collections::{BTreeMap, HashMap};

use sea_orm::{ConnectionTrait, Value};

use super::changes::Changes;
use super::codec::{decode, decode_into, encode, pieces};
use super::grams::{
    Gram, GramMap, first_char_grams, gram_of_text, gram_text, short_grams, span_grams,
};
use super::{json, pg};
use crate::Error;
use crate::util::Sql;

/// Grams whose lists are changed per round of statements.
const GRAM_BATCH: usize = 4_096;
/// Rows per multi-row INSERT (4 parameters each).
const INSERT_ROWS: usize = 1_000;

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

/// Adds the short grams (see [`short_grams`]) of every ranked user's search document to
/// posting lists built before there were any.
pub async fn fill_short<C: ConnectionTrait>(db: &C) -> Result<(), Error> {
    fill_with(db, |changes, docs| {
        for (rank, doc) in docs {
            changes.add(*rank, &short_grams(doc));
        }
    })
    .await
}

/// Adds back the grams of one word-start character (see [`first_char_grams`]).
pub async fn fill_first_chars<C: ConnectionTrait>(db: &C) -> Result<(), Error> {
    fill_with(db, |changes, docs| {
        for (rank, doc) in docs {
            changes.add(*rank, &first_char_grams(doc));
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
        // Every changed list is probed: one without chunks reads none (asking first which
        // lists have chunks was a statement more per write, a third of a registration's).
        let mut probes = Vec::new();
        let mut work = Vec::with_capacity(batch.len());
        for g in batch {
            let mut add = adds.remove(g).unwrap_or_default();
            let mut remove = removes.remove(g).unwrap_or_default();
            add.sort_unstable();
            add.dedup();
            remove.sort_unstable();
            remove.dedup();
            let mut all: Vec<i64> = add.iter().chain(&remove).copied().collect();
            all.sort_unstable();
            match all.as_slice() {
                [] => {}
                few if few.len() <= 8 => probes.extend(few.iter().map(|r| (*g, *r, *r))),
                many => probes.push((*g, many[0], many[many.len() - 1])),
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
                let parts = if merged.is_empty() {
                    Vec::new()
                } else {
                    pieces(merged)
                };
                // A piece that starts where the chunk did overwrites it (see [`write`]).
                if !parts.iter().any(|p| p[0] == chunk.lo) {
                    deletes.push((g, chunk.lo));
                }
                inserts.extend(parts.into_iter().map(|p| (g, p)));
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
        // A chunk rewritten in place: one change of the row instead of a delete and an insert.
        sql.push(" ON CONFLICT (gram, lo) DO UPDATE SET n = excluded.n, data = excluded.data");
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
