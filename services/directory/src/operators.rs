//! Operators and the certificates bound to them.

use cms_proto::common::v1::PageResponse;
use cms_proto::directory::v1::certificate_binding::Binding;
use cms_proto::directory::v1::{
    CertificateBinding, GetOperatorByCertificateRequest, IssuerSerial, ListOperatorsRequest,
    ListOperatorsResponse, Operator, OperatorScope, OperatorStatus,
};
use data_encoding::{HEXLOWER, HEXLOWER_PERMISSIVE};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, TransactionTrait,
};

use crate::entity::{operator, operator_certificate};
use crate::normalize;
use crate::util::{self, check_text, now_micros, timestamp};
use crate::{Directory, Error, token};

const MAX_ROLE: usize = 64;
const MAX_LIST: usize = 64;
const MAX_DN: usize = 1_024;

fn json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

fn unjson(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// Serial number bytes as lower-case hex without leading zero bytes (DER may add one).
fn serial_hex(serial: &[u8]) -> String {
    let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    HEXLOWER.encode(&serial[start..])
}

/// The bytes of a hex column this service wrote (empty if it was altered into non-hex).
fn unhex(text: &str) -> Vec<u8> {
    HEXLOWER_PERMISSIVE
        .decode(text.as_bytes())
        .unwrap_or_default()
}

fn to_proto(m: &operator::Model, certs: &[operator_certificate::Model]) -> Operator {
    Operator {
        id: m.id.clone(),
        username: m.username.clone(),
        display_name: m.display_name.clone(),
        email: m.email.clone(),
        user_id: m.user_id.clone(),
        roles: unjson(&m.roles),
        scope: Some(OperatorScope {
            org_units: unjson(&m.scope_org_units),
            template_ids: unjson(&m.scope_template_ids),
        }),
        certificates: certs
            .iter()
            .map(|c| CertificateBinding {
                binding: Some(if c.spki_hex.is_empty() {
                    Binding::IssuerSerial(IssuerSerial {
                        issuer_dn: c.issuer_dn.clone(),
                        serial_number: unhex(&c.serial_hex),
                    })
                } else {
                    Binding::SpkiSha256(unhex(&c.spki_hex))
                }),
                subject_dn: c.subject_dn.clone(),
                not_after: c.not_after.map(timestamp),
                label: c.label.clone(),
            })
            .collect(),
        status: m.status,
        created_at: Some(timestamp(m.created_at)),
        updated_at: Some(timestamp(m.updated_at)),
        last_login_at: m.last_login_at.map(timestamp),
        etag: m.revision.to_string(),
    }
}

fn check_list(field: &str, values: &[String], max_each: usize) -> Result<(), Error> {
    if values.len() > MAX_LIST {
        return Err(Error::invalid(
            field,
            format!("{field} has {} entries; at most {MAX_LIST}", values.len()),
        ));
    }
    for (i, v) in values.iter().enumerate() {
        check_text(&format!("{field}[{i}]"), v, max_each, true)?;
    }
    Ok(())
}

fn check_roles(roles: &[String]) -> Result<(), Error> {
    check_list("operator.roles", roles, MAX_ROLE)?;
    for r in roles {
        if !r
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            return Err(Error::invalid(
                "operator.roles",
                format!("role {r:?} may only use a-z, 0-9, '-' and '_'"),
            ));
        }
    }
    Ok(())
}

