//! The key import ceremony: 2 or 3 custodians each give a component of a master key, each
//! confirmed by its key check value; their XOR is stored as a new version (BeginKeyImport,
//! AddKeyComponent, FinishKeyImport, AbortKeyImport). Every step is on the audit record,
//! refused or not: a refused finish through `audit::gate`, the other steps here.

use std::time::{Duration, Instant};

use cms_cardcrypto::{KeyAlgorithm, SecretKey, Zeroizing};
use cms_proto::custody::v1 as pb;
use cms_proto::custody::v1::AuditEvent;

use crate::audit::Event;
use crate::audit::events::{Ceremony, CeremonyStep, KcvOutcome};
use crate::audit::gate::{Asker, refusal};
use crate::convert::{algorithm_from_proto, hex_upper, kcv_matches};
use crate::custody::Custody;
use crate::error::Error;
use crate::guards::Peer;
use crate::keyrules;
use crate::master_keys::{Material, NewKey, check_reference};
use crate::store::states::KeyOrigin;
use crate::wrap::{self, Fingerprint};

const IMPORT_TTL: Duration = Duration::from_secs(600);

/// A ceremony in progress (components are zeroized when it goes).
pub(crate) struct Import {
    reference: String,
    algorithm: KeyAlgorithm,
    version: u32,
    expected: u32,
    received: u32,
    accumulator: Zeroizing<Vec<u8>>,
    /// Keyed fingerprints of the components accepted so far (a repeated one is refused).
    seen: Vec<Fingerprint>,
    description: String,
    started: Instant,
}

impl Import {
    fn live(&self) -> bool {
        self.started.elapsed() < IMPORT_TTL
    }
}

fn no_such_import() -> Error {
    Error::NotFound("no such key import (or it expired)".into())
}

