//! Compiles every .proto under cms/ with protox (no `protoc` needed), writes the encoded
//! descriptor set for gRPC reflection, and gives every message or oneof that holds a field
//! marked `(cms.common.v1.sensitive)` a Debug impl that never prints that field.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use prost_reflect::{DescriptorPool, MessageDescriptor, Value};

fn proto_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            proto_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

const RUST_KEYWORDS: &[&str] = &[
    "as", "break", "const", "continue", "crate", "else", "enum", "extern", "false", "fn", "for",
    "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return",
    "static", "struct", "trait", "true", "type", "unsafe", "use", "where", "while", "async",
    "await", "dyn", "abstract", "become", "box", "do", "final", "macro", "override", "priv",
    "typeof", "unsized", "virtual", "yield", "try", "gen",
];

fn field_ident(name: &str) -> String {
    if RUST_KEYWORDS.contains(&name) {
        format!("r#{name}")
    } else {
        name.to_owned()
    }
}

fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn camel(name: &str) -> String {
    name.split('_')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// Rust path of a message: `crate::cms::custody::v1::Outer` or `…::outer::Inner`.
fn rust_path(message: &MessageDescriptor) -> String {
    let package = message.package_name().replace('.', "::");
    let mut parts: Vec<String> = Vec::new();
    let mut parent = message.parent_message();
    while let Some(p) = parent {
        parts.push(snake(p.name()));
        parent = p.parent_message();
    }
    parts.reverse();
    let mut path = format!("crate::{package}");
    for part in parts {
        path.push_str("::");
        path.push_str(&part);
    }
    format!("{path}::{}", message.name())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut files = Vec::new();
    proto_files(&root.join("cms"), &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed=cms");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(&files)?;
    let pool: DescriptorPool = compiler.descriptor_pool();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("cms_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    let sensitive_ext = pool
        .get_extension_by_name("cms.common.v1.sensitive")
        .ok_or("cms.common.v1.sensitive is not defined")?;
    let is_sensitive = |field: &prost_reflect::FieldDescriptor| {
        let options = field.options();
        options.has_extension(&sensitive_ext)
            && matches!(
                options.get_extension(&sensitive_ext).as_ref(),
                Value::Bool(true)
            )
    };

    let mut sensitive_fields = String::new();
    for message in pool.all_messages() {
        for field in message.fields().filter(&is_sensitive) {
            let _ = writeln!(sensitive_fields, "{}", field.full_name());
        }
    }
    std::fs::write(out.join("sensitive_fields.txt"), sensitive_fields)?;

    let mut skip = BTreeSet::new();
    let mut impls = String::new();
    for message in pool.all_messages() {
        if !message.package_name().starts_with("cms.") || message.is_map_entry() {
            continue;
        }
        let fields: Vec<_> = message.fields().collect();
        if !fields.iter().any(&is_sensitive) {
            continue;
        }
        skip.insert(format!(".{}", message.full_name()));
        let path = rust_path(&message);
        let _ = writeln!(
            impls,
            "impl ::core::fmt::Debug for {path} {{\n    fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {{\n        f.debug_struct({:?})",
            message.name()
        );
        let mut oneofs_done = BTreeSet::new();
        for field in &fields {
            if let Some(oneof) = field.containing_oneof().filter(|o| !o.is_synthetic()) {
                if oneofs_done.insert(oneof.name().to_owned()) {
                    let secret = oneof.fields().any(|f| is_sensitive(&f));
                    if secret {
                        let _ = writeln!(
                            impls,
                            "            .field({:?}, &\"<redacted>\")",
                            oneof.name()
                        );
                    } else {
                        let _ = writeln!(
                            impls,
                            "            .field({:?}, &self.{})",
                            oneof.name(),
                            field_ident(oneof.name())
                        );
                    }
                }
            } else if is_sensitive(field) {
                let _ = writeln!(
                    impls,
                    "            .field({:?}, &\"<redacted>\")",
                    field.name()
                );
            } else {
                let _ = writeln!(
                    impls,
                    "            .field({:?}, &self.{})",
                    field.name(),
                    field_ident(field.name())
                );
            }
        }
        impls.push_str("            .finish()\n    }\n}\n\n");
    }
    // Oneofs holding a sensitive field also need their enum's Debug replaced.
    for message in pool.all_messages() {
        if !message.package_name().starts_with("cms.") {
            continue;
        }
        for oneof in message.oneofs().filter(|o| !o.is_synthetic()) {
            if !oneof.fields().any(|f| is_sensitive(&f)) {
                continue;
            }
            skip.insert(format!(".{}.{}", message.full_name(), oneof.name()));
            let msg_path = rust_path(&message);
            let (parent, name) = msg_path.rsplit_once("::").unwrap_or(("crate", &msg_path));
            let enum_path = format!("{parent}::{}::{}", snake(name), camel(oneof.name()));
            let _ = writeln!(
                impls,
                "impl ::core::fmt::Debug for {enum_path} {{\n    fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {{\n        match self {{"
            );
            for field in oneof.fields() {
                let variant = camel(field.name());
                if is_sensitive(&field) {
                    let _ = writeln!(
                        impls,
                        "            Self::{variant}(_) => f.write_str(\"{variant}(<redacted>)\"),"
                    );
                } else {
                    let _ = writeln!(
                        impls,
                        "            Self::{variant}(v) => f.debug_tuple({variant:?}).field(v).finish(),"
                    );
                }
            }
            impls.push_str("        }\n    }\n}\n\n");
        }
    }
    std::fs::write(out.join("redacted_debug.rs"), &impls)?;
    let mut list = String::new();
    for path in &skip {
        let _ = writeln!(list, "{path}");
    }
    std::fs::write(out.join("sensitive_types.txt"), list)?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .generate_default_stubs(true)
        .skip_debug(skip.iter().cloned())
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
