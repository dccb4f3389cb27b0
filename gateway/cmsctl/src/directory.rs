//! `cmsctl operators|users|ldap|cards`: the directory through the gateway.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use cms_proto::common::v1::{CardProfile, PageRequest};
use cms_proto::directory::v1::{
    CardImportPhase, CardImportReport, CardRefusal, CertificateBinding, Credential,
    CredentialStatus, ImportCredentialsEnd, ImportCredentialsOptions, ImportReport,
    ImportUsersOptions, Operator, OperatorScope, OperatorStatus, User, certificate_binding,
};
use cms_proto::gateway::v1 as gw;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_stream::StreamExt;

use crate::messages::print_json;
use crate::{Cli, Error, connect};

#[derive(Subcommand)]
pub enum OperatorsCmd {
    /// Create an operator account; its username is the name in its certificate's SPIFFE ID
    /// (spiffe://<td>/cms/operator/<username>).
    Create(OperatorArgs),
    /// One operator.
    Show { id: String },
    /// Operators, optionally with one role.
    List {
        #[arg(long, default_value = "")]
        role: String,
        /// Also disabled operators.
        #[arg(long)]
        all: bool,
    },
    /// Change an operator: the options given replace the stored values.
    Update {
        id: String,
        #[command(flatten)]
        change: OperatorChange,
        /// Disable the account.
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        /// Enable the account again.
        #[arg(long)]
        enable: bool,
    },
}

#[derive(Args)]
pub struct OperatorArgs {
    #[arg(long)]
    username: String,
    #[command(flatten)]
    change: OperatorChange,
}