/// The certificate rows for `bindings`, validated.
fn cert_rows(
    operator_id: &str,
    bindings: &[CertificateBinding],
) -> Result<Vec<operator_certificate::ActiveModel>, Error> {
    if bindings.len() > MAX_LIST {
        return Err(Error::invalid(
            "operator.certificates",
            "too many certificates",
        ));
    }
    let mut rows = Vec::new();
    for (i, b) in bindings.iter().enumerate() {
        let field = format!("operator.certificates[{i}]");
        check_text(&format!("{field}.subject_dn"), &b.subject_dn, MAX_DN, false)?;
        check_text(&format!("{field}.label"), &b.label, 128, false)?;
        let (issuer_dn, serial, spki) = match &b.binding {
            Some(Binding::IssuerSerial(is)) => {
                check_text(
                    &format!("{field}.issuer_serial.issuer_dn"),
                    &is.issuer_dn,
                    MAX_DN,
                    true,
                )?;
                let s = serial_hex(&is.serial_number);
                if s.is_empty() || is.serial_number.len() > 21 {
                    return Err(Error::invalid(
                        &format!("{field}.issuer_serial.serial_number"),
                        "a certificate serial number has 1 to 20 significant bytes",
                    ));
                }
                (is.issuer_dn.clone(), s, String::new())
            }
            Some(Binding::SpkiSha256(h)) => {
                if h.len() != 32 {
                    return Err(Error::invalid(
                        &format!("{field}.spki_sha256"),
                        format!("spki_sha256 has {} bytes; a SHA-256 has 32", h.len()),
                    ));
                }
                (String::new(), String::new(), HEXLOWER.encode(h))
            }
            None => {
                return Err(Error::invalid(
                    &field,
                    format!("{field} needs issuer_serial or spki_sha256"),
                ));
            }
        };
        rows.push(operator_certificate::ActiveModel {
            id: Set(util::new_id()),
            operator_id: Set(operator_id.to_owned()),
            position: Set(i32::try_from(i).unwrap_or(0)),
            issuer_dn: Set(issuer_dn),
            serial_hex: Set(serial),
            spki_hex: Set(spki),
            subject_dn: Set(b.subject_dn.clone()),
            not_after: Set(b.not_after.as_ref().map(util::from_timestamp)),
            label: Set(b.label.clone()),
        });
    }
    Ok(rows)
}

