//! APDU round trip through pcscd + vpcd to the virtual card, and the card side of an offline
//! unblock, as a table of medians and 99th percentiles.
//!
//! ```text
//! cargo build -p cms-vcard --release
//! CMS_VCARD_BIN=target/release/cms-vcard \
//!     cargo bench -p cms-tests --bench vcard_roundtrip --profile dev
//! ```
//! (`--profile dev` spares a release build of the whole test crate; the client's own work is a
//! few microseconds either way.) Needs root, pcscd and vsmartcard-vpcd, like the card tests.
//! `CMS_BENCH_ROUNDS` sets the number of round trips (default 2000; the unblock runs a tenth).
//!
//! The benchmark starts its own pcscd and two cards, then runs itself again as the PC/SC client
//! with `PCSCLITE_CSOCK_NAME` pointing at that pcscd (libpcsclite reads it at start, and the
//! variable cannot be set safely in a running multi-threaded process).

use std::ffi::CString;
use std::time::{Duration, Instant};

use cms_cardcrypto::{KeyAlgorithm, SecretKey, response};
use cms_tests::pcsc::{Pcscd, new_card, text};

const CLIENT_ENV: &str = "CMS_BENCH_CLIENT";
/// gp-emv admin key of shared/vectors (master key 4041…4F, card id 00010203040506070809).
const MINIDRIVER_KEY: &str = "0EF59FCBF8019B62E62AF6EA20B8BF250EF59FCBF8019B62";

fn main() {
    if std::env::var_os(CLIENT_ENV).is_some() {
        client();
    } else {
        parent();
    }
}

fn parent() {
    let pcscd = std::sync::Arc::new(Pcscd::start());
    let dir = tempfile::tempdir().expect("temp dir");
    let piv = dir.path().join("piv.toml");
    new_card(&piv, &["--profile", "piv"]);
    let minidriver = dir.path().join("minidriver.toml");
    new_card(
        &minidriver,
        &[
            "--profile",
            "minidriver",
            "--card-id",
            "00000000000000010203040506070809",
            "--admin-key",
            MINIDRIVER_KEY,
            "--algorithm",
            "3des-3key",
        ],
    );
    let piv_card = pcscd.insert(&piv);
    let minidriver_card = pcscd.insert(&minidriver);
    let out = pcscd
        .client(std::env::current_exe().expect("own path"))
        .env(CLIENT_ENV, "1")
        .env("CMS_BENCH_PIV_READER", piv_card.reader())
        .env("CMS_BENCH_MD_READER", minidriver_card.reader())
        .output()
        .expect("run the client");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "client failed: {}", text(&out));
}

struct Stats {
    median: Duration,
    p99: Duration,
    mean: Duration,
    max: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let total: Duration = samples.iter().sum();
    Stats {
        median: at(0.5),
        p99: at(0.99),
        mean: total / samples.len() as u32,
        max: *samples.last().expect("samples"),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn connect(ctx: &pcsc::Context, env: &str) -> pcsc::Card {
    let reader = CString::new(std::env::var(env).expect("reader name")).expect("reader");
    ctx.connect(&reader, pcsc::ShareMode::Shared, pcsc::Protocols::ANY)
        .expect("connect to the card")
}

fn transmit(card: &pcsc::Card, apdu: &[u8]) -> Vec<u8> {
    let mut buffer = [0u8; pcsc::MAX_BUFFER_SIZE];
    card.transmit(apdu, &mut buffer).expect("transmit").to_vec()
}

fn sw(answer: &[u8]) -> u16 {
    u16::from_be_bytes([answer[answer.len() - 2], answer[answer.len() - 1]])
}

fn client() {
    let rounds: usize = std::env::var("CMS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let ctx = pcsc::Context::establish(pcsc::Scope::User).expect("pcscd");
    let mut rows = Vec::new();

    // PIV: GET VERSION (no data) and VERIFY status (the card's PIN path), one APDU each.
    let piv = connect(&ctx, "CMS_BENCH_PIV_READER");
    assert_eq!(
        sw(&transmit(
            &piv,
            &[0x00, 0xA4, 0x04, 0x00, 0x05, 0xA0, 0x00, 0x00, 0x03, 0x08]
        )),
        0x9000
    );
    for (name, apdu) in [
        ("GET VERSION (PIV)", &[0x00, 0xFD, 0x00, 0x00, 0x00][..]),
        ("VERIFY, status only (PIV)", &[0x00, 0x20, 0x00, 0x80][..]),
    ] {
        for _ in 0..rounds / 20 {
            transmit(&piv, apdu);
        }
        let samples = (0..rounds)
            .map(|_| {
                let start = Instant::now();
                let answer = transmit(&piv, apdu);
                let elapsed = start.elapsed();
                assert!(
                    matches!(sw(&answer), 0x9000 | 0x63C3),
                    "{:04X}",
                    sw(&answer)
                );
                elapsed
            })
            .collect();
        rows.push((name.to_owned(), rounds, stats(samples)));
    }

    // Minidriver: offline unblock at the card, from the typed response to the PIN reset
    // (EXTERNAL AUTHENTICATE + RESET RETRY COUNTER, each writing the card file), in one
    // exclusive transaction after GET CHALLENGE.
    let mut md = connect(&ctx, "CMS_BENCH_MD_READER");
    let key_bytes = cms_cardcrypto::parse_hex(MINIDRIVER_KEY, &[24]).expect("key");
    let key = SecretKey::new(KeyAlgorithm::Tdes3Key, &key_bytes).expect("key");
    let unblocks = (rounds / 10).max(10);
    let mut samples = Vec::with_capacity(unblocks);
    for _ in 0..unblocks {
        let tx = md.transaction().expect("transaction");
        let challenge = transmit(&tx, &[0x00, 0x84, 0x00, 0x00, 0x08]);
        assert_eq!(sw(&challenge), 0x9000);
        let answer = response(&key, &challenge[..8]).expect("response");
        let mut external = vec![0x00, 0x82, 0x00, 0x01, 0x08];
        external.extend_from_slice(&answer);
        let reset = [
            0x00, 0x2C, 0x02, 0x80, 0x06, b'2', b'4', b'6', b'8', b'1', b'3',
        ];
        let start = Instant::now();
        assert_eq!(sw(&transmit(&tx, &external)), 0x9000);
        assert_eq!(sw(&transmit(&tx, &reset)), 0x9000);
        samples.push(start.elapsed());
        if tx.end(pcsc::Disposition::LeaveCard).is_err() {
            panic!("end transaction");
        }
    }
    rows.push((
        "unblock at the card: EXT AUTH + RESET RETRY COUNTER".to_owned(),
        unblocks,
        stats(samples),
    ));

    println!("| what | rounds | median ms | p99 ms | mean ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for (name, n, s) in rows {
        println!(
            "| {name} | {n} | {} | {} | {} | {} |",
            ms(s.median),
            ms(s.p99),
            ms(s.mean),
            ms(s.max)
        );
    }
}
