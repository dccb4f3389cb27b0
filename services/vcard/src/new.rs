//! `cms-vcard new`: writes a card file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use cms_card::sim::state::{self, CardState, Profile};
use cms_cardcrypto::{KeyAlgorithm, Scheme, SecretKey, diversify, parse_hex};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProfileArg {
    /// ISO 7816-4 admin-key card (Windows minidriver style).
    Minidriver,
    /// PIV with YubiKey extensions.
    Piv,
}

#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// Where to write the card file (mode 0600).
    #[arg(long)]
    out: PathBuf,
    /// Card profile.
    #[arg(long, value_enum)]
    profile: ProfileArg,
    /// Card identifier, 16 bytes of hex (minidriver cardid / PIV CHUID GUID); random if absent.
    #[arg(long)]
    card_id: Option<String>,
    /// Serial number (PIV GET SERIAL); random if absent.
    #[arg(long)]
    serial: Option<u32>,
    /// Master key (hex) to diversify the admin key from, with --scheme.
    #[arg(long, conflicts_with = "admin_key", requires = "scheme")]
    master_key: Option<String>,
    /// Diversification scheme: gp-emv, gp-visa2 (3DES), gp-kdf3, sp800-108-cmac (AES).
    #[arg(long)]
    scheme: Option<String>,
    /// Master key version (bound into sp800-108-cmac).
    #[arg(long, default_value_t = 1)]
    key_version: u32,
    /// The admin key itself (hex), with --algorithm.
    #[arg(long)]
    admin_key: Option<String>,
    /// Admin-key algorithm: 3des-3key, aes-128, aes-192, aes-256 (with --admin-key, or the
    /// output length of an sp800-108-cmac diversification).
    #[arg(long)]
    algorithm: Option<String>,
    /// The user PIN (minidriver: 4 to 16 characters; PIV: 6 to 8).
    #[arg(long)]
    pin: Option<String>,
    /// The PUK (PIV only; 6 to 8 characters).
    #[arg(long)]
    puk: Option<String>,
    /// Overwrite an existing card file.
    #[arg(long)]
    force: bool,
}

fn algorithm(name: &str) -> anyhow::Result<KeyAlgorithm> {
    name.parse().context("--algorithm")
}

fn admin_key(args: &NewArgs, card_id: &[u8]) -> anyhow::Result<SecretKey> {
    if let Some(master) = &args.master_key {
        let scheme: Scheme = args
            .scheme
            .as_deref()
            .unwrap_or_default()
            .parse()
            .context("--scheme")?;
        let bytes = parse_hex(master, &[16, 24, 32]).context("--master-key")?;
        let (master_algorithm, out_len) = match scheme {
            Scheme::GpEmv | Scheme::GpVisa2 => (KeyAlgorithm::Tdes2Key, 24),
            Scheme::GpKdf3 => (
                KeyAlgorithm::aes_for_len(bytes.len()).context("--master-key length")?,
                bytes.len(),
            ),
            Scheme::Sp800108Cmac => {
                let out_len = match &args.algorithm {
                    Some(name) => algorithm(name)?.key_len(),
                    None => bytes.len(),
                };
                (
                    KeyAlgorithm::aes_for_len(bytes.len()).context("--master-key length")?,
                    out_len,
                )
            }
        };
        let master = SecretKey::from_zeroizing(master_algorithm, bytes).context("--master-key")?;
        return diversify(scheme, &master, card_id, args.key_version, out_len)
            .context("diversifying the admin key");
    }
    match (&args.admin_key, &args.algorithm) {
        (Some(hex), Some(name)) => {
            let algorithm = algorithm(name)?;
            let bytes = parse_hex(hex, &[algorithm.key_len()]).context("--admin-key")?;
            Ok(SecretKey::from_zeroizing(algorithm, bytes).context("--admin-key")?)
        }
        (Some(_), None) => bail!("--admin-key needs --algorithm"),
        (None, _) if matches!(args.profile, ProfileArg::Piv) => {
            // A factory-fresh YubiKey's management key.
            Ok(SecretKey::new(
                KeyAlgorithm::Tdes3Key,
                &state::DEFAULT_MANAGEMENT_KEY,
            )?)
        }
        (None, _) => bail!("a minidriver card needs --master-key with --scheme, or --admin-key"),
    }
}

