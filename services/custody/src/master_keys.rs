//! Master keys: their lifecycle RPCs (GenerateMasterKey, RotateMasterKey,
//! RetireMasterKeyVersion, ListMasterKeys) over the table of unwrapped versions
//! ([`crate::key_table`]). Import ceremonies are in
//! `key_import`; both store a new version through [`Custody::store_key`].

use std::sync::Arc;

use cms_cardcrypto::{KeyAlgorithm, SecretKey};
use cms_proto::common::v1::{AuthContext, PageResponse};
use cms_proto::custody::v1 as pb;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};

use crate::audit::{self, Event, events::NewKeyFacts};
use crate::convert::{algorithm_from_proto, hex_upper, stored_algorithm_to_proto};
use crate::custody::{Custody, context};
use crate::error::Error;
use crate::guards::{Caller, Peer};
use crate::key_table::{KeyTable, Loaded};
use crate::keyrules;
use crate::keystore::MasterKeyHandle;
use crate::store::entities::master_key;
use crate::store::states::{KeyOrigin, KeyState};

const MAX_REFERENCE: usize = 64;

/// Where a new master key version's bytes come from.
pub(crate) enum Material {
    Generate(KeyAlgorithm),
    Import(SecretKey),
}

impl Material {
    fn algorithm(&self) -> KeyAlgorithm {
        match self {
            Self::Generate(algorithm) => *algorithm,
            Self::Import(key) => key.algorithm(),
        }
    }
}

/// What a new master key version is, besides its bytes.
pub(crate) struct NewKey<'a> {
    pub(crate) reference: &'a str,
    pub(crate) version: u32,
    pub(crate) description: &'a str,
    pub(crate) origin: KeyOrigin,
    pub(crate) event: cms_proto::custody::v1::AuditEvent,
}

pub(crate) fn check_reference(reference: &str) -> Result<(), Error> {
    let ok = !reference.is_empty()
        && reference.len() <= MAX_REFERENCE
        && reference
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            field: "reference",
            message: format!(
                "a master key reference is 1 to {MAX_REFERENCE} characters of letters, digits, '-', '_' and '.'"
            ),
        })
    }
}

fn key_info(row: &master_key::Model, backend: pb::Backend, current: bool) -> pb::MasterKeyVersion {
    pb::MasterKeyVersion {
        reference: row.reference.clone(),
        version: u32::try_from(row.version).unwrap_or(0),
        algorithm: stored_algorithm_to_proto(&row.algorithm),
        kcv: row.kcv.clone(),
        state: match row.state {
            KeyState::Retired => pb::MasterKeyState::Retired,
            KeyState::Active if current => pb::MasterKeyState::Current,
            KeyState::Active => pb::MasterKeyState::Active,
        } as i32,
        origin: match row.origin {
            KeyOrigin::Imported => pb::KeyOrigin::Imported,
            KeyOrigin::Generated => pb::KeyOrigin::Generated,
        } as i32,
        backend: backend as i32,
        created_at: Some(audit::timestamp(row.created_at)),
        retired_at: row.retired_at.map(audit::timestamp),
        description: row.description.clone(),
    }
}

impl Custody {
    /// A usable, unretired master key version, or why not (unknown, retired, unreadable).
    pub(crate) fn usable_key(
        &self,
        reference: &str,
        version: u32,
    ) -> Result<Arc<MasterKeyHandle>, Error> {
        self.read().keys.usable(reference, version)
    }

    pub(crate) fn current_version(&self, reference: &str) -> Option<u32> {
        self.read().keys.current_version(reference)
    }

    pub(crate) fn next_version(&self, reference: &str) -> u32 {
        self.read().keys.next_version(reference)
    }

    /// Loads (unwraps) every master key version while unsealed; forgets them while sealed.
    pub(crate) async fn reload_keys(&self) -> Result<(), Error> {
        let mut keys = KeyTable::default();
        if let Some(kek) = self.unsealed_kek() {
            for row in master_key::Entity::find().all(&self.db).await? {
                keys.insert(Loaded::open(&*self.keystore, &kek, row));
            }
        }
        self.write().keys = keys;
        Ok(())
    }

    pub(crate) fn info(&self, row: &master_key::Model) -> pb::MasterKeyVersion {
        let current = self.current_version(&row.reference) == u32::try_from(row.version).ok();
        key_info(row, self.keystore.backend(), current)
    }

    /// Stores a new master key version and audits it (the record first: a key that exists
    /// without its record must not).
    pub(crate) async fn store_key(
        &self,
        caller: &Caller<'_>,
        auth: Option<AuthContext>,
        material: Material,
        new: NewKey<'_>,
    ) -> Result<master_key::Model, Error> {
        let NewKey {
            reference,
            version,
            description,
            origin,
            event,
        } = new;
        let kek = self.kek()?;
        let algorithm = material.algorithm();
        let stored = match &material {
            Material::Generate(algorithm) => self
                .keystore
                .generate(&kek, reference, version, *algorithm)?,
            Material::Import(key) => self.keystore.import(&kek, reference, version, key)?,
        };
        drop(material);
        let kcv = hex_upper(&stored.kcv);
        let row = master_key::ActiveModel {
            reference: Set(reference.to_owned()),
            version: Set(i32::try_from(version).unwrap_or(i32::MAX)),
            algorithm: Set(algorithm.as_str().to_owned()),
            kcv: Set(kcv.clone()),
            state: Set(KeyState::Active),
            description: Set(description.to_owned()),
            origin: Set(origin),
            wrapped: Set(stored.blob),
            created_at: Set(audit::now_ms()),
            retired_at: Set(None),
            ..Default::default()
        };
        let facts = NewKeyFacts {
            reference,
            version,
            algorithm: algorithm.as_str(),
            kcv: &kcv,
            origin: origin.as_str(),
        };
        let audited = Event::new_key(event, &caller.identity, context(auth), &facts);
        self.audit.record(audited, None).await?;
        let row = row.insert(&self.db).await.map_err(|e| match e {
            sea_orm::DbErr::RecordNotInserted => {
                Error::AlreadyExists(format!("master key {reference} version {version} exists"))
            }
            other => Error::Store(other),
        })?;
        let loaded = Loaded::open(&*self.keystore, &kek, row.clone());
        self.write().keys.insert(loaded);
        Ok(row)
    }

