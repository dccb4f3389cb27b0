//! The CMS gRPC contracts: one package `cms.<service>.v1` per service, generated at build time
//! from the .proto files beside this crate (no `protoc` needed).
//!
//! Messages that carry a secret (fields marked `(cms.common.v1.sensitive)`) have a Debug impl
//! that prints `<redacted>` for those fields; see build.rs.

#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

/// The encoded FileDescriptorSet of every CMS proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cms_descriptor.bin"));

/// Fully qualified names (`cms.custody.v1.Share.value`) of the fields marked
/// `(cms.common.v1.sensitive)`, one per line.
pub const SENSITIVE_FIELDS: &str = include_str!(concat!(env!("OUT_DIR"), "/sensitive_fields.txt"));

/// Fully qualified names of the messages and oneofs whose Debug is redacted.
pub const SENSITIVE_TYPES: &str = include_str!(concat!(env!("OUT_DIR"), "/sensitive_types.txt"));

pub mod cms {
    pub mod common {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/cms.common.v1.rs"));
        }
    }
    pub mod template {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/cms.template.v1.rs"));
        }
    }
    pub mod directory {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/cms.directory.v1.rs"));
        }
    }
    pub mod custody {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/cms.custody.v1.rs"));
        }
    }
    pub mod agent {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/cms.agent.v1.rs"));
        }
    }
    pub mod gateway {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/cms.gateway.v1.rs"));
        }
    }
}

include!(concat!(env!("OUT_DIR"), "/redacted_debug.rs"));

pub use cms::{agent, common, custody, directory, gateway, template};
