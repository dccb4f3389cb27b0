//! Which operator roles may do what through AdminService, decided from an operator account
//! as the directory holds it. Pure: the account lookup lives in `operators`.

use std::fmt;

/// The operator roles the directory records (`cms.directory.v1.Operator.roles`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Helpdesk,
    Approver,
    TemplateAdmin,
    KeyCustodian,
    Auditor,
    /// Users, imports, LDAP sync and cards in the directory.
    DirectoryAdmin,
    Admin,
}

impl Role {
    pub const ALL: [Self; 7] = [
        Self::Helpdesk,
        Self::Approver,
        Self::TemplateAdmin,
        Self::KeyCustodian,
        Self::Auditor,
        Self::DirectoryAdmin,
        Self::Admin,
    ];

    /// A role name as stored; `None` for names the gateway does not know (they grant nothing).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "helpdesk" => Self::Helpdesk,
            "approver" => Self::Approver,
            "template-admin" => Self::TemplateAdmin,
            "key-custodian" => Self::KeyCustodian,
            "auditor" => Self::Auditor,
            "directory-admin" => Self::DirectoryAdmin,
            "admin" => Self::Admin,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Helpdesk => "helpdesk",
            Self::Approver => "approver",
            Self::TemplateAdmin => "template-admin",
            Self::KeyCustodian => "key-custodian",
            Self::Auditor => "auditor",
            Self::DirectoryAdmin => "directory-admin",
            Self::Admin => "admin",
        }
    }
}

/// Refuses role names the gateway does not know: such a role would grant nothing, so a typo
/// ("Admin") would create an operator who silently cannot act.
pub fn check_role_names(names: &[String]) -> Result<(), String> {
    match names.iter().find(|n| Role::parse(n).is_none()) {
        None => Ok(()),
        Some(unknown) => {
            let known: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
            Err(format!(
                "operator.roles: {unknown:?} is not a role; use {}",
                known.join(", ")
            ))
        }
    }
}

/// What an AdminService call does, as far as roles are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// System and custody status: any active operator.
    ViewStatus,
    /// Seal, unseal, master keys, key ceremonies, SO token initialisation.
    AdministerCustody,
    /// Master key and SO token metadata (no key material).
    ReadKeyMetadata,
    /// Custody's audit records, head and chain verification.
    ReadAudit,
    /// Read templates and validate specs.
    ReadTemplates,
    /// Create, update and retire templates.
    ManageTemplates,
    /// Read operator accounts.
    ReadOperators,
    /// Create and update operator accounts (roles, scopes, certificate bindings).
    ManageOperators,
    /// Users (create, update, disable, CSV import, LDAP sync) and cards.
    ManageDirectory,
    /// The helpdesk's reading: search users, see their cards (the card's template then
    /// decides each action).
    ViewHelpdesk,
    /// Decide (approve or reject) dual-control requests.
    DecideApprovals,
    /// Mark cards lost, revoked or blocked.
    ChangeCardStatus,
}

impl Action {
    /// Roles that allow the action; empty means any active operator.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Self::ViewStatus => &[],
            Self::AdministerCustody => &[Role::KeyCustodian, Role::Admin],
            Self::ReadKeyMetadata => &[Role::KeyCustodian, Role::Admin, Role::Auditor],
            Self::ReadAudit => &[Role::Admin, Role::Auditor],
            Self::ReadTemplates => &[Role::TemplateAdmin, Role::Admin, Role::Auditor],
            Self::ManageTemplates => &[Role::TemplateAdmin],
            Self::ReadOperators => &[Role::Admin, Role::Auditor],
            Self::ManageOperators => &[Role::Admin],
            Self::ManageDirectory => &[Role::Admin, Role::DirectoryAdmin],
            Self::ViewHelpdesk => &[Role::Helpdesk, Role::Approver, Role::Auditor, Role::Admin],
            Self::DecideApprovals => &[Role::Approver],
            Self::ChangeCardStatus => &[Role::Helpdesk, Role::Admin],
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::ViewStatus => "see the system status",
            Self::AdministerCustody => "administer key custody",
            Self::ReadKeyMetadata => "read key metadata",
            Self::ReadAudit => "read the custody audit",
            Self::ReadTemplates => "read card templates",
            Self::ManageTemplates => "change card templates",
            Self::ReadOperators => "read operator accounts",
            Self::ManageOperators => "change operator accounts",
            Self::ManageDirectory => "change users or cards",
            Self::ViewHelpdesk => "use the helpdesk",
            Self::DecideApprovals => "decide approvals",
            Self::ChangeCardStatus => "change a card's status",
        }
    }

    /// Whether a directory outage may be bridged with the last known accounts: only for
    /// status, which an operator needs most when a backend is down and which changes nothing.
    pub fn tolerates_stale_accounts(self) -> bool {
        matches!(self, Self::ViewStatus)
    }
}

/// An operator account's standing, as far as the gateway cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub active: bool,
    /// Every role name as stored, for messages.
    pub role_names: Vec<String>,
}

impl Account {
    pub fn has_any(&self, roles: &[Role]) -> bool {
        self.role_names
            .iter()
            .filter_map(|n| Role::parse(n))
            .any(|r| roles.contains(&r))
    }
}

