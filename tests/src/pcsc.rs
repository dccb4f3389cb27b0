//! The real PC/SC stack for card tests: pcsc-lite's `pcscd` with vsmartcard's `vpcd` driver, and
//! virtual cards (`cms-vcard run`) in its reader slots.
//!
//! What Debian gives (packages pcscd, vsmartcard-vpcd): `/etc/reader.conf.d/vpcd` declares the
//! reader "Virtual PCD" with `DEVICENAME /dev/null:0x8C7B`, i.e. vpcd listens on TCP 35963 for
//! slot 0 ("Virtual PCD 00 00") and 35964 for slot 1 ("Virtual PCD 00 01"), on all interfaces.
//! pcscd 1.9.9 always serves `/run/pcscd/pcscd.comm` and refuses to start while another pcscd
//! holds it; clients (libpcsclite) follow `$PCSCLITE_CSOCK_NAME`.
//!
//! So each test binary gets its own pcscd, which cannot collide with a system pcscd, another test
//! binary or another engineer's tests: it runs as root in the foreground (`pcscd --foreground`)
//! in a private mount namespace (`unshare -m`) where a fresh directory of ours is bind-mounted over
//! `/run/pcscd` (no stale `pcscd.comm`/`pcscd.pid` can be in it), with its own reader config
//! (`-c`) naming a vpcd port pair picked for it. Clients are pointed at the socket with
//! [`Pcscd::env`]. pcscd is stopped when the last test holding it lets go, and, should the test
//! binary die, when its stdin pipe closes.
//!
//! Card tests lease one of vpcd's two slots ([`Pcscd::insert`]); a third test waits until a slot
//! is free, so tests of a binary may run in parallel.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use cms_card::sim::LogEntry;
use tempfile::TempDir;

/// Number of reader slots vpcd opens.
pub const SLOTS: usize = 2;

/// The client environment variable naming pcscd's socket.
pub const SOCKET_ENV: &str = "PCSCLITE_CSOCK_NAME";

const VPCD_DRIVER: &str = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so";

/// `None` when the PC/SC test stack can run here, or what is missing.
pub fn missing() -> Option<String> {
    if !is_root() {
        return Some("card tests start pcscd and need root".into());
    }
    for (program, package) in [
        ("/usr/sbin/pcscd", "pcscd"),
        (VPCD_DRIVER, "vsmartcard-vpcd"),
        ("/usr/bin/unshare", "util-linux"),
    ] {
        if !Path::new(program).exists() {
            return Some(format!("{program} is missing (Debian package {package})"));
        }
    }
    None
}

/// True when this process runs as root (effective uid 0, from /proc/self/status).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Panics with a clear message when the PC/SC stack is missing.
pub fn require() {
    if let Some(why) = missing() {
        panic!("{why}: tests/run.sh installs what card tests need");
    }
}

/// Where vpcd port pairs are looked for: below Linux's ephemeral range (32768-60999), so that
/// no outgoing connection can hold one, and a card connecting while vpcd is not yet listening
/// cannot end up connected to itself.
const VPCD_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// Two consecutive free TCP ports (vpcd binds both, on all interfaces).
///
/// vpcd binds them itself, so a port pair is chosen here and released: if another process takes
/// one in between, the vpcd slot is missing and [`Pcscd::insert`] times out with a message
/// saying so.
fn free_port_pair() -> u16 {
    let span = (VPCD_PORTS.end - VPCD_PORTS.start) / 2;
    // Start somewhere different in each process, so concurrent test binaries rarely probe
    // the same pair.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let start = (std::process::id().wrapping_add(nanos)) % u32::from(span);
    for offset in 0..u32::from(span) {
        let port = VPCD_PORTS.start + 2 * ((start + offset) % u32::from(span)) as u16;
        let first = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port));
        let second = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port + 1));
        if first.is_ok() && second.is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free TCP ports for vpcd in {VPCD_PORTS:?}");
}

/// A running pcscd with a vpcd reader.
pub struct Pcscd {
    dir: TempDir,
    child: Mutex<Child>,
    port: u16,
    slots: Mutex<[bool; SLOTS]>,
    slot_freed: Condvar,
}

