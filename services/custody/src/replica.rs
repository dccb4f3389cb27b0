//! Active/standby replicas of custody on one PostgreSQL database.
//!
//! Every replica serves the API, but only the one holding the lease ([`crate::lease`]) has a
//! [`Custody`]: it alone writes the audit chain and answers. A standby is up (database,
//! keystore, TLS ready) but reports not ready on `/readyz` and answers every call except
//! GetStatus, Unseal and Seal (kept for its turn: [`crate::standby_seal`]) with UNAVAILABLE
//! and a retry hint, so a Kubernetes Service sends it nothing.
//!
//! When a standby takes the lease it opens its `Custody` then, from the database: chain head,
//! recent card usage and master key state (imports, rotations, retirements) are read as the
//! previous active instance left them; nothing is answered from state older than the lease.
//! An active instance that loses its lease drops its `Custody` at once (fail closed) and
//! becomes a standby.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use cms_kit::ops::Readiness;
use sea_orm::DatabaseConnection;
use tonic::Status;

use crate::config::CallerScope;
use crate::custody::{Custody, Options};
use crate::error::Error;
use crate::lease::{POLL, PgLease};
use crate::standby_seal::StandbySeal;
use crate::wrap::Kek;

/// Why a standby is not ready, on `/readyz`.
pub const STANDBY: &str = "standby: another custody instance holds the lease";

/// Whether this replica serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
}

/// The custody of one replica: there while active, none while standing by. The API adapter
/// (`crate::api`) hands each call to it, or refuses the call.
pub struct Replica {
    active: RwLock<Option<Arc<Custody>>>,
    callers: Vec<CallerScope>,
    /// The seal kept while standing by: shares handed to every instance unseal it too.
    pub(crate) standby_seal: StandbySeal,
}

impl Replica {
    /// A replica that serves `custody` from the start (unit tests: `activate` also reports
    /// health).
    #[cfg(test)]
    pub fn active(custody: Custody) -> Self {
        let callers = custody.callers.clone();
        Self {
            active: RwLock::new(Some(Arc::new(custody))),
            callers,
            standby_seal: StandbySeal::new(None),
        }
    }

    /// A replica that waits for the lease; `db` holds the seal metadata its shares are
    /// checked against.
    pub fn standby(callers: Vec<CallerScope>, db: DatabaseConnection) -> Self {
        Self {
            active: RwLock::new(None),
            callers,
            standby_seal: StandbySeal::new(Some(db)),
        }
    }

    pub fn role(&self) -> Role {
        match *self.active.read().unwrap_or_else(|p| p.into_inner()) {
            Some(_) => Role::Active,
            None => Role::Standby,
        }
    }

    /// The caller scopes, for the calls a standby answers itself.
    pub(crate) fn callers(&self) -> &[CallerScope] {
        &self.callers
    }

    /// Serves `custody` from now on, and says so on gRPC health.
    pub(crate) async fn activate(&self, custody: Custody) {
        let custody = Arc::new(custody);
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = Some(custody.clone());
        custody.report_health().await;
    }

    /// Drops the `Custody`: new calls are refused at once; the last call in progress drops it.
    /// Returns its key-encryption key if it was unsealed.
    async fn stand_by(&self) -> Option<Arc<Kek>> {
        let was = self
            .active
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match was {
            Some(custody) => {
                custody.stand_down().await;
                custody.unsealed_kek()
            }
            None => None,
        }
    }

    /// The custody serving now, or the refusal of a standby.
    pub(crate) fn serving(&self) -> Result<Arc<Custody>, Status> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Error::Standby.into())
    }
}

/// Keeps `replica` in step with the PostgreSQL lease, for as long as it runs: a standby
/// tries to take the lease every [`POLL`] and, once it has it, opens custody from the
/// database and serves; the active replica checks the lease as often and stands by the
/// moment it is lost. Cancelling this drops the lease session, which releases the lease.
pub async fn follow_lease(
    mut lease: PgLease,
    replica: Arc<Replica>,
    options: Options,
    readiness: Readiness,
) {
    // Failures are logged when they start, not at every poll.
    let mut failing = false;
    loop {
        match replica.role() {
            Role::Standby => match lease.try_take().await {
                Ok(true) => {
                    let started = Instant::now();
                    // Unsealed by shares while standing by, or while this process last served.
                    let kept = replica.standby_seal.take_kek();
                    let fenced = Options {
                        fence: lease.fence(),
                        unsealed: kept.clone(),
                        ..options.clone()
                    };
                    match Custody::open(fenced).await {
                        Ok(custody) => {
                            replica.activate(custody).await;
                            readiness.release();
                            failing = false;
                            tracing::info!(
                                open_ms = started.elapsed().as_millis() as u64,
                                "custody lease taken: this instance is active"
                            );
                        }
                        Err(e) => {
                            // Nobody serves with state that could not be read: let another try.
                            replica.standby_seal.keep(kept);
                            lease.give_up();
                            if !failing {
                                tracing::error!(error = %cms_kit::exit::one_line(&e), "custody lease taken but custody cannot open; lease given up");
                            }
                            failing = true;
                        }
                    }
                }
                Ok(false) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "custody lease cannot be tried: database unreachable");
                    }
                    failing = true;
                }
            },
            Role::Active => {
                if !lease.still_held().await {
                    let kek = replica.stand_by().await;
                    replica.standby_seal.keep(kek);
                    readiness.hold(STANDBY);
                    tracing::error!(
                        "custody lease lost (its database session ended): refusing all calls, standing by"
                    );
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