/// Why an operator may not do something; its Display is the message the operator sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    NoAccount {
        operator: String,
    },
    Disabled {
        operator: String,
    },
    MissingRole {
        operator: String,
        action: Action,
        has: Vec<String>,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoAccount { operator } => write!(
                f,
                "operator {operator:?} has no operator account in the directory; an admin must create one with username {operator:?}"
            ),
            Self::Disabled { operator } => {
                write!(f, "the operator account {operator:?} is disabled")
            }
            Self::MissingRole {
                operator,
                action,
                has,
            } => {
                let needed: Vec<&str> = action.roles().iter().map(|r| r.as_str()).collect();
                let has = if has.is_empty() {
                    "none".to_owned()
                } else {
                    has.join(", ")
                };
                write!(
                    f,
                    "operator {operator:?} may not {}: that needs the {} role (it has: {has})",
                    action.describe(),
                    needed.join(" or ")
                )
            }
        }
    }
}

/// Decides whether `operator`, whose account is `account` (None: no account), may do `action`.
pub fn decide(operator: &str, account: Option<&Account>, action: Action) -> Result<(), Refusal> {
    let operator = operator.to_owned();
    let Some(account) = account else {
        return Err(Refusal::NoAccount { operator });
    };
    if !account.active {
        return Err(Refusal::Disabled { operator });
    }
    let needed = action.roles();
    if needed.is_empty() || account.has_any(needed) {
        Ok(())
    } else {
        Err(Refusal::MissingRole {
            operator,
            action,
            has: account.role_names.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(active: bool, roles: &[&str]) -> Account {
        Account {
            active,
            role_names: roles.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    #[test]
    fn custody_administration_needs_key_custodian_or_admin() {
        let act = Action::AdministerCustody;
        assert!(decide("a", Some(&account(true, &["admin"])), act).is_ok());
        assert!(decide("a", Some(&account(true, &["key-custodian"])), act).is_ok());
        for roles in [
            &["helpdesk"][..],
            &["auditor"],
            &["approver", "template-admin"],
            &[],
        ] {
            let err = decide("h", Some(&account(true, roles)), act).unwrap_err();
            assert!(matches!(err, Refusal::MissingRole { .. }), "{roles:?}");
        }
    }

    #[test]
    fn audit_is_for_admins_and_auditors() {
        let act = Action::ReadAudit;
        assert!(decide("a", Some(&account(true, &["auditor"])), act).is_ok());
        assert!(decide("a", Some(&account(true, &["admin"])), act).is_ok());
        assert!(decide("a", Some(&account(true, &["key-custodian"])), act).is_err());
        assert!(
            decide(
                "a",
                Some(&account(true, &["auditor"])),
                Action::ReadKeyMetadata
            )
            .is_ok()
        );
    }

    #[test]
    fn templates_operators_and_directory_have_their_roles() {
        let allowed = |roles: &[&str], act| decide("o", Some(&account(true, roles)), act).is_ok();
        assert!(allowed(&["template-admin"], Action::ManageTemplates));
        assert!(!allowed(&["admin"], Action::ManageTemplates));
        assert!(allowed(&["auditor"], Action::ReadTemplates));
        assert!(!allowed(&["helpdesk"], Action::ReadTemplates));
        assert!(allowed(&["admin"], Action::ManageOperators));
        assert!(!allowed(&["directory-admin"], Action::ManageOperators));
        assert!(!allowed(&["auditor"], Action::ManageOperators));
        assert!(allowed(&["auditor"], Action::ReadOperators));
        assert!(allowed(&["admin"], Action::ManageDirectory));
        assert!(allowed(&["directory-admin"], Action::ManageDirectory));
        assert!(!allowed(
            &["template-admin", "helpdesk"],
            Action::ManageDirectory
        ));
    }

    #[test]
    fn unknown_role_names_are_refused_when_written() {
        assert!(check_role_names(&["admin".into(), "directory-admin".into()]).is_ok());
        let err = check_role_names(&["helpdesk".into(), "Admin".into()]).unwrap_err();
        assert!(err.contains("\"Admin\" is not a role"), "{err}");
        assert!(err.contains("template-admin"), "{err}");
    }

    #[test]
    fn status_needs_only_an_active_account() {
        assert!(decide("a", Some(&account(true, &[])), Action::ViewStatus).is_ok());
        assert_eq!(
            decide("a", Some(&account(false, &["admin"])), Action::ViewStatus),
            Err(Refusal::Disabled {
                operator: "a".into()
            })
        );
        assert_eq!(
            decide("a", None, Action::ViewStatus),
            Err(Refusal::NoAccount {
                operator: "a".into()
            })
        );
    }

    #[test]
    fn unknown_role_names_grant_nothing_and_messages_say_what_is_missing() {
        let err = decide(
            "helpdesk1",
            Some(&account(true, &["Admin", "superuser"])),
            Action::AdministerCustody,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "operator \"helpdesk1\" may not administer key custody: that needs the key-custodian or admin role (it has: Admin, superuser)"
        );
    }
}