impl Pcscd {
    /// Starts pcscd (see the module documentation).
    pub fn start() -> Self {
        require();
        let dir = tempfile::Builder::new()
            .prefix("cms-pcscd-")
            .tempdir()
            .expect("temp dir");
        let run = dir.path().join("run");
        let conf = dir.path().join("reader.conf.d");
        std::fs::create_dir_all(&run).expect("run dir");
        std::fs::create_dir_all(&conf).expect("conf dir");
        let port = free_port_pair();
        std::fs::write(
            conf.join("vpcd"),
            format!(
                "FRIENDLYNAME \"Virtual PCD\"\nDEVICENAME /dev/null:{port}\n\
                 LIBPATH {VPCD_DRIVER}\nCHANNELID {port}\n"
            ),
        )
        .expect("reader config");
        // The mount point must exist outside the namespace too; an empty directory is harmless.
        std::fs::create_dir_all("/run/pcscd").expect("/run/pcscd");
        let log = std::fs::File::create(dir.path().join("pcscd.log")).expect("pcscd log");
        // The shell keeps pcscd's lifetime tied to our stdin: when this process goes (even
        // killed), the pipe closes, `cat` returns and pcscd is stopped.
        let script = format!(
            "mount --bind '{run}' /run/pcscd || exit 1\n\
             pcscd --foreground --error -c '{conf}' &\n\
             pid=$!\n\
             cat >/dev/null\n\
             kill $pid\n\
             wait $pid\n",
            run = run.display(),
            conf = conf.display(),
        );
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start pcscd");
        let pcscd = Pcscd {
            dir,
            child: Mutex::new(child),
            port,
            slots: Mutex::new([false; SLOTS]),
            slot_freed: Condvar::new(),
        };
        pcscd.wait_for_socket();
        pcscd
    }

