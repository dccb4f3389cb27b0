//! The index of the helpdesk search: users in page order, and which users have which grams.
//!
//! * `users.sort_rank`: a sparse number per user whose order is the page order (display key,
//!   username key, id). A new user takes a number between its neighbours'; where there is no
//!   room left, a few neighbours are renumbered ([`rank::place`]).
//! * `search_postings`: for each gram of the search documents (three characters in a row, a
//!   word start and its first one, three or four characters, where word boundaries all count
//!   as one character; or a word boundary as it is, with two characters before and one after
//!   it; see [`grams::doc_grams`]) the sort ranks of the users that have it, ascending, in
//!   chunks of a few hundred delta-coded ranks; `search_grams` holds how many users have each
//!   gram.
//!
//! A search takes the rarest grams of the query, intersects their lists a window of ranks at a
//! time from where the page starts, and checks those candidates against the text itself. The
//! candidates come in page order, so it reads about a page of users whatever the number of
//! matches, and the rarest list bounds the work when matches are few.

mod changes;
mod codec;
mod filters;
mod grams;
mod page;
mod plan;
mod rank;
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
