//! No response of custody's API can carry key material, except the few fields whose whole
//! purpose is to hand a secret over once, each named and justified here. A new field that
//! could carry a key (bytes, a key-like name, or marked sensitive) fails this test until it is
//! reviewed and listed.

use std::collections::{BTreeSet, HashMap};

use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};

/// (message, field) pairs that deliberately return a secret, and why that is allowed.
const ALLOWED: &[(&str, &str, &str)] = &[
    (
        "cms.custody.v1.ComputeCryptogramResponse",
        "response",
        "the cryptogram is the product",
    ),
    (
        "cms.custody.v1.ComputeCryptogramResponse",
        "response_checksum",
        "checksum of the cryptogram",
    ),
    (
        "cms.custody.v1.InitSealResponse",
        "shares",
        "KEK shares, shown once to custodians",
    ),
    (
        "cms.custody.v1.Share",
        "value",
        "a custodian's share, shown once at init",
    ),
    ("cms.custody.v1.Share", "checksum", "checksum of a share"),
    (
        "cms.custody.v1.InitSoTokenResponse",
        "so_unblock_key",
        "SO unblock key, shown once (DESIGN 1)",
    ),
    (
        "cms.custody.v1.InitSoTokenResponse",
        "shares",
        "SO unblock key as M-of-N shares, shown once",
    ),
    (
        "cms.custody.v1.ReleasePivPukResponse",
        "puk",
        "PIV PUK: the one release DESIGN 3 allows",
    ),
    (
        "cms.custody.v1.ReleasePivPukResponse",
        "next_puk",
        "PUK to rotate to right after use",
    ),
    (
        "cms.custody.v1.ReleasePivPukResponse",
        "puk_checksum",
        "checksum of the PUK read to a user",
    ),
    (
        "cms.common.v1.TypedCode",
        "hex",
        "typed codes carry cryptograms or PUKs",
    ),
    (
        "cms.common.v1.TypedCode",
        "checksum",
        "checksum of a typed code",
    ),
    (
        "cms.custody.v1.AuditRecord",
        "previous_hash",
        "audit chain link: a digest, not a key",
    ),
    (
        "cms.custody.v1.AuditRecord",
        "hash",
        "audit chain link: a digest, not a key",
    ),
    (
        "cms.custody.v1.AuditHead",
        "hash",
        "audit chain head: a digest, not a key",
    ),
    (
        "cms.common.v1.AuthContext",
        "card_id",
        "card identifier: public",
    ),
];

const KEYISH: &[&str] = &[
    "key",
    "kek",
    "secret",
    "component",
    "wrapped",
    "seed",
    "private",
    "share",
    "puk",
    "pin",
    "response",
    "cryptogram",
    "challenge",
    "password",
];

/// Whether `message.field` (message with its leading dot) is marked sensitive.
fn sensitive(message: &str, field: &str) -> bool {
    let full = format!("{}.{field}", message.trim_start_matches('.'));
    cms_proto::SENSITIVE_FIELDS.lines().any(|l| l == full)
}

#[test]
fn custody_responses_cannot_carry_key_material() {
    let set = FileDescriptorSet::decode(cms_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut messages: HashMap<String, &DescriptorProto> = HashMap::new();
    fn collect<'a>(
        prefix: &str,
        m: &'a DescriptorProto,
        out: &mut HashMap<String, &'a DescriptorProto>,
    ) {
        let name = format!("{prefix}.{}", m.name());
        for nested in &m.nested_type {
            collect(&name, nested, out);
        }
        out.insert(name, m);
    }
    let mut outputs = Vec::new();
    for file in &set.file {
        for m in &file.message_type {
            collect(&format!(".{}", file.package()), m, &mut messages);
        }
        if file.package() == "cms.custody.v1" {
            for service in &file.service {
                for method in &service.method {
                    outputs.push(method.output_type().to_owned());
                }
            }
        }
    }
    assert!(outputs.len() >= 20, "custody's RPCs were not found");

    let allowed: BTreeSet<(String, String)> = ALLOWED
        .iter()
        .map(|(m, f, _)| (format!(".{m}"), (*f).to_owned()))
        .collect();
    let mut seen = BTreeSet::new();
    let mut todo = outputs;
    let mut offending = Vec::new();
    while let Some(name) = todo.pop() {
        if !name.starts_with(".cms.") || !seen.insert(name.clone()) {
            continue;
        }
        let message = messages
            .get(&name)
            .unwrap_or_else(|| panic!("{name} not in descriptors"));
        let map_entry = message.options.as_ref().is_some_and(|o| o.map_entry());
        for field in &message.field {
            let lower = field.name().to_lowercase();
            let scalar = field.r#type() != Type::Message;
            // A map entry's "key" is structure, not content; message-typed fields are judged
            // by the message they hold (walked below), not by their name.
            let keyish = scalar
                && !(map_entry && lower == "key")
                && KEYISH
                    .iter()
                    .any(|k| lower.split('_').any(|part| part == *k));
            let risky = field.r#type() == Type::Bytes || sensitive(&name, field.name()) || keyish;
            // Metadata about keys (references, versions, KCVs, algorithms) is not key material.
            let metadata = [
                "reference",
                "version",
                "kcv",
                "algorithm",
                "count",
                "threshold",
                "index",
                "id",
                "label",
                "state",
                "progress",
                "expected",
            ]
            .iter()
            .any(|m| lower.ends_with(m));
            if risky && !metadata && !allowed.contains(&(name.clone(), field.name().to_owned())) {
                offending.push(format!("{name}.{}", field.name()));
            }
            if field.r#type() == Type::Message {
                todo.push(field.type_name().to_owned());
            }
        }
    }
    assert!(
        offending.is_empty(),
        "fields that could carry key material: {offending:#?}"
    );
    // The walk reached the messages that matter.
    assert!(seen.contains(".cms.custody.v1.ComputeCryptogramResponse"));
    assert!(seen.contains(".cms.custody.v1.MasterKeyVersion"));
}

#[test]
fn the_sensitive_marker_is_detected() {
    // Guards the test above: the option tag check must see a field we know is sensitive.
    let set = FileDescriptorSet::decode(cms_proto::FILE_DESCRIPTOR_SET).unwrap();
    let request = set
        .file
        .iter()
        .flat_map(|f| &f.message_type)
        .find(|m| m.name() == "ComputeCryptogramRequest")
        .unwrap();
    assert!(request.field.iter().any(|f| f.name() == "challenge"));
    assert!(sensitive(
        ".cms.custody.v1.ComputeCryptogramRequest",
        "challenge"
    ));
    assert!(!sensitive(
        ".cms.custody.v1.ComputeCryptogramRequest",
        "card_id"
    ));
}