impl Directory {
    async fn operator_row<C: ConnectionTrait>(db: &C, id: &str) -> Result<operator::Model, Error> {
        util::check_uuid("id", id)?;
        operator::Entity::find_by_id(id.to_owned())
            .one(db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("operator {id}")))
    }

    async fn certs_of<C: ConnectionTrait>(
        db: &C,
        id: &str,
    ) -> Result<Vec<operator_certificate::Model>, Error> {
        Ok(operator_certificate::Entity::find()
            .filter(operator_certificate::Column::OperatorId.eq(id))
            .order_by_asc(operator_certificate::Column::Position)
            .all(db)
            .await?)
    }

    /// Refuses a binding that another operator already holds.
    async fn check_bindings_free<C: ConnectionTrait>(
        db: &C,
        operator_id: &str,
        rows: &[operator_certificate::ActiveModel],
    ) -> Result<(), Error> {
        for row in rows {
            let (Set(issuer), Set(serial), Set(spki)) =
                (&row.issuer_dn, &row.serial_hex, &row.spki_hex)
            else {
                continue;
            };
            let query = if spki.is_empty() {
                operator_certificate::Entity::find()
                    .filter(operator_certificate::Column::IssuerDn.eq(issuer.clone()))
                    .filter(operator_certificate::Column::SerialHex.eq(serial.clone()))
            } else {
                operator_certificate::Entity::find()
                    .filter(operator_certificate::Column::SpkiHex.eq(spki.clone()))
            };
            if let Some(other) = query
                .filter(operator_certificate::Column::OperatorId.ne(operator_id))
                .one(db)
                .await?
            {
                return Err(Error::AlreadyExists(format!(
                    "this certificate is already bound to operator {}",
                    other.operator_id
                )));
            }
        }
        Ok(())
    }

    async fn check_scope(&self, scope: &OperatorScope) -> Result<(), Error> {
        check_list("operator.scope.org_units", &scope.org_units, 512)?;
        if scope.template_ids.len() > MAX_LIST {
            return Err(Error::invalid(
                "operator.scope.template_ids",
                "too many templates",
            ));
        }
        for (i, t) in scope.template_ids.iter().enumerate() {
            self.check_template(&format!("operator.scope.template_ids[{i}]"), t, 0, false)
                .await?;
        }
        Ok(())
    }

    fn check_operator_fields(o: &Operator) -> Result<(), Error> {
        check_text("operator.username", &o.username, 128, true)?;
        check_text("operator.display_name", &o.display_name, 256, false)?;
        check_text("operator.email", &o.email, 320, false)?;
        if !o.user_id.is_empty() {
            util::check_uuid("operator.user_id", &o.user_id)?;
        }
        check_roles(&o.roles)
    }

    pub async fn create_operator(&self, o: Option<Operator>) -> Result<Operator, Error> {
        let o = o.ok_or_else(|| Error::invalid("operator", "operator is required"))?;
        Self::check_operator_fields(&o)?;
        let scope = o.scope.clone().unwrap_or_default();
        self.check_scope(&scope).await?;
        let id = util::new_id();
        let certs = cert_rows(&id, &o.certificates)?;
        let now = now_micros();
        let txn = self.db.begin().await?;
        Self::check_bindings_free(&txn, &id, &certs).await?;
        let row = operator::ActiveModel {
            id: Set(id.clone()),
            username: Set(o.username.clone()),
            username_key: Set(normalize::fold(&o.username)),
            display_name: Set(o.display_name.clone()),
            email: Set(o.email.clone()),
            user_id: Set(o.user_id.clone()),
            roles: Set(json(&o.roles)),
            scope_org_units: Set(json(&scope.org_units)),
            scope_template_ids: Set(json(&scope.template_ids)),
            status: Set(OperatorStatus::Active as i32),
            created_at: Set(now),
            updated_at: Set(now),
            last_login_at: Set(None),
            revision: Set(1),
        };
        match operator::Entity::insert(row).exec(&txn).await {
            Ok(_) => {}
            Err(e) if util::unique_violation(&e) => {
                return Err(Error::AlreadyExists(format!(
                    "an operator named {:?} already exists",
                    o.username
                )));
            }
            Err(e) => return Err(e.into()),
        }
        if !certs.is_empty() {
            operator_certificate::Entity::insert_many(certs)
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        tracing::info!(operator = %id, "operator created");
        self.get_operator(&id).await
    }

    pub async fn get_operator(&self, id: &str) -> Result<Operator, Error> {
        let m = Self::operator_row(&self.db, id).await?;
        let certs = Self::certs_of(&self.db, id).await?;
        Ok(to_proto(&m, &certs))
    }

    pub async fn list_operators(
        &self,
        req: &ListOperatorsRequest,
    ) -> Result<ListOperatorsResponse, Error> {
        check_text("role", &req.role, MAX_ROLE, false)?;
        let limit = util::page_size(req.page.as_ref());
        let mut query = operator::Entity::find();
        if !req.include_disabled {
            query = query.filter(operator::Column::Status.eq(OperatorStatus::Active as i32));
        }
        let token = util::page_token(req.page.as_ref());
        if !token.is_empty() {
            let after = token::decode(token, 2)?;
            query = query.filter(
                sea_orm::Condition::any()
                    .add(operator::Column::UsernameKey.gt(after[0].clone()))
                    .add(
                        sea_orm::Condition::all()
                            .add(operator::Column::UsernameKey.eq(after[0].clone()))
                            .add(operator::Column::Id.gt(after[1].clone())),
                    ),
            );
        }
        // Operators are few: filter roles here rather than in SQL over JSON.
        let rows: Vec<operator::Model> = query
            .order_by_asc(operator::Column::UsernameKey)
            .order_by_asc(operator::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .filter(|m| req.role.is_empty() || unjson(&m.roles).contains(&req.role))
            .collect();
        let more = rows.len() > limit;
        let mut operators = Vec::new();
        let mut next = String::new();
        for m in rows.into_iter().take(limit) {
            if more {
                next = token::encode(&[&m.username_key, &m.id]);
            }
            let certs = Self::certs_of(&self.db, &m.id).await?;
            operators.push(to_proto(&m, &certs));
        }
        Ok(ListOperatorsResponse {
            operators,
            page: Some(PageResponse {
                next_page_token: next,
                total_estimate: 0,
            }),
        })
    }

    pub async fn update_operator(
        &self,
        o: Option<Operator>,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<Operator, Error> {
        let o = o.ok_or_else(|| Error::invalid("operator", "operator is required"))?;
        let paths = mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                "update_mask is required (e.g. \"roles\", \"scope\", \"certificates\", \"status\")",
            ));
        }
        let txn = self.db.begin().await?;
        let current = Self::operator_row(&txn, &o.id).await?;
        if !o.etag.is_empty() && o.etag != current.revision.to_string() {
            return Err(Error::Conflict(format!(
                "operator {} changed since it was read (etag {} is now {}): reload it and apply the change again",
                o.id, o.etag, current.revision
            )));
        }
        let mut merged = to_proto(&current, &[]);
        let mut replace_certs = None;
        for path in &paths {
            match path.as_str() {
                "username" => merged.username = o.username.clone(),
                "display_name" => merged.display_name = o.display_name.clone(),
                "email" => merged.email = o.email.clone(),
                "user_id" => merged.user_id = o.user_id.clone(),
                "roles" => merged.roles = o.roles.clone(),
                "scope" => {
                    let scope = o.scope.clone().unwrap_or_default();
                    self.check_scope(&scope).await?;
                    merged.scope = Some(scope);
                }
                "certificates" => replace_certs = Some(cert_rows(&o.id, &o.certificates)?),
                "status" => match OperatorStatus::try_from(o.status) {
                    Ok(OperatorStatus::Active | OperatorStatus::Disabled) => {
                        merged.status = o.status
                    }
                    _ => {
                        return Err(Error::invalid(
                            "operator.status",
                            "status must be OPERATOR_STATUS_ACTIVE or OPERATOR_STATUS_DISABLED",
                        ));
                    }
                },
                other => {
                    return Err(Error::invalid(
                        "update_mask",
                        format!(
                            "update_mask names {other:?}, which is not an updatable field (username, display_name, email, user_id, roles, scope, certificates, status)"
                        ),
                    ));
                }
            }
        }
        Self::check_operator_fields(&merged)?;
        let scope = merged.scope.clone().unwrap_or_default();
        let result = operator::Entity::update_many()
            .set(operator::ActiveModel {
                username: Set(merged.username.clone()),
                username_key: Set(normalize::fold(&merged.username)),
                display_name: Set(merged.display_name.clone()),
                email: Set(merged.email.clone()),
                user_id: Set(merged.user_id.clone()),
                roles: Set(json(&merged.roles)),
                scope_org_units: Set(json(&scope.org_units)),
                scope_template_ids: Set(json(&scope.template_ids)),
                status: Set(merged.status),
                updated_at: Set(now_micros()),
                revision: Set(current.revision + 1),
                ..Default::default()
            })
            .filter(operator::Column::Id.eq(current.id.clone()))
            .filter(operator::Column::Revision.eq(current.revision))
            .exec(&txn)
            .await;
        match result {
            Ok(r) if r.rows_affected == 1 => {}
            Ok(_) => {
                return Err(Error::Conflict(format!(
                    "operator {} changed concurrently: reload it and apply the change again",
                    o.id
                )));
            }
            Err(e) if util::unique_violation(&e) => {
                return Err(Error::AlreadyExists(format!(
                    "an operator named {:?} already exists",
                    merged.username
                )));
            }
            Err(e) => return Err(e.into()),
        }
        if let Some(rows) = replace_certs {
            Self::check_bindings_free(&txn, &current.id, &rows).await?;
            operator_certificate::Entity::delete_many()
                .filter(operator_certificate::Column::OperatorId.eq(current.id.clone()))
                .exec(&txn)
                .await?;
            if !rows.is_empty() {
                operator_certificate::Entity::insert_many(rows)
                    .exec(&txn)
                    .await?;
            }
        }
        txn.commit().await?;
        self.get_operator(&o.id).await
    }

    pub async fn operator_by_certificate(
        &self,
        req: &GetOperatorByCertificateRequest,
    ) -> Result<Operator, Error> {
        if req.issuer_dn.len() > MAX_DN
            || req.serial_number.len() > 64
            || req.spki_sha256.len() > 64
        {
            return Err(Error::invalid(
                "issuer_dn",
                "certificate identifiers are too long",
            ));
        }
        let mut cond = sea_orm::Condition::any();
        let serial = serial_hex(&req.serial_number);
        let mut any = false;
        if !req.issuer_dn.is_empty() && !serial.is_empty() {
            cond = cond.add(
                sea_orm::Condition::all()
                    .add(operator_certificate::Column::IssuerDn.eq(req.issuer_dn.clone()))
                    .add(operator_certificate::Column::SerialHex.eq(serial)),
            );
            any = true;
        }
        if req.spki_sha256.len() == 32 {
            cond = cond
                .add(operator_certificate::Column::SpkiHex.eq(HEXLOWER.encode(&req.spki_sha256)));
            any = true;
        }
        if !any {
            return Err(Error::invalid(
                "issuer_dn",
                "give issuer_dn and serial_number, or spki_sha256 (32 bytes)",
            ));
        }
        let bindings = operator_certificate::Entity::find()
            .filter(cond)
            .all(&self.db)
            .await?;
        for b in bindings {
            let m = Self::operator_row(&self.db, &b.operator_id).await?;
            if m.status == OperatorStatus::Active as i32 {
                let now = now_micros();
                operator::Entity::update_many()
                    .set(operator::ActiveModel {
                        last_login_at: Set(Some(now)),
                        ..Default::default()
                    })
                    .filter(operator::Column::Id.eq(m.id.clone()))
                    .exec(&self.db)
                    .await?;
                return self.get_operator(&m.id).await;
            }
        }
        Err(Error::NotFound(
            "no active operator is bound to this certificate".into(),
        ))
    }
}
