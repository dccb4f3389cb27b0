//! The end-to-end test harness: a throwaway PKI, services in-process on bound listeners, or
//! the whole system as real processes (`cms serve …`) on 127.0.0.1 with real certificates.
//!
//! Process tests need the workspace binaries (`cms`, `cmsctl`): `tests/run.sh` builds them
//! first; when iterating, run `cargo build --workspace --bins` before `cargo test -p cms-tests`.

pub mod cluster;
pub mod custody;
pub mod directory_process;
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

/// A base port for `cms up` / `cms demo --base-port` with the `count` ports after it free,
/// below the kernel's ephemeral range (32768-60999 here) and vpcd's ports (see
/// [`pcsc`]), so that no
/// outgoing connection or kernel-chosen listener of a parallel test takes one before the
/// services bind them. Each test process starts at its own offset, and a base handed out
/// once is never handed out again by the same process.
pub fn free_base_port(count: u16) -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    const LOW: u16 = 10_000;
    const HIGH: u16 = 20_000;
    let step = count.max(1).next_multiple_of(16);
    let slots = (HIGH - LOW) / step;
    let start = LOW + (std::process::id() % u32::from(slots)) as u16 * step;
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let candidates = (start..HIGH - step).step_by(step.into());
    for base in candidates.chain((LOW..start).step_by(step.into())) {
        if given.contains(&base) {
            continue;
        }
        let free = (0..count).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            given.push(base);
            return base;
        }
    }
    panic!("no {count} free ports in a row below {HIGH}");
}
