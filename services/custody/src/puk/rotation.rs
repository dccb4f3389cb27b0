//! ConfirmPukRotation (the card now has the next PUK version; its exposure is cleared) and
//! GetPukStatus (the state, never a PUK).

use cms_proto::custody::v1 as pb;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use super::checks::{
    MAX_PUK_VERSION, card_fingerprint, check_card_id, check_reference, status, unknown_card,
};
use crate::audit::{self, Event};
use crate::custody::{Custody, context};
use crate::error::Error;
use crate::guards::{self, Caller, Peer};
use crate::store::entities::puk_card;
use crate::wrap::Fingerprint;

impl Custody {
    /// A rotation confirmation's checks; the card's fingerprint and recorded version.
    async fn check_rotation(
        &self,
        caller: Result<Caller<'_>, Error>,
        req: &pb::ConfirmPukRotationRequest,
    ) -> Result<(Fingerprint, i64), Error> {
        let caller = caller?;
        caller.require_release_puk()?;
        caller.require_key(&req.master_key_reference)?;
        guards::require_context(&context(req.auth.clone()))?;
        let kek = self.kek()?;
        check_card_id(&req.card_id)?;
        check_reference(&req.master_key_reference)?;
        let card_fp = card_fingerprint(&kek, &req.master_key_reference, &req.card_id);
        let row = self.puk_record(&card_fp).await?.ok_or_else(unknown_card)?;
        if req.new_puk_version > MAX_PUK_VERSION {
            return Err(Error::Invalid {
                field: "new_puk_version",
                message: format!("a PIV card's PUK version is 1 to {MAX_PUK_VERSION}"),
            });
        }
        if i64::from(req.new_puk_version) != row.puk_version + 1 {
            return Err(Error::Precondition(format!(
                "custody has PUK version {} for this card, so a rotation confirms version {}, not {}",
                row.puk_version,
                row.puk_version + 1,
                req.new_puk_version
            )));
        }
        Ok((card_fp, row.puk_version))
    }

    /// ConfirmPukRotation.
    pub(crate) async fn confirm_puk_rotation(
        &self,
        peer: &Peer,
        req: pb::ConfirmPukRotationRequest,
    ) -> Result<pb::ConfirmPukRotationResponse, Error> {
        let caller = self.caller(peer);
        let mut auth = context(req.auth.clone());
        auth.card_id = req.card_id.clone();
        let event = Event::puk_rotation(
            &peer.audit_name(),
            auth,
            &req.master_key_reference,
            req.new_puk_version,
        );

        let _one_at_a_time = self.puk_lock.lock().await;
        let (card_fp, old) = match self.check_rotation(caller, &req).await {
            Ok(checked) => checked,
            Err(e) => return Err(self.refuse_puk(event, e).await),
        };
        let event = event.puk_rotated(old, req.new_puk_version);
        self.audit.record(event.clone(), None).await?;
        let updated = puk_card::Entity::update_many()
            .col_expr(
                puk_card::Column::PukVersion,
                Expr::val(i64::from(req.new_puk_version)),
            )
            .col_expr(puk_card::Column::Exposed, Expr::val(false))
            .col_expr(puk_card::Column::ExposedAt, Expr::val(None::<i64>))
            .col_expr(
                puk_card::Column::RotatedAt,
                Expr::val(Some(audit::now_ms())),
            )
            .filter(puk_card::Column::CardFp.eq(card_fp.to_vec()))
            .filter(puk_card::Column::PukVersion.eq(old))
            .exec(&self.db)
            .await;
        match updated {
            Ok(done) if done.rows_affected == 1 => {}
            Ok(_) => {
                let e = Error::Precondition(
                    "the card's PUK version changed while the rotation was confirmed".into(),
                );
                return Err(self.refuse_puk(event, e).await);
            }
            Err(e) => return Err(self.refuse_puk(event, e.into()).await),
        }
        let row = self.puk_record(&card_fp).await?.ok_or_else(unknown_card)?;
        Ok(pb::ConfirmPukRotationResponse {
            status: Some(status(&req.card_id, &row, None)),
        })
    }

    /// When `version` of the card became exposed by an online release that was not confirmed
    /// rotated within its session's lifetime; `None` while it may still be.
    async fn lapsed_release(&self, card_fp: &[u8], version: i64) -> Result<Option<i64>, Error> {
        let now = audit::now_ms();
        Ok(self
            .online_release(card_fp, version)
            .await?
            .map(|at| at.saturating_add(self.session_lifetime_ms()))
            .filter(|ends| *ends <= now))
    }

    /// GetPukStatus: for the gateway (`release_puk` and the key reference) and administrators.
    pub(crate) async fn puk_status(
        &self,
        peer: &Peer,
        req: pb::GetPukStatusRequest,
    ) -> Result<pb::GetPukStatusResponse, Error> {
        let caller = self.caller(peer)?;
        if !caller.scope.admin {
            caller.require_release_puk()?;
            caller.require_key(&req.master_key_reference)?;
        }
        let kek = self.kek()?;
        check_card_id(&req.card_id)?;
        check_reference(&req.master_key_reference)?;
        let card_fp = card_fingerprint(&kek, &req.master_key_reference, &req.card_id);
        let row = self.puk_record(&card_fp).await?.ok_or_else(unknown_card)?;
        let lapsed = self.lapsed_release(&card_fp, row.puk_version).await?;
        Ok(pb::GetPukStatusResponse {
            status: Some(status(&req.card_id, &row, lapsed)),
        })
    }
}
