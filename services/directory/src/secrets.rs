//! Secrets of the directory: the key that seals TOTP secrets at rest (AES-256-GCM via
//! `ring::aead`, bound to the user id), argon2id hashes of security answers, and RFC 6238
//! TOTP codes (`totp-rs`).

use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use data_encoding::{HEXLOWER, HEXLOWER_PERMISSIVE};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::Error;
use crate::config::SelfServiceSettings;

/// Format byte of sealed secrets (key version 1).
const SEALED_V1: u8 = 1;

/// The sealing key; never printed.
pub struct SecretKey {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    HEXLOWER_PERMISSIVE.decode(text.as_bytes()).ok()
}

impl SecretKey {
    /// Reads the key file (64 hex digits); when `configured` is unset and
    /// `<data_dir>/secrets.key` does not exist yet, generates it (mode 0600).
    pub fn load(configured: Option<&Path>, data_dir: &Path) -> Result<Self, Error> {
        let path: PathBuf = configured
            .map(Path::to_owned)
            .unwrap_or_else(|| data_dir.join("secrets.key"));
        let fail = |reason: String| Error::SecretsKey {
            path: path.display().to_string(),
            reason,
        };
        let rng = SystemRandom::new();
        if configured.is_none() && !path.exists() {
            let mut key = Zeroizing::new([0u8; 32]);
            rng.fill(key.as_mut())
                .map_err(|_| fail("no randomness".into()))?;
            std::fs::create_dir_all(data_dir).map_err(|e| fail(e.to_string()))?;
            write_private(&path, &Zeroizing::new(HEXLOWER.encode(key.as_ref())))
                .map_err(|e| fail(e.to_string()))?;
            tracing::warn!(path = %path.display(), "generated a new secrets key; back it up with the database");
        }
        let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?);
        let bytes = Zeroizing::new(
            unhex(text.trim()).ok_or_else(|| fail("not hex (64 hex digits expected)".into()))?,
        );
        if bytes.len() != 32 {
            return Err(fail(format!(
                "{} bytes; 32 (64 hex digits) expected",
                bytes.len()
            )));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| fail("unusable key".into()))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            rng,
        })
    }

    /// A key from raw bytes (tests, benchmarks).
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        #[allow(clippy::expect_used)]
        let key = UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte AES key");
        Self {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        }
    }

    pub fn random(&self, out: &mut [u8]) -> Result<(), Error> {
        self.rng
            .fill(out)
            .map_err(|_| Error::Internal("no randomness".into()))
    }

    /// `version || nonce || ciphertext || tag`, bound to `context` (e.g. "totp/<user id>").
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random(&mut nonce)?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(context)),
                &mut buf,
            )
            .map_err(|_| Error::Internal("seal failed".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        buf.zeroize();
        Ok(out)
    }

    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        let bad = || Error::Internal("a sealed secret does not open (wrong key or altered)".into());
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != SEALED_V1 {
            return Err(bad());
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1..=NONCE_LEN]);
        let mut buf = Zeroizing::new(sealed[1 + NONCE_LEN..].to_vec());
        let len = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(context)),
                buf.as_mut_slice(),
            )
            .map_err(|_| bad())?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

