//! LDAP sync: reads the users under a configured base DN (paged search), maps attributes to
//! user fields, and applies them like an import (one transaction, idempotent, source LDAP).

use std::time::Duration;

use cms_proto::directory::v1::{ImportError, ImportReport, UserSource};
use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry};

use crate::config::{DisabledMarker, LdapSource};
use crate::import::{self, Options, Progress, Record};
use crate::users::UserFields;
use crate::{Directory, Error};

const PAGE: i32 = 500;

fn first(entry: &SearchEntry, attribute: &str) -> Option<String> {
    if let Some((_, values)) = entry
        .attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attribute))
    {
        return values.first().cloned();
    }
    entry
        .bin_attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attribute))
        .and_then(|(_, v)| v.first())
        .map(|b| data_encoding::HEXLOWER.encode(b))
}

/// `Finance/Payroll` from `uid=x,ou=Payroll,ou=Finance,dc=example,dc=org`.
fn org_unit_of_dn(dn: &str) -> String {
    let mut units: Vec<&str> = dn
        .split(',')
        .filter_map(|rdn| {
            let (k, v) = rdn.trim().split_once('=')?;
            k.trim().eq_ignore_ascii_case("ou").then_some(v.trim())
        })
        .collect();
    units.reverse();
    units.join("/")
}

fn ldap_error(source: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Ldap(format!("LDAP source {source:?}: {what}: {e}"))
}

/// A failure before any answer came: the server was not reached (refused, unreachable, no
/// answer in time, or not an LDAP server), said as such rather than as the protocol error
/// ldap3 reports ("premature end of search stream").
fn connect_error(source: &str, url: &str, e: impl std::fmt::Display) -> Error {
    Error::Ldap(format!(
        "LDAP source {source:?}: could not connect to {url}: {e}"
    ))
}

/// Whether `entry` is marked disabled by `marker`.
fn marked_disabled(entry: &SearchEntry, marker: &DisabledMarker) -> bool {
    let Some(value) = first(entry, &marker.attribute) else {
        return false;
    };
    let value = value.trim();
    if marker.bit_mask != 0 {
        return value
            .parse::<i64>()
            .is_ok_and(|n| (n as u64) & marker.bit_mask != 0);
    }
    marker.values.iter().any(|v| v.eq_ignore_ascii_case(value))
}

/// The users read from LDAP, and the entries that were skipped, with why.
pub struct Read {
    pub records: Vec<Record>,
    pub skipped: Vec<ImportError>,
}

