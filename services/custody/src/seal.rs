//! Sealing: custody's key-encryption key (KEK) exists in memory only while unsealed. It is
//! split into N Shamir shares of which any M rebuild it (custodians type them in with
//! `cmsctl custody unseal`), or, for development, kept in a seal file.

use std::path::Path;

use cms_cardcrypto::{checksum, format_groups, parse_with_checksum};
use zeroize::Zeroizing;

use crate::wrap::{KEK_LEN, Kek, WrapError};

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "threshold must be at least 1 and at most the share count (got {threshold} of {count}); share count at most 255"
    )]
    Parameters { threshold: u32, count: u32 },
    #[error("share {0}: {1}")]
    Share(u32, cms_cardcrypto::CodeError),
    #[error("share {0} has the wrong length")]
    ShareLength(u32),
    #[error(
        "the shares do not rebuild the key-encryption key (a share is wrong or from another custody)"
    )]
    WrongShares,
    #[error("share {0} was already given")]
    Duplicate(u32),
    #[error(transparent)]
    Wrap(#[from] WrapError),
    #[error("seal.dev_seal_file {path}: {reason}")]
    DevFile { path: String, reason: String },
}

/// A share as custodians see it: its index, hex groups and a checksum.
pub struct ShownShare {
    pub index: u32,
    pub value: Zeroizing<String>,
    pub checksum: String,
}

/// Splits `kek` into `count` shares, any `threshold` of which rebuild it.
pub fn split(kek: &Kek, threshold: u32, count: u32) -> Result<Vec<ShownShare>, SealError> {
    split_secret(kek.expose(), threshold, count)
}

/// Splits any secret into `count` Shamir shares (first byte of each: its index).
pub fn split_secret(
    secret: &[u8],
    threshold: u32,
    count: u32,
) -> Result<Vec<ShownShare>, SealError> {
    let bad = || SealError::Parameters { threshold, count };
    let t = u8::try_from(threshold).map_err(|_| bad())?;
    let n = u8::try_from(count).map_err(|_| bad())?;
    if t == 0 || t > n {
        return Err(bad());
    }
    let dealer = blahaj::Sharks(t);
    Ok(dealer
        .dealer(secret)
        .take(usize::from(n))
        .map(|share| {
            let bytes = Zeroizing::new(Vec::from(&share));
            ShownShare {
                index: u32::from(bytes[0]),
                value: Zeroizing::new(format_groups(&bytes)),
                checksum: checksum(&bytes),
            }
        })
        .collect())
}

/// Parses one typed share (hex groups and checksum) into its bytes.
pub fn parse_share(
    index: u32,
    value: &str,
    checksum: &str,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let bytes = parse_with_checksum(value, checksum, &[KEK_LEN + 1])
        .map_err(|e| SealError::Share(index, e))?;
    if bytes.len() != KEK_LEN + 1 || u32::from(bytes[0]) != index {
        return Err(SealError::ShareLength(index));
    }
    Ok(bytes)
}

/// Rebuilds the KEK from `threshold` shares and checks it against the stored check value.
pub fn combine(
    threshold: u32,
    shares: &[Zeroizing<Vec<u8>>],
    check: &[u8],
) -> Result<Kek, SealError> {
    let t = u8::try_from(threshold).map_err(|_| SealError::WrongShares)?;
    let parsed: Vec<blahaj::Share> = shares
        .iter()
        .map(|s| blahaj::Share::try_from(&s[..]).map_err(|_| SealError::WrongShares))
        .collect::<Result<_, _>>()?;
    let secret = Zeroizing::new(
        blahaj::Sharks(t)
            .recover(parsed.iter())
            .map_err(|_| SealError::WrongShares)?,
    );
    let kek = Kek::from_bytes(&secret).map_err(|_| SealError::WrongShares)?;
    if kek.check_value() != check {
        return Err(SealError::WrongShares);
    }
    Ok(kek)
}

/// Reads the dev seal file, creating it (owner-only) with a new KEK when missing.
pub fn dev_file(path: &Path) -> Result<(Kek, bool), SealError> {
    let fail = |reason: String| SealError::DevFile {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => Ok((
            Kek::from_bytes(&bytes).map_err(|e| fail(e.to_string()))?,
            false,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            // Its directory may not exist yet: on PostgreSQL nothing else creates the data dir.
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|e| fail(e.to_string()))?;
            }
            let kek = Kek::generate()?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| fail(e.to_string()))?;
            file.write_all(kek.expose())
                .and_then(|()| file.sync_all())
                .map_err(|e| fail(e.to_string()))?;
            Ok((kek, true))
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_threshold_shares_rebuild_the_kek() {
        let kek = Kek::generate().unwrap();
        let check = kek.check_value();
        let shares = split(&kek, 3, 5).unwrap();
        let parsed: Vec<_> = shares
            .iter()
            .map(|s| parse_share(s.index, &s.value, &s.checksum).unwrap())
            .collect();
        for combo in [[0, 1, 2], [1, 3, 4], [4, 0, 2]] {
            let chosen: Vec<_> = combo.iter().map(|i| parsed[*i].clone()).collect();
            let rebuilt = combine(3, &chosen, &check).unwrap();
            assert_eq!(rebuilt.expose(), kek.expose());
        }
        // Two shares are not enough; a share of another KEK is wrong.
        assert!(combine(3, &parsed[..2], &check).is_err());
        let other = split(&Kek::generate().unwrap(), 3, 5).unwrap();
        let foreign = parse_share(other[0].index, &other[0].value, &other[0].checksum).unwrap();
        assert!(combine(3, &[foreign, parsed[1].clone(), parsed[2].clone()], &check).is_err());
    }

    #[test]
    fn typing_errors_are_caught_before_combining() {
        let shares = split(&Kek::generate().unwrap(), 2, 2).unwrap();
        let s = &shares[0];
        assert!(parse_share(s.index, &s.value, "0000").is_err() || s.checksum == "0000");
        assert!(parse_share(s.index + 1, &s.value, &s.checksum).is_err());
        assert!(split(&Kek::generate().unwrap(), 3, 2).is_err());
        assert!(split(&Kek::generate().unwrap(), 0, 2).is_err());
    }
}
