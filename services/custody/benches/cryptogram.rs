//! `cargo bench -p cms-custody --bench cryptogram`
//!
//! One run, one table: a baseline (gRPC health check, a no-op handler behind the same mTLS
//! acceptor and layers every service uses) and the cryptogram RPC with its durable audit
//! (SQLite WAL synced before each answer, group commit), at 1, 16, 64 and 256 requests in flight
//! spread over 4 connections. Requests/s, p50, p99 and the ratio to the baseline at the same
//! concurrency. The rows of one level are measured in interleaved slices (baseline, soft,
//! pkcs11, baseline, soft, ... [`ROUNDS`] times), so that a change in the machine's load
//! (other work on a shared machine) falls on all of them alike; the figures are over all
//! slices, and the last column gives the ratio of each round on its own. Client and servers share this machine's cores, as in the e2e tests, but run
//! on runtimes of their own (threads `bench-client` and `bench-server`, custody's own audit
//! threads besides), so a profile tells their costs apart.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cms_kit::client::{Channel, UpstreamSettings};
use cms_kit::pki::DevPki;
use cms_kit::server::{Listeners, Server};
use cms_kit::shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::common::v1::{ActorKind, AuthContext, DiversificationScheme, KeyAlgorithm};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::{ComputeCryptogramRequest, GenerateMasterKeyRequest};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const CONNECTIONS: usize = 4;
const LEVELS: [usize; 4] = [1, 16, 64, 256];

/// The levels to run: all of [`LEVELS`], or those listed in CUSTODY_BENCH_LEVELS (e.g. "64",
/// to profile one row).
fn levels() -> Vec<usize> {
    match std::env::var("CUSTODY_BENCH_LEVELS") {
        Ok(list) => list
            .split(',')
            .filter_map(|l| l.trim().parse().ok())
            .collect(),
        Err(_) => LEVELS.to_vec(),
    }
}
/// Slices per row and level, interleaved with the other rows': [`ROUNDS`], or
/// CUSTODY_BENCH_ROUNDS (more rounds, steadier figures on a noisy machine).
fn rounds() -> usize {
    std::env::var("CUSTODY_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(ROUNDS)
}
const ROUNDS: usize = 3;
/// Measured time per slice, after its warm-up.
const SLICE: Duration = Duration::from_secs(1);
const WARMUP: Duration = Duration::from_millis(300);

/// What one slice saw.
#[derive(Default)]
struct Slice {
    latencies: Vec<Duration>,
    errors: u64,
    /// CPU ticks by thread group over the measured time (see [`cpu_ticks`]).
    ticks: [u64; 4],
}

impl Slice {
    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / SLICE.as_secs_f64()
    }
}

#[derive(Clone)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// CPU time per answered request, µs, by thread group (see [`cpu_ticks`]).
    cpu_us: Vec<(&'static str, f64)>,
}