#[derive(Args)]
pub struct OperatorChange {
    /// A role (repeat): helpdesk, approver, template-admin, key-custodian, auditor,
    /// directory-admin, admin.
    #[arg(long = "role")]
    roles: Vec<String>,
    #[arg(long)]
    display_name: Option<String>,
    #[arg(long)]
    email: Option<String>,
    /// Scope: an org unit the operator may act on (repeat).
    #[arg(long = "org-unit")]
    org_units: Vec<String>,
    /// Scope: a template id the operator may act on (repeat).
    #[arg(long = "template")]
    template_ids: Vec<String>,
    /// Bind the operator to this certificate (PEM) by its public key's SHA-256.
    #[arg(long)]
    bind_cert: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum UsersCmd {
    /// Create a user.
    Create {
        #[arg(long)]
        username: String,
        #[command(flatten)]
        fields: UserFields,
    },
    /// Change a user's fields (the options given).
    Update {
        id: String,
        #[command(flatten)]
        fields: UserFields,
    },
    /// Disable a user.
    Disable {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Import users from a CSV file (header: username, display_name, email, phone, org_unit,
    /// external_id); a progress bar while it uploads, then the report. Exits 1 when a line
    /// was rejected.
    Import {
        file: PathBuf,
        /// Update users that exist already.
        #[arg(long)]
        update_existing: bool,
        /// Disable CSV users missing from the file.
        #[arg(long)]
        disable_missing: bool,
        /// Report only; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The first line is data, not a header.
        #[arg(long)]
        no_header: bool,
        /// Let the file change users an LDAP sync owns (refused otherwise: the next sync
        /// would undo it).
        #[arg(long)]
        overwrite_ldap_users: bool,
        #[arg(long, default_value = ",")]
        delimiter: String,
    },
}

#[derive(Args)]
pub struct UserFields {
    #[arg(long)]
    display_name: Option<String>,
    #[arg(long)]
    email: Option<String>,
    #[arg(long)]
    phone: Option<String>,
    #[arg(long)]
    org_unit: Option<String>,
    #[arg(long)]
    external_id: Option<String>,
}

#[derive(Subcommand)]
pub enum LdapCmd {
    /// Synchronise users from LDAP: progress, then the counts. Exits 1 when an entry was
    /// rejected.
    Sync {
        /// The configured source; default: the default one.
        #[arg(long, default_value = "")]
        source: String,
        /// Disable users of the source that LDAP no longer has.
        #[arg(long)]
        disable_missing: bool,
        /// Report only; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
pub enum CardsCmd {
    /// Register an issued card for a user.
    Register {
        #[arg(long)]
        user: String,
        /// The card's identifier (hex), as custody diversifies with it.
        #[arg(long)]
        card_id: String,
        #[arg(long)]
        serial: String,
        /// minidriver or piv.
        #[arg(long)]
        profile: String,
        #[arg(long)]
        template: String,
        #[arg(long, default_value_t = 0)]
        template_version: u32,
        #[arg(long, default_value_t = 0)]
        master_key_version: u32,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Change a card's status: active, blocked, revoked or lost.
    Status {
        id: String,
        status: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Import cards (an existing inventory) from a CSV file with a header (columns in
    /// deploy/README.md): progress, then the report. Importing a file again changes nothing.
    /// Exits 1 when a line was refused.
    Import {
        file: PathBuf,
        /// Report what would happen; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = ",")]
        delimiter: String,
    },
}

fn mask(paths: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    }
}

/// The public-key SHA-256 of a PEM certificate: what the directory binds an operator to.
fn spki_sha256(path: &PathBuf) -> Result<Vec<u8>, Error> {
    let fail = |e: &dyn std::fmt::Display| Error::Setup(format!("{}: {e}", path.display()));
    let pem = std::fs::read(path).map_err(|e| fail(&e))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| fail(&e))?;
    let cert = pem.parse_x509().map_err(|e| fail(&e))?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    Ok(ring::digest::digest(&ring::digest::SHA256, spki)
        .as_ref()
        .to_vec())
}

impl OperatorChange {
    /// Applies the options given to `op`; returns the field-mask paths changed.
    fn apply(&self, op: &mut Operator) -> Result<Vec<&'static str>, Error> {
        let mut paths = Vec::new();
        if !self.roles.is_empty() {
            op.roles = self.roles.clone();
            paths.push("roles");
        }
        if let Some(v) = &self.display_name {
            op.display_name = v.clone();
            paths.push("display_name");
        }
        if let Some(v) = &self.email {
            op.email = v.clone();
            paths.push("email");
        }
        if !self.org_units.is_empty() || !self.template_ids.is_empty() {
            op.scope = Some(OperatorScope {
                org_units: self.org_units.clone(),
                template_ids: self.template_ids.clone(),
            });
            paths.push("scope");
        }
        if let Some(cert) = &self.bind_cert {
            op.certificates = vec![CertificateBinding {
                binding: Some(certificate_binding::Binding::SpkiSha256(spki_sha256(cert)?)),
                label: cert
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                ..Default::default()
            }];
            paths.push("certificates");
        }
        Ok(paths)
    }
}

impl UserFields {
    fn apply(&self, user: &mut User) -> Vec<&'static str> {
        let mut paths = Vec::new();
        let mut set = |value: &Option<String>, field: &mut String, path| {
            if let Some(v) = value {
                field.clone_from(v);
                paths.push(path);
            }
        };
        set(&self.display_name, &mut user.display_name, "display_name");
        set(&self.email, &mut user.email, "email");
        set(&self.phone, &mut user.phone, "phone");
        set(&self.org_unit, &mut user.org_unit, "org_unit");
        set(&self.external_id, &mut user.external_id, "external_id");
        paths
    }
}

fn print_operator(json: bool, op: Option<&Operator>, what: &str) -> Result<(), Error> {
    match op {
        Some(op) if json => print_json(op, "cms.directory.v1.Operator"),
        Some(op) => {
            println!(
                "{what}: operator {} {:?} roles [{}]{}",
                op.id,
                op.username,
                op.roles.join(", "),
                if op.status == OperatorStatus::Disabled as i32 {
                    " DISABLED"
                } else {
                    ""
                }
            );
            Ok(())
        }
        None => Ok(()),
    }
}

fn print_user(json: bool, user: Option<&User>, what: &str) -> Result<(), Error> {
    match user {
        Some(u) if json => print_json(u, "cms.directory.v1.User"),
        Some(u) => {
            println!("{what}: user {} {:?}", u.id, u.username);
            Ok(())
        }
        None => Ok(()),
    }
}

fn print_card(json: bool, card: Option<&Credential>, what: &str) -> Result<(), Error> {
    match card {
        Some(c) if json => print_json(c, "cms.directory.v1.Credential"),
        Some(c) => {
            let status = CredentialStatus::try_from(c.status)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("CREDENTIAL_STATUS_")
                        .to_lowercase()
                })
                .unwrap_or_default();
            println!("{what}: card {} serial {:?} {status}", c.id, c.serial);
            Ok(())
        }
        None => Ok(()),
    }
}

/// The report of an import or a sync; true when no line was rejected.
fn print_report(json: bool, report: &ImportReport) -> Result<bool, Error> {
    if json {
        print_json(report, "cms.directory.v1.ImportReport")?;
    } else {
        for e in &report.errors {
            let column = if e.column.is_empty() {
                String::new()
            } else {
                format!(" ({})", e.column)
            };
            eprintln!("line {}{column}: {}", e.line, e.message);
        }
        println!(
            "{}created {}, updated {}, disabled {}, unchanged {}, rejected {}",
            if report.dry_run { "dry run: " } else { "" },
            report.created,
            report.updated,
            report.disabled,
            report.unchanged,
            report.errors.len()
        );
    }
    Ok(report.errors.is_empty())
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

pub async fn operators(cli: &Cli, command: &OperatorsCmd) -> Result<bool, Error> {
    let mut session = connect(cli)?;
    let json = cli.json;
    match command {
        OperatorsCmd::Create(args) => {
            let mut op = Operator {
                username: args.username.clone(),
                ..Default::default()
            };
            args.change.apply(&mut op)?;
            let r = session
                .admin
                .create_operator(gw::CreateOperatorRequest { operator: Some(op) })
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            print_operator(json, r.operator.as_ref(), "created")?;
        }
        OperatorsCmd::Show { id } => {
            let r = session
                .admin
                .get_operator(gw::GetOperatorRequest { id: id.clone() })
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            if json {
                print_json(&r, "cms.gateway.v1.GetOperatorResponse")?;
            } else {
                print_operator(false, r.operator.as_ref(), "operator")?;
            }
        }
        OperatorsCmd::List { role, all } => {
            let mut operators = Vec::new();
            let mut token = String::new();
            loop {
                let page = session
                    .admin
                    .list_operators(gw::ListOperatorsRequest {
                        page: Some(PageRequest {
                            page_size: 500,
                            page_token: token,
                        }),
                        role: role.clone(),
                        include_disabled: *all,
                    })
                    .await
                    .map_err(|s| session.rpc_error(s))?
                    .into_inner();
                operators.extend(page.operators);
                token = page.page.map(|p| p.next_page_token).unwrap_or_default();
                if token.is_empty() {
                    break;
                }
            }
            if json {
                let list = gw::ListOperatorsResponse {
                    operators,
                    page: None,
                };
                print_json(&list, "cms.gateway.v1.ListOperatorsResponse")?;
            } else {
                println!("{:<36} {:<20} {:<9} roles", "ID", "USERNAME", "STATUS");
                for op in &operators {
                    let status = if op.status == OperatorStatus::Active as i32 {
                        "active"
                    } else {
                        "disabled"
                    };
                    println!(
                        "{:<36} {:<20} {:<9} {}",
                        op.id,
                        op.username,
                        status,
                        op.roles.join(", ")
                    );
                }
            }
        }
        OperatorsCmd::Update {
            id,
            change,
            disable,
            enable,
        } => {
            let mut op = session
                .admin
                .get_operator(gw::GetOperatorRequest { id: id.clone() })
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner()
                .operator
                .unwrap_or_default();
            let mut paths = change.apply(&mut op)?;
            if *disable || *enable {
                op.status = if *disable {
                    OperatorStatus::Disabled
                } else {
                    OperatorStatus::Active
                } as i32;
                paths.push("status");
            }
            if paths.is_empty() {
                return Err(Error::Setup("operators update: nothing to change".into()));
            }
            let r = session
                .admin
                .update_operator(gw::UpdateOperatorRequest {
                    operator: Some(op),
                    update_mask: Some(mask(&paths)),
                })
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            print_operator(json, r.operator.as_ref(), "updated")?;
        }
    }
    Ok(true)
}

pub async fn users(cli: &Cli, command: &UsersCmd) -> Result<bool, Error> {
    let mut session = connect(cli)?;
    let json = cli.json;
    match command {
        UsersCmd::Create { username, fields } => {
            let mut user = User {
                username: username.clone(),
                ..Default::default()
            };
            fields.apply(&mut user);
            let r = session
                .admin
                .create_user(gw::CreateUserRequest { user: Some(user) })
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            print_user(json, r.user.as_ref(), "created")?;
            Ok(true)
        }
        UsersCmd::Update { id, fields } => {
            let mut user = User {
                id: id.clone(),
                ..Default::default()
            };
            let paths = fields.apply(&mut user);
            if paths.is_empty() {
                return Err(Error::Setup("users update: nothing to change".into()));
            }
            let r = session
                .admin
                .update_user(gw::UpdateUserRequest {
                    user: Some(user),
                    update_mask: Some(mask(&paths)),
                })
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            print_user(json, r.user.as_ref(), "updated")?;
            Ok(true)
        }
        UsersCmd::Disable { id, reason } => {
            let r = session
                .admin
                .disable_user(gw::DisableUserRequest {
                    id: id.clone(),
                    reason: reason.clone(),
                })
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            print_user(json, r.user.as_ref(), "disabled")?;
            Ok(true)
        }
        UsersCmd::Import {
            file,
            update_existing,
            disable_missing,
            dry_run,
            no_header,
            overwrite_ldap_users,
            delimiter,
        } => {
            let csv = std::fs::read(file)
                .map_err(|e| Error::Setup(format!("{}: {e}", file.display())))?;
            const CHUNK: usize = 64 * 1024;
            let options = gw::ImportUsersRequest {
                payload: Some(gw::import_users_request::Payload::Options(
                    ImportUsersOptions {
                        update_existing: *update_existing,
                        disable_missing: *disable_missing,
                        dry_run: *dry_run,
                        has_header: !*no_header,
                        delimiter: delimiter.clone(),
                        overwrite_ldap_users: *overwrite_ldap_users,
                    },
                )),
            };
            let chunks: Vec<gw::ImportUsersRequest> = csv
                .chunks(CHUNK)
                .map(|c| gw::ImportUsersRequest {
                    payload: Some(gw::import_users_request::Payload::CsvChunk(c.to_vec())),
                })
                .collect();
            let progress = if json {
                ProgressBar::hidden()
            } else {
                bar(csv.len() as u64, "{msg} [{bar:40}] {bytes}/{total_bytes}")
            };
            progress.set_message(format!("uploading {}", file.display()));
            let sent = progress.clone();
            let upload = tokio_stream::iter(std::iter::once(options).chain(chunks)).map(move |m| {
                if let Some(gw::import_users_request::Payload::CsvChunk(c)) = &m.payload {
                    sent.inc(c.len() as u64);
                }
                m
            });
            let outcome = session.admin.import_users(upload).await;
            progress.finish_and_clear();
            let report = outcome
                .map_err(|s| session.rpc_error(s))?
                .into_inner()
                .report
                .unwrap_or_default();
            print_report(json, &report)
        }
    }
}

pub async fn ldap(cli: &Cli, command: &LdapCmd) -> Result<bool, Error> {
    let mut session = connect(cli)?;
    let LdapCmd::Sync {
        source,
        disable_missing,
        dry_run,
    } = command;
    let mut events = session
        .admin
        .sync_ldap(gw::SyncLdapRequest {
            source: source.clone(),
            disable_missing: *disable_missing,
            dry_run: *dry_run,
        })
        .await
        .map_err(|s| session.rpc_error(s))?
        .into_inner();
    let progress = if cli.json {
        ProgressBar::hidden()
    } else {
        bar(0, "{spinner} {msg} {pos}/{len}")
    };
    progress.enable_steady_tick(Duration::from_millis(200));
    let mut report = None;
    while let Some(event) = events.next().await {
        match event.map_err(|s| session.rpc_error(s))?.event {
            Some(gw::sync_ldap_response::Event::Progress(p)) => {
                progress.set_message(format!("{}: entries read {}", p.phase, p.entries_read));
                progress.set_length(p.entries_total.max(p.entries_applied));
                progress.set_position(p.entries_applied);
            }
            Some(gw::sync_ldap_response::Event::Report(r)) => report = Some(r),
            None => {}
        }
    }
    progress.finish_and_clear();
    let report = report.ok_or_else(|| {
        Error::Setup(
            "ldap sync: the stream ended without a report; the sync may not have finished".into(),
        )
    })?;
    print_report(cli.json, &report)
}

fn card_status(name: &str) -> Result<CredentialStatus, Error> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "active" => CredentialStatus::Active,
        "blocked" => CredentialStatus::Blocked,
        "revoked" => CredentialStatus::Revoked,
        "lost" => CredentialStatus::Lost,
        other => {
            return Err(Error::Setup(format!(
                "card status {other:?}: use active, blocked, revoked or lost"
            )));
        }
    })
}

