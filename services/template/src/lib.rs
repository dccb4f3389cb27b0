//! The template service: card templates and their unblock and PIN policies.
//!
//! Templates are versioned: every change writes a new immutable version (the spec,
//! protobuf-encoded) and bumps the template's `latest_version` with a compare-and-set, so two
//! concurrent editors cannot both win (optimistic concurrency). Specs are validated as a whole
//! ([`policy::validate`]) and contradictory settings are refused with messages that name them.

mod config;
pub mod entity;
mod error;
pub mod migration;
pub mod pin;
pub mod policy;
pub mod sample;
mod token;

pub use config::Config;
pub use error::Error;

use cms_kit::server::{Listeners, Server};
use cms_kit::service::{Program, ServiceFuture};
use cms_kit::shutdown::Shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::common::v1::{CardProfile, PageResponse};
use cms_proto::template::v1::template_service_server::{TemplateService, TemplateServiceServer};
use cms_proto::template::v1::{
    CheckPinRequest, CheckPinResponse, CreateTemplateRequest, CreateTemplateResponse,
    GetTemplateRequest, GetTemplateResponse, ListTemplateVersionsRequest,
    ListTemplateVersionsResponse, ListTemplatesRequest, ListTemplatesResponse,
    RetireTemplateRequest, RetireTemplateResponse, Severity, Template, TemplateSpec, TemplateState,
    UpdateTemplateRequest, UpdateTemplateResponse, ValidatePolicyRequest, ValidatePolicyResponse,
};
use prost::Message;
use sea_orm::sea_query::{Expr, ExprTrait, LikeExpr};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, TransactionTrait,
};
use tonic::{Request, Response, Status};
use zeroize::Zeroize;

use entity::{template, template_version};

pub const NAME: &str = "template";

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;
/// Longest PIN accepted for checking, in bytes (cards take at most 127 characters).
const MAX_PIN_BYTES: usize = 512;

/// The TemplateService implementation.
#[derive(Debug, Clone)]
pub struct Templates {
    db: DatabaseConnection,
}

/// Microseconds since the Unix epoch.
fn now_micros() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}

fn page_size(page: Option<&cms_proto::common::v1::PageRequest>) -> u64 {
    let size = page.map(|p| p.page_size).unwrap_or(0);
    u64::from(if size == 0 {
        DEFAULT_PAGE
    } else {
        Ord::min(size, MAX_PAGE)
    })
}

fn page_token(page: Option<&cms_proto::common::v1::PageRequest>) -> &str {
    page.map(|p| p.page_token.as_str()).unwrap_or("")
}

/// `%text%` for LIKE, with `%`, `_` and `\` escaped (used with ESCAPE '\').
fn like_contains(text: &str) -> LikeExpr {
    let mut pattern = String::from("%");
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    LikeExpr::new(pattern).escape('\\')
}

fn name_key(name: &str) -> String {
    name.trim().to_lowercase()
}

