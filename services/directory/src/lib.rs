//! The directory service: users, operators, credentials (cards), self-service enrolment, search,
//! CSV import and LDAP sync.
//!
//! Storage is sea-orm over SQLite (default) or PostgreSQL. Every text the helpdesk searches is
//! also stored folded (case and accents removed, see [`normalize`]) in a per-user search
//! document, indexed by its grams in page order (see [`search`]), the same on both.
//! Secrets never leave in clear: security answers are argon2id hashes, TOTP secrets are sealed
//! with AES-256-GCM under a key from config ([`secrets`]).

pub mod card_import;
mod card_writer;
mod config;
mod credentials;
mod csv_upload;
mod enrol;
pub mod entity;
mod error;
pub mod import;
mod ldap;
mod memory;
pub mod migration;
pub mod normalize;
mod operators;
pub mod search;
pub mod secrets;
mod token;
pub mod users;
mod util;

use std::sync::Arc;

pub use config::{
    Config, DisabledMarker, LdapAttributes, LdapSource, SecretsSettings, SelfServiceSettings,
};
pub use error::Error;

use cms_kit::client::Channel;
use cms_kit::server::{Listeners, Server};
use cms_kit::service::{Program, ServiceFuture};
use cms_kit::shutdown::Shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::directory::v1::directory_service_server::{
    DirectoryService, DirectoryServiceServer,
};
use cms_proto::directory::v1::*;
use cms_proto::template::v1::template_service_client::TemplateServiceClient;
use sea_orm::DatabaseConnection;
use tonic::{Request, Response, Status};

pub const NAME: &str = "directory";

/// The DirectoryService implementation.
#[derive(Debug, Clone)]
pub struct Directory {
    db: DatabaseConnection,
    key: Arc<secrets::SecretKey>,
    hasher: secrets::AnswerHasher,
    self_service: SelfServiceSettings,
    import: config::ImportSettings,
    ldap: std::collections::BTreeMap<String, LdapSource>,
    templates: Option<TemplateServiceClient<Channel>>,
    /// Started on first use (it needs the runtime); shared by the clones.
    card_writer: Arc<std::sync::OnceLock<card_writer::CardWriter>>,
    /// Where card imports keep their upload until it is whole (anonymous files).
    spool_dir: std::path::PathBuf,
}

impl Directory {
    /// A directory on an open (migrated) database, without a template service.
    pub fn new(
        db: DatabaseConnection,
        key: secrets::SecretKey,
        settings: SelfServiceSettings,
    ) -> Self {
        Self {
            db,
            key: Arc::new(key),
            hasher: secrets::AnswerHasher::new(&settings),
            self_service: settings,
            import: config::ImportSettings::default(),
            ldap: Default::default(),
            templates: None,
            card_writer: Default::default(),
            spool_dir: std::env::temp_dir(),
        }
    }

    /// The writer of card registrations (see [`card_writer`]).
    pub(crate) fn card_writer(&self) -> &card_writer::CardWriter {
        self.card_writer
            .get_or_init(|| card_writer::CardWriter::start(self.db.clone()))
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }
}