fn aad(context: &str) -> Vec<u8> {
    let mut aad = b"cms-directory/v1/".to_vec();
    aad.extend_from_slice(context.as_bytes());
    aad
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

/// argon2id hashing of folded security answers.
#[derive(Clone, Debug)]
pub struct AnswerHasher {
    memory_kib: u32,
    iterations: u32,
}

impl AnswerHasher {
    pub fn new(settings: &SelfServiceSettings) -> Self {
        Self {
            memory_kib: settings.argon2_memory_kib.max(8),
            iterations: settings.argon2_iterations.max(1),
        }
    }

    fn raw(memory: u32, iterations: u32, salt: &[u8], answer: &[u8]) -> Result<[u8; 32], Error> {
        let params = Params::new(memory, iterations, 1, Some(32))
            .map_err(|e| Error::Internal(format!("argon2 parameters: {e}")))?;
        let mut out = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(answer, salt, &mut out)
            .map_err(|e| Error::Internal(format!("argon2: {e}")))?;
        Ok(out)
    }

    /// `argon2id$v=19$m=…,t=…,p=1$<salt>$<hash>` of the (already folded) answer.
    pub fn hash(&self, key: &SecretKey, answer: &str) -> Result<String, Error> {
        let mut salt = [0u8; 16];
        key.random(&mut salt)?;
        let hash = Self::raw(self.memory_kib, self.iterations, &salt, answer.as_bytes())?;
        Ok(format!(
            "argon2id$v=19$m={},t={},p=1${}${}",
            self.memory_kib,
            self.iterations,
            HEXLOWER.encode(&salt),
            HEXLOWER.encode(&hash)
        ))
    }

    /// Whether `answer` (already folded) matches `stored`, in constant time.
    pub fn verify(stored: &str, answer: &str) -> bool {
        let parts: Vec<&str> = stored.split('$').collect();
        let [alg, "v=19", params, salt, hash] = parts.as_slice() else {
            return false;
        };
        if *alg != "argon2id" {
            return false;
        }
        let mut memory = 0;
        let mut iterations = 0;
        for kv in params.split(',') {
            match kv.split_once('=') {
                Some(("m", v)) => memory = v.parse().unwrap_or(0),
                Some(("t", v)) => iterations = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        let (Some(salt), Some(expected)) = (unhex(salt), unhex(hash)) else {
            return false;
        };
        match Self::raw(memory, iterations, &salt, answer.as_bytes()) {
            Ok(actual) => bool::from(actual.as_slice().ct_eq(&expected)),
            Err(_) => false,
        }
    }
}

/// TOTP hash algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TotpAlg {
    Sha1,
    Sha256,
    Sha512,
}

/// TOTP generator parameters, stored as `SHA1:6:30`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TotpParams {
    pub alg: TotpAlg,
    pub digits: u32,
    pub period: u64,
}

impl TotpParams {
    pub fn encode(&self) -> String {
        format!("{}:{}:{}", self.alg_name(), self.digits, self.period)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let mut it = s.split(':');
        let alg = match it.next()? {
            "SHA1" => TotpAlg::Sha1,
            "SHA256" => TotpAlg::Sha256,
            "SHA512" => TotpAlg::Sha512,
            _ => return None,
        };
        Some(Self {
            alg,
            digits: it.next()?.parse().ok()?,
            period: it.next()?.parse().ok()?,
        })
    }

    pub fn alg_name(&self) -> &'static str {
        match self.alg {
            TotpAlg::Sha1 => "SHA1",
            TotpAlg::Sha256 => "SHA256",
            TotpAlg::Sha512 => "SHA512",
        }
    }

    /// Secret length recommended by RFC 4226/6238 for the hash.
    pub fn secret_len(&self) -> usize {
        match self.alg {
            TotpAlg::Sha1 => 20,
            TotpAlg::Sha256 => 32,
            TotpAlg::Sha512 => 64,
        }
    }

    /// The generator for `secret`, accepting codes `skew` steps around the current one.
    fn totp(&self, secret: &[u8], skew: u64) -> totp_rs::Totp {
        let algorithm = match self.alg {
            TotpAlg::Sha1 => totp_rs::Algorithm::SHA1,
            TotpAlg::Sha256 => totp_rs::Algorithm::SHA256,
            TotpAlg::Sha512 => totp_rs::Algorithm::SHA512,
        };
        // Parameters are checked at enrolment (6 or 8 digits, 15 to 300 s, a full-size secret);
        // stored ones are ours.
        totp_rs::Builder::new()
            .with_algorithm(algorithm)
            .with_digits(u8::try_from(self.digits).unwrap_or(u8::MAX))
            .with_step_duration(self.period.max(1))
            .with_skew(u16::try_from(skew).unwrap_or(u16::MAX))
            .with_secret(secret)
            .build_noncompliant()
    }

    /// The code for time step `step`.
    pub fn code(&self, secret: &[u8], step: u64) -> String {
        let time = step.saturating_mul(self.period.max(1));
        self.totp(secret, 0).generate(time).to_string()
    }

    /// The accepted step matching `code` within `skew` steps of `now_secs`, if any (compared
    /// in constant time).
    pub fn verify(&self, secret: &[u8], code: &str, now_secs: u64, skew: u64) -> Option<u64> {
        self.totp(secret, skew).check(code, now_secs)
    }
}