fn check_id(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::invalid("id", "the template id is required"));
    }
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(Error::invalid("id", "the template id is not a UUID"));
    }
    Ok(())
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), Error> {
    let n = value.chars().count();
    if n > max {
        return Err(Error::invalid(
            field,
            format!("{field} has {n} characters; at most {max} are allowed"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(Error::invalid(
            field,
            format!("{field} contains a control character"),
        ));
    }
    Ok(())
}

/// The spec, validated: refused with every error-severity violation when it has any.
fn valid_spec(spec: Option<TemplateSpec>) -> Result<TemplateSpec, Error> {
    let spec = spec.ok_or_else(|| Error::invalid("spec", "spec is required"))?;
    let violations = policy::validate(&spec);
    if violations
        .iter()
        .any(|v| v.severity == Severity::Error as i32)
    {
        return Err(Error::Policy(violations));
    }
    Ok(spec)
}

fn unique_violation(err: &sea_orm::DbErr) -> bool {
    matches!(
        err.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

fn to_proto(t: &template::Model, v: template_version::Model) -> Result<Template, Error> {
    let spec = TemplateSpec::decode(v.spec.as_slice()).map_err(|e| {
        Error::Storage(sea_orm::DbErr::Custom(format!(
            "stored spec of template {} version {} does not decode: {e}",
            t.id, v.version
        )))
    })?;
    Ok(Template {
        id: t.id.clone(),
        version: u32::try_from(v.version).unwrap_or(u32::MAX),
        state: t.state,
        spec: Some(spec),
        created_at: Some(timestamp(v.created_at)),
        created_by: v.created_by,
        change_comment: v.change_comment,
        retired_at: t.retired_at.map(timestamp),
        is_latest: v.version == t.latest_version,
    })
}

fn actor(auth: Option<&cms_proto::common::v1::AuthContext>) -> String {
    auth.map(|a| a.actor_id.clone()).unwrap_or_default()
}

impl Templates {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    async fn load(&self, id: &str) -> Result<template::Model, Error> {
        check_id(id)?;
        template::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("template {id}")))
    }

    async fn version(&self, t: &template::Model, version: u32) -> Result<Template, Error> {
        let number = if version == 0 {
            t.latest_version
        } else {
            i64::from(version)
        };
        let v = template_version::Entity::find_by_id((t.id.clone(), number))
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("template {} version {number}", t.id)))?;
        to_proto(t, v)
    }

    pub async fn create(
        &self,
        spec: Option<TemplateSpec>,
        comment: &str,
        by: &str,
    ) -> Result<Template, Error> {
        let spec = valid_spec(spec)?;
        check_text("change_comment", comment, policy::MAX_TEXT_CHARS)?;
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_micros();
        let txn = self.db.begin().await?;
        let row = template::ActiveModel {
            id: Set(id.clone()),
            name: Set(spec.name.trim().to_owned()),
            name_key: Set(name_key(&spec.name)),
            card_profile: Set(spec.card_profile),
            latest_version: Set(1),
            state: Set(TemplateState::Active as i32),
            retired_at: Set(None),
            retired_reason: Set(String::new()),
            created_at: Set(now),
            updated_at: Set(now),
        };
        let inserted = template::Entity::insert(row).exec(&txn).await;
        if let Err(e) = inserted {
            return Err(if unique_violation(&e) {
                Error::AlreadyExists(format!(
                    "a template named {:?} already exists",
                    spec.name.trim()
                ))
            } else {
                e.into()
            });
        }
        template_version::Entity::insert(template_version::ActiveModel {
            template_id: Set(id.clone()),
            version: Set(1),
            spec: Set(spec.encode_to_vec()),
            created_at: Set(now),
            created_by: Set(by.to_owned()),
            change_comment: Set(comment.to_owned()),
        })
        .exec(&txn)
        .await?;
        txn.commit().await?;
        tracing::info!(template = %id, version = 1, "template created");
        let t = self.load(&id).await?;
        self.version(&t, 1).await
    }

    pub async fn update(
        &self,
        id: &str,
        expected: u32,
        spec: Option<TemplateSpec>,
        comment: &str,
        by: &str,
    ) -> Result<Template, Error> {
        check_id(id)?;
        if expected == 0 {
            return Err(Error::invalid(
                "expected_current_version",
                "expected_current_version is required (the version you edited)",
            ));
        }
        let spec = valid_spec(spec)?;
        check_text("change_comment", comment, policy::MAX_TEXT_CHARS)?;
        let current = self.load(id).await?;
        if current.state == TemplateState::Retired as i32 {
            return Err(Error::FailedPrecondition(format!(
                "template {id} is retired and cannot change"
            )));
        }
        if spec.card_profile != current.card_profile {
            return Err(Error::invalid(
                "spec.card_profile",
                format!(
                    "card_profile cannot change from {} to {}: cards were issued under it; create a new template instead",
                    CardProfile::try_from(current.card_profile)
                        .map(|p| p.as_str_name())
                        .unwrap_or("?"),
                    CardProfile::try_from(spec.card_profile)
                        .map(|p| p.as_str_name())
                        .unwrap_or("?"),
                ),
            ));
        }
        // The same content again is not a change: answer the current version, add none.
        if current.latest_version == i64::from(expected) {
            let latest = self.version(&current, 0).await?;
            if latest.spec.as_ref() == Some(&spec) {
                tracing::info!(template = %id, version = expected, "template update changes nothing");
                return Ok(latest);
            }
        }
        let next = i64::from(expected) + 1;
        let now = now_micros();
        let txn = self.db.begin().await?;
        let updated = template::Entity::update_many()
            .col_expr(template::Column::LatestVersion, Expr::value(next))
            .col_expr(template::Column::Name, Expr::value(spec.name.trim()))
            .col_expr(template::Column::NameKey, Expr::value(name_key(&spec.name)))
            .col_expr(template::Column::UpdatedAt, Expr::value(now))
            .filter(template::Column::Id.eq(id))
            .filter(template::Column::LatestVersion.eq(i64::from(expected)))
            .filter(template::Column::State.eq(TemplateState::Active as i32))
            .exec(&txn)
            .await;
        let updated = match updated {
            Ok(u) => u,
            Err(e) if unique_violation(&e) => {
                return Err(Error::AlreadyExists(format!(
                    "a template named {:?} already exists",
                    spec.name.trim()
                )));
            }
            Err(e) => return Err(e.into()),
        };
        if updated.rows_affected != 1 {
            txn.rollback().await?;
            let now = self.load(id).await?;
            if now.state == TemplateState::Retired as i32 {
                return Err(Error::FailedPrecondition(format!(
                    "template {id} is retired and cannot change"
                )));
            }
            return Err(Error::VersionConflict {
                id: id.to_owned(),
                expected,
                current: u32::try_from(now.latest_version).unwrap_or(u32::MAX),
            });
        }
        template_version::Entity::insert(template_version::ActiveModel {
            template_id: Set(id.to_owned()),
            version: Set(next),
            spec: Set(spec.encode_to_vec()),
            created_at: Set(now),
            created_by: Set(by.to_owned()),
            change_comment: Set(comment.to_owned()),
        })
        .exec(&txn)
        .await?;
        txn.commit().await?;
        tracing::info!(template = %id, version = next, "template updated");
        let t = self.load(id).await?;
        self.version(&t, 0).await
    }

    pub async fn retire(&self, id: &str, reason: &str) -> Result<Template, Error> {
        check_text("reason", reason, policy::MAX_TEXT_CHARS)?;
        let t = self.load(id).await?;
        if t.state != TemplateState::Retired as i32 {
            let now = now_micros();
            template::Entity::update_many()
                .col_expr(
                    template::Column::State,
                    Expr::value(TemplateState::Retired as i32),
                )
                .col_expr(template::Column::RetiredAt, Expr::value(now))
                .col_expr(template::Column::RetiredReason, Expr::value(reason))
                .col_expr(template::Column::UpdatedAt, Expr::value(now))
                .filter(template::Column::Id.eq(id))
                .exec(&self.db)
                .await?;
            tracing::info!(template = %id, "template retired");
        }
        let t = self.load(id).await?;
        self.version(&t, 0).await
    }

    pub async fn list(&self, req: &ListTemplatesRequest) -> Result<ListTemplatesResponse, Error> {
        check_text("name_contains", &req.name_contains, policy::MAX_NAME_CHARS)?;
        let limit = page_size(req.page.as_ref());
        let mut query = template::Entity::find();
        if !req.include_retired {
            query = query.filter(template::Column::State.eq(TemplateState::Active as i32));
        }
        if req.card_profile != CardProfile::Unspecified as i32 {
            query = query.filter(template::Column::CardProfile.eq(req.card_profile));
        }
        if !req.name_contains.is_empty() {
            query = query.filter(
                Expr::col(template::Column::NameKey)
                    .like(like_contains(&name_key(&req.name_contains))),
            );
        }
        let token = page_token(req.page.as_ref());
        if !token.is_empty() {
            let after = token::decode(token, 2)?;
            query = query.filter(
                Condition::any()
                    .add(template::Column::NameKey.gt(after[0].clone()))
                    .add(
                        Condition::all()
                            .add(template::Column::NameKey.eq(after[0].clone()))
                            .add(template::Column::Id.gt(after[1].clone())),
                    ),
            );
        }
        let rows = query
            .order_by_asc(template::Column::NameKey)
            .order_by_asc(template::Column::Id)
            .limit(limit + 1)
            .all(&self.db)
            .await?;
        let more = rows.len() as u64 > limit;
        let mut templates = Vec::new();
        let mut next = String::new();
        for t in rows
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
        {
            if more {
                next = token::encode(&[&t.name_key, &t.id]);
            }
            templates.push(self.version(&t, 0).await?);
        }
        Ok(ListTemplatesResponse {
            templates,
            page: Some(PageResponse {
                next_page_token: next,
                total_estimate: 0,
            }),
        })
    }

    pub async fn versions(
        &self,
        req: &ListTemplateVersionsRequest,
    ) -> Result<ListTemplateVersionsResponse, Error> {
        let t = self.load(&req.id).await?;
        let limit = page_size(req.page.as_ref());
        let mut query = template_version::Entity::find()
            .filter(template_version::Column::TemplateId.eq(t.id.clone()));
        let token = page_token(req.page.as_ref());
        if !token.is_empty() {
            let before: i64 = token::decode(token, 1)?[0].parse().map_err(|_| {
                Error::invalid("page.page_token", "not a page token of this listing")
            })?;
            query = query.filter(template_version::Column::Version.lt(before));
        }
        let rows = query
            .order_by_desc(template_version::Column::Version)
            .limit(limit + 1)
            .all(&self.db)
            .await?;
        let more = rows.len() as u64 > limit;
        let mut versions = Vec::new();
        let mut next = String::new();
        for v in rows
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
        {
            if more {
                next = token::encode(&[&v.version.to_string()]);
            }
            versions.push(to_proto(&t, v)?);
        }
        Ok(ListTemplateVersionsResponse {
            versions,
            page: Some(PageResponse {
                next_page_token: next,
                total_estimate: u64::try_from(t.latest_version).unwrap_or(0),
            }),
        })
    }

    pub async fn check_pin(&self, req: &CheckPinRequest) -> Result<CheckPinResponse, Error> {
        if req.pin.len() > MAX_PIN_BYTES || req.previous_pin.len() > MAX_PIN_BYTES {
            return Err(Error::invalid(
                "pin",
                format!("a PIN has at most {MAX_PIN_BYTES} bytes"),
            ));
        }
        let t = self.load(&req.template_id).await?;
        let spec = self
            .version(&t, req.template_version)
            .await?
            .spec
            .unwrap_or_default();
        let policy = spec.pin_policy.unwrap_or_default();
        let violations = pin::check(&policy, &req.pin, &req.previous_pin);
        Ok(CheckPinResponse {
            acceptable: !violations
                .iter()
                .any(|v| v.severity == Severity::Error as i32),
            violations,
        })
    }
}

#[tonic::async_trait]
impl TemplateService for Templates {
    async fn create_template(
        &self,
        request: Request<CreateTemplateRequest>,
    ) -> Result<Response<CreateTemplateResponse>, Status> {
        let req = request.into_inner();
        let template = self
            .create(req.spec, &req.change_comment, &actor(req.auth.as_ref()))
            .await?;
        Ok(Response::new(CreateTemplateResponse {
            template: Some(template),
        }))
    }

    async fn get_template(
        &self,
        request: Request<GetTemplateRequest>,
    ) -> Result<Response<GetTemplateResponse>, Status> {
        let req = request.into_inner();
        let t = self.load(&req.id).await?;
        let template = self.version(&t, req.version).await?;
        Ok(Response::new(GetTemplateResponse {
            template: Some(template),
        }))
    }

    async fn list_templates(
        &self,
        request: Request<ListTemplatesRequest>,
    ) -> Result<Response<ListTemplatesResponse>, Status> {
        Ok(Response::new(self.list(request.get_ref()).await?))
    }

    async fn list_template_versions(
        &self,
        request: Request<ListTemplateVersionsRequest>,
    ) -> Result<Response<ListTemplateVersionsResponse>, Status> {
        Ok(Response::new(self.versions(request.get_ref()).await?))
    }

    async fn update_template(
        &self,
        request: Request<UpdateTemplateRequest>,
    ) -> Result<Response<UpdateTemplateResponse>, Status> {
        let req = request.into_inner();
        let template = self
            .update(
                &req.id,
                req.expected_current_version,
                req.spec,
                &req.change_comment,
                &actor(req.auth.as_ref()),
            )
            .await?;
        Ok(Response::new(UpdateTemplateResponse {
            template: Some(template),
        }))
    }

    async fn retire_template(
        &self,
        request: Request<RetireTemplateRequest>,
    ) -> Result<Response<RetireTemplateResponse>, Status> {
        let req = request.into_inner();
        let template = self.retire(&req.id, &req.reason).await?;
        Ok(Response::new(RetireTemplateResponse {
            template: Some(template),
        }))
    }

    async fn validate_policy(
        &self,
        request: Request<ValidatePolicyRequest>,
    ) -> Result<Response<ValidatePolicyResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Error::invalid("spec", "spec is required"))?;
        let violations = policy::validate(&spec);
        Ok(Response::new(ValidatePolicyResponse {
            valid: !violations
                .iter()
                .any(|v| v.severity == Severity::Error as i32),
            violations,
        }))
    }

    async fn check_pin(
        &self,
        request: Request<CheckPinRequest>,
    ) -> Result<Response<CheckPinResponse>, Status> {
        let mut req = request.into_inner();
        let outcome = Templates::check_pin(self, &req).await;
        req.pin.zeroize();
        req.previous_pin.zeroize();
        Ok(Response::new(outcome?))
    }
}

