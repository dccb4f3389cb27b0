//! The seal a standby replica keeps for its turn. The gateway hands every custodian share and
//! every Seal to each custody instance, so that the standby which takes the lease after a
//! failover serves unsealed (or stays sealed) as the active one did, with no new unseal.
//!
//! A standby checks the shares against the seal metadata in the shared database, exactly as
//! the active instance does, and keeps the rebuilt key-encryption key in memory only. Only the
//! active instance writes the audit chain: it records the unseal and the seal; a standby logs
//! that it followed (never a share).

use std::sync::{Arc, Mutex, MutexGuard};

use cms_cardcrypto::Zeroizing;
use cms_proto::custody::v1 as pb;
use sea_orm::{DatabaseConnection, EntityTrait};

use crate::error::Error;
use crate::guards::{self, Peer};
use crate::seal;
use crate::store::entities::seal_meta;
use crate::wrap::Kek;

/// What a standby holds of the seal.
enum Kept {
    /// Sealed: the shares given so far (distinct indexes).
    Sealed(Vec<Zeroizing<Vec<u8>>>),
    /// Unsealed: the key-encryption key it serves with once it takes the lease.
    Unsealed(Arc<Kek>),
}

/// The standby's seal, and the database holding the seal metadata it checks shares against.
pub struct StandbySeal {
    db: Option<DatabaseConnection>,
    kept: Mutex<Kept>,
}