/// RFC 4648 base32 without padding (as authenticator apps expect).
pub fn base32(bytes: &[u8]) -> String {
    data_encoding::BASE32_NOPAD.encode(bytes)
}

/// Characters left as they are in a URI component: RFC 3986's unreserved set.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encoding of everything but unreserved characters (RFC 3986).
pub fn percent(s: &str) -> String {
    utf8_percent_encode(s, UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_vectors() {
        let sha1 = b"12345678901234567890";
        let sha256 = b"12345678901234567890123456789012";
        let sha512 = b"1234567890123456789012345678901234567890123456789012345678901234";
        let p = |alg| TotpParams {
            alg,
            digits: 8,
            period: 30,
        };
        assert_eq!(p(TotpAlg::Sha1).code(sha1, 59 / 30), "94287082");
        assert_eq!(p(TotpAlg::Sha256).code(sha256, 59 / 30), "46119246");
        assert_eq!(p(TotpAlg::Sha512).code(sha512, 59 / 30), "90693936");
        assert_eq!(p(TotpAlg::Sha1).code(sha1, 1_111_111_109 / 30), "07081804");
        assert_eq!(
            p(TotpAlg::Sha512).code(sha512, 20_000_000_000 / 30),
            "47863826"
        );
        assert_eq!(p(TotpAlg::Sha1).verify(sha1, "94287082", 59, 1), Some(1));
        assert_eq!(p(TotpAlg::Sha1).verify(sha1, "94287082", 200, 1), None);
    }

    #[test]
    fn base32_rfc4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
    }

    #[test]
    fn percent_leaves_only_unreserved_characters() {
        assert_eq!(percent("A-z0.9_~"), "A-z0.9_~");
        assert_eq!(
            percent("Acme Corp:ü/?&="),
            "Acme%20Corp%3A%C3%BC%2F%3F%26%3D"
        );
    }

    #[test]
    fn seal_binds_context() {
        let key = SecretKey::from_bytes(&[7; 32]);
        let sealed = key.seal("totp/a", b"secret").unwrap();
        assert_eq!(key.open("totp/a", &sealed).unwrap().as_slice(), b"secret");
        assert!(key.open("totp/b", &sealed).is_err());
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
    }

    #[test]
    fn answers_hash_and_verify() {
        let key = SecretKey::from_bytes(&[1; 32]);
        let hasher = AnswerHasher {
            memory_kib: 64,
            iterations: 1,
        };
        let stored = hasher.hash(&key, "rex").unwrap();
        assert!(stored.starts_with("argon2id$v=19$m=64,t=1,p=1$"));
        assert!(!stored.contains("rex"));
        assert!(AnswerHasher::verify(&stored, "rex"));
        assert!(!AnswerHasher::verify(&stored, "rex2"));
    }

    #[test]
    fn key_file_is_generated_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecretKey::load(None, dir.path()).unwrap();
        let sealed = a.seal("x", b"y").unwrap();
        let b = SecretKey::load(None, dir.path()).unwrap();
        assert_eq!(b.open("x", &sealed).unwrap().as_slice(), b"y");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("secrets.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join("bad.key"), "abc").unwrap();
        let err = SecretKey::load(Some(&dir.path().join("bad.key")), dir.path()).unwrap_err();
        assert!(err.to_string().contains("bad.key"), "{err}");
    }
}
