//! Bulk card import (ImportCredentials): an enterprise's existing card inventory, from CSV.
//!
//! The upload is first kept aside in an anonymous temporary file, so that memory stays bounded
//! whatever the file's size and a broken upload changes nothing. Once it arrived whole, it is
//! read back in batches of [`BATCH`] lines and applied in one transaction. Each line is
//! imported, unchanged (its card id is already registered to the same user, so importing a
//! file again changes nothing), or refused with its reason. The owners' search documents gain
//! the new serials; the posting list changes are gathered over [`APPLY_EVERY`] cards and
//! written in one pass (a pass per batch rewrote the long lists of common grams every time).

use std::collections::HashMap;
use std::io::{Seek, Write};

use cms_proto::common::v1::CardProfile;
use cms_proto::directory::v1::{
    CardImportPhase, CardImportProgress, CardImportRefusal, CardImportReport, CardRefusal,
    Credential, ImportCredentialsOptions, UserStatus, import_credentials_request,
};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, FromQueryResult};
use tokio::sync::mpsc;

use crate::card_writer::{holders, insert_cards, refresh_documents};
use crate::credentials::{check_card, check_profile, new_row};
use crate::entity::user;
use crate::search::{self, Changes};
use crate::util::{Sql, now_micros, timestamp};
use crate::{Directory, Error, normalize};

/// Lines checked and written together.
const BATCH: usize = 2_000;
/// New cards whose posting list changes are gathered before they are written.
const APPLY_EVERY: usize = 250_000;
/// Most refusals listed in a report (all are counted).
pub const MAX_REFUSALS: usize = 1_000;
/// SQLite page cache of the connection applying an import, KiB.
const IMPORT_CACHE_KIB: u32 = 262_144;
/// The page cache `cms_kit::db` gives pooled SQLite connections, KiB.
const POOL_CACHE_KIB: u32 = 65_536;
/// Uploads from which an import gives its memory back afterwards (about 10,000 cards).
const LARGE_UPLOAD: u64 = 1 << 20;
/// Keys per lookup statement.
pub(crate) const LOOKUP_KEYS: usize = 1_000;

/// A column of the card CSV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    Username,
    ExternalId,
    CardId,
    Serial,
    Profile,
    TemplateId,
    TemplateVersion,
    MasterKeyVersion,
    PukVersion,
    Atr,
    Label,
}

impl Column {
    pub const ALL: [Column; 11] = [
        Column::Username,
        Column::ExternalId,
        Column::CardId,
        Column::Serial,
        Column::Profile,
        Column::TemplateId,
        Column::TemplateVersion,
        Column::MasterKeyVersion,
        Column::PukVersion,
        Column::Atr,
        Column::Label,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Column::Username => "username",
            Column::ExternalId => "external_id",
            Column::CardId => "card_id",
            Column::Serial => "serial",
            Column::Profile => "profile",
            Column::TemplateId => "template_id",
            Column::TemplateVersion => "template_version",
            Column::MasterKeyVersion => "master_key_version",
            Column::PukVersion => "puk_version",
            Column::Atr => "atr",
            Column::Label => "label",
        }
    }

    /// Columns every file must have (besides an owner column: username or external_id).
    fn required(self) -> bool {
        matches!(
            self,
            Column::CardId
                | Column::Serial
                | Column::Profile
                | Column::TemplateId
                | Column::TemplateVersion
                | Column::MasterKeyVersion
        )
    }
}

/// Where each column is in the file's lines.
struct Header {
    at: [Option<usize>; Column::ALL.len()],
    width: usize,
}