impl StandbySeal {
    pub fn new(db: Option<DatabaseConnection>) -> Self {
        Self {
            db,
            kept: Mutex::new(Kept::Sealed(Vec::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key-encryption key to open custody with when this replica takes the lease.
    pub fn take_kek(&self) -> Option<Arc<Kek>> {
        match std::mem::replace(&mut *self.lock(), Kept::Sealed(Vec::new())) {
            Kept::Unsealed(kek) => Some(kek),
            Kept::Sealed(_) => None,
        }
    }

    /// Keeps the key-encryption key of the custody this replica stopped serving (if unsealed).
    pub fn keep(&self, kek: Option<Arc<Kek>>) {
        *self.lock() = match kek {
            Some(kek) => Kept::Unsealed(kek),
            None => Kept::Sealed(Vec::new()),
        };
    }

    async fn meta(&self) -> Result<seal_meta::Model, Error> {
        let db = self.db.as_ref().ok_or(Error::Standby)?;
        seal_meta::Entity::find_by_id(1)
            .one(db)
            .await?
            .ok_or(Error::Uninitialised)
    }

    /// Unseal on a standby: takes the share as the active instance would.
    pub async fn unseal(
        &self,
        callers: &[crate::config::CallerScope],
        peer: &Peer,
        req: pb::UnsealRequest,
    ) -> Result<pb::UnsealResponse, Error> {
        guards::caller(callers, peer)?.require_admin()?;
        let share = match &req.share {
            Some(s) => Some(seal::parse_share(s.index, &s.value, &s.checksum)?),
            None => None,
        };
        let meta = self.meta().await?;
        let threshold = u32::try_from(meta.threshold).unwrap_or(1);
        let mut kept = self.lock();
        if let Kept::Unsealed(kek) = &*kept {
            if kek.check_value() == meta.kek_check {
                return Ok(answer(pb::SealState::Unsealed, 0, 0));
            }
            // A key from before the seal was initialised again: worthless now.
            *kept = Kept::Sealed(Vec::new());
        }
        let Kept::Sealed(shares) = &mut *kept else {
            unreachable!("made sealed above")
        };
        if req.reset {
            shares.clear();
        }
        if let Some(share) = share {
            if shares.iter().any(|s| s[0] == share[0]) {
                return Err(seal::SealError::Duplicate(u32::from(share[0])).into());
            }
            shares.push(share);
        }
        let progress = u32::try_from(shares.len()).unwrap_or(u32::MAX);
        if progress < threshold {
            return Ok(answer(pb::SealState::Sealed, progress, threshold));
        }
        let rebuilt = seal::combine(threshold, shares, &meta.kek_check);
        shares.clear();
        *kept = Kept::Unsealed(Arc::new(rebuilt?));
        tracing::info!("custody standby unsealed: it serves unsealed when it takes the lease");
        Ok(answer(pb::SealState::Unsealed, 0, 0))
    }

    /// Seal on a standby: forgets the key-encryption key and any shares.
    pub fn seal(
        &self,
        callers: &[crate::config::CallerScope],
        peer: &Peer,
    ) -> Result<pb::SealResponse, Error> {
        guards::caller(callers, peer)?.require_admin()?;
        *self.lock() = Kept::Sealed(Vec::new());
        tracing::warn!("custody standby sealed on request");
        Ok(pb::SealResponse {
            seal_state: pb::SealState::Sealed as i32,
            instances: vec![instance(pb::SealState::Sealed, 0, 0)],
        })
    }

    /// The standby's seal for GetStatus: state, progress and threshold.
    pub async fn status(&self) -> (pb::SealState, u32, u32) {
        let threshold = match self.meta().await {
            Ok(meta) => u32::try_from(meta.threshold).unwrap_or(1),
            Err(Error::Uninitialised) => return (pb::SealState::Uninitialised, 0, 0),
            Err(_) => 0,
        };
        match &*self.lock() {
            Kept::Unsealed(_) => (pb::SealState::Unsealed, 0, 0),
            Kept::Sealed(shares) => (
                pb::SealState::Sealed,
                u32::try_from(shares.len()).unwrap_or(u32::MAX),
                threshold,
            ),
        }
    }
}

/// A standby's own entry for the gateway's per-instance list.
fn instance(state: pb::SealState, progress: u32, threshold: u32) -> pb::InstanceSeal {
    pb::InstanceSeal {
        reached: true,
        role: pb::ReplicaRole::Standby as i32,
        seal_state: state as i32,
        progress,
        threshold,
        ..Default::default()
    }
}

fn answer(state: pb::SealState, progress: u32, threshold: u32) -> pb::UnsealResponse {
    pb::UnsealResponse {
        seal_state: state as i32,
        progress,
        threshold,
        instances: vec![instance(state, progress, threshold)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CallerScope;
    use crate::store::states::SealMode;
    use cms_kit::{PeerIdentity, SpiffeId};
    use sea_orm::{ActiveModelTrait, Set};

    const ADMIN: &str = "spiffe://cms.test/cms/gateway";
    const OTHER: &str = "spiffe://cms.test/cms/other";

    fn peer(identity: &str) -> Peer {
        let mut request = tonic::Request::new(());
        request.extensions_mut().insert(PeerIdentity {
            spiffe_id: identity.parse::<SpiffeId>().unwrap(),
            remote_addr: None,
        });
        Peer::of(&request)
    }

    fn unseal(share: &seal::ShownShare) -> pb::UnsealRequest {
        pb::UnsealRequest {
            share: Some(pb::Share {
                index: share.index,
                value: share.value.to_string(),
                checksum: share.checksum.clone(),
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_standby_rebuilds_the_key_from_shares_and_forgets_it_on_seal() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::test_database_in(dir.path()).await;
        let kek = Kek::generate().unwrap();
        seal_meta::ActiveModel {
            id: Set(1),
            threshold: Set(2),
            share_count: Set(3),
            kek_check: Set(kek.check_value()),
            mode: Set(SealMode::Shares),
            created_at: Set(0),
        }
        .insert(&db)
        .await
        .unwrap();
        let shares = seal::split(&kek, 2, 3).unwrap();
        let callers = [ADMIN, OTHER].map(|identity| CallerScope {
            identity: identity.parse().unwrap(),
            key_references: Vec::new(),
            admin: identity == ADMIN,
            release_puk: false,
        });
        let standby = StandbySeal::new(Some(db));

        let refused = standby
            .unseal(&callers, &peer(OTHER), unseal(&shares[0]))
            .await;
        assert!(matches!(refused, Err(Error::NotAllowed(_))));
        let first = standby
            .unseal(&callers, &peer(ADMIN), unseal(&shares[0]))
            .await
            .unwrap();
        assert_eq!(
            (first.seal_state, first.progress),
            (pb::SealState::Sealed as i32, 1)
        );
        assert_eq!(first.instances[0].role, pb::ReplicaRole::Standby as i32);
        let twice = standby
            .unseal(&callers, &peer(ADMIN), unseal(&shares[0]))
            .await;
        assert!(matches!(twice, Err(Error::Seal(_))));
        let second = standby
            .unseal(&callers, &peer(ADMIN), unseal(&shares[2]))
            .await
            .unwrap();
        assert_eq!(second.seal_state, pb::SealState::Unsealed as i32);
        assert_eq!(standby.status().await.0, pb::SealState::Unsealed);

        standby.seal(&callers, &peer(ADMIN)).unwrap();
        assert_eq!(standby.status().await, (pb::SealState::Sealed, 0, 2));
        assert!(standby.take_kek().is_none());

        for share in [&shares[1], &shares[2]] {
            standby
                .unseal(&callers, &peer(ADMIN), unseal(share))
                .await
                .unwrap();
        }
        let kept = standby.take_kek().expect("the rebuilt key, for the lease");
        assert_eq!(kept.check_value(), kek.check_value());
    }
}
