//! The helpdesk search and its index: users in page order, and which users have which grams.
//!
//! * `users.sort_rank`: a sparse number per user whose order is the page order (display key,
//!   username key, id). A new user takes a number between its neighbours'; where there is no
//!   room left, a few neighbours are renumbered ([`rank::place`]).
//! * `search_postings`: for each gram of the search documents (three characters in a row, a
//!   word start and its three or four characters, where word boundaries all count as one
//!   character; a word boundary as it is, with two characters before and one after it; and
//!   every one and two characters as they are, by whether some occurrence starts a word; see
//!   [`grams::doc_grams`]) the sort ranks of the users that have it, ascending, in chunks of a
//!   few hundred delta-coded ranks; `search_grams` holds how many users have each gram.
//!
//! A search takes the rarest grams of the query, intersects their lists a window of ranks at a
//! time from where the page starts, and checks those candidates against the text itself. The
//! candidates come in page order, so it reads about a page of users whatever the number of
//! matches, and the rarest list bounds the work when matches are few. A query of one or two
//! characters reads one list that holds exactly its matches.
//!
//! Modules, one concern each:
//! * [`page`]: one page of SearchUsers: page token, both tiers, external ids, matched fields,
//!   the estimate.
//! * [`tier`]: one tier of a search: the lists it reads, the scan window by window, the check
//!   of candidates against the text; the empty query walks the name index.
//! * [`filters`]: status and org-unit filters, the page keyset, exact external ids.
//! * [`plan`]: which of a query's lists a search reads (rarest, covering), and intersection.
//! * [`grams`]: what documents and queries are cut into, and the gram keys' stored text.
//! * [`codec`]: ranks as LEB128 deltas, and lists cut into chunks of a row each.
//! * [`store`]: the stored lists: counts, chunks, windows of ranks; writing changes; filling.
//! * [`changes`]: posting changes gathered in memory (one user, or a bulk load).
//! * [`rank`]: sort ranks, placed between neighbours, renumbered when crowded.
//! * [`rows`]: the users a search returns, with the columns a result shows.
//! * [`txn`]: one writer at a time, one snapshot per search, the WAL checkpoint after imports.

mod changes;
mod codec;
mod filters;
mod grams;
mod page;
mod plan;
mod rank;
mod rows;
mod store;
mod tier;
mod txn;

pub use changes::Changes;
pub use grams::{Gram, GramMap, SHORT_QUERY, doc_grams, is_short, query_grams};
pub use plan::{Lists, intersect, lists_to_read};
pub use rank::{Key, SPACE, even_ranks, place, set_ranks, unrank};
pub(crate) use store::run_overlapped;
pub use store::{
    apply, counts, counts_and_span, fill, fill_first_chars, fill_short, fill_spans, window,
};
pub use txn::{checkpoint, read_txn, write_txn};

use sea_orm::{ConnectionTrait, DbBackend, Value};

/// A JSON array parameter (read with `json_each` / `jsonb_array_elements`).
fn json(value: serde_json::Value) -> Value {
    Value::from(value.to_string())
}

fn pg(db: &impl ConnectionTrait) -> bool {
    db.get_database_backend() == DbBackend::Postgres
}
