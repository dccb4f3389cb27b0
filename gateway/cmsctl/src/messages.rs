//! Our proto messages as files and as `--json` output, through the descriptors compiled into
//! cms-proto and the proto3 JSON mapping (prost-reflect): field names as in the .proto or in
//! lowerCamelCase, enums by name ("CARD_PROFILE_PIV"), durations as "600s". A TOML file is read
//! with the same mapping. Unknown fields are refused, so a typo is an error, not a default.

use std::path::Path;
use std::sync::LazyLock;

use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions,
};

use crate::Error;

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(cms_proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
});

fn descriptor(name: &str) -> Result<MessageDescriptor, Error> {
    let pool = POOL
        .as_ref()
        .map_err(|e| Error::Setup(format!("cannot read the compiled proto descriptors: {e}")))?;
    pool.get_message_by_name(name)
        .ok_or_else(|| Error::Setup(format!("no message {name} in the compiled protos")))
}

/// `message` (of proto type `name`) as pretty JSON.
pub fn to_json<M: Message>(message: &M, name: &str) -> Result<String, Error> {
    let dynamic = DynamicMessage::decode(descriptor(name)?, message.encode_to_vec().as_slice())
        .map_err(|e| Error::Setup(format!("cannot re-read a {name}: {e}")))?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::pretty(&mut out);
    dynamic
        .serialize_with_options(&mut serializer, &options)
        .map_err(|e| Error::Setup(format!("cannot write a {name} as JSON: {e}")))?;
    String::from_utf8(out).map_err(|e| Error::Setup(format!("a {name} as JSON: {e}")))
}

/// Prints `message` as JSON on standard output.
pub fn print_json<M: Message>(message: &M, name: &str) -> Result<(), Error> {
    println!("{}", to_json(message, name)?);
    Ok(())
}

/// Reads a message of proto type `name` from a `.toml` or `.json` file.
pub fn read_file<M: Message + Default>(path: &Path, name: &str) -> Result<M, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?;
    let fail = |e: &dyn std::fmt::Display| Error::Setup(format!("{}: {e}", path.display()));
    let desc = descriptor(name)?;
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let dynamic = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => {
            let value: toml::Value = toml::from_str(&text).map_err(|e| fail(&one_line(&e)))?;
            DynamicMessage::deserialize_with_options(desc, value, &options).map_err(|e| fail(&e))?
        }
        Some("json") => {
            let mut de = serde_json::Deserializer::from_str(&text);
            let m = DynamicMessage::deserialize_with_options(desc, &mut de, &options)
                .map_err(|e| fail(&e))?;
            de.end().map_err(|e| fail(&e))?;
            m
        }
        _ => {
            return Err(Error::Setup(format!(
                "{}: name the file .toml or .json",
                path.display()
            )));
        }
    };
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| fail(&e))
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cms_proto::template::v1::TemplateSpec;

    #[test]
    fn a_toml_spec_reads_with_enum_names_and_durations() {
        let dir = std::env::temp_dir().join(format!("cmsctl-msg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(
            &path,
            "name = \"x\"\ncard_profile = \"CARD_PROFILE_PIV\"\n[unblock_policy]\nself_service_session_ttl = \"600s\"\n",
        )
        .unwrap();
        let spec: TemplateSpec = read_file(&path, "cms.template.v1.TemplateSpec").unwrap();
        assert_eq!(
            spec.card_profile,
            cms_proto::common::v1::CardProfile::Piv as i32
        );
        assert_eq!(
            spec.unblock_policy
                .unwrap()
                .self_service_session_ttl
                .unwrap()
                .seconds,
            600
        );
        std::fs::write(&path, "nmae = \"x\"\n").unwrap();
        let err = read_file::<TemplateSpec>(&path, "cms.template.v1.TemplateSpec").unwrap_err();
        assert!(err.to_string().contains("nmae"), "{err}");
        let json = to_json(&spec_named("y"), "cms.template.v1.TemplateSpec").unwrap();
        assert!(json.contains("\"name\": \"y\""), "{json}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_sample_policy_files_read() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples/templates");
        for (file, profile) in [
            (
                "minidriver.toml",
                cms_proto::common::v1::CardProfile::Minidriver,
            ),
            ("piv.toml", cms_proto::common::v1::CardProfile::Piv),
        ] {
            let spec: TemplateSpec = read_file(&dir.join(file), SPEC_NAME).unwrap();
            assert_eq!(spec.card_profile, profile as i32, "{file}");
            assert!(
                spec.pin_policy.is_some() && spec.unblock_policy.is_some(),
                "{file}"
            );
        }
    }

    const SPEC_NAME: &str = "cms.template.v1.TemplateSpec";

    fn spec_named(name: &str) -> TemplateSpec {
        TemplateSpec {
            name: name.into(),
            ..Default::default()
        }
    }
}
