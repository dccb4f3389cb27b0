//! The master key versions custody holds while unsealed ([`KeyTable`]), and the one check
//! of whether a version may be used ([`KeyTable::usable`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cms_cardcrypto::KeyAlgorithm;

use crate::config::KeystoreBackend;
use crate::error::Error;
use crate::keystore::{Keystore, KeystoreError, MasterKeyHandle};
use crate::store::entities::master_key;
use crate::store::states::KeyState;
use crate::wrap::Kek;

/// One master key version as loaded at unseal.
pub(crate) struct Loaded {
    pub(crate) row: master_key::Model,
    pub(crate) algorithm: KeyAlgorithm,
    /// `None` when the stored form could not be opened (altered, moved or truncated).
    handle: Option<Arc<MasterKeyHandle>>,
    /// The backend that made it, when that is not the running one.
    made_by: Option<KeystoreBackend>,
}

impl Loaded {
    /// Opens `row`'s stored form with `keystore`; one that cannot be opened is kept, with
    /// why, so that using it says so.
    pub(crate) fn open(keystore: &dyn Keystore, kek: &Kek, row: master_key::Model) -> Self {
        let algorithm = row.algorithm.parse::<KeyAlgorithm>().ok();
        let version = u32::try_from(row.version).unwrap_or(0);
        let mut made_by = None;
        let handle = algorithm.and_then(|algorithm| {
            match keystore.load(kek, &row.reference, version, algorithm, &row.wrapped)
            {
                Ok(handle) => Some(Arc::new(handle)),
                Err(e) => {
                    if let KeystoreError::OtherBackend { made_by: by, .. } = e {
                        made_by = Some(by);
                    }
                    tracing::error!(reference = %row.reference, version, error = %e, "master key cannot be opened");
                    None
                }
            }
        });
        Self {
            algorithm: algorithm.unwrap_or(KeyAlgorithm::Aes128),
            handle,
            made_by,
            row,
        }
    }

    fn retired(&self) -> bool {
        self.row.state == KeyState::Retired
    }

    /// The usable handle, or why the stored form cannot be used.
    fn handle(&self) -> Result<Arc<MasterKeyHandle>, Error> {
        let (reference, version) = (&self.row.reference, self.row.version);
        let version = u32::try_from(version).unwrap_or(0);
        if let Some(handle) = &self.handle {
            return Ok(handle.clone());
        }
        Err(match self.made_by {
            Some(made_by) => Error::OtherBackend {
                reference: reference.clone(),
                version,
                made_by,
                running: made_by.other(),
            },
            None => Error::Precondition(format!(
                "master key {reference} version {version} cannot be opened: its stored form was altered"
            )),
        })
    }
}

/// Every master key version, by reference and version, while unsealed (empty while sealed).
#[derive(Default)]
pub(crate) struct KeyTable(BTreeMap<(String, u32), Loaded>);

impl KeyTable {
    /// A usable, unretired master key version, or why not (unknown, retired, unreadable).
    pub(crate) fn usable(
        &self,
        reference: &str,
        version: u32,
    ) -> Result<Arc<MasterKeyHandle>, Error> {
        let loaded = self
            .0
            .get(&(reference.to_owned(), version))
            .ok_or_else(|| Error::UnknownKey {
                reference: reference.to_owned(),
                version,
            })?;
        if loaded.retired() {
            return Err(Error::Retired {
                reference: reference.to_owned(),
                version,
            });
        }
        loaded.handle()
    }

    pub(crate) fn versions(&self, reference: &str) -> impl Iterator<Item = (u32, &Loaded)> {
        self.0
            .range((reference.to_owned(), 0)..=(reference.to_owned(), u32::MAX))
            .map(|((_, v), k)| (*v, k))
    }

    /// The highest version not retired: what new cards are issued under.
    pub(crate) fn current_version(&self, reference: &str) -> Option<u32> {
        self.versions(reference)
            .filter(|(_, k)| !k.retired())
            .map(|(v, _)| v)
            .max()
    }

    pub(crate) fn next_version(&self, reference: &str) -> u32 {
        self.versions(reference).map(|(v, _)| v).max().unwrap_or(0) + 1
    }

    pub(crate) fn reference_count(&self) -> usize {
        self.0
            .keys()
            .map(|(r, _)| r.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    }

    pub(crate) fn active_count(&self) -> usize {
        self.0.values().filter(|k| !k.retired()).count()
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    /// A row changed in the database (retired): the table holds it as it is now.
    pub(crate) fn update_row(&mut self, row: &master_key::Model) {
        let version = u32::try_from(row.version).unwrap_or(0);
        if let Some(loaded) = self.0.get_mut(&(row.reference.clone(), version)) {
            loaded.row = row.clone();
        }
    }

    pub(crate) fn insert(&mut self, loaded: Loaded) {
        let version = u32::try_from(loaded.row.version).unwrap_or(0);
        self.0
            .insert((loaded.row.reference.clone(), version), loaded);
    }
}
