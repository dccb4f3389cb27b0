//! The gRPC API one port serves, as a closed set read once at start from the descriptors of
//! the services it registers.
//!
//! Metric labels and span names come from this set: a path that is not one of its methods is
//! the single value [`UNKNOWN`], whatever a caller sends (unique paths would otherwise grow
//! memory and /metrics without bound). Reflection lists these services and answers only from
//! the files they need.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};
use prost_types::FileDescriptorProto;

/// The label and span name of every path that is not a served method.
pub const UNKNOWN: &str = "unknown";

/// The standard services every port serves beside its own.
pub const STANDARD_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The encoded descriptor sets of the standard services.
pub const STANDARD_DESCRIPTORS: [&[u8]; 3] = [
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

#[derive(Debug, thiserror::Error)]
pub enum ServedError {
    #[error("descriptor set: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("descriptor set: {0}")]
    Malformed(&'static str),
    #[error("descriptor set: a file without a name")]
    Unnamed,
    #[error("service {0} is not in the descriptor sets")]
    UnknownService(String),
    #[error("descriptor set: {0} imports {1}, which is missing")]
    MissingImport(String, String),
}

/// One method of a served service, as it appears in labels and spans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Method {
    /// `/cms.custody.v1.CustodyService/GetStatus`, or [`UNKNOWN`].
    pub path: Arc<str>,
    /// `cms.custody.v1.CustodyService`, or [`UNKNOWN`].
    pub service: Arc<str>,
    /// `GetStatus`, or [`UNKNOWN`].
    pub name: Arc<str>,
}

/// See the module docs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ServedApi {
    methods: Arc<HashMap<Arc<str>, Method>>,
    unknown: Method,
    services: Arc<[String]>,
    descriptors: Arc<[u8]>,
}

/// One file of a descriptor set: its encoded bytes (kept as they are, so custom options
/// survive) and what we need of its decoded form.
struct File {
    raw: Vec<u8>,
    proto: FileDescriptorProto,
}

/// Splits an encoded `FileDescriptorSet` into its files without re-encoding them.
fn split(mut set: &[u8]) -> Result<Vec<File>, ServedError> {
    let mut files = Vec::new();
    while set.has_remaining() {
        let (tag, wire_type) = decode_key(&mut set)?;
        if tag != 1 || wire_type != WireType::LengthDelimited {
            return Err(ServedError::Malformed("not a FileDescriptorSet"));
        }
        let len = usize::try_from(decode_varint(&mut set)?)
            .map_err(|_| ServedError::Malformed("file too long"))?;
        if len > set.len() {
            return Err(ServedError::Malformed("truncated file"));
        }
        let (raw, rest) = set.split_at(len);
        set = rest;
        files.push(File {
            raw: raw.to_vec(),
            proto: FileDescriptorProto::decode(raw)?,
        });
    }
    Ok(files)
}

impl ServedApi {
    /// `services` (described in `descriptors`) plus the standard health and reflection
    /// services every port serves.
    pub fn with_standard(descriptors: &[u8], services: &[&str]) -> Result<Self, ServedError> {
        let mut sets = vec![descriptors];
        sets.extend(STANDARD_DESCRIPTORS);
        let mut names = services.to_vec();
        names.extend(STANDARD_SERVICES);
        Self::new(&sets, &names)
    }