    /// GenerateMasterKey: version 1 of a new reference.
    pub(crate) async fn generate_master_key(
        &self,
        peer: &Peer,
        req: pb::GenerateMasterKeyRequest,
    ) -> Result<pb::GenerateMasterKeyResponse, Error> {
        let caller = self.caller(peer)?;
        caller.require_admin()?;
        check_reference(&req.reference)?;
        let algorithm = algorithm_from_proto(req.algorithm, "algorithm")?;
        self.kek()?;
        if self.current_version(&req.reference).is_some() || self.next_version(&req.reference) > 1 {
            return Err(Error::AlreadyExists(format!(
                "master key {} exists; rotate it to make a new version",
                req.reference
            )));
        }
        let new = NewKey {
            reference: &req.reference,
            version: 1,
            description: &req.description,
            origin: KeyOrigin::Generated,
            event: pb::AuditEvent::MasterKeyGenerate,
        };
        let row = self
            .store_key(
                &caller,
                req.auth.clone(),
                Material::Generate(algorithm),
                new,
            )
            .await?;
        Ok(pb::GenerateMasterKeyResponse {
            key: Some(self.info(&row)),
        })
    }

    /// RotateMasterKey: a new version of the current one's algorithm.
    pub(crate) async fn rotate_master_key(
        &self,
        peer: &Peer,
        req: pb::RotateMasterKeyRequest,
    ) -> Result<pb::RotateMasterKeyResponse, Error> {
        let caller = self.caller(peer)?;
        caller.require_admin()?;
        check_reference(&req.reference)?;
        self.kek()?;
        let previous = {
            let state = self.read();
            let current = state.keys.current_version(&req.reference);
            current.and_then(|v| {
                state
                    .keys
                    .versions(&req.reference)
                    .find(|(version, _)| *version == v)
                    .map(|(_, k)| (k.row.clone(), k.algorithm))
            })
        };
        let Some((previous, algorithm)) = previous else {
            return Err(Error::NotFound(format!(
                "no active master key {}",
                req.reference
            )));
        };
        let new = NewKey {
            reference: &req.reference,
            version: self.next_version(&req.reference),
            description: &req.description,
            origin: KeyOrigin::Generated,
            event: pb::AuditEvent::MasterKeyRotate,
        };
        let row = self
            .store_key(
                &caller,
                req.auth.clone(),
                Material::Generate(algorithm),
                new,
            )
            .await?;
        Ok(pb::RotateMasterKeyResponse {
            key: Some(self.info(&row)),
            previous: Some(self.info(&previous)),
        })
    }

    /// RetireMasterKeyVersion: never the current version.
    pub(crate) async fn retire_master_key_version(
        &self,
        peer: &Peer,
        req: pb::RetireMasterKeyVersionRequest,
    ) -> Result<pb::RetireMasterKeyVersionResponse, Error> {
        let caller = self.caller(peer)?;
        caller.require_admin()?;
        self.kek()?;
        let row = master_key::Entity::find()
            .filter(master_key::Column::Reference.eq(req.reference.clone()))
            .filter(master_key::Column::Version.eq(i32::try_from(req.version).unwrap_or(-1)))
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::UnknownKey {
                reference: req.reference.clone(),
                version: req.version,
            })?;
        keyrules::may_retire(
            &req.reference,
            req.version,
            self.current_version(&req.reference),
        )?;
        let event = Event::key_retired(
            &caller.identity,
            context(req.auth),
            &req.reference,
            req.version,
            &req.reason,
        );
        self.audit.record(event, None).await?;
        let mut active: master_key::ActiveModel = row.into();
        active.state = Set(KeyState::Retired);
        active.retired_at = Set(Some(audit::now_ms()));
        let row = active.update(&self.db).await?;
        self.write().keys.update_row(&row);
        Ok(pb::RetireMasterKeyVersionResponse {
            key: Some(self.info(&row)),
        })
    }

    /// ListMasterKeys: by reference and version, retired ones on request.
    pub(crate) async fn list_master_keys(
        &self,
        peer: &Peer,
        req: pb::ListMasterKeysRequest,
    ) -> Result<pb::ListMasterKeysResponse, Error> {
        self.caller(peer)?;
        let mut query = master_key::Entity::find()
            .order_by_asc(master_key::Column::Reference)
            .order_by_asc(master_key::Column::Version);
        if !req.reference.is_empty() {
            query = query.filter(master_key::Column::Reference.eq(req.reference.clone()));
        }
        if !req.include_retired {
            query = query.filter(master_key::Column::State.ne(KeyState::Retired));
        }
        let rows = query.all(&self.db).await?;
        Ok(pb::ListMasterKeysResponse {
            page: Some(PageResponse {
                next_page_token: String::new(),
                total_estimate: rows.len() as u64,
            }),
            keys: rows.iter().map(|r| self.info(r)).collect(),
        })
    }
}