impl Header {
    fn parse(record: &csv::StringRecord) -> Result<Self, String> {
        let mut at = [None; Column::ALL.len()];
        for (i, name) in record.iter().enumerate() {
            let name = name
                .trim()
                .trim_start_matches('\u{feff}')
                .to_ascii_lowercase();
            let Some(c) = Column::ALL.iter().position(|c| c.name() == name) else {
                return Err(format!(
                    "unknown column {name:?} (header column {}); the columns are: {}",
                    i + 1,
                    Column::ALL.map(Column::name).join(", ")
                ));
            };
            if at[c].replace(i).is_some() {
                return Err(format!("column {name:?} appears twice in the header"));
            }
        }
        let missing: Vec<&str> = Column::ALL
            .iter()
            .enumerate()
            .filter(|(i, c)| c.required() && at[*i].is_none())
            .map(|(_, c)| c.name())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the header lacks the column(s) {}",
                missing.join(", ")
            ));
        }
        if at[0].is_none() && at[1].is_none() {
            return Err(
                "the header names no owner column: username, external_id or both".to_owned(),
            );
        }
        Ok(Self {
            at,
            width: record.len(),
        })
    }

    fn get<'r>(&self, record: &'r csv::StringRecord, column: Column) -> &'r str {
        let i = Column::ALL.iter().position(|c| *c == column);
        i.and_then(|i| self.at[i])
            .and_then(|at| record.get(at))
            .map_or("", str::trim)
    }
}

/// A line that reads as a card, its owner not yet looked up.
struct Parsed {
    line: u64,
    external_id: String,
    username: String,
    card: Credential,
}

fn refusal(
    line: u64,
    reason: CardRefusal,
    column: &str,
    message: impl Into<String>,
) -> CardImportRefusal {
    CardImportRefusal {
        line,
        reason: reason as i32,
        column: column.to_owned(),
        message: message.into(),
    }
}

fn bad(line: u64, column: Column, message: impl Into<String>) -> CardImportRefusal {
    refusal(line, CardRefusal::BadLine, column.name(), message)
}

fn number(
    line: u64,
    column: Column,
    text: &str,
    default: Option<u32>,
) -> Result<u32, CardImportRefusal> {
    match (text, default) {
        ("", Some(d)) => Ok(d),
        ("", None) => Err(bad(line, column, format!("{} is required", column.name()))),
        _ => text.parse().map_err(|_| {
            bad(
                line,
                column,
                format!("{} {text:?} is not a whole number", column.name()),
            )
        }),
    }
}

fn hex(line: u64, column: Column, text: &str) -> Result<Vec<u8>, CardImportRefusal> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    cms_cardcrypto::parse_hex(text, &[])
        .map(|bytes| bytes.to_vec())
        .map_err(|e| bad(line, column, format!("{} is not hex: {e}", column.name())))
}

/// Reads one line as a card, or says why it is not one.
fn parse_line(
    header: &Header,
    record: &csv::StringRecord,
    line: u64,
) -> Result<Parsed, CardImportRefusal> {
    if record.len() != header.width {
        return Err(refusal(
            line,
            CardRefusal::BadLine,
            "",
            format!("{} columns; the header has {}", record.len(), header.width),
        ));
    }
    let get = |c| header.get(record, c);
    let external_id = get(Column::ExternalId).to_owned();
    let username = get(Column::Username).to_owned();
    if external_id.is_empty() && username.is_empty() {
        return Err(bad(
            line,
            Column::Username,
            "the owner is missing: give its username or external_id",
        ));
    }
    let profile = match get(Column::Profile).to_ascii_lowercase().as_str() {
        "minidriver" | "card_profile_minidriver" => CardProfile::Minidriver,
        "piv" | "card_profile_piv" => CardProfile::Piv,
        other => {
            return Err(bad(
                line,
                Column::Profile,
                format!("profile {other:?} is not minidriver or piv"),
            ));
        }
    };
    let card_id = hex(line, Column::CardId, get(Column::CardId))?;
    let card = Credential {
        card_id,
        serial: get(Column::Serial).to_owned(),
        atr: hex(line, Column::Atr, get(Column::Atr))?,
        profile: profile as i32,
        template_id: get(Column::TemplateId).to_owned(),
        template_version: number(
            line,
            Column::TemplateVersion,
            get(Column::TemplateVersion),
            None,
        )?,
        master_key_version: number(
            line,
            Column::MasterKeyVersion,
            get(Column::MasterKeyVersion),
            None,
        )?,
        puk_version: number(line, Column::PukVersion, get(Column::PukVersion), Some(0))?,
        label: get(Column::Label).to_owned(),
        ..Default::default()
    };
    if let Err(e) = check_card(&card) {
        let (column, message) = match e {
            Error::Invalid { field, message } => (field, message),
            other => (String::new(), other.to_string()),
        };
        let column = column.trim_start_matches("credential.");
        return Err(refusal(
            line,
            CardRefusal::BadLine,
            column,
            message.replace("credential.", ""),
        ));
    }
    Ok(Parsed {
        line,
        external_id,
        username,
        card,
    })
}

