//! Custody administration commands. Secrets (shares, key components) are read from standard
//! input, never from arguments, which end up in shell history and process listings.

use std::io::{BufRead, IsTerminal, Write};

use clap::Subcommand;
use cms_proto::common::v1::KeyAlgorithm;
use cms_proto::custody::v1::{AuditHead, InstanceSeal, ReplicaRole, SealState, Share};
use cms_proto::gateway::v1 as gw;
use data_encoding::HEXUPPER;
use zeroize::Zeroizing;

use crate::messages::print_json;
use crate::{Cli, Error, connect};

#[derive(Subcommand)]
pub enum CustodyCmd {
    /// Seal state, self-test, backend and audit head.
    Status,
    /// Create the key-encryption key and show its M-of-N custodian shares, one at a time.
    Init {
        /// Shares needed to unseal (M).
        #[arg(long)]
        threshold: u32,
        /// Shares to create (N).
        #[arg(long)]
        shares: u32,
    },
    /// Give one custodian share (read from standard input: the share, then its checksum).
    Unseal {
        /// The share's number, as printed by `init`.
        #[arg(long)]
        index: u32,
        /// Custodian name for the audit trail.
        #[arg(long, default_value = "")]
        custodian: String,
        /// Forget shares given so far.
        #[arg(long)]
        reset: bool,
    },
    /// Forget the key-encryption key until custodians unseal again.
    Seal {
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Create the System Owner token's unblock key (once per installation) and show it once:
    /// in groups of 4 with its checksum, and with --shares as M-of-N shares.
    SoInit(crate::so_token::SoInitArgs),
    /// The System Owner token's metadata: label, algorithm, KCV, creation time, shares.
    SoInfo {
        /// Empty: the installation's SO token.
        #[arg(long, default_value = "")]
        label: String,
    },
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Master key versions (metadata only: reference, version, algorithm, KCV, state).
    List {
        #[arg(long, default_value = "")]
        reference: String,
        #[arg(long)]
        include_retired: bool,
    },
    /// Generate a master key inside custody.
    Generate {
        #[arg(long)]
        reference: String,
        /// 3des-2key, 3des-3key, aes-128, aes-192 or aes-256.
        #[arg(long)]
        algorithm: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Generate the next version of a master key (older versions keep working).
    Rotate {
        #[arg(long)]
        reference: String,
    },
    /// Stop using one version.
    Retire {
        #[arg(long)]
        reference: String,
        #[arg(long)]
        version: u32,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Key ceremony: read each component and its KCV from standard input (two lines per
    /// component), then the KCV of the whole key.
    Import {
        #[arg(long)]
        reference: String,
        #[arg(long)]
        algorithm: String,
        /// 2 or 3.
        #[arg(long, default_value_t = 2)]
        components: u32,
    },
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Print the current head (sequence and hash) as JSON; keep it somewhere safe.
    ExportHead,
    /// Verify the whole chain; with --head, also that an exported head is still in it
    /// (detects truncation). Exits 1 when the chain is broken.
    Verify {
        /// A file written by `export-head`.
        #[arg(long)]
        head: Option<std::path::PathBuf>,
    },
}

pub(crate) fn algorithm(name: &str) -> Result<KeyAlgorithm, Error> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "3des-2key" => KeyAlgorithm::Tdes2key,
        "3des-3key" => KeyAlgorithm::Tdes3key,
        "aes-128" => KeyAlgorithm::Aes128,
        "aes-192" => KeyAlgorithm::Aes192,
        "aes-256" => KeyAlgorithm::Aes256,
        other => {
            return Err(Error::Setup(format!(
                "--algorithm {other:?}: use 3des-2key, 3des-3key, aes-128, aes-192 or aes-256"
            )));
        }
    })
}

fn seal_name(state: i32) -> &'static str {
    match SealState::try_from(state).unwrap_or(SealState::Unspecified) {
        SealState::Uninitialised => "uninitialised",
        SealState::Sealed => "sealed",
        SealState::Unsealed => "unsealed",
        SealState::Error => "error (self-test failed)",
        SealState::Unspecified => "unknown",
    }
}

