//! Credentials (cards and tokens): registration, lookup, status and unblock records.

use cms_proto::common::v1::{CardProfile, Flow, PageResponse};
use cms_proto::directory::v1::{
    Credential, CredentialStatus, ListUserCredentialsRequest, ListUserCredentialsResponse,
    RecordUnblockRequest, UpdateCredentialStatusRequest,
};
use cms_proto::template::v1::{GetTemplateRequest, TemplateState};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use crate::card_writer::NewCard;
use crate::entity::credential;
use crate::normalize;
use crate::util::{self, check_text, now_micros, timestamp};
use crate::{Directory, Error, token};

pub const MAX_CARD_ID: usize = 64;
pub const MAX_SERIAL: usize = 64;
pub const MAX_ATR: usize = 33;

pub fn to_proto(c: &credential::Model) -> Credential {
    Credential {
        id: c.id.clone(),
        user_id: c.user_id.clone(),
        card_id: c.card_id.clone(),
        serial: c.serial.clone(),
        atr: c.atr.clone(),
        profile: c.profile,
        template_id: c.template_id.clone(),
        template_version: u32::try_from(c.template_version).unwrap_or(0),
        master_key_version: u32::try_from(c.master_key_version).unwrap_or(0),
        puk_version: u32::try_from(c.puk_version).unwrap_or(0),
        puk_rotation_pending: c.puk_rotation_pending,
        status: c.status,
        status_reason: c.status_reason.clone(),
        issued_at: Some(timestamp(c.issued_at)),
        last_unblock_at: c.last_unblock_at.map(timestamp),
        last_unblock_flow: c.last_unblock_flow,
        unblock_count: u32::try_from(c.unblock_count).unwrap_or(u32::MAX),
        updated_at: Some(timestamp(c.updated_at)),
        label: c.label.clone(),
    }
}

/// Checks a card to register, except for its owner, what needs the database (the card id's
/// uniqueness) and its template ([`Directory::check_template`]); returns its profile.
pub(crate) fn check_card(c: &Credential) -> Result<CardProfile, Error> {
    if c.card_id.is_empty() || c.card_id.len() > MAX_CARD_ID {
        return Err(Error::invalid(
            "credential.card_id",
            format!("credential.card_id must have 1 to {MAX_CARD_ID} bytes"),
        ));
    }
    check_text("credential.serial", &c.serial, MAX_SERIAL, true)?;
    if c.atr.len() > MAX_ATR {
        return Err(Error::invalid(
            "credential.atr",
            format!(
                "credential.atr has {} bytes; an ATR has at most {MAX_ATR}",
                c.atr.len()
            ),
        ));
    }
    check_text("credential.label", &c.label, 128, false)?;
    let profile = CardProfile::try_from(c.profile).unwrap_or(CardProfile::Unspecified);
    if profile == CardProfile::Unspecified {
        return Err(Error::invalid(
            "credential.profile",
            "credential.profile is required (CARD_PROFILE_MINIDRIVER or CARD_PROFILE_PIV)",
        ));
    }
    if c.template_version == 0 {
        return Err(Error::invalid(
            "credential.template_version",
            "credential.template_version is required (the version the card is issued under)",
        ));
    }
    Ok(profile)
}

/// Refuses a card whose profile is not its template's (`template_profile`).
pub(crate) fn check_profile(c: &Credential, template_profile: i32) -> Result<(), Error> {
    if template_profile == c.profile {
        return Ok(());
    }
    Err(Error::invalid(
        "credential.profile",
        format!(
            "credential.profile {} differs from the card profile of template {} ({})",
            CardProfile::try_from(c.profile)
                .map(|p| p.as_str_name())
                .unwrap_or("?"),
            c.template_id,
            CardProfile::try_from(template_profile)
                .map(|p| p.as_str_name())
                .unwrap_or("?")
        ),
    ))
}