/// What the reader of the kept-aside file hands over: a batch of lines (each a card or its
/// refusal) with the bytes read so far, or why the file cannot be imported at all.
type Batch = Result<(Vec<Result<Parsed, CardImportRefusal>>, u64), Error>;

/// Reads the CSV in `file` (from its start) and sends its lines in batches.
fn read_batches(file: std::fs::File, delimiter: u8, batches: mpsc::Sender<Batch>) {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .from_reader(std::io::BufReader::with_capacity(1 << 20, file));
    let mut header: Option<Header> = None;
    let mut batch = Vec::with_capacity(BATCH);
    let mut record = csv::StringRecord::new();
    let mut lines = 0u64;
    loop {
        let line = reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line());
                let message = match e.kind() {
                    csv::ErrorKind::Utf8 { .. } => "not UTF-8: save the file as UTF-8".to_owned(),
                    _ => format!("not valid CSV: {e}"),
                };
                if header.is_none() {
                    let _ = batches
                        .blocking_send(Err(Error::Import(format!("line {line}: {message}"))));
                    return;
                }
                batch.push(Err(refusal(line, CardRefusal::BadLine, "", message)));
                continue;
            }
        }
        let line = record.position().map_or(line, |p| p.line());
        if record.len() == 1 && record.get(0).is_some_and(|f| f.trim().is_empty()) {
            continue; // a blank line
        }
        let Some(h) = &header else {
            match Header::parse(&record) {
                Ok(h) => header = Some(h),
                Err(message) => {
                    let _ = batches
                        .blocking_send(Err(Error::Import(format!("line {line}: {message}"))));
                    return;
                }
            }
            continue;
        };
        lines += 1;
        batch.push(parse_line(h, &record, line));
        if batch.len() >= BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            if batches
                .blocking_send(Ok((full, reader.position().byte())))
                .is_err()
            {
                return;
            }
        }
    }
    if header.is_none() || lines == 0 {
        let _ = batches.blocking_send(Err(Error::Import(
            if header.is_none() {
                "the file is empty: no header, no cards"
            } else {
                "the file has a header but no cards"
            }
            .to_owned(),
        )));
        return;
    }
    if !batch.is_empty() {
        let _ = batches.blocking_send(Ok((batch, reader.position().byte())));
    }
}

/// The field delimiter an import's options name: "," when empty.
pub(crate) fn delimiter(text: &str) -> Result<u8, Error> {
    match text.as_bytes() {
        [] => Ok(b','),
        [d] if d.is_ascii() && !d.is_ascii_alphanumeric() && *d != b'"' && *d != b'\n' => Ok(*d),
        _ => Err(Error::invalid(
            "options.delimiter",
            "the delimiter must be one ASCII punctuation or tab character",
        )),
    }
}

/// The users whose `column` is one of `keys`.
async fn users_by(
    db: &DatabaseTransaction,
    column: &str,
    keys: &[&str],
) -> Result<Vec<user::Model>, Error> {
    let mut out = Vec::new();
    for chunk in keys.chunks(LOOKUP_KEYS) {
        let mut sql = Sql::new(db.get_database_backend());
        sql.push("SELECT * FROM users WHERE ");
        in_json_list(&mut sql, column, chunk)?;
        for row in db.query_all_raw(sql.statement()).await? {
            out.push(user::Model::from_query_result(&row, "")?);
        }
    }
    Ok(out)
}