pub fn run(args: &NewArgs) -> anyhow::Result<()> {
    if args.out.exists() && !args.force {
        bail!("{} exists (use --force to overwrite)", args.out.display());
    }
    let rng = SystemRandom::new();
    let mut random = [0u8; 20];
    rng.fill(&mut random)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    let card_id = match &args.card_id {
        Some(hex) => parse_hex(hex, &[16]).context("--card-id")?.to_vec(),
        None => random[..16].to_vec(),
    };
    let serial = args
        .serial
        .unwrap_or(u32::from_be_bytes([0, random[16], random[17], random[18]]));
    let admin_key = admin_key(args, &card_id)?;
    let (profile, default_pin, puk) = match args.profile {
        ProfileArg::Minidriver => {
            if args.puk.is_some() {
                bail!("--puk: a minidriver card has no PUK");
            }
            (Profile::Minidriver, "1234", None)
        }
        ProfileArg::Piv => {
            let puk = args
                .puk
                .clone()
                .unwrap_or_else(|| String::from_utf8_lossy(state::DEFAULT_PIV_PUK).into_owned());
            (
                Profile::Piv,
                "123456",
                Some(Zeroizing::new(puk.into_bytes())),
            )
        }
    };
    let pin = args.pin.as_deref().unwrap_or(default_pin);
    let card = CardState {
        profile,
        card_id,
        serial,
        admin_tries: state::ADMIN_TRIES,
        admin_key,
        pin: Zeroizing::new(pin.as_bytes().to_vec()),
        pin_tries: state::PIN_TRIES,
        puk_tries: if puk.is_some() { state::PUK_TRIES } else { 0 },
        puk,
        objects: BTreeMap::new(),
    };
    card.check().map_err(|reason| anyhow::anyhow!("{reason}"))?;
    card.save(&args.out)?;
    eprintln!(
        "cms-vcard: wrote {} card {} (admin key {})",
        profile.as_str(),
        args.out.display(),
        card.admin_key.algorithm()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: NewArgs,
    }

    fn new_card(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<CardState> {
        let out = dir.join("card.toml");
        let mut argv = vec!["new", "--out", out.to_str().expect("utf-8"), "--force"];
        argv.extend_from_slice(args);
        run(&Cli::try_parse_from(argv)?.args)?;
        Ok(CardState::load(&out)?)
    }

    fn hex(bytes: &[u8]) -> String {
        data_encoding::HEXUPPER.encode(bytes)
    }

    /// The admin key is diversified exactly as custody does it (shared/vectors).
    #[test]
    fn diversifies_the_admin_key_from_a_master_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        // gp-emv uses the rightmost 10 bytes of the card id.
        let card = new_card(
            dir.path(),
            &[
                "--profile",
                "minidriver",
                "--card-id",
                "00000000 00000001 02030405 06070809",
                "--master-key",
                "404142434445464748494A4B4C4D4E4F",
                "--scheme",
                "gp-emv",
            ],
        )
        .expect("card");
        assert_eq!(
            hex(card.admin_key.expose_bytes()),
            "0EF59FCBF8019B62E62AF6EA20B8BF250EF59FCBF8019B62"
        );
        // sp800-108-cmac binds the whole card id and the key version.
        let card = new_card(
            dir.path(),
            &[
                "--profile",
                "piv",
                "--card-id",
                "6F1D2B3C4D5E6F708192A3B4C5D6E7F8",
                "--master-key",
                "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F",
                "--scheme",
                "sp800-108-cmac",
                "--key-version",
                "2",
            ],
        )
        .expect("card");
        assert_eq!(card.admin_key.algorithm(), KeyAlgorithm::Aes256);
        assert_eq!(
            hex(card.admin_key.expose_bytes()),
            "19DE9A9AC9976B4DFC062C7466920EB591000095A02563995372EF5B76B47796"
        );
        assert_eq!(card.puk_tries, state::PUK_TRIES);
    }

    #[test]
    fn refuses_what_a_card_cannot_hold() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = new_card(dir.path(), &["--profile", "minidriver"]).expect_err("no key");
        assert!(err.to_string().contains("--master-key"), "{err}");
        let err = new_card(dir.path(), &["--profile", "piv", "--pin", "12"]).expect_err("short");
        assert!(err.to_string().contains("pin"), "{err}");
        let err = new_card(
            dir.path(),
            &[
                "--profile",
                "minidriver",
                "--admin-key",
                "0011",
                "--algorithm",
                "aes-128",
            ],
        )
        .expect_err("short key");
        assert!(err.to_string().contains("--admin-key"), "{err:#}");
        let err = new_card(
            dir.path(),
            &[
                "--profile",
                "minidriver",
                "--admin-key",
                "00112233445566778899AABBCCDDEEFF",
                "--algorithm",
                "aes-128",
                "--puk",
                "12345678",
            ],
        )
        .expect_err("puk");
        assert!(err.to_string().contains("PUK"), "{err}");
    }
}