/// The stored row of a new card `c` (checked by [`check_card`]) with id `id`, issued at
/// `now` unless `c` says when.
pub(crate) fn new_row(c: &Credential, id: String, now: i64) -> credential::Model {
    let piv = c.profile == CardProfile::Piv as i32;
    credential::Model {
        id,
        user_id: c.user_id.clone(),
        card_id: c.card_id.clone(),
        serial: c.serial.clone(),
        serial_key: normalize::serial(&c.serial),
        atr: c.atr.clone(),
        profile: c.profile,
        template_id: c.template_id.clone(),
        template_version: i64::from(c.template_version),
        master_key_version: i64::from(c.master_key_version),
        puk_version: if piv {
            i64::from(Ord::max(c.puk_version, 1))
        } else {
            0
        },
        puk_rotation_pending: false,
        status: CredentialStatus::Active as i32,
        status_reason: String::new(),
        issued_at: c
            .issued_at
            .as_ref()
            .map(util::from_timestamp)
            .unwrap_or(now),
        last_unblock_at: None,
        last_unblock_flow: Flow::Unspecified as i32,
        unblock_count: 0,
        updated_at: now,
        label: c.label.clone(),
    }
}

impl Directory {
    /// Checks that template `id` (version `version`, 0: any) exists: through the template
    /// service when configured, else only its form. `issuing` also refuses retired templates
    /// and returns the template's card profile.
    pub(crate) async fn check_template(
        &self,
        field: &str,
        id: &str,
        version: u32,
        issuing: bool,
    ) -> Result<Option<i32>, Error> {
        util::check_uuid(field, id).map_err(|_| {
            Error::UnknownTemplate(format!("{field} {id:?} is not a template id (a UUID)"))
        })?;
        let Some(client) = &self.templates else {
            return Ok(None);
        };
        let mut client = client.clone();
        let reply = client
            .get_template(GetTemplateRequest {
                id: id.to_owned(),
                version,
            })
            .await;
        let template = match reply {
            Ok(r) => r.into_inner().template.unwrap_or_default(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(Error::UnknownTemplate(if version == 0 {
                    format!("template {id} does not exist")
                } else {
                    format!("template {id} has no version {version}")
                }));
            }
            Err(s) => return Err(Error::Unavailable(s.message().to_owned())),
        };
        if issuing && template.state == TemplateState::Retired as i32 {
            return Err(Error::FailedPrecondition(format!(
                "template {id} is retired: no new cards may be issued under it"
            )));
        }
        Ok(template.spec.map(|s| s.card_profile))
    }

