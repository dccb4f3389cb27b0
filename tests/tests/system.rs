//! The whole system as real processes talking gRPC over mTLS on 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cms_tests::cluster::Cluster;

/// Runs `cmsctl status` until it exits 0 (the agent links a moment after it is ready).
fn status_until_all_serving(run: impl Fn() -> std::process::Output) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = run();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "cmsctl status never reported everything serving:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_all_serving(table: &str, trust_domain: &str) {
    for name in ["gateway", "template", "directory", "custody", "agent"] {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} line in:\n{table}"));
        assert!(line.contains("SERVING"), "{line}");
        assert!(
            line.contains(&format!("spiffe://{trust_domain}/cms/{name}")),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_processes_serve_and_cmsctl_reports_each_identity() {
    let cluster = Cluster::start(|_| String::new()).await;
    let table =
        tokio::task::block_in_place(|| status_until_all_serving(|| cluster.cmsctl(&["status"])));
    assert_all_serving(&table, "cms.test");
    assert!(
        table.contains("as spiffe://cms.test/cms/operator/admin"),
        "{table}"
    );

    // Every service stops cleanly on SIGTERM.
    for (name, status) in cluster.stop().await {
        let status = status.unwrap_or_else(|| panic!("{name} did not stop"));
        assert!(status.success(), "{name} exited with {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmsctl_status_fails_when_a_backend_is_down() {
    let mut cluster = Cluster::start(|_| String::new()).await;
    tokio::task::block_in_place(|| status_until_all_serving(|| cluster.cmsctl(&["status"])));
    cluster
        .service("directory")
        .stop(Duration::from_secs(10))
        .await;
    let out = cluster.cmsctl(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with("directory "))
        .expect("directory line");
    assert!(line.contains("UNREACHABLE"), "{line}");
    // The others are unaffected.
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("custody ") && l.contains("SERVING")),
        "{table}"
    );
}

/// `cms up` on a data dir, with ports from a per-process range (the launcher's ports are
/// fixed by design; the pid keeps parallel runs apart).
fn cms_up(data: &std::path::Path) -> Child {
    let base = cms_tests::free_base_port(20);
    Command::new(cms_tests::binary("cms"))
        .args(["up", "--trust-domain", "cms.test", "--base-port"])
        .arg(base.to_string())
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cms up")
}

/// Reads `cms up`'s stdout until it says it is up.
fn wait_up(child: &mut Child) -> String {
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.expect("read");
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("Ctrl-C stops everything") {
            // Keep draining so the launcher never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return seen;
        }
    }
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err);
    panic!("cms up ended before it was up:\n{seen}\n{err}");
}

fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, signal).expect("signal");
}

/// PIDs of the `cms serve` children of this data dir.
fn children(data: &std::path::Path) -> Vec<i32> {
    let needle = data.join("config").display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(" serve ") && cmdline.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn cms_up_starts_reuses_data_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cms-data");
    let cmsctl = |args: &[&str]| {
        Command::new(cms_tests::binary("cmsctl"))
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .output()
            .expect("cmsctl")
    };

    // First run: creates the PKI, starts all five, prints each address.
    let mut up = cms_up(&data);
    let banner = wait_up(&mut up);
    for name in ["template", "directory", "custody", "gateway", "agent"] {
        assert!(
            banner.contains(&format!("spiffe://cms.test/cms/{name}")),
            "{banner}"
        );
    }
    assert_all_serving(
        &status_until_all_serving(|| cmsctl(&["status"])),
        "cms.test",
    );
    assert_eq!(children(&data).len(), 5);
    let ca = std::fs::read(data.join("pki/ca.pem")).unwrap();
    // The console's address and the dev operator's PKCS#12 file for a browser, with its
    // password.
    assert!(
        banner.contains("Helpdesk console: https://localhost:"),
        "{banner}"
    );
    let password = std::fs::read_to_string(data.join("pki/operator-admin.p12.password")).unwrap();
    assert!(data.join("pki/operator-admin.p12").is_file());
    assert!(
        banner.contains(&format!("(password {}", password.trim())),
        "{banner}"
    );

    // SIGTERM stops everything cleanly.
    signal(&up, nix::sys::signal::Signal::SIGTERM);
    let status = up.wait().unwrap();
    assert!(status.success(), "cms up exited with {status}");
    assert!(children(&data).is_empty(), "children left behind");

    // Second run: reuses the data (same CA); a service that dies is restarted (see
    // launcher_restart.rs).
    let mut up = cms_up(&data);
    let banner = wait_up(&mut up);
    assert_eq!(
        std::fs::read(data.join("pki/ca.pem")).unwrap(),
        ca,
        "PKI was recreated"
    );
    assert!(
        banner.contains(&format!("(password {}", password.trim())),
        "the browser file's password changed: {banner}"
    );
    assert!(data.join("custody/custody.sqlite3").is_file());
    assert_all_serving(
        &status_until_all_serving(|| cmsctl(&["status"])),
        "cms.test",
    );
    signal(&up, nix::sys::signal::Signal::SIGTERM);
    let status = up.wait().unwrap();
    assert!(status.success(), "cms up exited with {status}");
    assert!(children(&data).is_empty(), "children left behind");
}
