//! A template may only name master keys that custody has. The template service has no link
//! to custody, so the gateway checks a spec's key references against custody's key list
//! before it forwards a create, an update or a validation.

use cms_proto::common::v1::{ErrorDetail, ErrorReason, KeyAlgorithm, PageRequest};
use cms_proto::custody::v1::{ListMasterKeysRequest, MasterKeyState, MasterKeyVersion};
use cms_proto::template::v1::{AdminKeyConfig, Severity, TemplateSpec, Violation};
use prost::Message;
use tonic::Status;

use crate::admin::CustodyClient;
use crate::forward::Call;

/// More versions of one reference than this is not a key custody set-up.
const MAX_VERSIONS: usize = 10_000;

/// The violations of `spec`'s master key references (empty when custody has them all).
pub async fn check(
    custody: &CustodyClient,
    call: &Call,
    spec: &TemplateSpec,
) -> Result<Vec<Violation>, Status> {
    let mut found = Vec::new();
    if let Some(admin_key) = &spec.admin_key
        && !admin_key.master_key_reference.is_empty()
    {
        let versions = versions(custody, call, &admin_key.master_key_reference).await?;
        found.extend(judge(
            "admin_key",
            &admin_key.master_key_reference,
            admin_key.master_key_version,
            &versions,
        ));
        found.extend(algorithm_fits(admin_key, &versions));
    }
    if let Some(puk) = &spec.puk
        && !puk.master_key_reference.is_empty()
    {
        let versions = versions(custody, call, &puk.master_key_reference).await?;
        found.extend(judge("puk", &puk.master_key_reference, 0, &versions));
    }
    Ok(found)
}

/// Whether custody's `versions` of `reference` hold the one the template names (0: any).
fn judge(
    section: &str,
    reference: &str,
    version: u32,
    versions: &[MasterKeyVersion],
) -> Option<Violation> {
    let violation = |field: String, code: &str, message: String| Violation {
        field,
        code: code.to_owned(),
        message,
        severity: Severity::Error as i32,
    };
    if versions.is_empty() {
        return Some(violation(
            format!("{section}.master_key_reference"),
            "MASTER_KEY_UNKNOWN",
            format!("custody has no active master key {reference:?}"),
        ));
    }
    if version != 0 && !versions.iter().any(|k| k.version == version) {
        let mut have: Vec<u32> = versions.iter().map(|k| k.version).collect();
        have.sort_unstable();
        let have: Vec<String> = have.iter().map(u32::to_string).collect();
        return Some(violation(
            format!("{section}.master_key_version"),
            "MASTER_KEY_VERSION_UNKNOWN",
            format!(
                "custody has no active version {version} of master key {reference:?} (it has {})",
                have.join(", ")
            ),
        ));
    }
    None
}

/// The admin key's algorithm must be the master key's: the card key is derived with it.
fn algorithm_fits(admin_key: &AdminKeyConfig, versions: &[MasterKeyVersion]) -> Option<Violation> {
    let used = if admin_key.master_key_version == 0 {
        versions
            .iter()
            .find(|k| k.state == MasterKeyState::Current as i32)
            .or_else(|| versions.iter().max_by_key(|k| k.version))
    } else {
        versions
            .iter()
            .find(|k| k.version == admin_key.master_key_version)
    }?;
    if admin_key.algorithm == 0 || used.algorithm == admin_key.algorithm {
        return None;
    }
    let name = |a: i32| {
        KeyAlgorithm::try_from(a)
            .map(|a| a.as_str_name())
            .unwrap_or("?")
    };
    Some(Violation {
        field: "admin_key.algorithm".into(),
        code: "MASTER_KEY_ALGORITHM_MISMATCH".into(),
        message: format!(
            "admin_key.algorithm is {} but version {} of master key {:?} is {}",
            name(admin_key.algorithm),
            used.version,
            used.reference,
            name(used.algorithm)
        ),
        severity: Severity::Error as i32,
    })
}

/// Custody's active versions of `reference`.
async fn versions(
    custody: &CustodyClient,
    call: &Call,
    reference: &str,
) -> Result<Vec<MasterKeyVersion>, Status> {
    let mut client = custody.clone();
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let request = call.outgoing(ListMasterKeysRequest {
            reference: reference.to_owned(),
            include_retired: false,
            page: Some(PageRequest {
                page_size: 500,
                page_token: token,
            }),
        });
        let page = client
            .list_master_keys(request)
            .await
            .map_err(|status| {
                Status::unavailable(format!(
                    "cannot check the template's master keys: custody answered {:?}: {}",
                    status.code(),
                    status.message()
                ))
            })?
            .into_inner();
        all.extend(page.keys.into_iter().filter(|k| k.reference == reference));
        token = page.page.map(|p| p.next_page_token).unwrap_or_default();
        if token.is_empty() || all.len() >= MAX_VERSIONS {
            return Ok(all);
        }
    }
}

/// The refusal of a create or update whose key references custody does not have.
pub fn refusal(violations: &[Violation]) -> Status {
    let message = format!(
        "invalid template: {}",
        violations
            .iter()
            .map(|v| format!("{}: {} ({})", v.field, v.message, v.code))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let detail = ErrorDetail {
        reason: ErrorReason::InvalidArgument as i32,
        field: violations
            .first()
            .map(|v| v.field.clone())
            .unwrap_or_default(),
        message: message.clone(),
        retry_after_seconds: 0,
        attempts_remaining: 0,
    };
    Status::with_details(
        tonic::Code::InvalidArgument,
        message,
        detail.encode_to_vec().into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(version: u32) -> MasterKeyVersion {
        MasterKeyVersion {
            reference: "mk".into(),
            version,
            ..Default::default()
        }
    }

    #[test]
    fn unknown_references_and_versions_are_named() {
        let v = judge("admin_key", "mk", 0, &[]).unwrap();
        assert_eq!(
            (v.field.as_str(), v.code.as_str()),
            ("admin_key.master_key_reference", "MASTER_KEY_UNKNOWN")
        );
        let v = judge("admin_key", "mk", 3, &[key(1), key(2)]).unwrap();
        assert_eq!(
            (v.field.as_str(), v.code.as_str()),
            ("admin_key.master_key_version", "MASTER_KEY_VERSION_UNKNOWN")
        );
        assert!(v.message.contains("it has 1, 2"), "{}", v.message);
        assert!(judge("admin_key", "mk", 2, &[key(1), key(2)]).is_none());
        assert!(judge("admin_key", "mk", 0, &[key(1)]).is_none());
    }

    #[test]
    fn the_admin_key_algorithm_must_be_the_master_keys() {
        let mut current = key(2);
        current.algorithm = KeyAlgorithm::Aes128 as i32;
        current.state = MasterKeyState::Current as i32;
        let mut old = key(1);
        old.algorithm = KeyAlgorithm::Tdes3key as i32;
        let versions = [old, current];
        let config = |algorithm: KeyAlgorithm, version| AdminKeyConfig {
            algorithm: algorithm as i32,
            master_key_reference: "mk".into(),
            master_key_version: version,
            ..Default::default()
        };
        let v = algorithm_fits(&config(KeyAlgorithm::Tdes3key, 0), &versions).unwrap();
        assert_eq!(v.code, "MASTER_KEY_ALGORITHM_MISMATCH");
        assert!(v.message.contains("AES_128"), "{}", v.message);
        assert!(algorithm_fits(&config(KeyAlgorithm::Tdes3key, 1), &versions).is_none());
        assert!(algorithm_fits(&config(KeyAlgorithm::Aes128, 0), &versions).is_none());
    }
}