    /// The API of `services` (fully qualified names), described in `descriptor_sets`
    /// (encoded `FileDescriptorSet`s; the first file of a name wins).
    pub fn new(descriptor_sets: &[&[u8]], services: &[&str]) -> Result<Self, ServedError> {
        let mut files: HashMap<String, File> = HashMap::new();
        for set in descriptor_sets {
            for file in split(set)? {
                let name = file.proto.name.clone().ok_or(ServedError::Unnamed)?;
                files.entry(name).or_insert(file);
            }
        }

        let mut methods = HashMap::new();
        let mut needed = BTreeSet::new();
        for &wanted in services {
            let (file_name, service) = files
                .iter()
                .find_map(|(name, file)| {
                    let package = file.proto.package();
                    file.proto
                        .service
                        .iter()
                        .find(|s| qualified(package, s.name()) == wanted)
                        .map(|s| (name.clone(), s))
                })
                .ok_or_else(|| ServedError::UnknownService(wanted.to_owned()))?;
            let service_name: Arc<str> = Arc::from(wanted);
            for method in &service.method {
                let path: Arc<str> = Arc::from(format!("/{wanted}/{}", method.name()));
                methods.insert(
                    path.clone(),
                    Method {
                        path,
                        service: service_name.clone(),
                        name: Arc::from(method.name()),
                    },
                );
            }
            add_with_imports(&files, &file_name, &mut needed)?;
        }

        let mut descriptors = Vec::new();
        for name in &needed {
            let raw = &files[name].raw;
            encode_key(1, WireType::LengthDelimited, &mut descriptors);
            encode_varint(raw.len() as u64, &mut descriptors);
            descriptors.put_slice(raw);
        }
        let unknown: Arc<str> = Arc::from(UNKNOWN);
        Ok(Self {
            methods: Arc::new(methods),
            unknown: Method {
                path: unknown.clone(),
                service: unknown.clone(),
                name: unknown,
            },
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            descriptors: descriptors.into(),
        })
    }

    /// The method `path` names, or the one unknown method.
    pub fn method(&self, path: &str) -> &Method {
        self.methods.get(path).unwrap_or(&self.unknown)
    }

    /// Fully qualified names of the served services.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// An encoded `FileDescriptorSet` of the files the served services need, and no other.
    pub fn descriptors(&self) -> &[u8] {
        &self.descriptors
    }
}

fn qualified(package: &str, name: &str) -> String {
    if package.is_empty() {
        name.to_owned()
    } else {
        format!("{package}.{name}")
    }
}

fn add_with_imports(
    files: &HashMap<String, File>,
    name: &str,
    needed: &mut BTreeSet<String>,
) -> Result<(), ServedError> {
    if !needed.insert(name.to_owned()) {
        return Ok(());
    }
    for import in &files[name].proto.dependency {
        if !files.contains_key(import) {
            return Err(ServedError::MissingImport(name.to_owned(), import.clone()));
        }
        add_with_imports(files, import, needed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health_only() -> ServedApi {
        ServedApi::new(&STANDARD_DESCRIPTORS, &STANDARD_SERVICES).unwrap()
    }

    #[test]
    fn served_methods_are_known_and_anything_else_is_one_unknown() {
        let api = health_only();
        let check = api.method("/grpc.health.v1.Health/Check");
        assert_eq!(&*check.path, "/grpc.health.v1.Health/Check");
        assert_eq!(&*check.service, "grpc.health.v1.Health");
        assert_eq!(&*check.name, "Check");
        assert_eq!(
            &*api
                .method("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
                .name,
            "ServerReflectionInfo"
        );
        for path in [
            "/grpc.health.v1.Health/Nope",
            "/grpc.health.v1.Health/Check/",
            "/grpc.health.v1.Health",
            "",
            "/x",
        ] {
            assert_eq!(&*api.method(path).path, UNKNOWN, "{path}");
        }
    }

    #[test]
    fn a_service_missing_from_the_descriptors_is_an_error() {
        let err = ServedApi::new(&STANDARD_DESCRIPTORS, &["cms.nope.v1.Nope"]).unwrap_err();
        assert!(matches!(err, ServedError::UnknownService(s) if s == "cms.nope.v1.Nope"));
    }

    #[test]
    fn descriptors_hold_only_the_files_the_services_need() {
        let api = ServedApi::new(&STANDARD_DESCRIPTORS, &["grpc.health.v1.Health"]).unwrap();
        let names: Vec<String> = split(api.descriptors())
            .unwrap()
            .into_iter()
            .map(|f| f.proto.name().to_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].contains("health"), "{names:?}");
    }
}
