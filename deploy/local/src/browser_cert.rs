//! PKCS#12 copies of the dev operators' client certificates, for importing into a browser: the
//! helpdesk console on the gateway's port asks the browser for its certificate.
//!
//! Each `pki/operator-<name>.pem` + `.key` gets `pki/operator-<name>.p12` (key, certificate
//! and the dev CA; PBES2 with AES-256 and an HMAC-SHA256 MAC, which current browsers and
//! OpenSSL 3 import) and `pki/operator-<name>.p12.password` (random, owner-only). Existing
//! files are kept, so the password stays the same across `cms up` runs.

use std::fs;
use std::path::{Path, PathBuf};

use cms_kit::pki::{DevPki, write_secret};
use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

#[derive(Debug, thiserror::Error)]
pub enum BrowserCertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Content { path: PathBuf, message: String },
    #[error(transparent)]
    Pki(#[from] cms_kit::pki::PkiError),
}

/// A PKCS#12 file for one operator and where its password is.
#[derive(Debug)]
pub struct BrowserCert {
    pub p12: PathBuf,
    pub password_file: PathBuf,
    pub password: String,
}

fn read(path: &Path) -> Result<Vec<u8>, BrowserCertError> {
    fs::read(path).map_err(|source| BrowserCertError::Io {
        path: path.to_owned(),
        source,
    })
}

fn content(path: &Path, message: impl ToString) -> BrowserCertError {
    BrowserCertError::Content {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// The PKCS#12 encoding of a PEM certificate chain (leaf first), its PKCS#8 PEM key and the CA.
pub fn pkcs12(
    cert_pem: &[u8],
    key_pem: &[u8],
    ca_pem: &[u8],
    friendly_name: &str,
    password: &str,
) -> Result<Vec<u8>, String> {
    let mut chain = Vec::new();
    for der in
        CertificateDer::pem_slice_iter(cert_pem).chain(CertificateDer::pem_slice_iter(ca_pem))
    {
        let der = der.map_err(|e| format!("certificate PEM: {e}"))?;
        chain.push(Certificate::from_der(&der).map_err(|e| format!("certificate: {e}"))?);
    }
    if chain.is_empty() {
        return Err("no certificate".into());
    }
    let key =
        PrivatePkcs8KeyDer::from_pem_slice(key_pem).map_err(|e| format!("PKCS#8 key PEM: {e}"))?;
    let key = PrivateKey::from_der(key.secret_pkcs8_der()).map_err(|e| format!("key: {e}"))?;
    // The local key id ties the key to its leaf certificate inside the file; any bytes unique
    // within the file will do, and this file holds one key.
    let key_id = friendly_name.as_bytes().to_vec();
    let mut store = KeyStore::new();
    store.add_entry(
        friendly_name,
        KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(key_id, key, chain)),
    );
    store.writer(password).write().map_err(|e| e.to_string())
}

/// Writes the PKCS#12 file of every dev operator certificate that lacks one.
pub fn ensure_operator_files(pki: &DevPki) -> Result<Vec<BrowserCert>, BrowserCertError> {
    let entries = fs::read_dir(&pki.dir).map_err(|source| BrowserCertError::Io {
        path: pki.dir.clone(),
        source,
    })?;
    let mut stems: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| {
            name.strip_suffix(".pem")
                .filter(|stem| stem.starts_with("operator-"))
                .map(str::to_owned)
        })
        .filter(|stem| pki.dir.join(format!("{stem}.key")).exists())
        .collect();
    stems.sort();
    stems.iter().map(|stem| ensure_file(pki, stem)).collect()
}

fn ensure_file(pki: &DevPki, stem: &str) -> Result<BrowserCert, BrowserCertError> {
    let p12 = pki.dir.join(format!("{stem}.p12"));
    let password_file = pki.dir.join(format!("{stem}.p12.password"));
    if p12.exists() && password_file.exists() {
        let password = String::from_utf8(read(&password_file)?)
            .map_err(|e| content(&password_file, e))?
            .trim()
            .to_owned();
        return Ok(BrowserCert {
            p12,
            password_file,
            password,
        });
    }
    let cert_path = pki.dir.join(format!("{stem}.pem"));
    let key_path = pki.dir.join(format!("{stem}.key"));
    let password = uuid::Uuid::new_v4().simple().to_string();
    let der = pkcs12(
        &read(&cert_path)?,
        &read(&key_path)?,
        &read(&pki.ca_path())?,
        stem,
        &password,
    )
    .map_err(|m| content(&cert_path, m))?;
    write_secret(&password_file, &format!("{password}\n"))?;
    write_bytes_secret(&p12, &der)?;
    Ok(BrowserCert {
        p12,
        password_file,
        password,
    })
}

fn write_bytes_secret(path: &Path, bytes: &[u8]) -> Result<(), BrowserCertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| BrowserCertError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("p12.tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// What `cms up` prints about the console: its address and how to get the certificate into a
/// browser.
pub fn console_instructions(console: &str, certs: &[BrowserCert], ca: &Path) -> String {
    let mut out = format!("\nHelpdesk console: {console}\n");
    for c in certs {
        out.push_str(&format!(
            "  operator certificate for the browser: {} (password {}, also in {})\n",
            c.p12.display(),
            c.password,
            c.password_file.display()
        ));
    }
    out.push_str(&format!(
        "  Import it under \"Your certificates\" (Chromium: Settings > Privacy and security > Security >\n  \
         Manage certificates; Firefox: Settings > Privacy & Security > View Certificates), and\n  \
         trust {} for websites under \"Authorities\" (or accept the browser's warning once).\n",
        ca.display()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_files_round_trip_and_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::new(dir.path().join("pki"), "cms.test");
        pki.init().unwrap();
        let certs = ensure_operator_files(&pki).unwrap();
        assert_eq!(certs.len(), 1, "{certs:?}");
        let c = &certs[0];
        assert!(c.p12.ends_with("operator-admin.p12"));
        assert_eq!(c.password.len(), 32);
        use std::os::unix::fs::PermissionsExt;
        for path in [&c.p12, &c.password_file] {
            assert_eq!(
                fs::metadata(path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }

        let der = fs::read(&c.p12).unwrap();
        let store =
            KeyStore::from_pkcs12(&der, &c.password, p12_keystore::Pkcs12ImportPolicy::Strict)
                .unwrap();
        let (_, chain) = store.private_key_chain().expect("a key with its chain");
        let tls = pki.tls_settings(cms_kit::pki::OPERATOR_CLIENT);
        let leaf = CertificateDer::from_pem_slice(&fs::read(&tls.cert).unwrap()).unwrap();
        assert_eq!(chain.certs()[0].as_der(), leaf.as_ref());
        assert_eq!(chain.certs().len(), 2, "leaf and CA");
        let key = PrivatePkcs8KeyDer::from_pem_slice(&fs::read(&tls.key).unwrap()).unwrap();
        assert_eq!(chain.key().as_der(), key.secret_pkcs8_der());
        assert!(
            KeyStore::from_pkcs12(&der, "wrong", p12_keystore::Pkcs12ImportPolicy::Strict).is_err()
        );

        // A second run keeps the file and its password.
        let again = ensure_operator_files(&pki).unwrap();
        assert_eq!(again[0].password, c.password);
        assert_eq!(fs::read(&again[0].p12).unwrap(), der);
        let text = console_instructions("https://localhost:7443/", &again, &pki.ca_path());
        assert!(text.contains("https://localhost:7443/") && text.contains(&c.password));
    }
}