/// One line per custody instance: its role and seal, or why it could not be reached.
fn print_instances(instances: &[InstanceSeal]) {
    if instances.len() < 2 && instances.iter().all(|i| i.error.is_empty()) {
        return;
    }
    for i in instances {
        if !i.error.is_empty() {
            let what = if i.reached { "refused" } else { "not reached" };
            println!("  {:<24} {what}: {}", i.address, i.error);
            continue;
        }
        let role = match ReplicaRole::try_from(i.role).unwrap_or(ReplicaRole::Unspecified) {
            ReplicaRole::Active => "active",
            ReplicaRole::Standby => "standby",
            ReplicaRole::Unspecified => "",
        };
        let mut line = format!("  {:<24} {role:<8} {}", i.address, seal_name(i.seal_state));
        if i.seal_state == SealState::Sealed as i32 && i.threshold > 0 {
            line.push_str(&format!(
                " ({} of {} shares given)",
                i.progress, i.threshold
            ));
        }
        println!("{line}");
    }
}

/// One line from standard input, prompted for when a person is typing.
fn read_secret_line(prompt: &str) -> Result<Zeroizing<String>, Error> {
    if std::io::stdin().is_terminal() {
        eprint!("{prompt}: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = Zeroizing::new(String::new());
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Error::Setup(format!("reading {prompt}: {e}")))?;
    if line.trim().is_empty() {
        return Err(Error::Setup(format!("{prompt}: nothing was entered")));
    }
    Ok(Zeroizing::new(line.trim().to_owned()))
}

pub async fn custody(cli: &Cli, command: &CustodyCmd) -> Result<bool, Error> {
    let mut s = connect(cli)?;
    match command {
        CustodyCmd::Status => {
            let r = s
                .admin
                .get_custody_status(gw::GetCustodyStatusRequest {})
                .await
                .map_err(|e| s.rpc_error(e))?
                .into_inner();
            let passed = r.self_test.as_ref().is_some_and(|t| t.passed);
            if cli.json {
                print_json(&r, "cms.gateway.v1.GetCustodyStatusResponse")?;
                return Ok(passed && r.seal_state == SealState::Unsealed as i32);
            }
            println!("seal state:   {}", seal_name(r.seal_state));
            if r.unseal_threshold > 0 {
                println!(
                    "unseal:       {} of {} shares given",
                    r.unseal_progress, r.unseal_threshold
                );
            }
            println!("self-test:    {}", if passed { "passed" } else { "FAILED" });
            println!(
                "master keys:  {} ({} active versions)",
                r.master_key_count, r.active_key_version_count
            );
            if let Some(head) = r.audit_head {
                println!(
                    "audit head:   #{} {}",
                    head.sequence,
                    HEXUPPER.encode(&head.hash)
                );
            }
            if !r.detail.is_empty() {
                println!("detail:       {}", r.detail);
            }
            Ok(passed && r.seal_state == SealState::Unsealed as i32)
        }
        CustodyCmd::Init { threshold, shares } => {
            no_json(cli, "custody init")?;
            let r = s
                .admin
                .init_custody(gw::InitCustodyRequest {
                    threshold: *threshold,
                    share_count: *shares,
                    custodian_labels: Vec::new(),
                })
                .await
                .map_err(|e| s.rpc_error(e))?
                .into_inner();
            println!(
                "custody initialised: any {} of these {} shares unseal it. Each is shown once and stored nowhere.",
                r.threshold,
                r.shares.len()
            );
            show_shares(&r.shares);
            Ok(true)
        }
        CustodyCmd::Unseal {
            index,
            custodian,
            reset,
        } => {
            let value = read_secret_line(&format!("share {index}"))?;
            let checksum = read_secret_line("checksum")?;
            let r = s
                .admin
                .unseal(gw::UnsealRequest {
                    share: Some(Share {
                        index: *index,
                        value: value.to_string(),
                        checksum: checksum.to_string(),
                    }),
                    reset: *reset,
                    custodian_label: custodian.clone(),
                })
                .await
                .map_err(|e| s.rpc_error(e))?
                .into_inner();
            if cli.json {
                print_json(&r, "cms.gateway.v1.UnsealResponse")?;
            } else {
                if r.seal_state == SealState::Unsealed as i32 {
                    println!("custody is unsealed");
                } else {
                    println!("share accepted: {} of {} given", r.progress, r.threshold);
                }
                print_instances(&r.instances);
            }
            Ok(true)
        }
        CustodyCmd::SoInit(args) => {
            no_json(cli, "custody so-init")?;
            crate::so_token::init(&mut s, args).await
        }
        CustodyCmd::SoInfo { label } => crate::so_token::info(&mut s, label, cli.json).await,
        CustodyCmd::Seal { reason } => {
            let r = s
                .admin
                .seal(gw::SealRequest {
                    reason: reason.clone(),
                })
                .await
                .map_err(|e| s.rpc_error(e))?
                .into_inner();
            if cli.json {
                print_json(&r, "cms.gateway.v1.SealResponse")?;
            } else {
                println!("custody is sealed");
                print_instances(&r.instances);
            }
            Ok(true)
        }
    }
}

/// Shows each share once; at a terminal, one custodian at a time with the screen cleared
/// after each.
pub(crate) fn show_shares(shares: &[Share]) {
    let interactive = std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    for share in shares {
        if interactive {
            eprint!(
                "Call custodian {} and press Enter to show their share...",
                share.index
            );
            let mut ignore = String::new();
            let _ = std::io::stdin().read_line(&mut ignore);
        }
        println!(
            "share {}: {}  checksum {}",
            share.index, share.value, share.checksum
        );
        if interactive {
            clear_when_written_down();
        }
    }
}

/// Waits for Enter, then clears the screen and its scrollback, so a secret shown once does
/// not stay on the terminal.
pub(crate) fn clear_when_written_down() {
    eprint!("Press Enter once it is written down; the screen is then cleared.");
    let mut ignore = String::new();
    let _ = std::io::stdin().read_line(&mut ignore);
    print!("\x1b[2J\x1b[3J\x1b[H");
    let _ = std::io::stdout().flush();
}

fn print_key(key: &cms_proto::custody::v1::MasterKeyVersion) {
    let alg = KeyAlgorithm::try_from(key.algorithm)
        .map(|a| {
            a.as_str_name()
                .trim_start_matches("KEY_ALGORITHM_")
                .to_owned()
        })
        .unwrap_or_default();
    let state = cms_proto::custody::v1::MasterKeyState::try_from(key.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("MASTER_KEY_STATE_")
                .to_owned()
        })
        .unwrap_or_default();
    println!(
        "{:<24} v{:<4} {:<9} KCV {}  {}",
        key.reference, key.version, alg, key.kcv, state
    );
}

