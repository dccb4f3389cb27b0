//! The helpdesk web console in a real browser: Debian's headless Chromium driven by
//! playwright-core (tests/browser/console.mjs) against the whole system as real processes.
//! Operator 1 (helpdesk) and operator 2 (approver, auditor) present their certificates as the
//! PKCS#12 files `cms up` writes; the scene is an offline unblock under dual control, with
//! the unblock tab driven by keyboard only and an axe-core scan of every page. Screenshots
//! and the axe reports stay in target/tmp/console-browser/.
//!
//! Needs `chromium`, `node` and `npm ci --prefix tests/browser` (tests/deps.sh and
//! tests/run.sh do both); nothing is downloaded while the test runs.

use std::path::{Path, PathBuf};
use std::process::Command;

mod console_common;

use console_common::groups;

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return path.into();
    }
    // Debian's /usr/bin/chromium is a wrapper script; the binary is beside it.
    ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no chromium: install Debian's chromium (tests/deps.sh does)"))
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_unblocks_offline_in_the_browser_with_a_second_approver() {
    let node_modules = browser_dir().join("node_modules");
    assert!(
        node_modules.join("playwright-core").exists() && node_modules.join("axe-core").exists(),
        "run `npm ci --prefix tests/browser` first (tests/run.sh does)"
    );
    let chromium = chromium();

    let desk = console_common::Desk::start(true).await;
    let cluster = &desk.cluster;
    let s = |k: &str| desk.code(k);

    // The browser files, as `cms up` writes them.
    let certs =
        cms_launcher::browser_cert::ensure_operator_files(&cluster.pki.dev).expect("PKCS#12 files");
    let p12 = |name: &str| {
        certs
            .iter()
            .find(|c| c.p12.ends_with(format!("operator-{name}.p12")))
            .unwrap_or_else(|| panic!("no PKCS#12 for {name}: {certs:?}"))
    };
    let (helpdesk, approver) = (p12("helpdesk1"), p12("approver1"));

    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-browser");
    let _ = std::fs::remove_dir_all(&out_dir);
    let url = format!("https://localhost:{}/", cluster.grpc("gateway").port());
    let output = tokio::task::spawn_blocking({
        let (helpdesk_p12, helpdesk_pw) = (helpdesk.p12.clone(), helpdesk.password.clone());
        let (approver_p12, approver_pw) = (approver.p12.clone(), approver.password.clone());
        let ca = cluster.pki.dev.ca_path();
        let out_dir = out_dir.clone();
        let codes = [
            ("CHALLENGE", groups(&s("challenge"))),
            ("CHALLENGE_CHECKSUM", s("challenge_checksum")),
            ("RESPONSE", groups(&s("response"))),
            ("RESPONSE_CHECKSUM", s("response_checksum")),
        ];
        move || {
            Command::new("node")
                .arg(browser_dir().join("console.mjs"))
                .current_dir(browser_dir())
                // The proxy that presents the client certificate checks the gateway's
                // certificate against the dev CA.
                .env("NODE_EXTRA_CA_CERTS", ca)
                .env("CHROMIUM", chromium)
                .env("CONSOLE_URL", url)
                .env("OUT_DIR", out_dir)
                .env("HELPDESK_P12", helpdesk_p12)
                .env("HELPDESK_P12_PASSWORD", helpdesk_pw)
                .env("APPROVER_P12", approver_p12)
                .env("APPROVER_P12_PASSWORD", approver_pw)
                .env("USER_QUERY", "alice")
                .env("USER_DISPLAY_NAME", "Alice Vector")
                .env("CARD_SERIAL", "SER-VECTOR")
                .envs(codes)
                .output()
                .expect("node (Debian's nodejs) runs")
        }
    })
    .await
    .expect("browser run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "browser scene failed ({}):\n{stdout}\n{stderr}\nscreenshots in {}",
        output.status,
        out_dir.display()
    );
    for artifact in [
        "unblock.png",
        "unblock-200-percent.png",
        "audit.png",
        "axe-unblock.json",
    ] {
        assert!(out_dir.join(artifact).exists(), "{artifact} was not kept");
    }
    desk.cluster.stop().await;
}
