//! `cmsctl templates`: card templates from policy files (.toml or .json, in the proto3 JSON
//! mapping of cms.template.v1.TemplateSpec; samples in deploy/examples/templates).

use std::path::PathBuf;

use clap::Subcommand;
use cms_proto::common::v1::PageRequest;
use cms_proto::gateway::v1 as gw;
use cms_proto::template::v1::{Severity, Template, TemplateSpec, TemplateState, Violation};

use crate::messages::{print_json, read_file};
use crate::{Cli, Error, connect};

const SPEC: &str = "cms.template.v1.TemplateSpec";

#[derive(Subcommand)]
pub enum TemplatesCmd {
    /// Create a template from a policy file; the file is validated first and every violation
    /// listed with its field.
    Create {
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Latest version of each template.
    List {
        /// Also retired templates.
        #[arg(long)]
        all: bool,
        /// Only names containing this (case-insensitive).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// One template version (the latest unless --version).
    Show {
        id: String,
        #[arg(long, default_value_t = 0)]
        version: u32,
    },
    /// Every version of a template, newest first.
    Versions { id: String },
    /// Replace a template's content with a policy file (a new version; none when the content
    /// is the same).
    Update {
        id: String,
        #[arg(long)]
        file: PathBuf,
        /// The version the file was edited from; default: the current one.
        #[arg(long)]
        expected_version: Option<u32>,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Stop using a template for new cards (it stays readable).
    Retire {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Check a policy file without storing it. Exits 1 when it has errors.
    Validate {
        #[arg(long)]
        file: PathBuf,
    },
}

pub async fn run(cli: &Cli, command: &TemplatesCmd) -> Result<bool, Error> {
    let mut session = connect(cli)?;
    let json = cli.json;
    macro_rules! call {
        ($method:ident, $request:expr) => {
            session
                .admin
                .$method($request)
                .await
                .map_err(|s| session.rpc_error(s))?
                .into_inner()
        };
    }
    match command {
        TemplatesCmd::Validate { file } => {
            let spec: TemplateSpec = read_file(file, SPEC)?;
            let answer = call!(
                validate_policy,
                gw::ValidatePolicyRequest { spec: Some(spec) }
            );
            if json {
                print_json(&answer, "cms.gateway.v1.ValidatePolicyResponse")?;
            } else {
                print_violations(&answer.violations);
                println!(
                    "{}: {}",
                    file.display(),
                    if answer.valid { "valid" } else { "INVALID" }
                );
            }
            Ok(answer.valid)
        }
        TemplatesCmd::Create { file, comment } => {
            let spec: TemplateSpec = read_file(file, SPEC)?;
            let check = call!(
                validate_policy,
                gw::ValidatePolicyRequest {
                    spec: Some(spec.clone())
                }
            );
            if !check.valid {
                return Err(invalid(file, &check.violations));
            }
            let created = call!(
                create_template,
                gw::CreateTemplateRequest {
                    spec: Some(spec),
                    change_comment: comment.clone(),
                }
            );
            show(json, created.template.as_ref(), "created")?;
            Ok(true)
        }
        TemplatesCmd::Update {
            id,
            file,
            expected_version,
            comment,
        } => {
            let spec: TemplateSpec = read_file(file, SPEC)?;
            let expected = match expected_version {
                Some(v) => *v,
                None => call!(
                    get_template,
                    gw::GetTemplateRequest {
                        id: id.clone(),
                        version: 0
                    }
                )
                .template
                .map(|t| t.version)
                .unwrap_or_default(),
            };
            let check = call!(
                validate_policy,
                gw::ValidatePolicyRequest {
                    spec: Some(spec.clone())
                }
            );
            if !check.valid {
                return Err(invalid(file, &check.violations));
            }
            let updated = call!(
                update_template,
                gw::UpdateTemplateRequest {
                    id: id.clone(),
                    expected_current_version: expected,
                    spec: Some(spec),
                    change_comment: comment.clone(),
                }
            );
            let unchanged = updated
                .template
                .as_ref()
                .is_some_and(|t| t.version == expected);
            show(
                json,
                updated.template.as_ref(),
                if unchanged {
                    "unchanged (same content)"
                } else {
                    "updated"
                },
            )?;
            Ok(true)
        }
        TemplatesCmd::List { all, name } => {
            let mut templates = Vec::new();
            let mut token = String::new();
            loop {
                let page = call!(
                    list_templates,
                    gw::ListTemplatesRequest {
                        page: Some(PageRequest {
                            page_size: 200,
                            page_token: token,
                        }),
                        include_retired: *all,
                        card_profile: 0,
                        name_contains: name.clone(),
                    }
                );
                templates.extend(page.templates);
                token = page.page.map(|p| p.next_page_token).unwrap_or_default();
                if token.is_empty() {
                    break;
                }
            }
            if json {
                let list = gw::ListTemplatesResponse {
                    templates,
                    page: None,
                };
                print_json(&list, "cms.gateway.v1.ListTemplatesResponse")?;
            } else {
                table(&templates);
            }
            Ok(true)
        }
        TemplatesCmd::Show { id, version } => {
            let t = call!(
                get_template,
                gw::GetTemplateRequest {
                    id: id.clone(),
                    version: *version
                }
            );
            match t.template {
                Some(t) if !json => {
                    table(std::slice::from_ref(&t));
                    if let Some(spec) = &t.spec {
                        println!("{}", crate::messages::to_json(spec, SPEC)?);
                    }
                }
                other => print_json(
                    &gw::GetTemplateResponse { template: other },
                    "cms.gateway.v1.GetTemplateResponse",
                )?,
            }
            Ok(true)
        }
        TemplatesCmd::Versions { id } => {
            let v = call!(
                list_template_versions,
                gw::ListTemplateVersionsRequest {
                    id: id.clone(),
                    page: None
                }
            );
            if json {
                print_json(&v, "cms.gateway.v1.ListTemplateVersionsResponse")?;
            } else {
                println!(
                    "{:<8} {:<24} {:<24} comment",
                    "VERSION", "CREATED BY", "CREATED"
                );
                for t in &v.versions {
                    println!(
                        "{:<8} {:<24} {:<24} {}",
                        t.version,
                        t.created_by,
                        t.created_at.map(|c| c.to_string()).unwrap_or_default(),
                        t.change_comment
                    );
                }
            }
            Ok(true)
        }
        TemplatesCmd::Retire { id, reason } => {
            let r = call!(
                retire_template,
                gw::RetireTemplateRequest {
                    id: id.clone(),
                    reason: reason.clone()
                }
            );
            show(json, r.template.as_ref(), "retired")?;
            Ok(true)
        }
    }
}

fn show(json: bool, template: Option<&Template>, what: &str) -> Result<(), Error> {
    match template {
        Some(t) if json => print_json(t, "cms.template.v1.Template"),
        Some(t) => {
            println!(
                "{what}: template {} {:?} version {}",
                t.id,
                t.spec.as_ref().map(|s| s.name.as_str()).unwrap_or_default(),
                t.version
            );
            Ok(())
        }
        None => Ok(()),
    }
}

fn table(templates: &[Template]) {
    println!(
        "{:<36} {:<8} {:<8} {:<12} name",
        "ID", "VERSION", "STATE", "PROFILE"
    );
    for t in templates {
        let spec = t.spec.clone().unwrap_or_default();
        let state = match TemplateState::try_from(t.state) {
            Ok(TemplateState::Active) => "active",
            Ok(TemplateState::Retired) => "retired",
            _ => "?",
        };
        let profile = cms_proto::common::v1::CardProfile::try_from(spec.card_profile)
            .map(|p| {
                p.as_str_name()
                    .trim_start_matches("CARD_PROFILE_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        println!(
            "{:<36} {:<8} {:<8} {:<12} {}",
            t.id, t.version, state, profile, spec.name
        );
    }
}

fn print_violations(violations: &[Violation]) {
    for v in violations {
        let severity = if v.severity == Severity::Error as i32 {
            "error"
        } else {
            "warning"
        };
        eprintln!("{severity}: {}: {} ({})", v.field, v.message, v.code);
    }
}

/// The refusal of a policy file: every violation on its own line, then one summary line.
fn invalid(file: &std::path::Path, violations: &[Violation]) -> Error {
    print_violations(violations);
    let errors = violations
        .iter()
        .filter(|v| v.severity == Severity::Error as i32)
        .count();
    Error::Setup(format!(
        "{}: {errors} policy error(s); nothing was stored",
        file.display()
    ))
}