/// Key versions as lines, or with --json as a JSON list of cms.custody.v1.MasterKeyVersion.
fn show_keys(cli: &Cli, keys: &[cms_proto::custody::v1::MasterKeyVersion]) -> Result<(), Error> {
    if cli.json {
        let list = gw::ListMasterKeysResponse {
            keys: keys.to_vec(),
            page: None,
        };
        print_json(&list, "cms.gateway.v1.ListMasterKeysResponse")
    } else {
        keys.iter().for_each(print_key);
        Ok(())
    }
}

/// Commands that show secrets one at a time do not print them as one JSON document.
fn no_json(cli: &Cli, command: &str) -> Result<(), Error> {
    if cli.json {
        return Err(Error::Setup(format!(
            "{command} shows secrets one at a time, for one person each; it has no --json"
        )));
    }
    Ok(())
}

pub async fn keys(cli: &Cli, command: &KeysCmd) -> Result<bool, Error> {
    let mut s = connect(cli)?;
    match command {
        KeysCmd::List {
            reference,
            include_retired,
        } => {
            let r = s
                .admin
                .list_master_keys(gw::ListMasterKeysRequest {
                    reference: reference.clone(),
                    include_retired: *include_retired,
                    page: None,
                })
                .await
                .map_err(|e| s.rpc_error(e))?
                .into_inner();
            show_keys(cli, &r.keys)?;
        }
        KeysCmd::Generate {
            reference,
            algorithm: name,
            description,
        } => {
            let r = s
                .admin
                .generate_master_key(gw::GenerateMasterKeyRequest {
                    reference: reference.clone(),
                    algorithm: algorithm(name)? as i32,
                    description: description.clone(),
                })
                .await
                .map_err(|e| s.rpc_error(e))?
                .into_inner();
            show_keys(cli, r.key.as_slice())?;
        }
        KeysCmd::Rotate { reference } => {
            let r = s
                .admin
                .rotate_master_key(gw::RotateMasterKeyRequest {
                    reference: reference.clone(),
                    description: String::new(),
                })
                .await
                .map_err(|e| s.rpc_error(e))?
                .into_inner();
            show_keys(cli, r.key.as_slice())?;
        }
        KeysCmd::Retire {
            reference,
            version,
            reason,
        } => {
            let r = s
                .admin
                .retire_master_key_version(gw::RetireMasterKeyVersionRequest {
                    reference: reference.clone(),
                    version: *version,
                    reason: reason.clone(),
                })
                .await
                .map_err(|e| s.rpc_error(e))?
                .into_inner();
            show_keys(cli, r.key.as_slice())?;
        }
        KeysCmd::Import {
            reference,
            algorithm: name,
            components,
        } => {
            let begun = s
                .admin
                .begin_key_import(gw::BeginKeyImportRequest {
                    reference: reference.clone(),
                    algorithm: algorithm(name)? as i32,
                    component_count: *components,
                    description: String::new(),
                    make_current: true,
                })
                .await
                .map_err(|e| s.rpc_error(e))?
                .into_inner();
            let import_id = begun.import_id.clone();
            let outcome = ceremony(&mut s, &import_id, *components).await;
            if outcome.is_err() {
                // Leave nothing half-done behind: the next ceremony can start at once.
                let _ = s
                    .admin
                    .abort_key_import(gw::AbortKeyImportRequest {
                        import_id,
                        reason: "the ceremony failed in cmsctl".into(),
                    })
                    .await;
            }
            let r = outcome?;
            show_keys(cli, r.key.as_slice())?;
        }
    }
    Ok(true)
}