pub async fn cards(cli: &Cli, command: &CardsCmd) -> Result<bool, Error> {
    let mut session = connect(cli)?;
    match command {
        CardsCmd::Register {
            user,
            card_id,
            serial,
            profile,
            template,
            template_version,
            master_key_version,
            label,
        } => {
            let card_id = cms_cardcrypto::code::parse_hex(card_id, &[])
                .map_err(|e| Error::Setup(format!("--card-id: {e}")))?;
            let profile = match profile.to_ascii_lowercase().as_str() {
                "minidriver" => CardProfile::Minidriver,
                "piv" => CardProfile::Piv,
                other => {
                    return Err(Error::Setup(format!(
                        "--profile {other:?}: use minidriver or piv"
                    )));
                }
            };
            let r = session
                .admin
                .register_credential(gw::RegisterCredentialRequest {
                    credential: Some(Credential {
                        user_id: user.clone(),
                        card_id: card_id.to_vec(),
                        serial: serial.clone(),
                        profile: profile as i32,
                        template_id: template.clone(),
                        template_version: *template_version,
                        master_key_version: *master_key_version,
                        label: label.clone(),
                        ..Default::default()
                    }),
                })
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            print_card(cli.json, r.credential.as_ref(), "registered")?;
        }
        CardsCmd::Status { id, status, reason } => {
            let status = card_status(status)?;
            let r = session
                .admin
                .update_credential_status(gw::UpdateCredentialStatusRequest {
                    id: id.clone(),
                    status: status as i32,
                    reason: reason.clone(),
                })
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner();
            print_card(cli.json, r.credential.as_ref(), "updated")?;
        }
        CardsCmd::Import {
            file,
            dry_run,
            delimiter,
        } => return import_cards(&mut session, cli.json, file, *dry_run, delimiter).await,
    }
    Ok(true)
}

