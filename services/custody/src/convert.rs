//! Conversions at the edge of the domain: proto enums to the card-crypto types and back,
//! and the upper-case hex that key check values are shown in.

use cms_cardcrypto::{KeyAlgorithm, Scheme, SecretKey};
use cms_proto::common::v1::{DiversificationScheme, KeyAlgorithm as ProtoAlgorithm};
use cms_proto::custody::v1 as pb;

use crate::error::Error;

/// A request's key algorithm; `field` names it in the refusal when it is missing.
pub(crate) fn algorithm_from_proto(value: i32, field: &'static str) -> Result<KeyAlgorithm, Error> {
    Ok(
        match ProtoAlgorithm::try_from(value).unwrap_or(ProtoAlgorithm::Unspecified) {
            ProtoAlgorithm::Tdes2key => KeyAlgorithm::Tdes2Key,
            ProtoAlgorithm::Tdes3key => KeyAlgorithm::Tdes3Key,
            ProtoAlgorithm::Aes128 => KeyAlgorithm::Aes128,
            ProtoAlgorithm::Aes192 => KeyAlgorithm::Aes192,
            ProtoAlgorithm::Aes256 => KeyAlgorithm::Aes256,
            ProtoAlgorithm::Unspecified => {
                return Err(Error::Invalid {
                    field,
                    message: "an algorithm is required (3DES 2-key or 3-key, AES-128/192/256)"
                        .into(),
                });
            }
        },
    )
}

pub(crate) fn algorithm_to_proto(algorithm: KeyAlgorithm) -> ProtoAlgorithm {
    match algorithm {
        KeyAlgorithm::Tdes2Key => ProtoAlgorithm::Tdes2key,
        KeyAlgorithm::Tdes3Key => ProtoAlgorithm::Tdes3key,
        KeyAlgorithm::Aes128 => ProtoAlgorithm::Aes128,
        KeyAlgorithm::Aes192 => ProtoAlgorithm::Aes192,
        KeyAlgorithm::Aes256 => ProtoAlgorithm::Aes256,
    }
}

/// A stored algorithm name as the proto enum (unspecified when the name is unknown).
pub(crate) fn stored_algorithm_to_proto(stored: &str) -> i32 {
    stored
        .parse::<KeyAlgorithm>()
        .map(|a| algorithm_to_proto(a) as i32)
        .unwrap_or(0)
}

pub(crate) fn scheme_from_proto(value: i32) -> Result<Scheme, Error> {
    Ok(
        match DiversificationScheme::try_from(value).unwrap_or(DiversificationScheme::Unspecified) {
            DiversificationScheme::GpEmv => Scheme::GpEmv,
            DiversificationScheme::GpVisa2 => Scheme::GpVisa2,
            DiversificationScheme::GpKdf3 => Scheme::GpKdf3,
            DiversificationScheme::Sp800108Cmac => Scheme::Sp800108Cmac,
            DiversificationScheme::Unspecified => {
                return Err(Error::Invalid {
                    field: "scheme",
                    message: "a diversification scheme is required".into(),
                });
            }
        },
    )
}

pub(crate) fn hex_upper(bytes: &[u8]) -> String {
    data_encoding::HEXUPPER.encode(bytes)
}

/// Whether `expected` (hex, spaces allowed) is `key`'s key check value.
pub(crate) fn kcv_matches(key: &SecretKey, expected: &str) -> bool {
    let expected: String = expected.chars().filter(|c| !c.is_whitespace()).collect();
    let Ok(bytes) = data_encoding::HEXUPPER_PERMISSIVE.decode(expected.as_bytes()) else {
        return false;
    };
    key.verify_kcv(&bytes)
}

/// Shares as they are shown to custodians, once.
pub(crate) fn shares_to_proto(shares: Vec<crate::seal::ShownShare>) -> Vec<pb::Share> {
    shares
        .into_iter()
        .map(|s| pb::Share {
            index: s.index,
            value: s.value.to_string(),
            checksum: s.checksum,
        })
        .collect()
}
