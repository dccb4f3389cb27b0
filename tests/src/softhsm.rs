//! Throwaway SoftHSM2 tokens for the `pkcs11` keystore backend (Debian package softhsm2:
//! `softhsm2-util` and the module at /usr/lib/softhsm/libsofthsm2.so, or
//! `$CMS_TEST_SOFTHSM_MODULE`).
//!
//! Each [`SoftHsm`] is a temp dir with its own `softhsm2.conf` (`directories.tokendir =
//! <dir>/tokens`) and tokens made with `softhsm2-util --init-token --free`, each with a random
//! user PIN written to a mode-0600 PIN file, as custody's `keystore.pin_file` wants it.
//!
//! SoftHSM2 finds its config through the `SOFTHSM2_CONF` environment variable, read when a
//! process initialises the module, and it only sees the tokens that exist at that moment. So:
//! * child processes (the `cms-custody` binary) get it with `Command::env(`[`SoftHsm::env`]`)`;
//! * in-process custody uses [`process`], which creates every token the test binary needs
//!   up front and sets `SOFTHSM2_CONF` for the process once. Every test of such a binary
//!   calls [`process`] first (with the same label list), so the variable is set before any
//!   test does anything else.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tempfile::TempDir;

/// Where Debian's softhsm2 package puts the module.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The SoftHSM2 PKCS#11 module to use.
pub fn module() -> PathBuf {
    std::env::var_os("CMS_TEST_SOFTHSM_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE))
}

/// `None` when SoftHSM2 is usable here, or what is missing.
pub fn missing() -> Option<String> {
    let util = Command::new("softhsm2-util").arg("--version").output();
    if !util.is_ok_and(|o| o.status.success()) {
        return Some("softhsm2-util is not installed (Debian package softhsm2)".into());
    }
    let module = module();
    if !module.is_file() {
        return Some(format!(
            "{} is missing (Debian package softhsm2)",
            module.display()
        ));
    }
    None
}

/// Panics with a clear message when SoftHSM2 is not installed.
pub fn require() {
    if let Some(why) = missing() {
        panic!("{why}: install it (tests/run.sh does: apt-get install softhsm2)");
    }
}

/// One initialised token.
#[derive(Clone, Debug)]
pub struct Token {
    pub label: String,
    /// A mode-0600 file holding the user PIN.
    pub pin_file: PathBuf,
    pub so_pin: String,
}

impl Token {
    /// The user PIN (from the PIN file).
    pub fn pin(&self) -> String {
        std::fs::read_to_string(&self.pin_file)
            .expect("PIN file")
            .trim_end()
            .to_owned()
    }
}

pub struct SoftHsm {
    root: PathBuf,
    _temp: Option<TempDir>,
    tokens: Vec<Token>,
}

impl std::fmt::Debug for SoftHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftHsm")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn random_hex(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    cms_custody::wrap::random(&mut bytes).expect("random");
    data_encoding::HEXLOWER.encode(&bytes)
}

impl SoftHsm {
    /// A token directory in a temp dir (removed on drop) with `labels` initialised.
    pub fn new(labels: &[&str]) -> Self {
        require();
        let temp = tempfile::Builder::new()
            .prefix("cms-softhsm-")
            .tempdir()
            .expect("temp dir");
        let mut hsm = Self::create(temp.path().to_owned(), labels);
        hsm._temp = Some(temp);
        hsm
    }

    fn create(root: PathBuf, labels: &[&str]) -> Self {
        std::fs::create_dir_all(root.join("tokens")).expect("token dir");
        std::fs::write(
            root.join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                root.join("tokens").display()
            ),
        )
        .expect("softhsm2.conf");
        let mut hsm = Self {
            root,
            _temp: None,
            tokens: Vec::new(),
        };
        for label in labels {
            hsm.init_token(label);
        }
        hsm
    }

    fn init_token(&mut self, label: &str) {
        let pin = random_hex(8);
        let so_pin = random_hex(8);
        let out = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                &pin,
                "--so-pin",
            ])
            .arg(&so_pin)
            .env("SOFTHSM2_CONF", self.conf())
            .output()
            .expect("run softhsm2-util");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token {label}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = self.root.join(format!("{label}.pin"));
        write_private(&pin_file, format!("{pin}\n").as_bytes());
        self.tokens.push(Token {
            label: label.to_owned(),
            pin_file,
            so_pin,
        });
    }

    /// The `softhsm2.conf` of this token directory.
    pub fn conf(&self) -> PathBuf {
        self.root.join("softhsm2.conf")
    }

    /// The directory holding the conf, the tokens and the PIN files.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `("SOFTHSM2_CONF", conf)`, for `Command::env`.
    pub fn env(&self) -> (&'static str, PathBuf) {
        ("SOFTHSM2_CONF", self.conf())
    }

    pub fn token(&self, label: &str) -> &Token {
        self.tokens
            .iter()
            .find(|t| t.label == label)
            .unwrap_or_else(|| panic!("no SoftHSM token {label} was made for this test binary"))
    }

    /// Custody's `[keystore]` settings for the token `label`.
    pub fn keystore(&self, label: &str) -> cms_custody::KeystoreSettings {
        cms_custody::KeystoreSettings {
            backend: cms_custody::KeystoreBackend::Pkcs11,
            module: Some(module()),
            token_label: Some(self.token(label).label.clone()),
            pin_file: Some(self.token(label).pin_file.clone()),
            ..Default::default()
        }
    }

    /// The same as a TOML `[keystore]` section.
    pub fn keystore_toml(&self, label: &str) -> String {
        format!(
            "[keystore]\nbackend = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\n",
            module().display(),
            self.token(label).label,
            self.token(label).pin_file.display()
        )
    }
}

fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("create PIN file");
    file.write_all(bytes).expect("write PIN file");
}

static PROCESS: OnceLock<SoftHsm> = OnceLock::new();

/// The token directory of this test process, with every token in `labels`; the first call
/// creates it and points `SOFTHSM2_CONF` at it. Call it first in every test of the binary,
/// always with the same list.
///
/// It lives under `$TMPDIR/cms-test-softhsm/<pid>` (a static is never dropped); directories
/// left by earlier test processes that have exited are removed on the way.
pub fn process(labels: &[&str]) -> &'static SoftHsm {
    let hsm = PROCESS.get_or_init(|| {
        require();
        let base = std::env::temp_dir().join("cms-test-softhsm");
        if let Ok(entries) = std::fs::read_dir(&base) {
            for entry in entries.flatten() {
                let gone = entry
                    .file_name()
                    .to_str()
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if gone {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let root = base.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&root);
        let hsm = SoftHsm::create(root, labels);
        // SAFETY: FFI edge: SoftHSM2 (C) reads SOFTHSM2_CONF with getenv when the module is
        // initialised, and offers no other way to find its config. Setting the variable is
        // only unsound while another thread reads the environment through libc; this runs
        // once, inside the OnceLock initialiser that every test of the binary enters before
        // doing anything else (the others wait here), and before any module is loaded.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("SOFTHSM2_CONF", hsm.conf());
        }
        hsm
    });
    for label in labels {
        hsm.token(label);
    }
    hsm
}
