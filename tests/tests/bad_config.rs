//! A server binary with a bad config: one line naming the problem, a non-zero exit, no panic.

use std::net::SocketAddr;
use std::process::Command;

use cms_launcher::layout::{Layout, Peers, Ports};
use cms_tests::pki::{TRUST_DOMAIN, TestPki};

/// A valid template config under a fresh temp dir.
fn valid() -> (tempfile::TempDir, Layout, String) {
    let dir = tempfile::tempdir().unwrap();
    TestPki::new(dir.path());
    let layout = Layout::new(dir.path(), TRUST_DOMAIN).unwrap();
    layout.create_dirs().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let text = layout
        .service_config(
            "template",
            Ports {
                grpc: any,
                ops: any,
            },
            &Peers::default(),
            "",
        )
        .unwrap();
    (dir, layout, text)
}

/// Runs `cms-template --config <text>` (plus env) and returns its stderr, checking the exit
/// code and the shape of the message.
fn fails_with(layout: &Layout, text: &str, env: &[(&str, &str)]) -> String {
    let path = layout.config_path("template");
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(cms_tests::binary("cms-template"))
        .arg("--config")
        .arg(&path)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A config that should be refused but is not starts a server that never exits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the service started instead of refusing its config: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // Exactly one line: no timestamped log line before it, no multi-line report.
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("cms-template: error: "), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    stderr
}

/// `text` with `line` added at the start of section `[section]`.
fn with_line(text: &str, section: &str, line: &str) -> String {
    let header = format!("[{section}]\n");
    assert!(text.contains(&header), "no [{section}] in {text}");
    text.replacen(&header, &format!("{header}{line}\n"), 1)
}

#[test]
fn the_valid_config_starts() {
    // Guards the cases below: they fail for their own reason, not a broken base config.
    let (_dir, layout, text) = valid();
    let path = layout.config_path("template");
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(cms_tests::binary("cms-template"))
        .arg("--config")
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let announce = layout.announce_path("template");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while cms_kit::server::read_announce(&announce).is_none() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "valid config did not start"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "not serving after 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn unknown_key_is_named() {
    let (_dir, layout, text) = valid();
    let msg = fails_with(&layout, &format!("colour = \"blue\"\n{text}"), &[]);
    assert!(msg.contains("colour"), "{msg}");
}

#[test]
fn unknown_key_from_the_environment_is_named() {
    let (_dir, layout, text) = valid();
    let msg = fails_with(
        &layout,
        &text,
        &[("CMS_TEMPLATE__SERVER__LISTN", "127.0.0.1:1")],
    );
    assert!(msg.contains("listn"), "{msg}");
    assert!(
        msg.contains("environment variable CMS_TEMPLATE__SERVER__LISTN"),
        "{msg}"
    );
}

#[test]
fn toml_syntax_error_is_one_line_with_its_position() {
    let (_dir, layout, text) = valid();
    // The parser stops at the second value, column 11 of the inserted line.
    let text = with_line(&text, "server", "timeout = 3 3");
    let line = text
        .lines()
        .position(|l| l == "timeout = 3 3")
        .expect("inserted line")
        + 1;
    let msg = fails_with(&layout, &text, &[]);
    let path = layout.config_path("template").display().to_string();
    assert!(msg.contains(&format!("{path}:{line}:11: ")), "{msg}");
}

#[test]
fn bad_value_from_the_environment_names_the_variable() {
    let (_dir, layout, text) = valid();
    let msg = fails_with(
        &layout,
        &text,
        &[("CMS_TEMPLATE__SERVER__LISTEN", "not-an-address")],
    );
    assert!(
        msg.contains("environment variable CMS_TEMPLATE__SERVER__LISTEN")
            && msg.contains("server.listen"),
        "{msg}"
    );
}

#[test]
fn zero_handshake_cap_is_refused_by_name() {
    let (_dir, layout, text) = valid();
    let text = with_line(&text, "server", "max_concurrent_handshakes = 0");
    let msg = fails_with(&layout, &text, &[]);
    assert!(
        msg.contains("server.max_concurrent_handshakes") && msg.contains("0 is not allowed"),
        "{msg}"
    );
}

#[test]
fn zero_reload_interval_is_refused_by_name() {
    let (_dir, layout, text) = valid();
    let msg = fails_with(
        &layout,
        &with_line(&text, "tls", "reload_interval_ms = 0"),
        &[],
    );
    assert!(
        msg.contains("tls.reload_interval_ms") && msg.contains("0 is not allowed"),
        "{msg}"
    );
    // The same from the environment names the variable.
    let msg = fails_with(
        &layout,
        &text,
        &[("CMS_TEMPLATE__TLS__RELOAD_INTERVAL_MS", "0")],
    );
    assert!(
        msg.contains("environment variable CMS_TEMPLATE__TLS__RELOAD_INTERVAL_MS"),
        "{msg}"
    );
}

#[test]
fn missing_certificate_file_is_named() {
    let (dir, layout, text) = valid();
    let cert = dir.path().join("pki/template.pem").display().to_string();
    let text = text.replace(&cert, "/nonexistent/template.pem");
    let msg = fails_with(&layout, &text, &[]);
    assert!(
        msg.contains("tls.cert") && msg.contains("/nonexistent/template.pem"),
        "{msg}"
    );
}

#[test]
fn port_in_use_is_named() {
    let (_dir, layout, text) = valid();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let text = text.replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{addr}\""),
        1,
    );
    let msg = fails_with(&layout, &text, &[]);
    assert!(
        msg.contains("server.listen") && msg.contains(&addr.to_string()),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("in use"), "{msg}");
}

#[test]
fn unusable_data_dir_is_named() {
    let (dir, layout, text) = valid();
    // Root can read anything, so make the data dir a file: unusable for anyone.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let data_dir = dir.path().join("template").display().to_string();
    let text = text.replace(
        &format!("data_dir = \"{data_dir}\""),
        &format!("data_dir = \"{}\"", file.display()),
    );
    let msg = fails_with(&layout, &text, &[]);
    assert!(
        msg.contains("data_dir") && msg.contains("not a directory"),
        "{msg}"
    );
}

#[test]
fn missing_config_file_is_named() {
    let out = Command::new(cms_tests::binary("cms-template"))
        .args(["--config", "/nonexistent/template.toml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/template.toml"), "{stderr}");
}
