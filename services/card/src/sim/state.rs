//! The card's persistent state (its "EEPROM"): identity, keys, PIN, PUK and retry counters, kept
//! in a TOML card file that `cms-vcard new` writes and the card rewrites on every change.
//!
//! Writes are atomic (temp file, fsync, rename, fsync of the directory), so a card killed in the
//! middle of a write keeps either its old or its new counters, never a torn file: a blocked card
//! stays blocked across restarts. The file holds the card's secrets, as a real card's chip does; it
//! is created with mode 0600.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use cms_cardcrypto::{KeyAlgorithm, SecretKey, format_groups, parse_hex};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::minidriver;

/// Tries of the user PIN.
pub const PIN_TRIES: u8 = 3;
/// Tries of the admin key (minidriver) or management key (PIV).
pub const ADMIN_TRIES: u8 = 5;
/// Tries of the PIV PUK.
pub const PUK_TRIES: u8 = 5;

/// Factory PIN of a PIV card (YubiKey default).
pub const DEFAULT_PIV_PIN: &[u8] = b"123456";
/// Factory PUK of a PIV card (YubiKey default).
pub const DEFAULT_PIV_PUK: &[u8] = b"12345678";
/// Factory management key of a PIV card (YubiKey default, 3DES).
pub const DEFAULT_MANAGEMENT_KEY: [u8; 24] = [
    1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
];

/// The card profiles (DESIGN.md section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// ISO 7816-4 admin-key card, as a Windows minidriver drives it.
    Minidriver,
    /// NIST SP 800-73-4 PIV with YubiKey extensions.
    Piv,
}

impl Profile {
    /// Configuration name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Profile::Minidriver => "minidriver",
            Profile::Piv => "piv",
        }
    }
}

/// Why a card file could not be read or written. Never contains key, PIN or PUK bytes.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the file failed.
    #[error("card file {path}: {source}")]
    Io {
        /// The card file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid card file.
    #[error("card file {path}: {reason}")]
    Invalid {
        /// The card file.
        path: PathBuf,
        /// What is wrong (names the field, never its value).
        reason: String,
    },
}

/// The card's persistent state in memory.
#[derive(Clone)]
pub struct CardState {
    /// Which profile the card implements.
    pub profile: Profile,
    /// Card identifier: the minidriver `cardid` or the PIV CHUID GUID (16 bytes).
    pub card_id: Vec<u8>,
    /// Serial number (YubiKey GET SERIAL).
    pub serial: u32,
    /// The admin key (minidriver) or the 9B management key (PIV).
    pub admin_key: SecretKey,
    /// Admin-key tries left.
    pub admin_tries: u8,
    /// The user PIN.
    pub pin: Zeroizing<Vec<u8>>,
    /// PIN tries left.
    pub pin_tries: u8,
    /// The PUK (PIV only).
    pub puk: Option<Zeroizing<Vec<u8>>>,
    /// PUK tries left.
    pub puk_tries: u8,
    /// PIV data objects written with PUT DATA: tag -> the whole `53` TLV.
    pub objects: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl std::fmt::Debug for CardState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardState")
            .field("profile", &self.profile)
            .field("admin_key", &self.admin_key)
            .field("admin_tries", &self.admin_tries)
            .field("pin_tries", &self.pin_tries)
            .field("puk_tries", &self.puk_tries)
            .finish_non_exhaustive()
    }
}

/// The card file as written on disk. Secrets are hex (keys) or text (PIN, PUK); the struct is
/// wiped when dropped.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct CardFile {
    #[zeroize(skip)]
    profile: Profile,
    card_id: String,
    serial: u32,
    admin_key_algorithm: String,
    admin_key: String,
    admin_tries_left: u8,
    pin: String,
    pin_tries_left: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    puk: Option<String>,
    #[serde(default)]
    puk_tries_left: u8,
    /// PUT DATA objects, hex tag -> hex value (public data: certificates, CCC).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[zeroize(skip)]
    objects: BTreeMap<String, String>,
}

/// Hex in groups of 4 (what `parse_hex` reads back); the string moves into the wiped CardFile.
fn hex(bytes: &[u8]) -> String {
    format_groups(bytes)
}

impl CardState {
    fn to_file(&self) -> CardFile {
        CardFile {
            profile: self.profile,
            card_id: hex(&self.card_id),
            serial: self.serial,
            admin_key_algorithm: self.admin_key.algorithm().as_str().to_owned(),
            admin_key: hex(self.admin_key.expose_bytes()),
            admin_tries_left: self.admin_tries,
            pin: String::from_utf8_lossy(&self.pin).into_owned(),
            pin_tries_left: self.pin_tries,
            puk: self
                .puk
                .as_ref()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            puk_tries_left: self.puk_tries,
            objects: self
                .objects
                .iter()
                .map(|(tag, value)| (hex(tag), hex(value)))
                .collect(),
        }
    }

