//! What the custody end-to-end tests share: hex helpers and the key ceremony through the RPC.

use cms_cardcrypto::{KeyAlgorithm, SecretKey};
use cms_kit::client::Channel;
use cms_proto::common::v1::KeyAlgorithm as Alg;
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::{
    AddKeyComponentRequest, BeginKeyImportRequest, FinishKeyImportRequest, MasterKeyVersion,
};

/// Bytes of a hex string (test data only: panics on bad input).
pub fn hex(s: &str) -> Vec<u8> {
    data_encoding::HEXUPPER_PERMISSIVE
        .decode(s.as_bytes())
        .unwrap()
}

/// Upper-case hex of `bytes`.
pub fn upper(bytes: &[u8]) -> String {
    data_encoding::HEXUPPER.encode(bytes)
}

pub fn proto_alg(alg: KeyAlgorithm) -> Alg {
    match alg {
        KeyAlgorithm::Tdes2Key => Alg::Tdes2key,
        KeyAlgorithm::Tdes3Key => Alg::Tdes3key,
        KeyAlgorithm::Aes128 => Alg::Aes128,
        KeyAlgorithm::Aes192 => Alg::Aes192,
        KeyAlgorithm::Aes256 => Alg::Aes256,
    }
}

/// The key check value custody expects for `key`, as upper-case hex.
pub fn kcv(alg: KeyAlgorithm, key: &[u8]) -> String {
    upper(&SecretKey::new(alg, key).unwrap().kcv())
}

/// A key ceremony: the key arrives as two XOR components, each confirmed by its KCV; the new
/// version must carry the key's KCV and the version the import announced.
pub async fn import(
    client: &mut CustodyServiceClient<Channel>,
    reference: &str,
    alg: KeyAlgorithm,
    key: &[u8],
) -> MasterKeyVersion {
    let begun = client
        .begin_key_import(BeginKeyImportRequest {
            reference: reference.into(),
            algorithm: proto_alg(alg) as i32,
            component_count: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first: Vec<u8> = (0..key.len())
        .map(|i| (i as u8).wrapping_mul(37) ^ 0x5A)
        .collect();
    let second: Vec<u8> = key.iter().zip(&first).map(|(k, c)| k ^ c).collect();
    for component in [&first, &second] {
        client
            .add_key_component(AddKeyComponentRequest {
                import_id: begun.import_id.clone(),
                component: component.clone(),
                expected_kcv: kcv(alg, component),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let key_info = client
        .finish_key_import(FinishKeyImportRequest {
            import_id: begun.import_id,
            expected_kcv: kcv(alg, key),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key_info.kcv, kcv(alg, key));
    assert_eq!(key_info.version, begun.version);
    key_info
}