impl Custody {
    fn imports(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Import>> {
        self.imports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An import ceremony's key reference, version, components received and expected.
    fn import_progress(&self, import_id: &str) -> Option<(String, u32, u32, u32)> {
        self.imports()
            .get(import_id)
            .map(|i| (i.reference.clone(), i.version, i.received, i.expected))
    }

    /// BeginKeyImport: the ceremony goes on only once its first record is written.
    pub(crate) async fn begin_key_import(
        &self,
        peer: &Peer,
        req: pb::BeginKeyImportRequest,
    ) -> Result<pb::BeginKeyImportResponse, Error> {
        let asker = Asker::new(peer, req.auth.as_ref());
        let reference = req.reference.clone();
        let begun = match self.begin_import(peer, req) {
            Ok(begun) => begun,
            Err(error) => {
                let (outcome, reason) = refusal(&error);
                let event = Event::ceremony_refused(
                    CeremonyStep::Begin,
                    "BeginKeyImport",
                    &asker,
                    &Ceremony {
                        reference: &reference,
                        ..Default::default()
                    },
                    outcome,
                    reason,
                );
                self.record_refusal(event, "BeginKeyImport").await;
                return Err(error);
            }
        };
        let ceremony = Ceremony {
            import_id: &begun.import_id,
            reference: &reference,
            version: begun.version,
        };
        let event = Event::ceremony(CeremonyStep::Begin, &asker.caller, asker.auth, &ceremony);
        if let Err(e) = self.audit.record(event, None).await {
            self.imports().remove(&begun.import_id);
            return Err(e.into());
        }
        Ok(begun)
    }

    fn begin_import(
        &self,
        peer: &Peer,
        req: pb::BeginKeyImportRequest,
    ) -> Result<pb::BeginKeyImportResponse, Error> {
        let caller = self.caller(peer)?;
        caller.require_admin()?;
        check_reference(&req.reference)?;
        let algorithm = algorithm_from_proto(req.algorithm, "algorithm")?;
        self.kek()?;
        if !(2..=3).contains(&req.component_count) {
            return Err(Error::Invalid {
                field: "component_count",
                message: "a key ceremony uses 2 or 3 components".into(),
            });
        }
        let mut id = [0u8; 16];
        wrap::random(&mut id).map_err(crate::seal::SealError::from)?;
        let import_id = hex_upper(&id);
        let version = self.next_version(&req.reference);
        let mut imports = self.imports();
        imports.retain(|_, i| i.live());
        if imports.values().any(|i| i.reference == req.reference) {
            return Err(Error::AlreadyExists(format!(
                "an import of {} is already in progress",
                req.reference
            )));
        }
        imports.insert(
            import_id.clone(),
            Import {
                reference: req.reference,
                algorithm,
                version,
                expected: req.component_count,
                received: 0,
                accumulator: Zeroizing::new(vec![0; algorithm.key_len()]),
                seen: Vec::new(),
                description: req.description,
                started: Instant::now(),
            },
        );
        let expires = std::time::SystemTime::now() + IMPORT_TTL;
        Ok(pb::BeginKeyImportResponse {
            import_id,
            version,
            expires_at: Some(expires.into()),
        })
    }

    /// AddKeyComponent: accepted only with its key check value, and only once on record.
    pub(crate) async fn add_key_component(
        &self,
        peer: &Peer,
        req: pb::AddKeyComponentRequest,
    ) -> Result<pb::AddKeyComponentResponse, Error> {
        let asker = Asker::new(peer, req.auth.as_ref());
        let import_id = req.import_id.clone();
        let progress = self.import_progress(&import_id);
        let (reference, version, index, expected) = progress.clone().unwrap_or_default();
        let ceremony = Ceremony {
            import_id: &import_id,
            reference: &reference,
            version,
        };
        match self.add_component(peer, req) {
            Ok(added) => {
                let event = Event::ceremony_component(
                    &asker.caller,
                    asker.auth,
                    &ceremony,
                    added.components_received,
                    added.components_expected,
                    KcvOutcome::Matched,
                );
                self.audit.record(event, None).await?;
                Ok(added)
            }
            Err(error) => {
                let kcv = if matches!(error, Error::KcvMismatch(_)) {
                    KcvOutcome::Mismatched
                } else {
                    KcvOutcome::NotChecked
                };
                let (outcome, reason) = refusal(&error);
                let event = Event::ceremony_component_refused(
                    &asker,
                    &ceremony,
                    progress.map(|_| (index + 1, expected)),
                    kcv,
                    outcome,
                    reason,
                );
                self.record_refusal(event, "AddKeyComponent").await;
                Err(error)
            }
        }
    }

    fn add_component(
        &self,
        peer: &Peer,
        req: pb::AddKeyComponentRequest,
    ) -> Result<pb::AddKeyComponentResponse, Error> {
        let caller = self.caller(peer)?;
        caller.require_admin()?;
        let kek = self.kek()?;
        let mut imports = self.imports();
        let import = imports
            .get_mut(&req.import_id)
            .filter(|i| i.live())
            .ok_or_else(no_such_import)?;
        if import.received >= import.expected {
            return Err(Error::Precondition(
                "all components were already given; finish the import".into(),
            ));
        }
        let component =
            SecretKey::new(import.algorithm, &req.component).map_err(|_| Error::Invalid {
                field: "component",
                message: format!(
                    "a {} component is {} bytes",
                    import.algorithm.as_str(),
                    import.algorithm.key_len()
                ),
            })?;
        let kcv = hex_upper(&component.kcv());
        if !kcv_matches(&component, &req.expected_kcv) {
            return Err(Error::KcvMismatch(format!(
                "component {} does not have the key check value given; it was not accepted",
                import.received + 1
            )));
        }
        let fingerprint = keyrules::check_component(
            &kek,
            &req.import_id,
            &component,
            import.received + 1,
            &import.seen,
        )?;
        import.seen.push(fingerprint);
        for (acc, byte) in import.accumulator.iter_mut().zip(component.expose_bytes()) {
            *acc ^= byte;
        }
        import.received += 1;
        Ok(pb::AddKeyComponentResponse {
            components_received: import.received,
            components_expected: import.expected,
            component_kcv: kcv,
        })
    }

    /// FinishKeyImport: the combined key, confirmed by its key check value, is stored.
    pub(crate) async fn finish_key_import(
        &self,
        peer: &Peer,
        req: pb::FinishKeyImportRequest,
    ) -> Result<pb::FinishKeyImportResponse, Error> {
        let caller = self.caller(peer)?;
        caller.require_admin()?;
        self.kek()?;
        let import = {
            let mut imports = self.imports();
            let ready = imports
                .get(&req.import_id)
                .filter(|i| i.live())
                .ok_or_else(no_such_import)?;
            if ready.received < ready.expected {
                return Err(Error::Precondition(format!(
                    "{} of {} components given",
                    ready.received, ready.expected
                )));
            }
            imports
                .remove(&req.import_id)
                .ok_or_else(|| Error::NotFound("no such key import".into()))?
        };
        let key =
            SecretKey::new(import.algorithm, &import.accumulator).map_err(|_| Error::Invalid {
                field: "component",
                message: "the combined key is not valid for its algorithm".into(),
            })?;
        keyrules::check_combined(&key)?;
        if !kcv_matches(&key, &req.expected_kcv) {
            return Err(Error::KcvMismatch(
                "the combined key does not have the key check value given; nothing was stored"
                    .into(),
            ));
        }
        let new = NewKey {
            reference: &import.reference,
            version: import.version,
            description: &import.description,
            origin: KeyOrigin::Imported,
            event: AuditEvent::MasterKeyImport,
        };
        let row = self
            .store_key(&caller, req.auth, Material::Import(key), new)
            .await?;
        Ok(pb::FinishKeyImportResponse {
            key: Some(self.info(&row)),
        })
    }

    /// AbortKeyImport: the ceremony and its components are dropped.
    pub(crate) async fn abort_key_import(
        &self,
        peer: &Peer,
        req: pb::AbortKeyImportRequest,
    ) -> Result<pb::AbortKeyImportResponse, Error> {
        let asker = Asker::new(peer, req.auth.as_ref());
        let (reference, version, ..) = self.import_progress(&req.import_id).unwrap_or_default();
        let ceremony = Ceremony {
            import_id: &req.import_id,
            reference: &reference,
            version,
        };
        match self.abort_import(peer, &req.import_id) {
            Ok(()) => {
                let event = Event::ceremony_aborted(&asker, &ceremony, &req.reason);
                self.audit.record(event, None).await?;
                Ok(pb::AbortKeyImportResponse {})
            }
            Err(error) => {
                let (outcome, reason) = refusal(&error);
                let event = Event::ceremony_refused(
                    CeremonyStep::Abort,
                    "AbortKeyImport",
                    &asker,
                    &Ceremony {
                        import_id: &req.import_id,
                        ..Default::default()
                    },
                    outcome,
                    reason,
                );
                self.record_refusal(event, "AbortKeyImport").await;
                Err(error)
            }
        }
    }

    fn abort_import(&self, peer: &Peer, import_id: &str) -> Result<(), Error> {
        let caller = self.caller(peer)?;
        caller.require_admin()?;
        self.imports()
            .remove(import_id)
            .ok_or_else(|| Error::NotFound("no such key import".into()))?;
        Ok(())
    }
}
