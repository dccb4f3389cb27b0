//! One page of SearchUsers: the page token, both tiers and the external ids, the matched
//! fields and credentials of each user, and the estimate of all matches.

use cms_proto::common::v1::PageResponse;
use cms_proto::directory::v1::{
    MatchField, SearchUsersRequest, SearchUsersResponse, UserSearchResult,
};
use sea_orm::ConnectionTrait;

use super::filters::{Filters, external_id_matches, external_ids};
use super::rows;
use super::tier::{IndexView, search_tier};
use crate::entity::{credential, user};
use crate::users::{MAX_QUERY, to_proto};
use crate::util::{self, check_text};
use crate::{Directory, Error, normalize, search, token};

impl Directory {
    /// The helpdesk search: every user whose display name, username, email or card serial
    /// contains the folded query; users with a word starting with the query first (tier 0),
    /// then the other substring matches (tier 1), each tier by display name, username and id.
    /// Paged with a keyset token, so pages are stable while users are added.
    pub async fn search_users(
        &self,
        req: &SearchUsersRequest,
    ) -> Result<SearchUsersResponse, Error> {
        check_text("query", &req.query, MAX_QUERY, false)?;
        let q = normalize::query(&normalize::fold(&req.query));
        let limit = util::page_size(req.page.as_ref());
        let filters = Filters::of(req)?;
        let token = util::page_token(req.page.as_ref());
        let after = parse_token(token, &q)?;
        // An exact external id comes with the word starts (tier 0), and not again after.
        let external = if q.is_empty() {
            Vec::new()
        } else {
            external_ids(&req.query)
        };

        // One snapshot for every statement of the search.
        let txn = search::read_txn(&self.db).await?;
        let mut view = IndexView::read(&txn, &q).await?;
        let tiers = Tiers {
            q: &q,
            filters: &filters,
            external: &external,
            after: after.as_ref(),
        };
        let mut page = tiers.collect(&txn, &mut view, limit + 1).await?;
        let more = page.len() > limit;
        let total_estimate = if token.is_empty() && !more {
            page.len() as u64
        } else {
            estimate(&txn, &view, &q)
                .await?
                .max(page.len() as u64 + u64::from(more))
        };
        page.truncate(limit);
        let next = match (more, page.last()) {
            (true, Some((m, tier))) => {
                token::encode(&[&tier.to_string(), &m.display_key, &m.username_key, &m.id])
            }
            _ => String::new(),
        };
        let creds = credentials_of(&txn, &page).await?;
        txn.commit().await?;
        let matches = Matches {
            q: &q,
            q_serial: normalize::serial(&req.query),
            external: &external,
        };
        let results = page
            .into_iter()
            .map(|(m, tier)| matches.result(m, tier, &creds))
            .collect();
        Ok(SearchUsersResponse {
            results,
            page: Some(PageResponse {
                next_page_token: next,
                total_estimate,
            }),
        })
    }
}

/// The tier and keyset a page token continues after (`None`: the first page).
fn parse_token(token: &str, q: &str) -> Result<Option<(u8, [String; 3])>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let parts = token::decode(token, 4)?;
    let tier: u8 = match parts[0].as_str() {
        "0" => 0,
        "1" if !q.is_empty() => 1,
        _ => {
            return Err(Error::invalid(
                "page.page_token",
                "not a page token of this search",
            ));
        }
    };
    Ok(Some((
        tier,
        [parts[1].clone(), parts[2].clone(), parts[3].clone()],
    )))
}

/// The tiers of one search, from the page token's on.
struct Tiers<'a> {
    q: &'a str,
    filters: &'a Filters,
    external: &'a [String],
    after: Option<&'a (u8, [String; 3])>,
}

