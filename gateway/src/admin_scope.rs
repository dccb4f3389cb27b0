//! The operator's scope on AdminService's directory and template changes: an operator limited
//! to some org units (or templates) changes only users, and cards of users, within them; bulk
//! imports and LDAP sync, which can touch any user, need an unrestricted operator.
//!
//! Checked before the role check of `Admin::begin` only when the caller is an active operator:
//! anyone else is refused there, with its reason.

use std::time::Duration;

use cms_proto::directory::v1::{GetCredentialRequest, GetUserRequest, Operator};
use tonic::{Request, Status};

use crate::admin::Admin;
use crate::authz::org_unit_in;
use crate::roles::Action;

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a change touches.
pub enum Target<'a> {
    /// A user to be created in this org unit.
    OrgUnit(&'a str),
    /// An existing user (and, when set, the org unit it moves to).
    User(&'a str, Option<&'a str>),
    /// A new card of this user under this template.
    NewCard {
        user_id: &'a str,
        template_id: &'a str,
    },
    /// An existing card.
    Card(&'a str),
    /// A template (update, retire).
    Template(&'a str),
    /// Anything (bulk import, LDAP sync, new templates).
    Everything,
}

fn scope(operator: &Operator) -> (&[String], &[String]) {
    operator
        .scope
        .as_ref()
        .map(|s| (s.org_units.as_slice(), s.template_ids.as_slice()))
        .unwrap_or_default()
}

impl Admin {
    /// Refuses (and logs) a change outside the calling operator's scope.
    pub async fn require_scope<T>(
        &self,
        rpc: &'static str,
        action: Action,
        request: &Request<T>,
        target: Target<'_>,
    ) -> Result<(), Status> {
        // Callers that are not operators (granted services) have no scope to enforce; the
        // action itself was authorised before.
        let Ok(name) = self.operators.operator_of(request).await else {
            return Ok(());
        };
        let Ok(operator) = self.operators.active_account(&name).await else {
            return Ok(());
        };
        let (units, templates) = scope(&operator);
        if units.is_empty() && templates.is_empty() {
            return Ok(());
        }
        let denied = match self.outside(units, templates, target).await {
            Ok(None) => return Ok(()),
            Ok(Some(what)) => Status::from(crate::Error::denied(format!(
                "{what} is outside the scope of operator {name:?}"
            ))),
            Err(status) => status,
        };
        self.record_refusal(rpc, action, request, &denied);
        Err(denied)
    }

    /// What of `target` lies outside the scope, if anything.
    async fn outside(
        &self,
        units: &[String],
        templates: &[String],
        target: Target<'_>,
    ) -> Result<Option<String>, Status> {
        let unit_ok = |unit: &str| org_unit_in(unit, units);
        let template_ok = |id: &str| templates.is_empty() || templates.iter().any(|t| t == id);
        Ok(match target {
            Target::OrgUnit(unit) => (!unit_ok(unit)).then(|| format!("org unit {unit:?}")),
            Target::User(id, moving_to) => {
                let unit = self.user_org_unit(id).await?;
                if !unit_ok(&unit) {
                    Some(format!("user {id}"))
                } else {
                    moving_to
                        .filter(|to| !unit_ok(to))
                        .map(|to| format!("org unit {to:?}"))
                }
            }
            Target::NewCard {
                user_id,
                template_id,
            } => {
                if !template_ok(template_id) {
                    Some(format!("template {template_id}"))
                } else {
                    let unit = self.user_org_unit(user_id).await?;
                    (!unit_ok(&unit)).then(|| format!("user {user_id}"))
                }
            }
            Target::Card(id) => {
                let mut directory = self.directory.clone();
                let mut request = Request::new(GetCredentialRequest { id: id.to_owned() });
                request.set_timeout(LOOKUP_TIMEOUT);
                let card = directory
                    .get_credential(request)
                    .await?
                    .into_inner()
                    .credential
                    .unwrap_or_default();
                if !template_ok(&card.template_id) {
                    Some(format!("card {id} (template {})", card.template_id))
                } else {
                    let unit = self.user_org_unit(&card.user_id).await?;
                    (!unit_ok(&unit)).then(|| format!("card {id}"))
                }
            }
            Target::Template(id) => (!template_ok(id)).then(|| format!("template {id}")),
            Target::Everything => Some("a change that may touch any user or template".into()),
        })
    }

    async fn user_org_unit(&self, id: &str) -> Result<String, Status> {
        let mut directory = self.directory.clone();
        let mut request = Request::new(GetUserRequest { id: id.to_owned() });
        request.set_timeout(LOOKUP_TIMEOUT);
        Ok(directory
            .get_user(request)
            .await?
            .into_inner()
            .user
            .map(|u| u.org_unit)
            .unwrap_or_default())
    }
}
