//! Who acts in the helpdesk workflow, and what their roles and scope allow.
//!
//! The actor is an operator with an active directory account: either the caller itself
//! (`/cms/operator/<name>`, or a certificate the directory binds to the account), or the operator a granted service (`/cms/service/<name>`, listed in
//! `helpdesk.service_callers`) names in the `x-cms-operator` header. The same roles, scope,
//! template rules, approvals and audit apply to both; the audit also records the service.

use cms_kit::PeerIdentity;
use cms_kit::authz::IdentityPattern;
use cms_proto::common::v1::ActorKind;
use cms_proto::directory::v1::Operator;

use crate::Error;
use crate::caller::{Caller, classify};
use crate::operators::OperatorAccounts;
use crate::roles::{self, Account, Action};

/// Metadata key by which a granted service names the operator it acts for.
pub const ON_BEHALF_OF: &str = crate::forward::ON_BEHALF_OF;

/// An authenticated operator, as far as the workflow needs it.
#[derive(Clone, Debug)]
pub struct Actor {
    pub account: Operator,
    /// The verified SPIFFE ID of the connection, or the bound certificate's label.
    pub peer: String,
    /// The service that called on the operator's behalf, if any.
    pub via_service: Option<String>,
}

impl Actor {
    /// The operator's username: the actor id in the audit and the decision log.
    pub fn username(&self) -> &str {
        &self.account.username
    }

    pub fn display_name(&self) -> &str {
        if self.account.display_name.is_empty() {
            &self.account.username
        } else {
            &self.account.display_name
        }
    }

    pub fn actor_kind(&self) -> ActorKind {
        ActorKind::Operator
    }

    fn as_account(&self) -> Account {
        Account {
            active: true,
            role_names: self.account.roles.clone(),
        }
    }

    /// Refuses unless the operator holds a role the gateway-level `action` needs.
    pub fn require(&self, action: Action) -> Result<(), Error> {
        roles::decide(self.username(), Some(&self.as_account()), action)
            .map_err(|refusal| Error::denied(refusal.to_string()))
    }

    /// Whether the operator holds one of the role names a template rule lists.
    pub fn holds_any(&self, names: &[String]) -> bool {
        self.account.roles.iter().any(|r| names.contains(r))
    }

    pub fn has_role(&self, role: roles::Role) -> bool {
        self.account.roles.iter().any(|r| r == role.as_str())
    }

    /// The org units the operator may serve; empty: all.
    pub fn org_units(&self) -> &[String] {
        self.account
            .scope
            .as_ref()
            .map(|s| s.org_units.as_slice())
            .unwrap_or_default()
    }

    fn template_ids(&self) -> &[String] {
        self.account
            .scope
            .as_ref()
            .map(|s| s.template_ids.as_slice())
            .unwrap_or_default()
    }

    /// Refuses a user outside the operator's org units (a unit covers its sub-units).
    pub fn require_user_in_scope(&self, user_id: &str, org_unit: &str) -> Result<(), Error> {
        if org_unit_in(org_unit, self.org_units()) {
            return Ok(());
        }
        Err(Error::denied(format!(
            "user {user_id} (org unit {org_unit:?}) is outside the scope of operator {:?} (org units: {})",
            self.username(),
            self.org_units().join(", ")
        )))
    }

    /// Whether cards of `template_id` are within the operator's scope.
    pub fn covers_template(&self, template_id: &str) -> bool {
        let ids = self.template_ids();
        ids.is_empty() || ids.iter().any(|t| t == template_id)
    }

    pub fn require_template_in_scope(&self, template_id: &str) -> Result<(), Error> {
        if self.covers_template(template_id) {
            return Ok(());
        }
        Err(Error::denied(format!(
            "cards of template {template_id} are outside the scope of operator {:?}",
            self.username()
        )))
    }
}

/// Whether `unit` is one of `scope` or below one of them; an empty scope covers everything.
pub fn org_unit_in(unit: &str, scope: &[String]) -> bool {
    scope.is_empty()
        || scope.iter().any(|s| {
            let s = s.trim_end_matches('/');
            unit == s
                || unit
                    .strip_prefix(s)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
}

/// Finds the operator acting in `request`.
pub async fn actor<T>(
    accounts: &OperatorAccounts,
    service_callers: &[IdentityPattern],
    request: &tonic::Request<T>,
) -> Result<Actor, Error> {
    if let Some(certificate) =
        cms_kit::ConnectionIdentity::of(request).and_then(|c| c.bound_certificate())
    {
        let operator = accounts.operator_of(request).await?;
        let account = accounts.active_account(&operator).await?;
        return Ok(Actor {
            account,
            peer: crate::caller::bound_certificate_label(certificate),
            via_service: None,
        });
    }
    let peer =
        PeerIdentity::of(request).ok_or_else(|| Error::denied("no verified client identity"))?;
    let (operator, via_service) = match classify(peer) {
        Caller::Operator(_) => (accounts.operator_of(request).await?, None),
        Caller::Service(_) if service_callers.iter().any(|p| p.matches(&peer.spiffe_id)) => {
            let named = request
                .metadata()
                .get(ON_BEHALF_OF)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.len() <= 128)
                .ok_or_else(|| {
                    Error::denied(format!(
                        "{} acts for an operator: name it in the {ON_BEHALF_OF} header",
                        peer.spiffe_id
                    ))
                })?;
            (named.to_owned(), Some(peer.spiffe_id.to_string()))
        }
        Caller::Service(_) => {
            return Err(Error::denied(format!(
                "{} is not granted the helpdesk workflow (helpdesk.service_callers)",
                peer.spiffe_id
            )));
        }
        _ => {
            return Err(Error::denied(format!(
                "{} is not an operator identity",
                peer.spiffe_id
            )));
        }
    };
    let account = accounts.active_account(&operator).await?;
    Ok(Actor {
        account,
        peer: peer.spiffe_id.to_string(),
        via_service,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_units_cover_their_sub_units_only() {
        let scope = vec!["Finance".to_owned(), "IT/Ops/".to_owned()];
        assert!(org_unit_in("Finance", &scope));
        assert!(org_unit_in("Finance/Payroll", &scope));
        assert!(org_unit_in("IT/Ops", &scope));
        assert!(!org_unit_in("FinanceX", &scope));
        assert!(!org_unit_in("IT", &scope));
        assert!(!org_unit_in("", &scope));
        assert!(org_unit_in("anything", &[]));
    }
}
