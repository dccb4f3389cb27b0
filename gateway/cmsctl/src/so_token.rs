//! The System Owner token: its unblock key is made once per installation and shown once
//! (DESIGN.md section 4 format: upper-case hex in groups of 4, CRC-16 checksum), optionally
//! also as M-of-N shares; afterwards only its metadata can be read.

use clap::Args;
use cms_proto::common::v1::KeyAlgorithm;
use cms_proto::custody::v1::SoTokenInfo;
use cms_proto::gateway::v1 as gw;

use std::io::IsTerminal;

use crate::admin::{algorithm, clear_when_written_down, show_shares};
use crate::{Error, Session};

#[derive(Args)]
pub struct SoInitArgs {
    /// Algorithm of the SO token's admin key: 3des-2key, 3des-3key, aes-128, aes-192 or aes-256.
    #[arg(long)]
    algorithm: String,
    /// Label of the SO token. Default: "so-token".
    #[arg(long, default_value = "")]
    label: String,
    /// Also split the key into this many shares (0: none).
    #[arg(long, default_value_t = 0)]
    shares: u32,
    /// Shares needed to rebuild the key (with --shares).
    #[arg(long, default_value_t = 0)]
    threshold: u32,
    /// The SO token card's identifier in hex, recorded with it.
    #[arg(long)]
    card_id: Option<String>,
}

pub async fn init(s: &mut Session, args: &SoInitArgs) -> Result<bool, Error> {
    if args.shares > 0 && (args.threshold == 0 || args.threshold > args.shares) {
        return Err(Error::Setup(format!(
            "--threshold {} with --shares {}: the threshold must be 1 to the share count",
            args.threshold, args.shares
        )));
    }
    let card_id = match &args.card_id {
        Some(hex) => cms_cardcrypto::parse_hex(hex, &[])
            .map_err(|e| Error::Setup(format!("--card-id: {e}")))?
            .to_vec(),
        None => Vec::new(),
    };
    let r = s
        .admin
        .init_so_token(gw::InitSoTokenRequest {
            label: args.label.clone(),
            algorithm: algorithm(&args.algorithm)? as i32,
            share_count: args.shares,
            share_threshold: args.threshold,
            card_id,
        })
        .await
        .map_err(|e| s.rpc_error(e))?
        .into_inner();
    let code = r
        .so_unblock_key
        .ok_or_else(|| Error::Setup("the gateway returned no unblock key".into()))?;
    // Shown in the house format whatever the server's spacing, and only if its checksum holds.
    let key = cms_cardcrypto::parse_with_checksum(&code.hex, &code.checksum, &[])
        .map_err(|e| Error::Setup(format!("the unblock key the gateway returned: {e}")))?;
    let info = r.info.unwrap_or_default();
    println!(
        "SO token {:?} created ({}, KCV {}). Its unblock key is shown once and stored nowhere:",
        info.label,
        algorithm_name(info.algorithm),
        r.kcv
    );
    println!(
        "unblock key: {}  checksum {}",
        cms_cardcrypto::format_groups(&key),
        cms_cardcrypto::checksum(&key)
    );
    let interactive = std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    if interactive {
        clear_when_written_down();
    }
    if !r.shares.is_empty() {
        println!(
            "and as shares: any {} of these {} rebuild it.",
            info.share_threshold,
            r.shares.len()
        );
        show_shares(&r.shares);
    }
    Ok(true)
}

pub async fn info(s: &mut Session, label: &str, json: bool) -> Result<bool, Error> {
    let r = s
        .admin
        .get_so_token_info(gw::GetSoTokenInfoRequest {
            label: label.to_owned(),
        })
        .await
        .map_err(|e| s.rpc_error(e))?
        .into_inner();
    if json {
        crate::messages::print_json(&r, "cms.gateway.v1.GetSoTokenInfoResponse")?;
    } else {
        print_info(&r.info.unwrap_or_default());
    }
    Ok(true)
}

fn algorithm_name(value: i32) -> String {
    KeyAlgorithm::try_from(value)
        .map(|a| {
            a.as_str_name()
                .trim_start_matches("KEY_ALGORITHM_")
                .to_owned()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn print_info(info: &SoTokenInfo) {
    println!("label:      {}", info.label);
    println!("algorithm:  {}", algorithm_name(info.algorithm));
    println!("KCV:        {}", info.kcv);
    if let Some(t) = &info.created_at {
        println!("created at: {t}");
    }
    if info.share_count > 0 {
        println!(
            "shares:     {} (any {} rebuild the key)",
            info.share_count, info.share_threshold
        );
    } else {
        println!("shares:     none");
    }
    if !info.card_id.is_empty() {
        println!(
            "card id:    {}",
            data_encoding::HEXUPPER.encode(&info.card_id)
        );
    }
}