/// Opens the database and applies pending migrations (once, under a lock on PostgreSQL).
pub async fn open_database(config: &Config) -> Result<DatabaseConnection, Error> {
    let db = cms_kit::db::connect(&config.database, &config.data_dir, NAME).await?;
    migration::run(&db).await.map_err(Error::Migrate)?;
    Ok(db)
}

/// The `cms-template` binary: serves, or only migrates (`--migrate-only`).
pub const PROGRAM: Program<Config, Error> = Program {
    name: NAME,
    run,
    migrate: Some(migrate),
};

/// Serves the template API on `listeners` until `shutdown`.
///
/// Boxed so that the service's async code is compiled once, in this crate: a binary or test
/// that awaited the bare future would compile all of it again (minutes per binary).
pub fn run(config: Config, listeners: Listeners, shutdown: Shutdown) -> ServiceFuture<Error> {
    Box::pin(serve_template(config, listeners, shutdown))
}

/// Applies pending migrations and returns (see [`open_database`]).
pub fn migrate(config: Config) -> ServiceFuture<Error> {
    Box::pin(async move {
        open_database(&config).await?.close().await?;
        Ok(())
    })
}

async fn serve_template(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let tls = TlsSource::load(config.tls.clone())?;
    let db = open_database(&config).await?;
    Server::new(NAME, config.server, config.access, tls)
        .add_service(TemplateServiceServer::new(Templates::new(db)))
        .serve(listeners, shutdown)
        .await?;
    Ok(())
}
