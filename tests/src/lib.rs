//! The end-to-end test harness: a throwaway PKI, services in-process on bound listeners, or
//! the whole system as real processes (`cms serve …`) on 127.0.0.1 with real certificates.
//!
//! Process tests need the workspace binaries (`cms`, `cmsctl`): `tests/run.sh` builds them
//! first; when iterating, run `cargo build --workspace --bins` before `cargo test -p cms-tests`.

pub mod cluster;
pub mod custody;
pub mod inproc;
pub mod ldap;
pub mod pcsc;
pub mod pki;
pub mod postgres;
pub mod scale;
pub mod softhsm;

use std::path::PathBuf;

/// Path of a workspace binary: in `CMS_BIN_DIR` when set (for example `target/release`, to
/// benchmark release binaries from a debug test build; a relative path is taken from the
/// workspace root, since cargo runs tests and benches in the package's directory), else
/// beside the test executable.
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("CMS_BIN_DIR") {
        Some(dir) => std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(dir),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            // target/<profile>/deps/<test> -> target/<profile>/<name>
            exe.parent()
                .and_then(|deps| deps.parent())
                .expect("target directory")
                .to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins; tests/run.sh does)",
        path.display()
    );
    path
}
