//! What custody keeps per card and per session (never a PUK): reading it, and writing what
//! a release changed.

use sea_orm::sea_query::{Expr, Func};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set, TryInsertResult};

use super::Release;
use super::checks::session_used;
use crate::audit;
use crate::custody::Custody;
use crate::error::Error;
use crate::store::entities::{puk_card, puk_session};

impl Custody {
    /// When `version` of the card was first released to an online session, if it was.
    pub(super) async fn online_release(
        &self,
        card_fp: &[u8],
        version: i64,
    ) -> Result<Option<i64>, Error> {
        Ok(puk_session::Entity::find()
            .filter(puk_session::Column::CardFp.eq(card_fp.to_vec()))
            .filter(puk_session::Column::PukVersion.eq(version))
            .order_by_asc(puk_session::Column::At)
            .one(&self.db)
            .await?
            .map(|s| s.at))
    }

    pub(super) async fn puk_record(
        &self,
        card_fp: &[u8],
    ) -> Result<Option<puk_card::Model>, Error> {
        Ok(puk_card::Entity::find()
            .filter(puk_card::Column::CardFp.eq(card_fp.to_vec()))
            .one(&self.db)
            .await?)
    }

    /// Records what a release changes: the card (when first seen), and the session taken
    /// (online) or the version exposed (offline).
    pub(super) async fn record_release(&self, release: &Release) -> Result<(), Error> {
        let now = audit::now_ms();
        let version = i64::from(release.version);
        let offline = release.session_fp.is_none();
        let first_seen = puk_card::ActiveModel {
            card_fp: Set(release.card_fp.to_vec()),
            puk_version: Set(version),
            exposed: Set(offline),
            exposed_at: Set(offline.then_some(now)),
            rotated_at: Set(None),
            created_at: Set(now),
            ..Default::default()
        };
        puk_card::Entity::insert(first_seen)
            .on_conflict_do_nothing_on([puk_card::Column::CardFp])
            .exec(&self.db)
            .await?;
        let changed_meanwhile = || {
            Error::Precondition(
                "the card's PUK version changed while the PUK was being released; read it again"
                    .into(),
            )
        };
        match &release.session_fp {
            Some(session_fp) => {
                let row = self
                    .puk_record(&release.card_fp)
                    .await?
                    .ok_or_else(changed_meanwhile)?;
                if row.puk_version != version {
                    return Err(changed_meanwhile());
                }
                let taken = puk_session::ActiveModel {
                    session_fp: Set(session_fp.clone()),
                    card_fp: Set(release.card_fp.to_vec()),
                    puk_version: Set(version),
                    at: Set(now),
                    ..Default::default()
                };
                let inserted = puk_session::Entity::insert(taken)
                    .on_conflict_do_nothing_on([puk_session::Column::SessionFp])
                    .exec(&self.db)
                    .await?;
                if !matches!(inserted, TryInsertResult::Inserted(_)) {
                    return Err(session_used());
                }
                if let Some(since) = release.exposed_since {
                    let exposed_at: Expr =
                        Func::coalesce([Expr::col(puk_card::Column::ExposedAt), Expr::val(since)])
                            .into();
                    puk_card::Entity::update_many()
                        .col_expr(puk_card::Column::Exposed, Expr::val(true))
                        .col_expr(puk_card::Column::ExposedAt, exposed_at)
                        .filter(puk_card::Column::CardFp.eq(release.card_fp.to_vec()))
                        .filter(puk_card::Column::PukVersion.eq(version))
                        .exec(&self.db)
                        .await?;
                }
            }
            None => {
                // Exposed since the first read-out of this version.
                let exposed_at: Expr =
                    Func::coalesce([Expr::col(puk_card::Column::ExposedAt), Expr::val(now)]).into();
                let updated = puk_card::Entity::update_many()
                    .col_expr(puk_card::Column::Exposed, Expr::val(true))
                    .col_expr(puk_card::Column::ExposedAt, exposed_at)
                    .filter(puk_card::Column::CardFp.eq(release.card_fp.to_vec()))
                    .filter(puk_card::Column::PukVersion.eq(version))
                    .exec(&self.db)
                    .await?;
                if updated.rows_affected != 1 {
                    return Err(changed_meanwhile());
                }
            }
        }
        Ok(())
    }
}
