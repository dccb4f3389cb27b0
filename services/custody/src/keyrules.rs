//! Rules about master keys, kept apart from the RPC plumbing: which version may be retired,
//! which keys a key ceremony accepts, and which admin keys a diversification scheme makes.
//! Each rule refuses with an error that names it.

use cms_cardcrypto::{KeyAlgorithm, Scheme, SecretKey, degenerate};

use crate::error::Error;
use crate::wrap::{Fingerprint, Kek};

/// The current version (the highest one not retired) is what new cards are issued under:
/// retiring it would leave the key with no current version.
pub(crate) fn may_retire(reference: &str, version: u32, current: Option<u32>) -> Result<(), Error> {
    if current == Some(version) {
        return Err(Error::RetireCurrent {
            reference: reference.to_owned(),
            version,
        });
    }
    Ok(())
}

/// The admin key a scheme derives must be of the algorithm the card's challenge is answered
/// with: the GP 3DES schemes make 3DES keys, the CMAC schemes AES keys.
pub(crate) fn scheme_fits(scheme: Scheme, admin: KeyAlgorithm) -> Result<(), Error> {
    if scheme.admin_algorithms().contains(&admin) {
        return Ok(());
    }
    let makes = if admin.is_aes() { "3DES" } else { "AES" };
    Err(Error::Invalid {
        field: "admin_key_algorithm",
        message: format!(
            "scheme {scheme} derives {makes} admin keys, and the admin-key algorithm is {}: choose a scheme and an admin-key algorithm that fit",
            admin.as_str()
        ),
    })
}

/// One component of a key ceremony, as it arrives: not all zeros (it would give its
/// custodian no share of the secret) and not one given before in this ceremony (two equal
/// components cancel out, and a repeated one means a custodian's own part is missing).
/// `seen` holds the keyed fingerprints of the components accepted so far.
pub(crate) fn check_component(
    kek: &Kek,
    import_id: &str,
    component: &SecretKey,
    number: u32,
    seen: &[Fingerprint],
) -> Result<Fingerprint, Error> {
    if component.expose_bytes().iter().all(|b| *b == 0) {
        return Err(Error::Invalid {
            field: "component",
            message: format!(
                "component {number} is all zeros: each custodian's component must be a random value"
            ),
        });
    }
    let fingerprint = kek.fingerprint(
        "key-ceremony-component",
        &[import_id.as_bytes(), component.expose_bytes()],
    );
    if seen.contains(&fingerprint) {
        return Err(Error::Invalid {
            field: "component",
            message: format!(
                "component {number} is the same as a component given before in this ceremony: each custodian gives their own"
            ),
        });
    }
    Ok(fingerprint)
}

/// The key the components combine to: refused when degenerate (all zeros, a weak DES part,
/// K1 = K2, ...). Nothing is stored then, and the ceremony starts over.
pub(crate) fn check_combined(key: &SecretKey) -> Result<(), Error> {
    match degenerate(key) {
        None => Ok(()),
        Some(why) => Err(Error::Invalid {
            field: "component",
            message: format!(
                "the components combine to a degenerate {} key ({why}); nothing was stored: begin the import again with new components",
                key.algorithm().as_str()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_version_is_not_retired() {
        assert!(may_retire("mk", 1, Some(2)).is_ok());
        assert!(may_retire("mk", 2, None).is_ok());
        let err = may_retire("mk", 2, Some(2)).unwrap_err().to_string();
        assert!(err.contains("current version cannot be retired"), "{err}");
    }

    #[test]
    fn schemes_and_admin_algorithms_must_fit() {
        let err = scheme_fits(Scheme::GpEmv, KeyAlgorithm::Aes128).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("gp-emv") && text.contains("aes-128"),
            "{text}"
        );
        assert!(matches!(
            err,
            Error::Invalid {
                field: "admin_key_algorithm",
                ..
            }
        ));
        assert!(scheme_fits(Scheme::Sp800108Cmac, KeyAlgorithm::Tdes3Key).is_err());
        for scheme in Scheme::ALL {
            for admin in scheme.admin_algorithms() {
                assert!(scheme_fits(scheme, *admin).is_ok());
            }
        }
    }

    #[test]
    fn components_zero_and_repeated_are_refused() {
        let kek = Kek::generate().unwrap();
        let zero = SecretKey::new(KeyAlgorithm::Aes128, &[0; 16]).unwrap();
        assert!(check_component(&kek, "i", &zero, 1, &[]).is_err());
        let one = SecretKey::new(KeyAlgorithm::Aes128, &[7; 16]).unwrap();
        let fp = check_component(&kek, "i", &one, 1, &[]).unwrap();
        let err = check_component(&kek, "i", &one, 2, &[fp]).unwrap_err();
        assert!(err.to_string().contains("same as a component"), "{err}");
        // Another ceremony does not see this one's components.
        assert!(check_component(&kek, "j", &one, 1, &[fp]).is_ok());
    }
}