/// `column IN <keys>`, the texts in `keys` bound as one JSON array. On PostgreSQL the list is
/// an array built once (an InitPlan), so that each key is looked up in the column's index:
/// `IN (SELECT …)` hash-joined a scan of the whole table, for every batch of an import.
pub(crate) fn in_json_list(sql: &mut Sql, column: &str, keys: &[&str]) -> Result<(), Error> {
    let list = serde_json::to_string(keys)
        .map_err(|e| Error::Internal(format!("a key list as JSON: {e}")))?;
    sql.push(column);
    if sql.backend == DbBackend::Postgres {
        sql.push(" = ANY(ARRAY(SELECT jsonb_array_elements_text(")
            .bind(list)
            .push("::jsonb)))");
    } else {
        sql.push(" IN (SELECT value FROM json_each(")
            .bind(list)
            .push("))");
    }
    Ok(())
}

/// Counts, refusals and the pending posting list changes of an import under way.
#[derive(Default)]
struct Tally {
    lines: u64,
    imported: u64,
    unchanged: u64,
    refused: u64,
    refusals: Vec<CardImportRefusal>,
    /// The refusals of the batch being applied (found in several passes).
    batch_refusals: Vec<CardImportRefusal>,
    changes: Changes,
    pending: usize,
    /// The templates looked up: their card profile (`None`: not checked) or why they are
    /// refused.
    templates: HashMap<(String, u32), Result<Option<i32>, String>>,
}

impl Tally {
    fn refuse(&mut self, r: CardImportRefusal) {
        self.refused += 1;
        self.batch_refusals.push(r);
    }

    /// Lists the refusals of the batch just applied, in line order.
    fn list_refusals(&mut self) {
        let mut batch = std::mem::take(&mut self.batch_refusals);
        batch.sort_by_key(|r| r.line);
        let room = MAX_REFUSALS.saturating_sub(self.refusals.len());
        self.refusals.extend(batch.into_iter().take(room));
    }

    fn progress(&self, phase: CardImportPhase, received: u64, applied: u64) -> CardImportProgress {
        CardImportProgress {
            phase: phase as i32,
            bytes_received: received,
            lines_read: self.lines,
            imported: self.imported,
            unchanged: self.unchanged,
            refused: self.refused,
            bytes_applied: applied,
        }
    }
}

