//! The local API on a Unix domain socket: the desktop app, the CLI and a logon-screen plugin on
//! this PC use it with no certificate. Access is the socket file's: mode (0660 by default) and
//! group, set before the socket is visible under its final name, so there is no moment at which
//! a user outside the group could connect.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cms_kit::metrics::Metrics;
use cms_kit::served::ServedApi;
use cms_kit::shutdown::Shutdown;
use cms_kit::trace::ServerTraceLayer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;

use crate::config::LocalApiSettings;
use crate::error::Error;

/// A bound local socket; the file is removed when served to the end.
#[derive(Debug)]
pub struct LocalSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl LocalSocket {
    /// Where clients connect.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn local_err(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::LocalApi(format!("{}: {what}", path.display()))
}

/// Resolves a group name or numeric id.
fn group_id(group: &str) -> Result<nix::unistd::Gid, String> {
    if let Ok(id) = group.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(id));
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(format!("local_api.group: no group named {group:?}")),
        Err(e) => Err(format!("local_api.group: cannot look up {group:?}: {e}")),
    }
}

/// Binds the socket at `settings`' path (default `<data_dir>/agent.sock`).
///
/// A leftover socket from a crashed agent is replaced; a socket some process still answers on
/// (another agent) or a file that is not a socket is left alone and reported.
pub fn bind(settings: &LocalApiSettings, data_dir: &Path) -> Result<LocalSocket, Error> {
    let path = settings.socket_path(data_dir);
    let mode = settings.mode_bits().map_err(Error::LocalApi)?;
    let gid = settings
        .group
        .as_deref()
        .map(group_id)
        .transpose()
        .map_err(Error::LocalApi)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| local_err(dir, e))?;
    }
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(local_err(
                    &path,
                    "another process is serving on this socket",
                ));
            }
            std::fs::remove_file(&path).map_err(|e| local_err(&path, e))?;
        }
        Ok(_) => return Err(local_err(&path, "exists and is not a socket")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(local_err(&path, e)),
    }
    // Bind under a temporary name, set mode and group, then rename into place: clients only
    // ever see the final permissions.
    let staging = path.with_extension(format!("sock.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(|e| local_err(&staging, e))?;
    let prepared = (|| {
        if let Some(gid) = gid {
            nix::unistd::chown(&staging, None, Some(gid)).map_err(|e| local_err(&staging, e))?;
        }
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
            .map_err(|e| local_err(&staging, e))?;
        std::fs::rename(&staging, &path).map_err(|e| local_err(&path, e))
    })();
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok(LocalSocket { listener, path })
}

/// Serves `routes` on the socket until `shutdown`, then lets requests finish for at most
/// `grace` (a WatchReaders stream never finishes by itself); removes the socket file.
pub async fn serve(
    routes: Routes,
    socket: LocalSocket,
    metrics: Metrics,
    version: &'static str,
    api: ServedApi,
    grace: std::time::Duration,
    shutdown: Shutdown,
) -> Result<(), Error> {
    tracing::info!(socket = %socket.path.display(), "local API serving");
    let LocalSocket { listener, path } = socket;
    let server = tonic::transport::Server::builder()
        .layer(ServerTraceLayer::new(metrics, version, api))
        .add_routes(routes)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.wait());
    tokio::pin!(server);
    let served = tokio::select! {
        r = &mut server => r,
        () = shutdown.wait() => match tokio::time::timeout(grace, &mut server).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        },
    };
    let _ = std::fs::remove_file(&path);
    served.map_err(|e| Error::LocalApi(format!("{}: {e}", path.display())))
}

/// A gRPC channel to an agent's local socket (for the CLI and tests).
pub async fn connect(path: &Path) -> Result<tonic::transport::Channel, Error> {
    let path = path.to_owned();
    let shown = path.display().to_string();
    // The URI is required by the API but unused: the connector dials the socket.
    tonic::transport::Endpoint::from_static("http://agent.local")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| Error::LocalApi(format!("cannot connect to the agent at {shown}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, group: Option<String>) -> LocalApiSettings {
        LocalApiSettings {
            enabled: true,
            socket: Some(dir.join("agent.sock")),
            group,
            mode: "0660".into(),
        }
    }

    #[tokio::test]
    async fn socket_gets_mode_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let gid = nix::unistd::getgid().as_raw();
        let socket = bind(&settings(dir.path(), Some(gid.to_string())), dir.path()).unwrap();
        let meta = std::fs::metadata(socket.path()).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
        // No staging name is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), None);
        let first = bind(&s, dir.path()).unwrap();
        // A live listener: refused.
        let err = bind(&s, dir.path()).unwrap_err().to_string();
        assert!(err.contains("another process"), "{err}");
        drop(first); // the file stays, nobody answers: stale.
        assert!(dir.path().join("agent.sock").exists());
        bind(&s, dir.path()).unwrap();
    }

    #[test]
    fn a_regular_file_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agent.sock"), b"keep").unwrap();
        let err = bind(&settings(dir.path(), None), dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("agent.sock")).unwrap(),
            b"keep"
        );
    }

    #[test]
    fn bad_mode_names_the_key() {
        let mut s = settings(Path::new("/tmp"), None);
        s.mode = "rw-rw----".into();
        assert!(s.mode_bits().unwrap_err().contains("local_api.mode"));
    }
}