    /// A pcscd shared by the tests of this binary while any of them holds it.
    pub fn shared() -> Arc<Self> {
        static SHARED: OnceLock<Mutex<Weak<Pcscd>>> = OnceLock::new();
        let slot = SHARED.get_or_init(|| Mutex::new(Weak::new()));
        let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pcscd) = guard.upgrade() {
            return pcscd;
        }
        let pcscd = Arc::new(Self::start());
        *guard = Arc::downgrade(&pcscd);
        pcscd
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(self.socket()).is_err() {
            if let Ok(Some(status)) = self.child.lock().expect("child").try_wait() {
                panic!("pcscd exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "pcscd did not open its socket: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// pcscd's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pcscd.log")).unwrap_or_default()
    }

    /// pcscd's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join("pcscd.comm")
    }

    /// The environment a PC/SC client needs to reach this pcscd.
    pub fn env(&self) -> (&'static str, PathBuf) {
        (SOCKET_ENV, self.socket())
    }

    /// A command for a PC/SC client (opensc-tool, yubico-piv-tool, cms-agent) pointed at this
    /// pcscd.
    pub fn client(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        let (key, value) = self.env();
        command.env(key, value);
        command
    }

    /// vpcd's TCP port for `slot`.
    pub fn vpcd_port(&self, slot: usize) -> u16 {
        self.port + slot as u16
    }

    /// The PC/SC reader name of `slot`.
    pub fn reader_name(slot: usize) -> String {
        format!("Virtual PCD 00 {slot:02}")
    }

    /// Leases `count` slots at once: a test that needs two cards must not hold one slot while
    /// waiting for another (two such tests would wait for each other forever).
    fn lease_slots(&self, count: usize) -> Vec<usize> {
        assert!(count <= SLOTS, "vpcd has {SLOTS} slots");
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let free: Vec<usize> = (0..SLOTS).filter(|&i| !slots[i]).take(count).collect();
            if free.len() == count {
                for &slot in &free {
                    slots[slot] = true;
                }
                return free;
            }
            slots = self
                .slot_freed
                .wait(slots)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn release_slot(&self, slot: usize) {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())[slot] = false;
        self.slot_freed.notify_all();
    }

    /// Inserts the card of `card_file` into a free slot: starts `cms-vcard run` against vpcd and
    /// waits until pcscd has seen the card. Blocks while both slots are taken.
    pub fn insert(self: &Arc<Self>, card_file: &Path) -> CardInReader {
        let slot = self.lease_slots(1)[0];
        self.start_card(slot, card_file)
    }

    /// Inserts several cards at once, each in its own slot (all slots are leased together).
    pub fn insert_all(self: &Arc<Self>, card_files: &[&Path]) -> Vec<CardInReader> {
        let slots = self.lease_slots(card_files.len());
        slots
            .into_iter()
            .zip(card_files)
            .map(|(slot, file)| self.start_card(slot, file))
            .collect()
    }

    fn start_card(self: &Arc<Self>, slot: usize, card_file: &Path) -> CardInReader {
        let dir = tempfile::Builder::new()
            .prefix("cms-vcard-")
            .tempdir()
            .expect("temp dir");
        let apdu_log = dir.path().join("apdu.log");
        let control = dir.path().join("control.sock");
        let output = std::fs::File::create(dir.path().join("vcard.log")).expect("vcard log");
        let child = Command::new(vcard_binary())
            .arg("run")
            .arg("--card")
            .arg(card_file)
            .arg("--vpcd")
            .arg(format!("127.0.0.1:{}", self.vpcd_port(slot)))
            .arg("--apdu-log")
            .arg(&apdu_log)
            .arg("--control")
            .arg(&control)
            // The card stops when this pipe closes, even if the test binary is killed.
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(output.try_clone().expect("log"))
            .stderr(output)
            .spawn()
            .expect("start cms-vcard");
        let card = CardInReader {
            pcscd: Arc::clone(self),
            slot,
            child,
            dir,
            apdu_log,
            control,
            card_file: card_file.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket's file appears at bind(2), a moment before listen(2): wait until it
        // takes a connection, not just until it exists.
        while UnixStream::connect(&card.control).is_err() {
            assert!(
                Instant::now() < deadline,
                "cms-vcard did not start: {}",
                card.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let answer = card.control("wait-ready");
        assert_eq!(
            answer,
            "ok",
            "pcscd did not see the card in slot {slot} (vpcd port {}; {}): {}\npcscd: {}",
            self.vpcd_port(slot),
            card.control("status"),
            card.output(),
            self.log()
        );
        card
    }
}

impl Drop for Pcscd {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        // Closing stdin makes the wrapper stop pcscd and leave the namespace.
        drop(child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The `cms-vcard` binary (built beside the test executable, or `$CMS_VCARD_BIN`, for example a
/// release build in a benchmark).
pub fn vcard_binary() -> PathBuf {
    std::env::var_os("CMS_VCARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::binary("cms-vcard"))
}

/// Writes a card file with `cms-vcard new` (arguments after `new --out <file>`).
pub fn new_card(file: &Path, args: &[&str]) {
    let out = Command::new(vcard_binary())
        .arg("new")
        .arg("--out")
        .arg(file)
        .args(args)
        .output()
        .expect("run cms-vcard new");
    assert!(out.status.success(), "cms-vcard new: {}", text(&out));
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A virtual card in a vpcd slot; the card process stops and the slot is freed on drop.
pub struct CardInReader {
    pcscd: Arc<Pcscd>,
    slot: usize,
    child: Child,
    dir: TempDir,
    apdu_log: PathBuf,
    control: PathBuf,
    card_file: PathBuf,
}

impl CardInReader {
    /// The PC/SC reader the card is in.
    pub fn reader(&self) -> String {
        Pcscd::reader_name(self.slot)
    }

    /// The pcscd serving the reader.
    pub fn pcscd(&self) -> &Arc<Pcscd> {
        &self.pcscd
    }

    /// The card file (the card's persistent state).
    pub fn card_file(&self) -> &Path {
        &self.card_file
    }

    /// The APDU log file.
    pub fn apdu_log(&self) -> &Path {
        &self.apdu_log
    }

    /// The commands the card has seen so far.
    pub fn apdus(&self) -> Vec<LogEntry> {
        cms_card::sim::log::read_entries(&self.apdu_log).expect("read APDU log")
    }

    /// cms-vcard's own output.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vcard.log")).unwrap_or_default()
    }

    /// Sends one control command, returns the answer line.
    pub fn control(&self, command: &str) -> String {
        let mut stream = UnixStream::connect(&self.control).expect("control socket");
        writeln!(stream, "{command}").expect("control write");
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .expect("control read");
        line.trim_end().to_owned()
    }

    /// Pulls the card out of the reader and waits until pcscd has noticed (it polls vpcd, about
    /// every 400 ms). A client that sends a command in between already gets an error: vpcd's
    /// connection is closed.
    pub fn remove(&self) {
        assert_eq!(self.control("remove"), "ok");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pcscd_sees_card() {
            assert!(
                Instant::now() < deadline,
                "pcscd still sees the pulled card"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether pcscd reports a card in this reader (`opensc-tool -l`).
    pub fn pcscd_sees_card(&self) -> bool {
        let out = self
            .client("opensc-tool")
            .arg("-l")
            .output()
            .expect("run opensc-tool -l");
        let listing = String::from_utf8_lossy(&out.stdout);
        let reader = self.reader();
        listing
            .lines()
            .find(|line| line.ends_with(&reader))
            .is_some_and(|line| line.split_whitespace().nth(1) == Some("Yes"))
    }

    /// Puts it back and waits until pcscd has seen it.
    pub fn reinsert(&self) {
        assert_eq!(self.control("insert"), "ok", "{}", self.output());
    }

    /// A PC/SC client command aimed at this pcscd.
    pub fn client(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.pcscd.client(program)
    }
}

impl Drop for CardInReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The slot is free only once pcscd has noticed the card gone (it polls vpcd): a card put
        // in before that meets a reader pcscd still thinks holds the old, powered card, and is
        // never powered up. Bounded, and no panic in a drop.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pcscd_sees_card() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.pcscd.release_slot(self.slot);
    }
}
