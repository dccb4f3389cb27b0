//! Seal and unseal: the key-encryption key's life in memory (GetStatus, InitSeal, Unseal,
//! Seal). Shares are combined here; their math is in [`crate::seal`].

use std::sync::Arc;

use cms_cardcrypto::Zeroizing;
use cms_proto::custody::v1 as pb;
use sea_orm::{ActiveModelTrait, EntityTrait, Set};

use crate::audit::{self, Event};
use crate::convert::shares_to_proto;
use crate::custody::{Custody, VERSION, context};
use crate::error::Error;
use crate::guards::Peer;
use crate::seal;
use crate::store::entities::{seal_meta, so_token};
use crate::store::states::SealMode;
use crate::wrap::Kek;

/// Whether custody holds its key-encryption key.
pub(crate) enum Seal {
    Uninitialised,
    Sealed {
        threshold: u32,
        check: Vec<u8>,
        shares: Vec<Zeroizing<Vec<u8>>>,
    },
    Unsealed {
        kek: Arc<Kek>,
    },
}

impl Seal {
    /// Sealed as `meta` describes, with no share given yet.
    pub(crate) fn sealed(meta: &seal_meta::Model) -> Self {
        Self::Sealed {
            threshold: u32::try_from(meta.threshold).unwrap_or(1),
            check: meta.kek_check.clone(),
            shares: Vec::new(),
        }
    }
}

impl Custody {
    /// GetStatus: seal state, self-test, keys and audit head; never a secret.
    pub(crate) async fn status(&self, peer: &Peer) -> Result<pb::GetStatusResponse, Error> {
        self.caller(peer)?;
        let head = self.audit.head().await?;
        let so_token = so_token::Entity::find().one(&self.db).await?.is_some();
        let state = self.read();
        let (seal_state, progress, threshold, detail) = match &state.seal {
            Seal::Uninitialised => (
                pb::SealState::Uninitialised,
                0,
                0,
                "no key-encryption key yet: run `cmsctl custody init`".to_owned(),
            ),
            Seal::Sealed {
                threshold, shares, ..
            } => (
                pb::SealState::Sealed,
                u32::try_from(shares.len()).unwrap_or(0),
                *threshold,
                format!("sealed: {} of {threshold} shares given", shares.len()),
            ),
            Seal::Unsealed { .. } => (pb::SealState::Unsealed, 0, 0, String::new()),
        };
        let (passed, failed) = match &self.self_test {
            Ok(()) => (true, Vec::new()),
            Err(why) => (false, vec![why.clone()]),
        };
        let seal_state = if passed {
            seal_state
        } else {
            pb::SealState::Error
        };
        // A chain that did not verify at start: custody refuses all work but reads.
        let (seal_state, detail) = match self.audit.broken() {
            Some(why) => (pb::SealState::Error, format!("audit: {why}")),
            None => (seal_state, detail),
        };
        Ok(pb::GetStatusResponse {
            seal_state: seal_state as i32,
            self_test: Some(pb::SelfTestResult {
                passed,
                ran_at: Some(audit::timestamp(self.self_test_at)),
                failed_tests: failed,
                tests_run: crate::selftest::TESTS,
            }),
            backend: self.keystore.backend() as i32,
            unseal_progress: progress,
            unseal_threshold: threshold,
            master_key_count: u32::try_from(state.keys.reference_count()).unwrap_or(u32::MAX),
            active_key_version_count: u32::try_from(state.keys.active_count()).unwrap_or(u32::MAX),
            audit_head: Some(head),
            so_token_initialised: so_token,
            detail: if passed {
                detail
            } else {
                "self-test failed".into()
            },
            version: VERSION.into(),
        })
    }

