//! Custody administered the way an operator does it: `cmsctl` → gateway → custody, all real
//! processes over mTLS. Initialisation with shares, a key ceremony, sealing across a restart,
//! unsealing by two custodians, and the audit chain verified and then found broken.

use std::process::Output;

use cms_cardcrypto::{KeyAlgorithm, SecretKey};
use cms_tests::cluster::Cluster;
use cms_tests::custody::upper;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ctl(cluster: &Cluster, args: &[&str], input: &str) -> Output {
    tokio::task::block_in_place(|| cluster.cmsctl_with_input(args, input))
}

/// Custody with no dev seal file: it starts uninitialised and needs custodians.
fn without_dev_seal(name: &str, config: String) -> String {
    if name != "custody" {
        return config;
    }
    let mut out = String::new();
    let mut skip = false;
    for line in config.lines() {
        if line == "[seal]" {
            skip = true;
            continue;
        }
        if skip && line.starts_with('[') {
            skip = false;
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_initialise_unseal_and_verify_custody_with_cmsctl() {
    let mut cluster = Cluster::start_with(without_dev_seal).await;

    let out = ctl(&cluster, &["custody", "status"], "");
    assert!(text(&out).contains("uninitialised"), "{}", text(&out));
    assert_eq!(out.status.code(), Some(1));

    // Initialise: three shares, any two unseal.
    let out = ctl(
        &cluster,
        &["custody", "init", "--threshold", "2", "--shares", "3"],
        "",
    );
    assert!(out.status.success(), "{}", text(&out));
    let shares: Vec<(String, String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("share ")?;
            let (index, rest) = rest.split_once(": ")?;
            let (value, checksum) = rest.split_once("  checksum ")?;
            Some((index.to_owned(), value.to_owned(), checksum.to_owned()))
        })
        .collect();
    assert_eq!(shares.len(), 3, "{}", text(&out));

    // Key ceremony: two components, each confirmed by its KCV, then the whole key's KCV.
    let key = [
        0x40u8, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4A, 0x4B, 0x4C, 0x4D, 0x4E,
        0x4F,
    ];
    let first = [0x13u8; 16];
    let second: Vec<u8> = key.iter().zip(first).map(|(k, c)| k ^ c).collect();
    let kcv = |bytes: &[u8]| upper(&SecretKey::new(KeyAlgorithm::Aes128, bytes).unwrap().kcv());
    let wrong = format!("{}\n000000\n", upper(&first));
    let out = ctl(
        &cluster,
        &[
            "keys",
            "import",
            "--reference",
            "mk",
            "--algorithm",
            "aes-128",
        ],
        &wrong,
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("key check value"), "{}", text(&out));
    let ceremony = format!(
        "{}\n{}\n{}\n{}\n{}\n",
        upper(&first),
        kcv(&first),
        upper(&second),
        kcv(&second),
        kcv(&key)
    );
    let out = ctl(
        &cluster,
        &[
            "keys",
            "import",
            "--reference",
            "mk",
            "--algorithm",
            "aes-128",
        ],
        &ceremony,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("KCV {}", kcv(&key))),
        "{}",
        text(&out)
    );
    // The key material never shows up in what cmsctl prints.
    assert!(!text(&out).contains(&upper(&key)));

    let out = ctl(&cluster, &["audit", "export-head"], "");
    assert!(out.status.success(), "{}", text(&out));
    let head_file = cluster.dir.path().join("head.json");
    std::fs::write(&head_file, &out.stdout).unwrap();

    // A restart seals custody; two custodians unseal it.
    cluster.restart("custody").await;
    let out = ctl(&cluster, &["custody", "status"], "");
    assert!(
        text(&out).contains("seal state:   sealed"),
        "{}",
        text(&out)
    );
    let (i1, v1, c1) = &shares[2];
    let out = ctl(
        &cluster,
        &["custody", "unseal", "--index", i1],
        &format!("{v1}\n{c1}\n"),
    );
    assert!(text(&out).contains("1 of 2"), "{}", text(&out));
    let (i2, v2, c2) = &shares[0];
    let out = ctl(
        &cluster,
        &["custody", "unseal", "--index", i2],
        &format!("{v2}\n{c2}\n"),
    );
    assert!(text(&out).contains("custody is unsealed"), "{}", text(&out));
    let out = ctl(&cluster, &["keys", "list"], "");
    assert!(text(&out).contains(&kcv(&key)), "{}", text(&out));

    // The chain verifies, also against the exported head.
    let head_arg = head_file.display().to_string();
    let out = ctl(&cluster, &["audit", "verify", "--head", &head_arg], "");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("audit chain OK"), "{}", text(&out));

    // Someone edits the audit table behind custody's back.
    cluster
        .service("custody")
        .stop(std::time::Duration::from_secs(10))
        .await;
    let db_path = cluster.dir.path().join("custody/custody.sqlite3");
    let db = sea_orm::Database::connect(format!("sqlite://{}", db_path.display()))
        .await
        .unwrap();
    use sea_orm::ConnectionTrait;
    db.execute_unprepared("UPDATE audit_record SET reason = 'nothing to see' WHERE seq = 2")
        .await
        .unwrap();
    drop(db);
    cluster.restart("custody").await;
    let out = ctl(&cluster, &["audit", "verify", "--head", &head_arg], "");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("BROKEN at record 2"), "{}", text(&out));
}
