//! Service configuration: one serde struct per service, read from a TOML file and overridden
//! by environment variables `CMS_<SERVICE>__<SECTION>__<KEY>` (for example
//! `CMS_CUSTODY__SERVER__LISTEN`). Unknown keys are rejected; errors name the key.

use std::path::Path;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(String);

/// Reads `path` (if given) then the environment for `service` into `T`. Every error is one
/// line: a TOML syntax error with its `file:line:column`, a bad value with its key, and a
/// value from the environment with the variable it came from.
pub fn load<T: DeserializeOwned>(service: &str, path: Option<&Path>) -> Result<T, ConfigError> {
    let prefix = format!("CMS_{}", service.to_ascii_uppercase());
    let overrides = EnvOverrides::read(&prefix);
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        if !path.is_file() {
            return Err(ConfigError(format!(
                "file {} does not exist or is not a file",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        check_toml_syntax(&path.display().to_string(), &text)?;
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(&prefix)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("access.allow"),
    );
    let built = builder.build().map_err(|e| overrides.explain(&e))?;
    built.try_deserialize().map_err(|e| overrides.explain(&e))
}

/// Parses TOML text into `T` (used by the launcher and tests that write configs).
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    check_toml_syntax("config text", text)?;
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .map_err(|e| ConfigError(one_line(&e.to_string())))?;
    built
        .try_deserialize()
        .map_err(|e| ConfigError(one_line(&e.to_string())))
}

/// For settings where 0 would stall or spin the service (a cap of zero handshakes, a reload
/// timer of zero): refuse it instead of quietly using another value.
pub fn at_least_one<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + PartialEq + From<u8>,
{
    let value = T::deserialize(deserializer)?;
    if value == T::from(0) {
        return Err(D::Error::custom("0 is not allowed (the least is 1)"));
    }
    Ok(value)
}

/// The TOML parser's error as `origin:line:column: message`, instead of the parser's
/// multi-line report with a source excerpt.
fn check_toml_syntax(origin: &str, text: &str) -> Result<(), ConfigError> {
    let Err(e) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    let message = one_line(e.message());
    Err(ConfigError(match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before
                .rsplit('\n')
                .next()
                .unwrap_or_default()
                .chars()
                .count()
                + 1;
            format!("{origin}:{line}:{column}: {message}")
        }
        None => format!("{origin}: {message}"),
    }))
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `CMS_<SERVICE>__…` variables set, by the config key each one overrides.
struct EnvOverrides(Vec<(String, String)>);

impl EnvOverrides {
    fn read(prefix: &str) -> Self {
        let head = format!("{prefix}__");
        Self(
            std::env::vars_os()
                .filter_map(|(name, _)| name.into_string().ok())
                .filter_map(|name| {
                    let key = name.strip_prefix(&head)?.to_lowercase().replace("__", ".");
                    Some((key, name))
                })
                .collect(),
        )
    }

    /// The error on one line, prefixed with the environment variable that set the key at
    /// fault, when one did (the environment overrides the file).
    fn explain(&self, e: &config::ConfigError) -> ConfigError {
        let text = one_line(&e.to_string());
        let variable = key_at_fault(e, &text)
            .and_then(|key| self.0.iter().find(|(k, _)| *k == key))
            .map(|(_, name)| name);
        match variable {
            Some(name) => ConfigError(format!("environment variable {name}: {text}")),
            None => ConfigError(text),
        }
    }
}

/// The config key an error is about. An unknown field is reported at its parent key, with
/// the field named in serde's message ("unknown field `x`").
fn key_at_fault(e: &config::ConfigError, text: &str) -> Option<String> {
    let key = match e {
        config::ConfigError::Type { key, .. } | config::ConfigError::At { key, .. } => key.clone(),
        config::ConfigError::NotFound(key) => Some(key.clone()),
        _ => None,
    };
    let unknown = text
        .split_once("unknown field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(field, _)| field);
    match (key, unknown) {
        (Some(parent), Some(field)) => Some(format!("{parent}.{field}")),
        (None, Some(field)) => Some(field.to_owned()),
        (key, None) => key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        server: Section,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Section {
        listen: String,
    }

    #[test]
    fn unknown_key_is_named() {
        let err = from_toml::<Sample>("[server]\nlisten = \"x\"\nlisen = 1\n").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn toml_syntax_error_is_one_line_with_its_position() {
        let err = from_toml::<Sample>("[server]\nlisten = 3 3\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("config: config text:2:"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn missing_key_is_named() {
        let err = from_toml::<Sample>("[server]\n").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
    }
}