impl Directory {
    /// Receives a card import stream (options first, then CSV chunks), keeps it aside until it
    /// is whole, then applies it; `progress` gets events along the way.
    pub async fn import_credentials<S>(
        &self,
        mut stream: S,
        progress: &mut (dyn FnMut(CardImportProgress) + Send),
    ) -> Result<CardImportReport, Error>
    where
        S: futures_util::Stream<
                Item = Result<cms_proto::directory::v1::ImportCredentialsRequest, tonic::Status>,
            > + Unpin,
    {
        use futures_util::StreamExt;
        use import_credentials_request::Payload;
        let started = now_micros();
        let options: ImportCredentialsOptions = match stream.next().await {
            Some(Ok(m)) => match m.payload {
                Some(Payload::Options(o)) => o,
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
        let delimiter = delimiter(&options.delimiter)?;
        let spool = tempfile::tempfile_in(&self.spool_dir)
            .map_err(|e| Error::Internal(format!("a temporary file for the upload: {e}")))?;
        let mut spool = std::io::BufWriter::with_capacity(1 << 20, spool);
        let mut received = 0u64;
        let mut next_report = 1 << 20;
        let tally = Tally::default();
        let mut ended = false;
        while let Some(message) = stream.next().await {
            let message = message.map_err(|s| {
                Error::Import(format!(
                    "the upload was interrupted ({}); nothing was changed",
                    s.message()
                ))
            })?;
            if ended {
                return Err(Error::invalid(
                    "end",
                    "the end of the upload must be its last message; nothing was changed",
                ));
            }
            match message.payload {
                Some(Payload::End(end)) => {
                    if end.total_bytes != received {
                        return Err(Error::Import(format!(
                            "the upload ended with {received} bytes of the {} sent; nothing was changed",
                            end.total_bytes
                        )));
                    }
                    ended = true;
                }
                Some(Payload::CsvChunk(chunk)) => {
                    received += chunk.len() as u64;
                    if received > self.import.max_bytes {
                        return Err(Error::invalid(
                            "csv_chunk",
                            format!(
                                "the CSV is larger than import.max_bytes ({} bytes)",
                                self.import.max_bytes
                            ),
                        ));
                    }
                    // Writes go to the page cache: no need to leave the runtime's thread.
                    spool
                        .write_all(&chunk)
                        .map_err(|e| Error::Internal(format!("keeping the upload aside: {e}")))?;
                    if received >= next_report {
                        next_report += 1 << 20;
                        progress(tally.progress(CardImportPhase::Receiving, received, 0));
                    }
                }
                Some(Payload::Options(_)) => {
                    return Err(Error::invalid(
                        "options",
                        "options may only be sent in the first message",
                    ));
                }
                None => {}
            }
        }
        if !ended {
            return Err(Error::Import(
                "the upload broke off before its end; nothing was changed".into(),
            ));
        }
        let mut file = spool
            .into_inner()
            .map_err(|e| Error::Internal(format!("keeping the upload aside: {e}")))?;
        file.rewind()
            .map_err(|e| Error::Internal(format!("reading the upload back: {e}")))?;
        progress(tally.progress(CardImportPhase::Receiving, received, 0));
        // A large inventory gives back what it used, as a large user import does.
        let large = received >= LARGE_UPLOAD;
        let trimmer = large.then(crate::memory::Trimmer::start);
        let outcome = self
            .apply_cards(
                file,
                delimiter,
                options.dry_run,
                received,
                started,
                tally,
                progress,
            )
            .await;
        drop(trimmer);
        if large {
            crate::memory::release_after_import(&self.db).await;
        }
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply_cards(
        &self,
        file: std::fs::File,
        delimiter: u8,
        dry_run: bool,
        received: u64,
        started: i64,
        mut tally: Tally,
        progress: &mut (dyn FnMut(CardImportProgress) + Send),
    ) -> Result<CardImportReport, Error> {
        let (tx, mut batches) = mpsc::channel(2);
        let reader = tokio::task::spawn_blocking(move || read_batches(file, delimiter, tx));
        let txn = search::write_txn(&self.db).await?;
        let sqlite = txn.get_database_backend() == DbBackend::Sqlite;
        if !sqlite {
            // Each statement planned for the tables as they are: a plan cached early (while
            // the import's first batches were all the cards there were) scanned the whole
            // credentials table for every batch as the import grew it.
            txn.execute_unprepared("SET LOCAL plan_cache_mode = force_custom_plan")
                .await?;
        }
        if sqlite {
            // The owners of a large file are all over the users table: with SQLite's usual
            // cache, dirty pages were spilled and written again and again.
            txn.execute_unprepared(&format!("PRAGMA cache_size = -{IMPORT_CACHE_KIB}"))
                .await?;
        }
        let now = now_micros();
        while let Some(batch) = batches.recv().await {
            let (lines, read) = batch?;
            self.apply_card_batch(&txn, lines, now, &mut tally).await?;
            tally.list_refusals();
            progress(tally.progress(CardImportPhase::Applying, received, read));
        }
        reader
            .await
            .map_err(|e| Error::Internal(format!("reading the upload: {e}")))?;
        search::apply(&txn, std::mem::take(&mut tally.changes)).await?;
        if sqlite {
            // The connection goes back to the pool: with its usual cache.
            txn.execute_unprepared(&format!("PRAGMA cache_size = -{POOL_CACHE_KIB}"))
                .await?;
        }
        if dry_run {
            txn.rollback().await?;
        } else {
            txn.commit().await?;
            search::checkpoint(&self.db).await;
        }
        progress(tally.progress(CardImportPhase::Done, received, received));
        tracing::info!(
            imported = tally.imported,
            unchanged = tally.unchanged,
            refused = tally.refused,
            dry_run,
            "card import applied"
        );
        Ok(CardImportReport {
            imported: tally.imported,
            unchanged: tally.unchanged,
            refused: tally.refused,
            refusals: tally.refusals,
            dry_run,
            started_at: Some(timestamp(started)),
            finished_at: Some(timestamp(now_micros())),
        })
    }

    /// The profile of template `id` version `version`, or why cards cannot be issued under it
    /// (looked up once per import).
    async fn template_profile(
        &self,
        tally: &mut Tally,
        id: &str,
        version: u32,
    ) -> Result<Result<Option<i32>, String>, Error> {
        let key = (id.to_owned(), version);
        if let Some(known) = tally.templates.get(&key) {
            return Ok(known.clone());
        }
        let answer = match self.check_template("template_id", id, version, true).await {
            Ok(profile) => Ok(profile),
            Err(e @ (Error::UnknownTemplate(_) | Error::FailedPrecondition(_))) => {
                Err(e.to_string())
            }
            Err(Error::Invalid { message, .. }) => Err(message),
            Err(e) => return Err(e),
        };
        tally.templates.insert(key, answer.clone());
        Ok(answer)
    }

    /// Checks and writes one batch of lines in `txn`.
    async fn apply_card_batch(
        &self,
        txn: &DatabaseTransaction,
        lines: Vec<Result<Parsed, CardImportRefusal>>,
        now: i64,
        tally: &mut Tally,
    ) -> Result<(), Error> {
        tally.lines += lines.len() as u64;
        let mut cards = Vec::with_capacity(lines.len());
        for line in lines {
            match line {
                Err(r) => tally.refuse(r),
                Ok(p) => {
                    let template = self
                        .template_profile(tally, &p.card.template_id, p.card.template_version)
                        .await?;
                    match template {
                        Err(message) => tally.refuse(refusal(
                            p.line,
                            CardRefusal::UnknownTemplate,
                            "template_id",
                            message,
                        )),
                        Ok(Some(profile)) if check_profile(&p.card, profile).is_err() => {
                            let message = check_profile(&p.card, profile)
                                .err()
                                .map(|e| e.to_string().replace("credential.", ""))
                                .unwrap_or_default();
                            tally.refuse(refusal(
                                p.line,
                                CardRefusal::UnknownTemplate,
                                "profile",
                                message,
                            ));
                        }
                        Ok(_) => cards.push(p),
                    }
                }
            }
        }

        // The owners, by external id and by username.
        let external: Vec<&str> = cards
            .iter()
            .filter(|p| !p.external_id.is_empty())
            .map(|p| p.external_id.as_str())
            .collect();
        let by_external: HashMap<String, user::Model> = users_by(txn, "external_id", &external)
            .await?
            .into_iter()
            .map(|m| (m.external_id.clone(), m))
            .collect();
        let keys: Vec<String> = cards
            .iter()
            .filter(|p| p.external_id.is_empty())
            .map(|p| normalize::fold(&p.username))
            .collect();
        let by_name: HashMap<String, user::Model> = users_by(
            txn,
            "username_key",
            &keys.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await?
        .into_iter()
        .map(|m| (m.username_key.clone(), m))
        .collect();
        let mut owned = Vec::with_capacity(cards.len());
        for p in cards {
            let owner = if p.external_id.is_empty() {
                by_name.get(&normalize::fold(&p.username)).ok_or_else(|| {
                    refusal(
                        p.line,
                        CardRefusal::UnknownUser,
                        "username",
                        format!("no user is named {:?}", p.username),
                    )
                })
            } else {
                match by_external.get(&p.external_id) {
                    None => Err(refusal(
                        p.line,
                        CardRefusal::UnknownUser,
                        "external_id",
                        format!("no user has external_id {:?}", p.external_id),
                    )),
                    Some(m)
                        if !p.username.is_empty()
                            && m.username_key != normalize::fold(&p.username) =>
                    {
                        Err(refusal(
                            p.line,
                            CardRefusal::UnknownUser,
                            "username",
                            format!(
                                "external_id {:?} is user {:?}, not {:?}",
                                p.external_id, m.username, p.username
                            ),
                        ))
                    }
                    Some(m) => Ok(m),
                }
            };
            match owner {
                Err(r) => tally.refuse(r),
                Ok(m) if m.status == UserStatus::Disabled as i32 => tally.refuse(refusal(
                    p.line,
                    CardRefusal::UserDisabled,
                    "",
                    format!(
                        "user {:?} is disabled: no card may be registered for it",
                        m.username
                    ),
                )),
                Ok(m) => owned.push((p, m)),
            }
        }

        // Card ids already registered (to the same owner: unchanged; to another: refused).
        let ids: Vec<&[u8]> = owned
            .iter()
            .map(|(p, _)| p.card.card_id.as_slice())
            .collect();
        let mut holders = holders(txn, &ids).await?;
        let mut new_rows = Vec::new();
        let mut owners: HashMap<i64, &user::Model> = HashMap::new();
        for (Parsed { line, mut card, .. }, m) in owned {
            match holders.get(&card.card_id) {
                Some(holder) if *holder == m.id => tally.unchanged += 1,
                Some(_) => tally.refuse(refusal(
                    line,
                    CardRefusal::CardIdTaken,
                    "card_id",
                    "this card id is registered to another user",
                )),
                None => {
                    holders.insert(card.card_id.clone(), m.id.clone());
                    card.user_id = m.id.clone();
                    new_rows.push(new_row(&card, crate::util::new_id(), now));
                    owners.insert(m.num, m);
                    tally.imported += 1;
                }
            }
        }
        insert_cards(txn, &new_rows).await?;
        tally.pending += new_rows.len();
        drop(new_rows);
        let owners: Vec<&user::Model> = owners.into_values().collect();
        refresh_documents(txn, &owners, &mut tally.changes).await?;
        if tally.pending >= APPLY_EVERY {
            tally.pending = 0;
            search::apply(txn, std::mem::take(&mut tally.changes)).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text: &str) -> Result<Header, String> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(text.as_bytes());
        let record = reader.records().next().unwrap().unwrap();
        Header::parse(&record)
    }

    #[test]
    fn headers_name_their_problem() {
        let ok = "username,card_id,serial,profile,template_id,template_version,master_key_version";
        assert!(header(ok).is_ok());
        let e = header("username,card_id,shoe_size").err().unwrap();
        assert!(e.contains("shoe_size"), "{e}");
        let e = header("username,card_id,serial").err().unwrap();
        assert!(e.contains("profile, template_id"), "{e}");
        let e = header("card_id,serial,profile,template_id,template_version,master_key_version")
            .err()
            .unwrap();
        assert!(e.contains("owner"), "{e}");
        let e = header(&format!("{ok},card_id")).err().unwrap();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn lines_are_cards_or_bad_lines_with_their_column() {
        let h = header("external_id,card_id,serial,profile,template_id,template_version,master_key_version,atr")
            .unwrap();
        let line = |text: &str| {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(text.as_bytes());
            let record = reader.records().next().unwrap().unwrap();
            parse_line(&h, &record, 7)
        };
        let template = "0190a5b2-0000-7000-8000-000000000001";
        let p = line(&format!("E1,04 A1 B2,SC-1,piv,{template},1,2,3B8F")).unwrap();
        assert_eq!(p.card.card_id, vec![0x04, 0xa1, 0xb2]);
        assert_eq!(p.card.profile, CardProfile::Piv as i32);
        assert_eq!((p.card.template_version, p.card.master_key_version), (1, 2));
        assert_eq!(p.card.atr, vec![0x3b, 0x8f]);
        for (text, column) in [
            (format!("E1,zz,SC-1,piv,{template},1,2,"), "card_id"),
            (format!("E1,01,SC-1,smart,{template},1,2,"), "profile"),
            (
                format!("E1,01,SC-1,piv,{template},one,2,"),
                "template_version",
            ),
            (format!("E1,01,,piv,{template},1,2,"), "serial"),
            (format!(",01,SC-1,piv,{template},1,2,"), "username"),
            (format!("E1,,SC-1,piv,{template},1,2,"), "card_id"),
            (format!("E1,01,SC-1,piv,{template},1,2,3B,extra"), ""),
        ] {
            let r = line(&text).err().unwrap_or_else(|| panic!("{text}"));
            assert_eq!(r.reason, CardRefusal::BadLine as i32, "{text}");
            assert_eq!(
                (r.line, r.column.as_str()),
                (7, column),
                "{text}: {}",
                r.message
            );
            assert!(!r.message.contains("credential."), "{}", r.message);
        }
    }
}
