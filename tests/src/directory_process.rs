//! The directory as a real process (`cms serve directory`, as `cms up` runs it) for the
//! memory checks of bulk imports: starting it alone, reading its memory from /proc, and a
//! generated CSV of users streamed through ImportUsers as `cmsctl users import` sends it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cms_launcher::layout::{Layout, Peers, Ports};
use cms_launcher::supervise;

use crate::pki::{TRUST_DOMAIN, TestPki};

/// splitmix64: deterministic data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

const FIRST: &[&str] = &[
    "James",
    "Mary",
    "John",
    "Patricia",
    "Robert",
    "Jennifer",
    "Michael",
    "Linda",
    "Zoë",
    "Chloé",
    "Jürgen",
    "Søren",
    "Agnès",
    "Łukasz",
    "Renée",
    "José",
    "François",
    "Björn",
    "Inés",
    "Ólafur",
    "Dörte",
    "Małgorzata",
    "Håkon",
    "Noémie",
    "Li",
    "Wei",
    "Yuki",
    "Aarav",
    "Fatima",
    "Omar",
    "Ngozi",
    "Kwame",
    "Priya",
];
const SYLLABLES: &[&str] = &[
    "an", "ber", "ca", "dal", "en", "fer", "gar", "hol", "in", "jo", "kel", "lan", "mor", "nor",
    "os", "par", "quin", "ros", "sch", "tan", "ul", "van", "wil", "xa", "yor", "zim", "mül", "øst",
    "bré", "ström", "son", "mann", "berg", "ley", "ton", "ski", "ez", "ini", "ova", "dt",
];
const OUS: &[&str] = &[
    "Finance",
    "Finance/Payroll",
    "IT",
    "IT/Operations",
    "HR",
    "Sales/EMEA",
    "R&D/Lab",
    "Legal",
];
const DOMAINS: &[&str] = &["example.com", "corp.example.org", "mail.example.net"];

/// `users` users as CSV with a header: unique usernames and employee ids, names with
/// diacritics, some hyphenated or with an apostrophe.
pub fn users_csv(users: usize) -> Vec<u8> {
    use std::fmt::Write;
    let mut rng = Rng(7);
    let mut out = String::from("username,display_name,email,phone,org_unit,external_id\n");
    for i in 0..users {
        let first = rng.pick(FIRST);
        let mut last = String::new();
        for _ in 0..2 + rng.next() % 2 {
            last.push_str(rng.pick(SYLLABLES));
        }
        let mut last: String = match last.chars().next() {
            Some(c) => c.to_uppercase().chain(last.chars().skip(1)).collect(),
            None => last,
        };
        match i % 50 {
            0 => last.insert_str(0, "O'"),
            1 => last.push_str("-Smith"),
            _ => {}
        }
        let ascii: String = format!("{first}.{last}")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
            .to_lowercase();
        let _ = writeln!(
            out,
            "{ascii}{i},\"{first} {last}\",{ascii}{}@{},+1555{:07},{},E{i:08}",
            i % 1000,
            rng.pick(DOMAINS),
            i,
            rng.pick(OUS),
        );
    }
    out.into_bytes()
}

/// One reading of /proc/<pid>/status, KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub vm_rss: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kb| kb.parse().ok())
                .unwrap_or(0)
        };
        Self {
            vm_rss: field("VmRSS:"),
            rss_anon: field("RssAnon:"),
            rss_file: field("RssFile:"),
        }
    }
}

/// Starts `cms serve directory` in `dir` with `extra` appended to its config.
pub async fn start(dir: &Path, extra: &str) -> (Layout, supervise::Service) {
    let _pki = TestPki::new(dir);
    let layout = Layout::new(dir, TRUST_DOMAIN).expect("layout");
    layout.create_dirs().expect("dirs");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let text = layout
        .service_config(
            "directory",
            Ports {
                grpc: any,
                ops: any,
            },
            &Peers::default(),
            extra,
        )
        .expect("config");
    std::fs::write(layout.config_path("directory"), text).expect("write config");
    let service = supervise::start(
        &crate::binary("cms"),
        &layout,
        "directory",
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    (layout, service)
}
