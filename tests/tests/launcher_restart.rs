//! `cms up` restarts a service that dies, says so, and the system serves again; the dev
//! operator's account it created lets cmsctl administer custody.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// `cms up` on `data`, on ports that are free.
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

/// Every stdout line of `child`, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line starting with `prefix`; returns it and everything seen.
fn wait_line(lines: &mpsc::Receiver<String>, prefix: &str, within: Duration) -> (String, String) {
    let deadline = Instant::now() + within;
    let mut seen = String::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.starts_with(prefix) {
                    return (line, seen);
                }
            }
            Err(_) => break,
        }
    }
    panic!("no line starting with {prefix:?} within {within:?}; seen:\n{seen}");
}

/// PID of the `cms serve <service>` child of this data dir.
fn pid_of(data: &std::path::Path, service: &str) -> Option<i32> {
    let needle = data.join("config").join(format!("{service}.toml"));
    let needle = needle.display().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains(" serve ") && cmdline.contains(&needle)).then_some(pid)
        })
}

fn cmsctl(data: &std::path::Path, args: &[&str]) -> Output {
    Command::new(cms_tests::binary("cmsctl"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .expect("cmsctl")
}

/// Runs `cmsctl <args>` until it exits 0.
fn until_ok(data: &std::path::Path, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cmsctl(data, args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "cmsctl {args:?} kept failing:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn cms_up_restarts_a_killed_service_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cms-data");
    let mut up = cms_up(&data);
    let lines = lines_of(&mut up);
    let (_, banner) = wait_line(&lines, "Ctrl-C stops everything", Duration::from_secs(120));
    assert!(
        banner.contains("created the operator account \"admin\" (roles admin, template-admin)"),
        "{banner}"
    );
    until_ok(&data, &["status"]);
    // The dev operator's account lets it administer custody.
    until_ok(
        &data,
        &[
            "keys",
            "generate",
            "--reference",
            "mk",
            "--algorithm",
            "aes-128",
        ],
    );

    for service in ["custody", "directory"] {
        let old = pid_of(&data, service).expect("service pid");
        kill(Pid::from_raw(old), Signal::SIGKILL).unwrap();
        let (line, _) = wait_line(
            &lines,
            &format!("{service} stopped unexpectedly"),
            Duration::from_secs(10),
        );
        assert!(line.contains("restarting it in 1 s"), "{line}");
        let (line, _) = wait_line(
            &lines,
            &format!("{service} restarted (pid "),
            Duration::from_secs(60),
        );
        let new = pid_of(&data, service).expect("restarted pid");
        assert_ne!(new, old, "{line}");
        assert!(line.contains(&format!("(pid {new})")), "{line}");
        // Serving again: status through the gateway, and custody's keys are still there.
        until_ok(&data, &["status"]);
        let keys = until_ok(&data, &["keys", "list"]);
        assert!(keys.contains("mk "), "{keys}");
    }

    kill(Pid::from_raw(up.id() as i32), Signal::SIGTERM).unwrap();
    let status = up.wait().unwrap();
    assert!(status.success(), "cms up exited with {status}");
    for service in ["template", "directory", "custody", "gateway", "agent"] {
        assert_eq!(pid_of(&data, service), None, "{service} left behind");
    }
}
