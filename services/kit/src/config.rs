//! Service configuration: one serde struct per service, read from a TOML file and overridden
//! by environment variables `CMS_<SERVICE>__<SECTION>__<KEY>` (for example
//! `CMS_CUSTODY__SERVER__LISTEN`). Unknown keys are rejected; errors name the key.

use std::path::Path;

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(String);

/// Reads `path` (if given) then the environment for `service` into `T`.
pub fn load<T: DeserializeOwned>(service: &str, path: Option<&Path>) -> Result<T, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        if !path.is_file() {
            return Err(ConfigError(format!(
                "file {} does not exist or is not a file",
                path.display()
            )));
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    let prefix = format!("CMS_{}", service.to_ascii_uppercase());
    builder = builder.add_source(
        config::Environment::with_prefix(&prefix)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("access.allow"),
    );
    let built = builder.build().map_err(|e| ConfigError(e.to_string()))?;
    built
        .try_deserialize()
        .map_err(|e| ConfigError(e.to_string()))
}

/// Parses TOML text into `T` (used by the launcher and tests that write configs).
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    toml_de(text)
}

fn toml_de<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .map_err(|e| ConfigError(e.to_string()))?;
    built
        .try_deserialize()
        .map_err(|e| ConfigError(e.to_string()))
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
    fn missing_key_is_named() {
        let err = from_toml::<Sample>("[server]\n").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
    }
}