/// Reads and maps every entry of `source`; `progress` sees the entries read so far.
pub async fn read(
    name: &str,
    source: &LdapSource,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Read, Error> {
    progress(Progress {
        phase: "connecting",
        read: 0,
        applied: 0,
        total: 0,
    });
    let timeout = Duration::from_millis(source.timeout_ms.max(100));
    let settings = LdapConnSettings::new().set_conn_timeout(timeout);
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &source.url)
        .await
        .map_err(|e| connect_error(name, &source.url, e))?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.drive().await {
            tracing::warn!(error = %e, "LDAP connection ended with an error");
        }
    });
    let outcome = async {
        if let Some(dn) = &source.bind_dn {
            let password = match &source.bind_password_file {
                Some(path) => zeroize::Zeroizing::new(
                    std::fs::read_to_string(path)
                        .map_err(|e| {
                            ldap_error(name, &format!("bind_password_file {}", path.display()), e)
                        })?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                ),
                None => zeroize::Zeroizing::new(String::new()),
            };
            let bound = ldap.with_timeout(timeout).simple_bind(dn, &password).await;
            match bound {
                // No answer at all: the connection was not made.
                Err(e) => return Err(connect_error(name, &source.url, e)),
                Ok(r) => {
                    r.success()
                        .map_err(|e| ldap_error(name, &format!("bind as {dn:?} failed"), e))?;
                }
            }
        }
        let a = &source.attributes;
        let mut attrs = vec![
            a.username.clone(),
            a.display_name.clone(),
            a.email.clone(),
            a.phone.clone(),
            a.org_unit.clone(),
            a.external_id.clone(),
        ];
        if let Some(marker) = &a.disabled {
            attrs.push(marker.attribute.clone());
        }
        let adapters: Vec<Box<dyn Adapter<_, _>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(PAGE)),
        ];
        let mut stream = ldap
            .with_timeout(timeout)
            .streaming_search_with(
                adapters,
                &source.base_dn,
                Scope::Subtree,
                &source.filter,
                attrs,
            )
            .await
            .map_err(|e| {
                if source.bind_dn.is_none() {
                    // Anonymous: the search is the first request sent.
                    connect_error(name, &source.url, e)
                } else {
                    ldap_error(name, "search failed", e)
                }
            })?;
        let mut records = Vec::new();
        let mut errors: Vec<ImportError> = Vec::new();
        let mut index = 0u64;
        while let Some(entry) = stream
            .next()
            .await
            .map_err(|e| ldap_error(name, "search failed", e))?
        {
            index += 1;
            let entry = SearchEntry::construct(entry);
            let get = |attr: &str| first(&entry, attr).unwrap_or_default();
            let Some(username) = first(&entry, &a.username) else {
                errors.push(ImportError {
                    line: index,
                    column: a.username.clone(),
                    message: format!("entry {:?} has no {} attribute", entry.dn, a.username),
                });
                continue;
            };
            let mut org_unit = get(&a.org_unit);
            if org_unit.is_empty() {
                org_unit = org_unit_of_dn(&entry.dn);
            }
            let fields = UserFields {
                username,
                display_name: get(&a.display_name),
                email: get(&a.email),
                phone: get(&a.phone),
                org_unit,
                external_id: get(&a.external_id),
            };
            let disabled = a
                .disabled
                .as_ref()
                .is_some_and(|m| marked_disabled(&entry, m));
            match fields.validated("") {
                Ok(fields) => records.push(Record {
                    line: index,
                    fields,
                    disabled,
                }),
                Err((column, message)) => errors.push(ImportError {
                    line: index,
                    column,
                    message: format!("entry {:?}: {message}", entry.dn),
                }),
            }
            if index.is_multiple_of(PAGE as u64) {
                progress(Progress {
                    phase: "reading",
                    read: index,
                    applied: 0,
                    total: 0,
                });
            }
        }
        stream
            .finish()
            .await
            .success()
            .map_err(|e| ldap_error(name, "search failed", e))?;
        progress(Progress {
            phase: "reading",
            read: index,
            applied: 0,
            total: index,
        });
        let _ = ldap.unbind().await;
        // A username on two entries: which is the person is unknown, so both are skipped.
        let mut lines: std::collections::HashMap<String, Vec<u64>> = Default::default();
        for r in &records {
            lines
                .entry(crate::normalize::fold(&r.fields.username))
                .or_default()
                .push(r.line);
        }
        records.retain(|r| {
            let on = &lines[&crate::normalize::fold(&r.fields.username)];
            if on.len() > 1 {
                errors.push(ImportError {
                    line: r.line,
                    column: a.username.clone(),
                    message: format!(
                        "username {:?} is on entries {}; skipped",
                        r.fields.username,
                        on.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
                    ),
                });
                false
            } else {
                true
            }
        });
        errors.sort_by_key(|e| e.line);
        Ok(Read {
            records,
            skipped: errors,
        })
    }
    .await;
    driver.abort();
    outcome
}

impl Directory {
    /// Synchronises users from the LDAP source `name` (empty: "default").
    pub async fn sync_ldap(
        &self,
        name: &str,
        disable_missing: bool,
        dry_run: bool,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<ImportReport, Error> {
        let name = if name.is_empty() { "default" } else { name };
        let source = self.ldap.get(name).ok_or_else(|| {
            Error::invalid(
                "source",
                format!(
                    "no LDAP source named {name:?} is configured (known: {})",
                    self.ldap.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        let Read { records, skipped } = read(name, source, progress).await?;
        if source.strict && !skipped.is_empty() {
            return Err(Error::Import(
                import::describe(&skipped, 20).replace("line ", "entry "),
            ));
        }
        // A skipped entry may be a user who still exists: disabling the "missing" ones would
        // disable them.
        let skip_disabling = disable_missing && !skipped.is_empty();
        let mut report = self
            .apply_import(
                records,
                UserSource::Ldap,
                Options {
                    update_existing: true,
                    disable_missing: disable_missing && !skip_disabling,
                    dry_run,
                    overwrite_ldap_users: false,
                },
                progress,
            )
            .await?;
        if !skipped.is_empty() {
            tracing::warn!(
                source = name,
                skipped = skipped.len(),
                "LDAP entries skipped"
            );
            report.errors = skipped;
            if skip_disabling {
                report.errors.push(ImportError {
                    line: 0,
                    column: String::new(),
                    message: "disable_missing was not applied: a skipped entry may be a user who is still there".into(),
                });
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn org_units_from_dn() {
        assert_eq!(
            super::org_unit_of_dn("uid=x,ou=Payroll,OU=Finance,dc=example,dc=org"),
            "Finance/Payroll"
        );
        assert_eq!(super::org_unit_of_dn("uid=x,dc=example"), "");
    }
}