impl Tiers<'_> {
    /// Up to `want` users in page order, each with its tier: those of tier 0 (word starts and
    /// exact external ids), then those of tier 1 (other substrings).
    async fn collect<C: ConnectionTrait>(
        &self,
        db: &C,
        view: &mut IndexView,
        want: usize,
    ) -> Result<Vec<(user::Model, u8)>, Error> {
        let first_tier = self.after.map(|(t, _)| *t).unwrap_or(0);
        let last_tier = if self.q.is_empty() { 0 } else { 1 };
        let later = self.filters.leaving_out(self.external);
        let mut page: Vec<(user::Model, u8)> = Vec::new();
        for tier in first_tier..=last_tier {
            let need = want - page.len();
            let keyset = self.after.filter(|(t, _)| *t == tier).map(|(_, k)| k);
            let filters = if tier == 0 { self.filters } else { &later };
            let mut rows = search_tier(db, view, self.q, tier, filters, keyset, need).await?;
            if tier == 0 && !self.external.is_empty() {
                rows.extend(external_id_matches(db, self.external, filters, keyset, need).await?);
                rows.sort_by(|a, b| {
                    (&a.display_key, &a.username_key, &a.id).cmp(&(
                        &b.display_key,
                        &b.username_key,
                        &b.id,
                    ))
                });
                rows.dedup_by(|a, b| a.id == b.id);
                rows.truncate(need);
            }
            page.extend(rows.into_iter().map(|m| (m, tier)));
            if page.len() >= want {
                break;
            }
        }
        Ok(page)
    }
}

/// The credentials of the users on `page`, newest first: for counts and serial matches.
async fn credentials_of<C: ConnectionTrait>(
    db: &C,
    page: &[(user::Model, u8)],
) -> Result<Vec<credential::Model>, Error> {
    rows::credentials_of(db, page.iter().map(|(m, _)| m.id.clone()).collect()).await
}

/// What a search looked for, to say which fields and credentials of a user matched.
struct Matches<'a> {
    q: &'a str,
    q_serial: String,
    external: &'a [String],
}

impl Matches<'_> {
    fn result(&self, m: user::Model, tier: u8, creds: &[credential::Model]) -> UserSearchResult {
        let q = self.q;
        let own: Vec<&credential::Model> = creds.iter().filter(|c| c.user_id == m.id).collect();
        let mut matched_fields = Vec::new();
        let mut matched_credentials = Vec::new();
        if !q.is_empty() {
            let has = |folded: &str| normalize::without_marks(folded).contains(q);
            if has(&normalize::fold(&m.username)) {
                matched_fields.push(MatchField::Username as i32);
            }
            if has(&m.display_key) {
                matched_fields.push(MatchField::DisplayName as i32);
            }
            if has(&normalize::fold(&m.email)) {
                matched_fields.push(MatchField::Email as i32);
            }
            if self.external.contains(&m.external_id) {
                matched_fields.push(MatchField::ExternalId as i32);
            }
            for c in &own {
                if (!self.q_serial.is_empty() && c.serial_key.contains(&self.q_serial))
                    || normalize::fold(&c.serial).contains(q)
                {
                    matched_credentials.push(crate::credentials::to_proto(c));
                }
            }
            if !matched_credentials.is_empty() {
                matched_fields.push(MatchField::CardSerial as i32);
            }
        }
        UserSearchResult {
            user: Some(to_proto(&m)),
            matched_fields,
            prefix_match: !q.is_empty() && tier == 0,
            matched_credentials,
            credential_count: u32::try_from(own.len()).unwrap_or(u32::MAX),
        }
    }
}

/// About how many users a search for folded query `q` finds (filters and external ids not
/// counted): at most as many as have the rarest of the grams every substring match has;
/// without such grams (empty and short queries), the number of users.
async fn estimate<C: ConnectionTrait>(db: &C, view: &IndexView, q: &str) -> Result<u64, Error> {
    let count = |g: &search::Gram| view.counts.get(g).copied().unwrap_or(0);
    let rarest = if q.is_empty() {
        None
    } else if search::is_short(q) {
        // The short grams of both tiers hold exactly the matches.
        Some(
            [0, 1]
                .iter()
                .flat_map(|t| search::query_grams(q, *t))
                .map(|g| count(&g))
                .sum(),
        )
    } else {
        search::query_grams(q, 1).iter().map(count).min()
    };
    let count = match rarest {
        Some(n) => n,
        None => {
            // Row numbers are never reused and users are never deleted: the last is the count.
            let row = db
                .query_one_raw(sea_orm::Statement::from_string(
                    db.get_database_backend(),
                    "SELECT coalesce(max(num), 0) AS n FROM users",
                ))
                .await?;
            match row {
                Some(row) => row.try_get::<i64>("", "n")?,
                None => 0,
            }
        }
    };
    Ok(u64::try_from(count).unwrap_or(0))
}