#[tonic::async_trait]
impl DirectoryService for Directory {
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        let user = Directory::create_user(self, request.into_inner().user).await?;
        Ok(Response::new(CreateUserResponse { user: Some(user) }))
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let user = Directory::get_user(self, &request.get_ref().id).await?;
        Ok(Response::new(GetUserResponse { user: Some(user) }))
    }

    async fn update_user(
        &self,
        request: Request<UpdateUserRequest>,
    ) -> Result<Response<UpdateUserResponse>, Status> {
        let req = request.into_inner();
        let user = Directory::update_user(self, req.user, req.update_mask).await?;
        Ok(Response::new(UpdateUserResponse { user: Some(user) }))
    }

    async fn disable_user(
        &self,
        request: Request<DisableUserRequest>,
    ) -> Result<Response<DisableUserResponse>, Status> {
        let req = request.get_ref();
        let user = Directory::disable_user(self, &req.id, &req.reason).await?;
        Ok(Response::new(DisableUserResponse { user: Some(user) }))
    }

    async fn search_users(
        &self,
        request: Request<SearchUsersRequest>,
    ) -> Result<Response<SearchUsersResponse>, Status> {
        Ok(Response::new(
            Directory::search_users(self, request.get_ref()).await?,
        ))
    }

    async fn create_operator(
        &self,
        request: Request<CreateOperatorRequest>,
    ) -> Result<Response<CreateOperatorResponse>, Status> {
        let operator = Directory::create_operator(self, request.into_inner().operator).await?;
        Ok(Response::new(CreateOperatorResponse {
            operator: Some(operator),
        }))
    }

    async fn get_operator(
        &self,
        request: Request<GetOperatorRequest>,
    ) -> Result<Response<GetOperatorResponse>, Status> {
        let operator = Directory::get_operator(self, &request.get_ref().id).await?;
        Ok(Response::new(GetOperatorResponse {
            operator: Some(operator),
        }))
    }

    async fn list_operators(
        &self,
        request: Request<ListOperatorsRequest>,
    ) -> Result<Response<ListOperatorsResponse>, Status> {
        Ok(Response::new(
            Directory::list_operators(self, request.get_ref()).await?,
        ))
    }

    async fn update_operator(
        &self,
        request: Request<UpdateOperatorRequest>,
    ) -> Result<Response<UpdateOperatorResponse>, Status> {
        let req = request.into_inner();
        let operator = Directory::update_operator(self, req.operator, req.update_mask).await?;
        Ok(Response::new(UpdateOperatorResponse {
            operator: Some(operator),
        }))
    }

    async fn get_operator_by_certificate(
        &self,
        request: Request<GetOperatorByCertificateRequest>,
    ) -> Result<Response<GetOperatorByCertificateResponse>, Status> {
        let operator = self.operator_by_certificate(request.get_ref()).await?;
        Ok(Response::new(GetOperatorByCertificateResponse {
            operator: Some(operator),
        }))
    }

    async fn register_credential(
        &self,
        request: Request<RegisterCredentialRequest>,
    ) -> Result<Response<RegisterCredentialResponse>, Status> {
        let credential =
            Directory::register_credential(self, request.into_inner().credential).await?;
        Ok(Response::new(RegisterCredentialResponse {
            credential: Some(credential),
        }))
    }

    async fn get_credential(
        &self,
        request: Request<GetCredentialRequest>,
    ) -> Result<Response<GetCredentialResponse>, Status> {
        let credential = Directory::get_credential(self, &request.get_ref().id).await?;
        Ok(Response::new(GetCredentialResponse {
            credential: Some(credential),
        }))
    }

    async fn get_credential_by_card_id(
        &self,
        request: Request<GetCredentialByCardIdRequest>,
    ) -> Result<Response<GetCredentialByCardIdResponse>, Status> {
        let credential =
            Directory::get_credential_by_card_id(self, &request.get_ref().card_id).await?;
        Ok(Response::new(GetCredentialByCardIdResponse {
            credential: Some(credential),
        }))
    }

    async fn list_user_credentials(
        &self,
        request: Request<ListUserCredentialsRequest>,
    ) -> Result<Response<ListUserCredentialsResponse>, Status> {
        Ok(Response::new(
            Directory::list_user_credentials(self, request.get_ref()).await?,
        ))
    }

    async fn update_credential_status(
        &self,
        request: Request<UpdateCredentialStatusRequest>,
    ) -> Result<Response<UpdateCredentialStatusResponse>, Status> {
        let credential = Directory::update_credential_status(self, request.get_ref()).await?;
        Ok(Response::new(UpdateCredentialStatusResponse {
            credential: Some(credential),
        }))
    }

    async fn record_unblock(
        &self,
        request: Request<RecordUnblockRequest>,
    ) -> Result<Response<RecordUnblockResponse>, Status> {
        let credential = Directory::record_unblock(self, request.get_ref()).await?;
        Ok(Response::new(RecordUnblockResponse {
            credential: Some(credential),
        }))
    }

    async fn enrol_security_questions(
        &self,
        request: Request<EnrolSecurityQuestionsRequest>,
    ) -> Result<Response<EnrolSecurityQuestionsResponse>, Status> {
        Ok(Response::new(
            Directory::enrol_security_questions(self, request.get_ref()).await?,
        ))
    }

    async fn get_security_questions(
        &self,
        request: Request<GetSecurityQuestionsRequest>,
    ) -> Result<Response<GetSecurityQuestionsResponse>, Status> {
        Ok(Response::new(
            Directory::get_security_questions(self, request.get_ref()).await?,
        ))
    }

    async fn verify_security_answers(
        &self,
        request: Request<VerifySecurityAnswersRequest>,
    ) -> Result<Response<VerifySecurityAnswersResponse>, Status> {
        Ok(Response::new(
            Directory::verify_security_answers(self, request.get_ref()).await?,
        ))
    }

    async fn enrol_totp(
        &self,
        request: Request<EnrolTotpRequest>,
    ) -> Result<Response<EnrolTotpResponse>, Status> {
        Ok(Response::new(
            Directory::enrol_totp(self, request.get_ref()).await?,
        ))
    }

    async fn import_users(
        &self,
        request: Request<tonic::Streaming<ImportUsersRequest>>,
    ) -> Result<Response<ImportUsersResponse>, Status> {
        let report = self
            .import_stream(request.into_inner(), &mut |_, _| {})
            .await?;
        Ok(Response::new(ImportUsersResponse {
            report: Some(report),
        }))
    }

    async fn import_users_with_progress(
        &self,
        request: Request<tonic::Streaming<ImportUsersWithProgressRequest>>,
    ) -> Result<Response<tonic::codegen::BoxStream<ImportUsersWithProgressResponse>>, Status> {
        let stream = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let this = self.clone();
        tokio::spawn(async move {
            let events = tx.clone();
            let mut progress = move |p: import::Progress, bytes: u64| {
                let _ = events.send(Ok(ImportUsersWithProgressResponse {
                    event: Some(import_users_with_progress_response::Event::Progress(
                        ImportProgress {
                            phase: p.phase.to_owned(),
                            records_read: p.read,
                            records_applied: p.applied,
                            records_total: p.total,
                            bytes_received: bytes,
                        },
                    )),
                }));
            };
            let outcome = this.import_stream(stream, &mut progress).await;
            let _ = tx.send(match outcome {
                Ok(report) => Ok(ImportUsersWithProgressResponse {
                    event: Some(import_users_with_progress_response::Event::Report(report)),
                }),
                Err(e) => Err(Status::from(e)),
            });
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn import_credentials(
        &self,
        request: Request<tonic::Streaming<ImportCredentialsRequest>>,
    ) -> Result<Response<tonic::codegen::BoxStream<ImportCredentialsResponse>>, Status> {
        let stream = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let this = self.clone();
        tokio::spawn(async move {
            let events = tx.clone();
            let mut progress = move |p: CardImportProgress| {
                let _ = events.send(Ok(ImportCredentialsResponse {
                    event: Some(import_credentials_response::Event::Progress(p)),
                }));
            };
            let outcome = this.import_credentials(stream, &mut progress).await;
            let _ = tx.send(match outcome {
                Ok(report) => Ok(ImportCredentialsResponse {
                    event: Some(import_credentials_response::Event::Report(report)),
                }),
                Err(e) => Err(Status::from(e)),
            });
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn sync_ldap(
        &self,
        request: Request<SyncLdapRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<SyncLdapResponse>>, Status> {
        let req = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let this = self.clone();
        tokio::spawn(async move {
            let events = tx.clone();
            let mut progress = move |p: import::Progress| {
                let applied = if p.phase == "applying" || p.phase == "done" {
                    p.applied
                } else {
                    0
                };
                let _ = events.send(Ok(SyncLdapResponse {
                    event: Some(sync_ldap_response::Event::Progress(SyncLdapProgress {
                        phase: p.phase.to_owned(),
                        entries_read: p.read,
                        entries_applied: applied,
                        entries_total: p.total,
                    })),
                }));
            };
            let outcome = this
                .sync_ldap(&req.source, req.disable_missing, req.dry_run, &mut progress)
                .await;
            let _ = tx.send(match outcome {
                Ok(report) => Ok(SyncLdapResponse {
                    event: Some(sync_ldap_response::Event::Report(report)),
                }),
                Err(e) => Err(Status::from(e)),
            });
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn verify_totp(
        &self,
        request: Request<VerifyTotpRequest>,
    ) -> Result<Response<VerifyTotpResponse>, Status> {
        Ok(Response::new(
            Directory::verify_totp(self, request.get_ref()).await?,
        ))
    }
}

/// One message of an import stream, whichever RPC carried it.
enum ImportPart {
    Options(ImportUsersOptions),
    Chunk(Vec<u8>),
    Empty,
}

impl From<ImportUsersRequest> for ImportPart {
    fn from(m: ImportUsersRequest) -> Self {
        match m.payload {
            Some(import_users_request::Payload::Options(o)) => Self::Options(o),
            Some(import_users_request::Payload::CsvChunk(c)) => Self::Chunk(c),
            None => Self::Empty,
        }
    }
}

impl From<ImportUsersWithProgressRequest> for ImportPart {
    fn from(m: ImportUsersWithProgressRequest) -> Self {
        match m.payload {
            Some(import_users_with_progress_request::Payload::Options(o)) => Self::Options(o),
            Some(import_users_with_progress_request::Payload::CsvChunk(c)) => Self::Chunk(c),
            None => Self::Empty,
        }
    }
}

impl Directory {
    /// Receives an import stream (options first, then CSV chunks), parses and applies it.
    async fn import_stream<T, S>(
        &self,
        mut stream: S,
        progress: &mut (dyn FnMut(import::Progress, u64) + Send),
    ) -> Result<ImportReport, Error>
    where
        T: Into<ImportPart>,
        S: futures_util::Stream<Item = Result<T, Status>> + Unpin,
    {
        use futures_util::StreamExt;
        let options = match stream.next().await {
            Some(Ok(m)) => match m.into() {
                ImportPart::Options(o) => o,
                _ => {
                    return Err(Error::invalid(
                        "options",
                        "the first message of an import must carry the options",
                    ));
                }
            },
            Some(Err(status)) => return Err(Error::invalid("csv_chunk", status.message())),
            None => return Err(Error::invalid("options", "the import stream was empty")),
        };
        let delimiter = card_import::delimiter(&options.delimiter)?;
        // Parsed as it arrives: the file is never whole in memory.
        let mut upload = csv_upload::CsvUpload::start(options.has_header, delimiter);
        let mut next_report = 1 << 20;
        while let Some(message) = stream.next().await {
            let message = message.map_err(|s| {
                Error::Import(format!(
                    "the upload was interrupted ({}); nothing was changed",
                    s.message()
                ))
            })?;
            match message.into() {
                ImportPart::Chunk(chunk) => {
                    if upload.received() + chunk.len() as u64 > self.import.max_bytes {
                        return Err(Error::invalid(
                            "csv_chunk",
                            format!(
                                "the CSV is larger than import.max_bytes ({} bytes)",
                                self.import.max_bytes
                            ),
                        ));
                    }
                    upload.push(chunk).await;
                    if upload.received() >= next_report {
                        next_report += 1 << 20;
                        progress(
                            import::Progress {
                                phase: "receiving",
                                read: 0,
                                applied: 0,
                                total: 0,
                            },
                            upload.received(),
                        );
                    }
                }
                ImportPart::Options(_) => {
                    return Err(Error::invalid(
                        "options",
                        "options may only be sent in the first message",
                    ));
                }
                ImportPart::Empty => {}
            }
        }
        // The request's buffers go now, not after the import (they would miss its trim).
        drop(stream);
        let received = upload.received();
        progress(
            import::Progress {
                phase: "parsing",
                read: 0,
                applied: 0,
                total: 0,
            },
            received,
        );
        let records = upload
            .finish()
            .await
            .map_err(Error::Internal)?
            .map_err(|errors| Error::Import(import::describe(&errors, 20)))?;
        self.apply_import(
            records,
            UserSource::Csv,
            import::Options {
                update_existing: options.update_existing,
                disable_missing: options.disable_missing,
                dry_run: options.dry_run,
                overwrite_ldap_users: options.overwrite_ldap_users,
            },
            &mut |p| progress(p, received),
        )
        .await
    }
}

/// Opens the database and applies pending migrations (once, under a lock on PostgreSQL).
///
/// The migrations get a pool of their own: an SQLite connection that prepared a statement before
/// a migration altered a table keeps sqlx's column list of the old table for it, and reading a
/// row with the new column count crashes the connection's worker (seen after adding
/// `users.sort_rank` to a database with users).
pub async fn open_database(config: &Config) -> Result<DatabaseConnection, Error> {
    let db = cms_kit::db::connect(&config.database, &config.data_dir, NAME).await?;
    migration::run(&db).await.map_err(Error::Migrate)?;
    db.close().await?;
    Ok(cms_kit::db::connect(&config.database, &config.data_dir, NAME).await?)
}

/// The `cms-directory` binary: serves, or only migrates (`--migrate-only`).
pub const PROGRAM: Program<Config, Error> = Program {
    name: NAME,
    run,
    migrate: Some(migrate),
};

/// Serves the directory API on `listeners` until `shutdown`.
///
/// Boxed so that the service's async code is compiled once, in this crate: a binary or test
/// that awaited the bare future would compile all of it again (minutes per binary).
pub fn run(config: Config, listeners: Listeners, shutdown: Shutdown) -> ServiceFuture<Error> {
    Box::pin(serve_directory(config, listeners, shutdown))
}

/// Applies pending migrations and returns.
pub fn migrate(config: Config) -> ServiceFuture<Error> {
    Box::pin(async move {
        let db = cms_kit::db::connect(&config.database, &config.data_dir, NAME).await?;
        migration::run(&db).await.map_err(Error::Migrate)?;
        db.close().await?;
        Ok(())
    })
}

async fn serve_directory(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), Error> {
    memory::tune_allocator();
    let tls = TlsSource::load(config.tls.clone())?;
    let key = secrets::SecretKey::load(config.secrets.key_file.as_deref(), &config.data_dir)?;
    let db = open_database(&config).await?;
    let templates = match &config.template {
        Some(upstream) => Some(TemplateServiceClient::new(
            cms_kit::client::channel(upstream, tls.clone())
                .map_err(|e| Error::TemplateClient(e.to_string()))?,
        )),
        None => None,
    };
    let mut directory = Directory::new(db, key, config.self_service.clone());
    directory.import = config.import.clone();
    directory.ldap = config.ldap.clone();
    directory.templates = templates;
    directory.spool_dir = config.data_dir.clone();
    Server::new(NAME, config.server, config.access, tls)
        .add_service(DirectoryServiceServer::new(directory))
        .serve(listeners, shutdown)
        .await?;
    Ok(())
}