/// This process's CPU time so far, in clock ticks, by thread group: the load generator, the
/// servers' runtime, custody's own threads (audit writer, WAL checkpoints), and the worker
/// threads of SQLite pool connections (sqlx).
fn cpu_ticks() -> [(&'static str, u64); 4] {
    let mut groups = [("client", 0), ("server", 0), ("audit", 0), ("sqlite", 0)];
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return groups;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... utime stime: fields 14 and 15, counted after the comm.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = fields
            .get(11)
            .and_then(|u| u.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
        let group = if comm.starts_with("bench-client") {
            0
        } else if comm.starts_with("bench-server") {
            1
        } else if comm.starts_with("custody-") {
            2
        } else if comm.starts_with("sqlx-sqlite") {
            3
        } else {
            continue;
        };
        groups[group].1 += ticks;
    }
    groups
}

fn channels(pki: &DevPki, addr: std::net::SocketAddr, server: &str) -> Vec<Channel> {
    let tls = TlsSource::load(pki.tls_settings("gateway")).expect("client TLS");
    (0..CONNECTIONS)
        .map(|_| {
            cms_kit::client::channel(
                &UpstreamSettings {
                    address: addr.to_string(),
                    identity: pki.spiffe_id(server).expect("id"),
                    connect_timeout_ms: 3_000,
                },
                tls.clone(),
            )
            .expect("channel")
        })
        .collect()
}

/// Runs `in_flight` loops for SLICE (after WARMUP), each sending one request at a time.
async fn measure<F, Fut>(in_flight: usize, call: F) -> Slice
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let measure_from = start + WARMUP;
    let end = measure_from + SLICE;
    let mut tasks = Vec::new();
    for worker in 0..in_flight {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut n = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                n += 1;
                let ok = call(worker, n).await;
                if sent >= measure_from {
                    if ok {
                        latencies.push(sent.elapsed());
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep_until((measure_from).into()).await;
    let cpu_before = cpu_ticks();
    tokio::time::sleep_until(end.into()).await;
    let cpu_after = cpu_ticks();
    let mut slice = Slice::default();
    for t in tasks {
        let (l, e) = t.await.expect("worker");
        slice.latencies.extend(l);
        slice.errors += e;
    }
    for (i, ((_, before), (_, after))) in cpu_before.iter().zip(cpu_after).enumerate() {
        slice.ticks[i] = after - before;
    }
    slice
}

/// One row's figures over all its slices.
fn figures(slices: &[Slice]) -> Figures {
    let mut all: Vec<Duration> = slices
        .iter()
        .flat_map(|s| s.latencies.iter().copied())
        .collect();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    // Linux reports utime and stime in USER_HZ ticks: 100 per second.
    let tick_us = 10_000.0;
    let names = cpu_ticks().map(|(name, _)| name);
    let cpu_us = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let ticks: u64 = slices.iter().map(|s| s.ticks[i]).sum();
            (*name, ticks as f64 * tick_us / all.len().max(1) as f64)
        })
        .collect();
    Figures {
        cpu_us,
        rps: all.len() as f64 / (SLICE.as_secs_f64() * slices.len().max(1) as f64),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors: slices.iter().map(|s| s.errors).sum(),
    }
}

/// Each round's ratio of `row` to `base`, e.g. "0.71 / 0.78 / 0.74".
fn round_ratios(row: &[Slice], base: &[Slice]) -> String {
    row.iter()
        .zip(base)
        .map(|(r, b)| format!("{:.2}", r.rps() / b.rps()))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn custody_config(dir: &Path, pki: &DevPki) -> cms_custody::Config {
    let tls = pki.tls_settings("custody");
    let text = format!(
        r#"data_dir = "{data}"
[server]
listen = "127.0.0.1:0"
ops_listen = "127.0.0.1:0"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[access]
allow = ["{gateway}"]
[seal]
dev_seal_file = "{data}/dev-seal.key"
[[callers]]
identity = "{gateway}"
key_references = ["*"]
admin = true
[guards]
caller_rate_per_sec = 1000000.0
caller_burst = 1000000
max_outstanding = 4096
[telemetry]
log = "warn"
"#,
        data = dir.join("custody").display(),
        ca = tls.ca.display(),
        cert = tls.cert.display(),
        key = tls.key.display(),
        gateway = pki.spiffe_id("gateway").expect("id"),
    );
    cms_kit::config::from_toml(&text).expect("custody config")
}

/// A throwaway SoftHSM2 token for the pkcs11 rows: its own token dir and `softhsm2.conf`
/// in a temp dir, one token made with `softhsm2-util`, the user PIN in a mode-0600 file.
struct SoftHsm {
    _dir: tempfile::TempDir,
    conf: std::path::PathBuf,
    keystore: cms_custody::KeystoreSettings,
}

fn softhsm() -> Result<SoftHsm, String> {
    let module = std::env::var_os("CMS_BENCH_SOFTHSM_MODULE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/lib/softhsm/libsofthsm2.so".into());
    if !module.is_file() {
        return Err(format!("{} is missing", module.display()));
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| e.to_string())?;
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let secret = || {
        let mut bytes = [0u8; 8];
        cms_custody::wrap::random(&mut bytes).expect("random");
        data_encoding::HEXLOWER.encode(&bytes)
    };
    let (pin, so_pin) = (secret(), secret());
    let out = std::process::Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            &pin,
            "--so-pin",
            &so_pin,
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .map_err(|e| format!("softhsm2-util: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let pin_file = dir.path().join("bench.pin");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pin_file)
            .map_err(|e| e.to_string())?;
        file.write_all(pin.as_bytes()).map_err(|e| e.to_string())?;
    }
    Ok(SoftHsm {
        _dir: dir,
        conf,
        keystore: cms_custody::KeystoreSettings {
            backend: cms_custody::KeystoreBackend::Pkcs11,
            module: Some(module),
            token_label: Some("bench".into()),
            pin_file: Some(pin_file),
            ..Default::default()
        },
    })
}

fn main() {
    let hsm = softhsm();
    if let Ok(hsm) = &hsm {
        // SAFETY: FFI edge: SoftHSM2 (C) finds its config only through SOFTHSM2_CONF, read
        // with getenv when custody loads the module. This runs before the runtimes exist, while
        // the process has a single thread, so nothing reads the environment concurrently.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("SOFTHSM2_CONF", &hsm.conf);
        }
    }
    cms_kit::tls::install_crypto_provider();
    // The servers and the load generator each get a runtime (and worker threads) of their
    // own, as the gateway and custody are separate processes in production: in one runtime
    // the client's tasks queue in front of the servers' and their wake-ups cross. Every row,
    // baseline included, is measured this same way.
    let servers = runtime("bench-server");
    let clients = runtime("bench-client");
    let dir = tempfile::tempdir().expect("temp dir");
    let started = servers.block_on(start_servers(dir.path(), hsm));
    clients.block_on(bench(&started));
    started.trigger.trigger();
    // Let the servers see the shutdown before their runtime goes.
    std::thread::sleep(Duration::from_millis(200));
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

/// What the load generator needs to reach the servers.
struct Started {
    pki: DevPki,
    echo: std::net::SocketAddr,
    soft: std::net::SocketAddr,
    /// The pkcs11 custody, or why there is none.
    pkcs11: Result<std::net::SocketAddr, String>,
    trigger: shutdown::Trigger,
    _hsm: Option<SoftHsm>,
}

/// Starts the baseline server, custody (soft) and custody (pkcs11, when SoftHSM2 is usable).
async fn start_servers(dir: &Path, hsm: Result<SoftHsm, String>) -> Started {
    let pki = DevPki::new(dir.join("pki"), "cms.bench");
    pki.init().expect("pki");

    // Baseline: health checks against a server with no API of its own.
    let (trigger, stop) = shutdown::channel();
    let echo_listeners = Listeners::loopback().await.expect("bind");
    let echo = echo_listeners.grpc.local_addr().expect("addr");
    let echo_server = Server::new(
        "echo",
        custody_config(dir, &pki).server,
        Default::default(),
        TlsSource::load(pki.tls_settings("custody")).expect("tls"),
    )
    .with_version("bench");
    tokio::spawn(echo_server.serve(echo_listeners, stop.clone()));

    // Custody with a durable audit in an SQLite file.
    let soft_listeners = Listeners::loopback().await.expect("bind");
    let soft = soft_listeners.grpc.local_addr().expect("addr");
    tokio::spawn(cms_custody::run(
        custody_config(dir, &pki),
        soft_listeners,
        stop.clone(),
    ));

    // The same on the pkcs11 backend (SoftHSM2), with its own data dir.
    let pkcs11 = match &hsm {
        Ok(hsm) => {
            let dir = dir.join("pkcs11");
            std::fs::create_dir_all(dir.join("custody")).expect("data dir");
            let mut config = custody_config(&dir, &pki);
            config.keystore = hsm.keystore.clone();
            let listeners = Listeners::loopback().await.expect("bind");
            let addr = listeners.grpc.local_addr().expect("addr");
            let stop = stop.clone();
            tokio::spawn(async move {
                if let Err(e) = cms_custody::run(config, listeners, stop).await {
                    eprintln!("pkcs11 custody stopped: {e}");
                }
            });
            Ok(addr)
        }
        Err(why) => Err(why.clone()),
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    Started {
        pki,
        echo,
        soft,
        pkcs11,
        trigger,
        _hsm: hsm.ok(),
    }
}

/// A master key "bench" made by (or, on pkcs11, inside) the custody behind `channel`.
async fn generate_key(channel: &Channel) -> u32 {
    CustodyServiceClient::new(channel.clone())
        .generate_master_key(GenerateMasterKeyRequest {
            reference: "bench".into(),
            algorithm: KeyAlgorithm::Aes128 as i32,
            ..Default::default()
        })
        .await
        .expect("generate key")
        .into_inner()
        .key
        .expect("key")
        .version
}

/// `in_flight` loops of cryptogram requests against `channels`, each for a fresh card
/// (`prefix` keeps card ids unique across rows: the per-card limit is not measured here).
async fn cryptograms(
    channels: &Arc<Vec<Channel>>,
    version: u32,
    prefix: String,
    in_flight: usize,
) -> Slice {
    let channels = channels.clone();
    measure(in_flight, move |worker, n| {
        let mut client = CustodyServiceClient::new(channels[worker % CONNECTIONS].clone());
        let card = format!("{prefix}-w{worker}-n{n}").into_bytes();
        let mut challenge = [0u8; 16];
        challenge[..8].copy_from_slice(&n.to_be_bytes());
        let request = ComputeCryptogramRequest {
            card_id: card,
            challenge: challenge.to_vec(),
            master_key_reference: "bench".into(),
            master_key_version: version,
            scheme: DiversificationScheme::Sp800108Cmac as i32,
            admin_key_algorithm: KeyAlgorithm::Aes128 as i32,
            auth: Some(AuthContext {
                actor_kind: ActorKind::Service as i32,
                request_id: format!("bench-{worker}-{n}"),
                ..Default::default()
            }),
            challenge_code: None,
        };
        async move { client.compute_cryptogram(request).await.is_ok() }
    })
    .await
}

async fn bench(started: &Started) {
    let pki = &started.pki;
    let echo = Arc::new(channels(pki, started.echo, "custody"));
    let soft = Arc::new(channels(pki, started.soft, "custody"));
    let soft_version = generate_key(&soft[0]).await;
    let pkcs11 = match started.pkcs11 {
        Ok(addr) => {
            let channels = Arc::new(channels(pki, addr, "custody"));
            let version = generate_key(&channels[0]).await;
            Some((channels, version))
        }
        Err(_) => None,
    };

    println!(
        "custody cryptogram benchmark: {CONNECTIONS} connections, per row {} slices of {}s (after {}ms warm-up each), interleaved with the other rows, {} cores",
        rounds(),
        SLICE.as_secs(),
        WARMUP.as_millis(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "| backend | in flight | baseline req/s | baseline p50 ms | baseline p99 ms | cryptogram req/s | p50 ms | p99 ms | errors | ratio | pkcs11/soft | ratio by round |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut cpu = Vec::new();
    for (level, in_flight) in levels().into_iter().enumerate() {
        let (mut base_slices, mut soft_slices, mut p11_slices) =
            (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds() {
            let echo = echo.clone();
            base_slices.push(
                measure(in_flight, move |worker, _| {
                    let mut client = HealthClient::new(echo[worker % CONNECTIONS].clone());
                    async move {
                        client
                            .check(HealthCheckRequest {
                                service: String::new(),
                            })
                            .await
                            .is_ok()
                    }
                })
                .await,
            );
            soft_slices.push(
                cryptograms(&soft, soft_version, format!("r{level}-{round}"), in_flight).await,
            );
            // The same requests against custody on the pkcs11 backend (SoftHSM2), right after
            // the soft slice so both see the same machine load; same baseline.
            if let Some((channels, version)) = &pkcs11 {
                p11_slices.push(
                    cryptograms(channels, *version, format!("p{level}-{round}"), in_flight).await,
                );
            }
        }
        let base = figures(&base_slices);
        let crypto = figures(&soft_slices);
        println!(
            "| soft | {in_flight} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {} | {:.2}x | - | {} |",
            base.rps,
            base.p50_ms,
            base.p99_ms,
            crypto.rps,
            crypto.p50_ms,
            crypto.p99_ms,
            crypto.errors + base.errors,
            crypto.rps / base.rps,
            round_ratios(&soft_slices, &base_slices),
        );
        cpu.push(("baseline", in_flight, base.cpu_us.clone()));
        cpu.push(("soft", in_flight, crypto.cpu_us.clone()));
        if pkcs11.is_some() {
            let p11 = figures(&p11_slices);
            println!(
                "| pkcs11 | {in_flight} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {} | {:.2}x | {:.2}x | {} |",
                base.rps,
                base.p50_ms,
                base.p99_ms,
                p11.rps,
                p11.p50_ms,
                p11.p99_ms,
                p11.errors + base.errors,
                p11.rps / base.rps,
                p11.rps / crypto.rps,
                round_ratios(&p11_slices, &base_slices),
            );
            cpu.push(("pkcs11", in_flight, p11.cpu_us.clone()));
        }
    }
    println!();
    println!("CPU per request, µs, by thread group (10 ms ticks: rough at low rates)");
    println!("| row | in flight | client | server | custody threads | sqlx sqlite | total |");
    println!("|---|---|---|---|---|---|---|");
    for (row, in_flight, groups) in cpu {
        let total: f64 = groups.iter().map(|(_, us)| us).sum();
        let cells: Vec<String> = groups.iter().map(|(_, us)| format!("{us:.0}")).collect();
        println!(
            "| {row} | {in_flight} | {} | {total:.0} |",
            cells.join(" | ")
        );
    }
    if let Err(why) = &started.pkcs11 {
        println!(
            "| pkcs11 | skipped: SoftHSM2 is not usable here ({why}); install it with `apt-get install softhsm2` | | | | | | | | | | |"
        );
    }
}