    fn from_file(file: &CardFile, path: &Path) -> Result<CardState, StateError> {
        let invalid = |reason: &str| StateError::Invalid {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let card_id = parse_hex(&file.card_id, &[minidriver::CARD_ID_LEN])
            .map_err(|e| invalid(&format!("card_id: {e}")))?;
        let algorithm: KeyAlgorithm = file
            .admin_key_algorithm
            .parse()
            .map_err(|e| invalid(&format!("admin_key_algorithm: {e}")))?;
        let key = parse_hex(&file.admin_key, &[algorithm.key_len()])
            .map_err(|e| invalid(&format!("admin_key: {e}")))?;
        let admin_key = SecretKey::from_zeroizing(algorithm, key)
            .map_err(|e| invalid(&format!("admin_key: {e}")))?;
        let mut objects = BTreeMap::new();
        for (tag, value) in &file.objects {
            let tag = parse_hex(tag, &[]).map_err(|e| invalid(&format!("objects: {e}")))?;
            let value = parse_hex(value, &[]).map_err(|e| invalid(&format!("objects: {e}")))?;
            objects.insert(tag.to_vec(), value.to_vec());
        }
        let state = CardState {
            profile: file.profile,
            card_id: card_id.to_vec(),
            serial: file.serial,
            admin_key,
            admin_tries: file.admin_tries_left.min(ADMIN_TRIES),
            pin: Zeroizing::new(file.pin.as_bytes().to_vec()),
            pin_tries: file.pin_tries_left.min(PIN_TRIES),
            puk: file
                .puk
                .as_ref()
                .map(|p| Zeroizing::new(p.as_bytes().to_vec())),
            puk_tries: file.puk_tries_left.min(PUK_TRIES),
            objects,
        };
        state.check().map_err(invalid)?;
        Ok(state)
    }

    /// Checks the invariants of a profile; the message names the field.
    pub fn check(&self) -> Result<(), &'static str> {
        match self.profile {
            Profile::Minidriver => {
                if !(minidriver::MIN_PIN_LEN..=minidriver::MAX_PIN_LEN).contains(&self.pin.len()) {
                    return Err("pin: a minidriver PIN has 4 to 16 characters");
                }
            }
            Profile::Piv => {
                if !(6..=8).contains(&self.pin.len()) || self.pin.contains(&0xFF) {
                    return Err("pin: a PIV PIN has 6 to 8 characters");
                }
                match &self.puk {
                    Some(puk) if (6..=8).contains(&puk.len()) && !puk.contains(&0xFF) => {}
                    _ => return Err("puk: a PIV card needs a PUK of 6 to 8 characters"),
                }
                if self.admin_key.algorithm() == KeyAlgorithm::Tdes2Key {
                    return Err("admin_key_algorithm: a PIV management key is 3des-3key or AES");
                }
            }
        }
        Ok(())
    }

    /// Reads a card file.
    pub fn load(path: &Path) -> Result<CardState, StateError> {
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| StateError::Io {
            path: path.to_owned(),
            source,
        })?);
        let file: CardFile = toml::from_str(&text).map_err(|e| StateError::Invalid {
            path: path.to_owned(),
            reason: toml_reason(&e, &text),
        })?;
        CardState::from_file(&file, path)
    }

    /// Writes the card file atomically: temp file (mode 0600), fsync, rename, fsync directory.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: path.to_owned(),
            source,
        };
        let text =
            Zeroizing::new(
                toml::to_string(&self.to_file()).map_err(|e| StateError::Invalid {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?,
            );
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
        tmp_name.push(".tmp");
        let tmp = dir.join(tmp_name);
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            file.write_all(text.as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, path).map_err(io)?;
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

/// What is wrong with a card file, without its content: toml's full error quotes the offending
/// line, and its message may quote a value ("invalid type: string \"…\""), either of which may
/// be a PIN or a key. A message with a quote is replaced by the line number.
fn toml_reason(error: &toml::de::Error, text: &str) -> String {
    let message = error.message();
    if !message.contains('"') && !message.contains('\'') {
        return message.to_owned();
    }
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("invalid value on line {line}")
        }
        None => "not a valid card file".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn piv_state() -> CardState {
        CardState {
            profile: Profile::Piv,
            card_id: vec![0x11; 16],
            serial: 424242,
            admin_key: SecretKey::new(KeyAlgorithm::Tdes3Key, &DEFAULT_MANAGEMENT_KEY)
                .expect("key"),
            admin_tries: ADMIN_TRIES,
            pin: Zeroizing::new(DEFAULT_PIV_PIN.to_vec()),
            pin_tries: PIN_TRIES,
            puk: Some(Zeroizing::new(DEFAULT_PIV_PUK.to_vec())),
            puk_tries: PUK_TRIES,
            objects: BTreeMap::new(),
        }
    }

    #[test]
    fn card_file_roundtrips_and_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("card.toml");
        let mut state = piv_state();
        state.pin_tries = 1;
        state
            .objects
            .insert(vec![0x5F, 0xC1, 0x07], vec![0x53, 0x00]);
        state.save(&path).expect("saves");
        let back = CardState::load(&path).expect("loads");
        assert_eq!(back.pin_tries, 1);
        assert_eq!(back.card_id, state.card_id);
        assert!(back.admin_key.ct_eq(&state.admin_key));
        assert_eq!(&back.pin[..], DEFAULT_PIV_PIN);
        assert_eq!(back.objects, state.objects);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("card.toml.tmp").exists());
    }

    #[test]
    fn bad_card_files_name_the_field_not_the_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("card.toml");
        let mut state = piv_state();
        state.save(&path).expect("saves");
        let text = fs::read_to_string(&path).expect("reads");
        fs::write(&path, text.replacen("0708", "07ZZ", 1)).expect("writes");
        let err = CardState::load(&path).expect_err("refused").to_string();
        assert!(err.contains("admin_key"), "{err}");
        assert!(!err.contains("0102"), "{err}");
        // A value of the wrong type: toml would quote it.
        fs::write(
            &path,
            text.replace("pin_tries_left = 3", "pin_tries_left = \"s3cr3t\""),
        )
        .expect("writes");
        let err = CardState::load(&path).expect_err("refused").to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
        assert!(err.contains("line"), "{err}");
        state.pin = Zeroizing::new(b"12".to_vec());
        state.save(&path).expect("saves");
        let err = CardState::load(&path).expect_err("refused").to_string();
        assert!(err.contains("pin"), "{err}");
        assert!(!err.contains("\"12\""), "{err}");
    }
}