/// Gives each component with its KCV, then finishes with the whole key's KCV.
async fn ceremony(
    s: &mut crate::Session,
    import_id: &str,
    components: u32,
) -> Result<gw::FinishKeyImportResponse, Error> {
    for n in 1..=components {
        let text = read_secret_line(&format!("component {n} (hex)"))?;
        let component = cms_cardcrypto::parse_hex(&text, &[])
            .map_err(|e| Error::Setup(format!("component {n}: {e}")))?;
        let kcv = read_secret_line(&format!("component {n} KCV"))?;
        let r = s
            .admin
            .add_key_component(gw::AddKeyComponentRequest {
                import_id: import_id.to_owned(),
                component: component.to_vec(),
                expected_kcv: kcv.to_string(),
                custodian_label: String::new(),
            })
            .await
            .map_err(|e| s.rpc_error(e))?
            .into_inner();
        eprintln!("component {n} accepted (KCV {})", r.component_kcv);
    }
    let kcv = read_secret_line("KCV of the whole key")?;
    Ok(s.admin
        .finish_key_import(gw::FinishKeyImportRequest {
            import_id: import_id.to_owned(),
            expected_kcv: kcv.to_string(),
        })
        .await
        .map_err(|e| s.rpc_error(e))?
        .into_inner())
}

fn head_json(head: &AuditHead) -> String {
    serde_json::json!({
        "chain_id": head.chain_id,
        "sequence": head.sequence,
        "hash": HEXUPPER.encode(&head.hash),
    })
    .to_string()
}

fn parse_head(text: &str) -> Result<AuditHead, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let hash_hex = value["hash"].as_str().ok_or("no \"hash\"")?;
    let hash = cms_cardcrypto::parse_hex(hash_hex, &[32]).map_err(|e| e.to_string())?;
    Ok(AuditHead {
        sequence: value["sequence"].as_u64().ok_or("no \"sequence\"")?,
        hash: hash.to_vec(),
        recorded_at: None,
        chain_id: value["chain_id"].as_str().unwrap_or_default().to_owned(),
    })
}

pub async fn audit(cli: &Cli, command: &AuditCmd) -> Result<bool, Error> {
    let mut s = connect(cli)?;
    match command {
        AuditCmd::ExportHead => {
            let r = s
                .admin
                .export_audit_head(gw::ExportAuditHeadRequest {})
                .await
                .map_err(|e| s.rpc_error(e))?
                .into_inner();
            let head = r.head.unwrap_or_default();
            println!("{}", head_json(&head));
            Ok(true)
        }
        AuditCmd::Verify { head } => {
            let expected = match head {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| Error::Setup(format!("--head {}: {e}", path.display())))?;
                    Some(
                        parse_head(&text)
                            .map_err(|e| Error::Setup(format!("--head {}: {e}", path.display())))?,
                    )
                }
                None => None,
            };
            let r = s
                .admin
                .verify_audit(gw::VerifyAuditRequest {
                    expected_head: expected,
                    from_sequence: 0,
                })
                .await
                .map_err(|e| s.rpc_error(e))?
                .into_inner();
            if cli.json {
                print_json(&r, "cms.gateway.v1.VerifyAuditResponse")?;
            } else if r.ok {
                let head = r.head.clone().unwrap_or_default();
                println!(
                    "audit chain OK: {} records, head #{} {}",
                    r.records_checked,
                    head.sequence,
                    HEXUPPER.encode(&head.hash)
                );
            } else {
                println!(
                    "audit chain BROKEN at record {}: {} ({})",
                    r.first_bad_sequence, r.reason, r.detail
                );
            }
            Ok(r.ok)
        }
    }
}