    async fn credential(&self, id: &str) -> Result<credential::Model, Error> {
        util::check_uuid("id", id)?;
        credential::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("credential {id}")))
    }

    pub async fn register_credential(&self, c: Option<Credential>) -> Result<Credential, Error> {
        let c = c.ok_or_else(|| Error::invalid("credential", "credential is required"))?;
        util::check_uuid("credential.user_id", &c.user_id)?;
        check_card(&c)?;
        if let Some(template_profile) = self
            .check_template(
                "credential.template_id",
                &c.template_id,
                c.template_version,
                true,
            )
            .await?
        {
            check_profile(&c, template_profile)?;
        }
        let row = new_row(&c, util::new_id(), now_micros());
        let registered = to_proto(&row);
        let card = NewCard { row };
        self.card_writer().register(card).await?;
        tracing::info!(credential = %registered.id, user = %c.user_id, "credential registered");
        Ok(registered)
    }

    pub async fn get_credential(&self, id: &str) -> Result<Credential, Error> {
        Ok(to_proto(&self.credential(id).await?))
    }

    pub async fn get_credential_by_card_id(&self, card_id: &[u8]) -> Result<Credential, Error> {
        if card_id.is_empty() || card_id.len() > MAX_CARD_ID {
            return Err(Error::invalid(
                "card_id",
                format!("card_id must have 1 to {MAX_CARD_ID} bytes"),
            ));
        }
        credential::Entity::find()
            .filter(credential::Column::CardId.eq(card_id.to_vec()))
            .one(&self.db)
            .await?
            .map(|c| to_proto(&c))
            .ok_or_else(|| Error::NotFound("no credential with this card_id".into()))
    }

    pub async fn list_user_credentials(
        &self,
        req: &ListUserCredentialsRequest,
    ) -> Result<ListUserCredentialsResponse, Error> {
        let owner = Self::user_by_id(&self.db, &req.user_id).await?;
        let limit = util::page_size(req.page.as_ref());
        let mut query =
            credential::Entity::find().filter(credential::Column::UserId.eq(owner.id.clone()));
        if !req.include_inactive {
            query = query.filter(credential::Column::Status.is_not_in([
                CredentialStatus::Revoked as i32,
                CredentialStatus::Lost as i32,
            ]));
        }
        let token = util::page_token(req.page.as_ref());
        if !token.is_empty() {
            let after = token::decode(token, 2)?;
            let issued: i64 = after[0].parse().map_err(|_| {
                Error::invalid("page.page_token", "not a page token of this listing")
            })?;
            query = query.filter(
                Condition::any()
                    .add(credential::Column::IssuedAt.lt(issued))
                    .add(
                        Condition::all()
                            .add(credential::Column::IssuedAt.eq(issued))
                            .add(credential::Column::Id.gt(after[1].clone())),
                    ),
            );
        }
        let rows = query
            .order_by_desc(credential::Column::IssuedAt)
            .order_by_asc(credential::Column::Id)
            .limit(limit as u64 + 1)
            .all(&self.db)
            .await?;
        let more = rows.len() > limit;
        let page: Vec<_> = rows.into_iter().take(limit).collect();
        let next = match (more, page.last()) {
            (true, Some(c)) => token::encode(&[&c.issued_at.to_string(), &c.id]),
            _ => String::new(),
        };
        Ok(ListUserCredentialsResponse {
            credentials: page.iter().map(to_proto).collect(),
            page: Some(PageResponse {
                next_page_token: next,
                total_estimate: 0,
            }),
        })
    }

    pub async fn update_credential_status(
        &self,
        req: &UpdateCredentialStatusRequest,
    ) -> Result<Credential, Error> {
        check_text("reason", &req.reason, 1_000, false)?;
        let status =
            CredentialStatus::try_from(req.status).unwrap_or(CredentialStatus::Unspecified);
        if status == CredentialStatus::Unspecified {
            return Err(Error::invalid("status", "status is required"));
        }
        let current = self.credential(&req.id).await?;
        if current.status == CredentialStatus::Revoked as i32 && status != CredentialStatus::Revoked
        {
            return Err(Error::FailedPrecondition(format!(
                "credential {} is revoked; revocation is permanent",
                req.id
            )));
        }
        credential::Entity::update_many()
            .set(credential::ActiveModel {
                status: Set(status as i32),
                status_reason: Set(req.reason.clone()),
                updated_at: Set(now_micros()),
                ..Default::default()
            })
            .filter(credential::Column::Id.eq(req.id.clone()))
            .exec(&self.db)
            .await?;
        tracing::info!(credential = %req.id, status = status.as_str_name(), "credential status changed");
        self.get_credential(&req.id).await
    }

    pub async fn record_unblock(&self, req: &RecordUnblockRequest) -> Result<Credential, Error> {
        let current = self.credential(&req.id).await?;
        if current.status != CredentialStatus::Active as i32 {
            return Err(Error::FailedPrecondition(format!(
                "credential {} is not active; unblocks are refused",
                req.id
            )));
        }
        let flow = req.auth.as_ref().map(|a| a.flow).unwrap_or(0);
        let piv = current.profile == CardProfile::Piv as i32;
        if piv && req.puk_version == 0 {
            return Err(Error::invalid(
                "puk_version",
                "puk_version is required for a PIV credential",
            ));
        }
        let now = now_micros();
        credential::Entity::update_many()
            .set(credential::ActiveModel {
                last_unblock_at: Set(Some(
                    req.unblocked_at
                        .as_ref()
                        .map(util::from_timestamp)
                        .unwrap_or(now),
                )),
                last_unblock_flow: Set(flow),
                puk_version: Set(if piv { i64::from(req.puk_version) } else { 0 }),
                puk_rotation_pending: Set(piv && req.puk_rotation_pending),
                updated_at: Set(now),
                ..Default::default()
            })
            .col_expr(
                credential::Column::UnblockCount,
                Expr::col(credential::Column::UnblockCount).add(1),
            )
            .filter(credential::Column::Id.eq(req.id.clone()))
            .exec(&self.db)
            .await?;
        self.get_credential(&req.id).await
    }
}