/// `cards import`: the file streamed in chunks (never whole in memory), then the directory's
/// progress, then its report.
async fn import_cards(
    session: &mut crate::Session,
    json: bool,
    file: &PathBuf,
    dry_run: bool,
    delimiter: &str,
) -> Result<bool, Error> {
    use gw::import_credentials_request::Payload;
    use std::io::Read;
    use std::sync::{Arc, Mutex};
    const CHUNK: usize = 64 * 1024;
    let fail = |e: &dyn std::fmt::Display| Error::Setup(format!("{}: {e}", file.display()));
    let mut reader = std::fs::File::open(file).map_err(|e| fail(&e))?;
    let size = reader.metadata().map_err(|e| fail(&e))?.len();
    let progress = if json {
        ProgressBar::hidden()
    } else {
        bar(size, "{msg} [{bar:40}] {bytes}/{total_bytes}")
    };
    progress.set_message(format!("uploading {}", file.display()));
    // A read error ends the upload without its end message (the directory then changes
    // nothing) and is reported here.
    let read_error: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
    let (sent, failed) = (progress.clone(), read_error.clone());
    let mut total = 0u64;
    let mut done = false;
    let chunks = std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut chunk = vec![0; CHUNK];
        let payload = match reader.read(&mut chunk) {
            Ok(0) => {
                done = true;
                Payload::End(ImportCredentialsEnd { total_bytes: total })
            }
            Ok(n) => {
                chunk.truncate(n);
                total += n as u64;
                sent.inc(n as u64);
                Payload::CsvChunk(chunk)
            }
            Err(e) => {
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                return None;
            }
        };
        Some(gw::ImportCredentialsRequest {
            payload: Some(payload),
        })
    });
    let options = gw::ImportCredentialsRequest {
        payload: Some(Payload::Options(ImportCredentialsOptions {
            dry_run,
            delimiter: delimiter.to_owned(),
        })),
    };
    let upload = tokio_stream::iter(std::iter::once(options).chain(chunks));
    let mut events = session
        .admin
        .import_credentials(upload)
        .await
        .map_err(|s| session.rpc_error(s))?
        .into_inner();
    let mut report = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(status) => {
                progress.finish_and_clear();
                if let Some(e) = read_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Err(fail(&e));
                }
                return Err(session.rpc_error(status));
            }
        };
        match event.event {
            Some(gw::import_credentials_response::Event::Progress(p))
                if p.phase == CardImportPhase::Applying as i32 =>
            {
                progress.set_length(p.bytes_received);
                progress.set_position(p.bytes_applied);
                progress.set_message(format!(
                    "applying: imported {}, unchanged {}, refused {}",
                    p.imported, p.unchanged, p.refused
                ));
            }
            Some(gw::import_credentials_response::Event::Report(r)) => report = Some(r),
            Some(gw::import_credentials_response::Event::Progress(_)) | None => {}
        }
    }
    progress.finish_and_clear();
    if let Some(e) = read_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(fail(&e));
    }
    let report = report.ok_or_else(|| {
        Error::Setup(
            "cards import: the stream ended without a report; the import may not have finished"
                .into(),
        )
    })?;
    print_card_report(json, &report)
}

fn print_card_report(json: bool, report: &CardImportReport) -> Result<bool, Error> {
    if json {
        print_json(report, "cms.directory.v1.CardImportReport")?;
    } else {
        for r in &report.refusals {
            let reason = CardRefusal::try_from(r.reason)
                .map(|r| r.as_str_name().trim_start_matches("CARD_REFUSAL_"))
                .unwrap_or("?");
            let column = if r.column.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.column)
            };
            eprintln!("line {}{column}: {reason}: {}", r.line, r.message);
        }
        if (report.refusals.len() as u64) < report.refused {
            eprintln!(
                "… and {} more refused lines",
                report.refused - report.refusals.len() as u64
            );
        }
        println!(
            "{}imported {}, unchanged {}, refused {}",
            if report.dry_run { "dry run: " } else { "" },
            report.imported,
            report.unchanged,
            report.refused
        );
    }
    Ok(report.refused == 0)
}