    /// InitSeal: makes the key-encryption key and hands out its shares, once.
    pub(crate) async fn init_seal(
        &self,
        peer: &Peer,
        req: pb::InitSealRequest,
    ) -> Result<pb::InitSealResponse, Error> {
        let caller = self.caller(peer)?;
        caller.require_admin()?;
        self.self_test.as_ref().map_err(|_| Error::SelfTestFailed)?;
        if !matches!(self.read().seal, Seal::Uninitialised) {
            return Err(Error::AlreadyExists(
                "custody is already initialised".into(),
            ));
        }
        let kek = Kek::generate().map_err(seal::SealError::from)?;
        let shares = seal::split(&kek, req.threshold, req.share_count)?;
        let event = Event::seal_init(
            &caller.identity,
            context(req.auth),
            req.threshold,
            req.share_count,
        );
        self.audit.record(event, None).await?;
        seal_meta::ActiveModel {
            id: Set(1),
            threshold: Set(i32::try_from(req.threshold).unwrap_or(1)),
            share_count: Set(i32::try_from(req.share_count).unwrap_or(1)),
            kek_check: Set(kek.check_value()),
            mode: Set(SealMode::Shares),
            created_at: Set(audit::now_ms()),
        }
        .insert(&self.db)
        .await?;
        self.write().seal = Seal::Unsealed { kek: Arc::new(kek) };
        self.report_health().await;
        Ok(pb::InitSealResponse {
            shares: shares_to_proto(shares),
            threshold: req.threshold,
            kcv: String::new(),
            seal_state: pb::SealState::Unsealed as i32,
        })
    }

    /// Unseal: takes one custodian's share; the share that reaches the threshold unseals.
    pub(crate) async fn unseal(
        &self,
        peer: &Peer,
        req: pb::UnsealRequest,
    ) -> Result<pb::UnsealResponse, Error> {
        let caller = self.caller(peer)?;
        caller.require_admin()?;
        self.self_test.as_ref().map_err(|_| Error::SelfTestFailed)?;
        let share = match &req.share {
            Some(s) => Some(seal::parse_share(s.index, &s.value, &s.checksum)?),
            None => None,
        };
        let unsealed = |progress, threshold| pb::UnsealResponse {
            seal_state: pb::SealState::Unsealed as i32,
            progress,
            threshold,
            instances: Vec::new(),
        };
        let outcome = {
            let mut state = self.write();
            match &mut state.seal {
                Seal::Uninitialised => return Err(Error::Uninitialised),
                Seal::Unsealed { .. } => return Ok(unsealed(0, 0)),
                Seal::Sealed {
                    threshold,
                    check,
                    shares,
                } => {
                    if req.reset {
                        shares.clear();
                    }
                    if let Some(share) = share {
                        if shares.iter().any(|s| s[0] == share[0]) {
                            let index = u32::from(share[0]);
                            return Err(seal::SealError::Duplicate(index).into());
                        }
                        shares.push(share);
                    }
                    if u32::try_from(shares.len()).unwrap_or(0) >= *threshold {
                        let rebuilt = seal::combine(*threshold, shares, check);
                        shares.clear();
                        Some(rebuilt)
                    } else {
                        None
                    }
                }
            }
        };
        match outcome {
            None => {
                let (progress, threshold) = match &self.read().seal {
                    Seal::Sealed {
                        threshold, shares, ..
                    } => (u32::try_from(shares.len()).unwrap_or(0), *threshold),
                    _ => (0, 0),
                };
                Ok(pb::UnsealResponse {
                    seal_state: pb::SealState::Sealed as i32,
                    progress,
                    threshold,
                    instances: Vec::new(),
                })
            }
            // Recorded as a refused administrative call by `audit::gate`.
            Some(Err(e)) => Err(e.into()),
            Some(Ok(kek)) => {
                let event =
                    Event::unsealed(&caller.identity, context(req.auth), &req.custodian_label);
                self.audit.record(event, None).await?;
                self.write().seal = Seal::Unsealed { kek: Arc::new(kek) };
                self.reload_keys().await?;
                self.report_health().await;
                tracing::info!("custody unsealed");
                Ok(unsealed(0, 0))
            }
        }
    }

    /// Seal: forgets the key-encryption key and every unwrapped master key.
    pub(crate) async fn seal(
        &self,
        peer: &Peer,
        req: pb::SealRequest,
    ) -> Result<pb::SealResponse, Error> {
        let caller = self.caller(peer)?;
        caller.require_admin()?;
        let meta = seal_meta::Entity::find_by_id(1).one(&self.db).await?;
        let Some(meta) = meta else {
            return Err(Error::Uninitialised);
        };
        let event = Event::sealed(&caller.identity, context(req.auth), &req.reason);
        self.audit.record(event, None).await?;
        {
            let mut state = self.write();
            state.seal = Seal::sealed(&meta);
            state.keys.clear();
        }
        self.report_health().await;
        tracing::warn!("custody sealed on request");
        Ok(pb::SealResponse {
            seal_state: pb::SealState::Sealed as i32,
            instances: Vec::new(),
        })
    }
}
