//! Child processes: start a service, wait until it is ready, stop it gracefully.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;

use crate::layout::Layout;

/// A running service process.
#[derive(Debug)]
pub struct Service {
    pub name: &'static str,
    pub process: tokio::process::Child,
    pub grpc: SocketAddr,
    pub ops: SocketAddr,
    pub log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("{name}: cannot start {exe}: {source}")]
    Spawn {
        name: &'static str,
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("{name}: {path}: {source}")]
    Io {
        name: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) before it was ready; last lines of {log}:\n{tail}")]
    Died {
        name: &'static str,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("{name} was not ready after {secs} s; last lines of {log}:\n{tail}")]
    NotReady {
        name: &'static str,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
}

/// The last `n` lines of a log file (empty when unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts `exe serve <name> --config <file>` with its output appended to the service log, then
/// waits until the service has announced its addresses and `/readyz` answers 200.
pub async fn start(
    exe: &Path,
    layout: &Layout,
    name: &'static str,
    ready_within: Duration,
) -> Result<Service, SuperviseError> {
    let log_path = layout.log_path(name);
    let announce = layout.announce_path(name);
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| SuperviseError::Io { name, path, source }
    };
    match std::fs::remove_file(&announce) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&announce)(e)),
        _ => {}
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err(&log_path))?;
    let log_err = log.try_clone().map_err(io_err(&log_path))?;
    let mut process = Command::new(exe)
        .arg("serve")
        .arg(name)
        .arg("--config")
        .arg(layout.config_path(name))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SuperviseError::Spawn {
            name,
            exe: exe.to_owned(),
            source,
        })?;

    let deadline = Instant::now() + ready_within;
    loop {
        if let Some(status) = process.try_wait().map_err(io_err(exe))? {
            return Err(SuperviseError::Died {
                name,
                status,
                tail: tail(&log_path, 20),
                log: log_path,
            });
        }
        if let Some((grpc, ops)) = cms_kit::server::read_announce(&announce)
            && matches!(cms_kit::ops::http_get(ops, "/readyz").await, Ok((200, _)))
        {
            return Ok(Service {
                name,
                process,
                grpc,
                ops,
                log: log_path,
            });
        }
        if Instant::now() > deadline {
            let _ = process.start_kill();
            return Err(SuperviseError::NotReady {
                name,
                secs: ready_within.as_secs(),
                tail: tail(&log_path, 20),
                log: log_path,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Service {
    /// SIGTERM, then SIGKILL if it has not exited within `grace`. Returns its exit status.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.process.try_wait() {
            return Some(status);
        }
        if let Some(pid) = self.process.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, self.process.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = self.process.kill().await;
                self.process.wait().await.ok()
            }
        }
    }
}

/// Stops services in reverse start order.
pub async fn stop_all(services: &mut [Service], grace: Duration) {
    for service in services.iter_mut().rev() {
        service.stop(grace).await;
    }
}

/// When to restart a service that died: after 1 s, doubling up to 30 s while it keeps dying;
/// back to 1 s once it has stayed up for a minute. After `MAX_FAILED_STARTS` starts in a row
/// that never became ready, the launcher gives up.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    failed_starts: u32,
    up_since: Instant,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: Self::FIRST,
            failed_starts: 0,
            up_since: Instant::now(),
        }
    }
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(30);
    pub const STABLE_AFTER: Duration = Duration::from_secs(60);
    pub const MAX_FAILED_STARTS: u32 = 5;

    /// The wait before the next start, after the service died or failed to start.
    pub fn delay(&mut self) -> Duration {
        if self.failed_starts == 0 && self.up_since.elapsed() >= Self::STABLE_AFTER {
            self.next = Self::FIRST;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }

    pub fn started(&mut self) {
        self.failed_starts = 0;
        self.up_since = Instant::now();
    }

    /// Records a start that failed; false when it is time to give up.
    pub fn failed_start(&mut self) -> bool {
        self.failed_starts += 1;
        self.failed_starts < Self::MAX_FAILED_STARTS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_gives_up_after_failed_starts() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..7).map(|_| b.delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        for _ in 1..Backoff::MAX_FAILED_STARTS {
            assert!(b.failed_start());
        }
        assert!(!b.failed_start());
        b.started();
        assert!(b.failed_start());
    }
}
