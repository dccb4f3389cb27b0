//! The System Owner token through the gateway: `cmsctl custody so-init` shows the unblock key
//! once in the house format (groups of 4, CRC-16 checksum) and as M-of-N shares;
//! `cmsctl custody so-info` reads its metadata. Real processes over mTLS.

use std::process::Output;

use cms_cardcrypto::{KeyAlgorithm, SecretKey};
use cms_kit::pki::LeafSpec;
use cms_proto::directory::v1::{CreateOperatorRequest, Operator};
use cms_tests::cluster::Cluster;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ctl(cluster: &Cluster, args: &[&str]) -> Output {
    tokio::task::block_in_place(|| cluster.cmsctl(args))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn so_init_shows_the_unblock_key_once_and_so_info_reads_its_metadata() {
    let cluster = Cluster::start(|_| String::new()).await;

    // Before initialisation: a clear NOT_FOUND, not UNIMPLEMENTED.
    let out = ctl(&cluster, &["custody", "so-info"]);
    // 4: not found (cmsctl --help lists the exit codes).
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains(": not found: "), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1,
        "{}",
        text(&out)
    );

    // An operator without the key-custodian or admin role cannot create it.
    let mut directory =
        cms_launcher::bootstrap::directory_client(&cluster.layout, cluster.grpc("directory"))
            .unwrap();
    directory
        .create_operator(CreateOperatorRequest {
            operator: Some(Operator {
                username: "helpdesk3".into(),
                roles: vec!["helpdesk".into()],
                ..Default::default()
            }),
            auth: None,
        })
        .await
        .unwrap();
    let helpdesk = cluster.pki.issue(
        "operator-helpdesk3",
        &LeafSpec::new(cluster.pki.id("operator/helpdesk3"), 30),
    );
    let (cert, key) = (
        helpdesk.cert.display().to_string(),
        helpdesk.key.display().to_string(),
    );
    let out = ctl(
        &cluster,
        &[
            "--cert",
            &cert,
            "--key",
            &key,
            "custody",
            "so-init",
            "--algorithm",
            "aes-128",
        ],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("permission denied"), "{}", text(&out));

    // The admin creates it: key in groups of 4 with its checksum, and 3 shares (any 2).
    let out = ctl(
        &cluster,
        &[
            "custody",
            "so-init",
            "--algorithm",
            "aes-128",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--card-id",
            "0102030405060708",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("unblock key: "))
        .unwrap_or_else(|| panic!("no key line in:\n{stdout}"));
    let (groups, checksum) = line.split_once("  checksum ").expect("checksum");
    assert_eq!(groups.split(' ').count(), 8, "{groups}");
    assert!(
        groups.split(' ').all(|g| g.len() == 4
            && g.chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())),
        "{groups}"
    );
    let key = cms_cardcrypto::parse_with_checksum(groups, checksum, &[16]).expect("checksum");
    let kcv =
        data_encoding::HEXUPPER.encode(&SecretKey::new(KeyAlgorithm::Aes128, &key).unwrap().kcv());
    assert!(stdout.contains(&format!("KCV {kcv}")), "{stdout}");
    let shares = stdout.lines().filter(|l| l.starts_with("share ")).count();
    assert_eq!(shares, 3, "{stdout}");

    // One per installation.
    let out = ctl(&cluster, &["custody", "so-init", "--algorithm", "aes-128"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1,
        "{}",
        text(&out)
    );

    // Its metadata, never the key.
    let out = ctl(&cluster, &["custody", "so-info"]);
    assert!(out.status.success(), "{}", text(&out));
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains(&format!("KCV:        {kcv}")), "{info}");
    assert!(info.contains("AES_128"), "{info}");
    assert!(
        info.contains("shares:     3 (any 2 rebuild the key)"),
        "{info}"
    );
    assert!(info.contains("card id:    0102030405060708"), "{info}");
    assert!(!info.contains(groups), "{info}");
}
