//! A throwaway OpenLDAP `slapd` (Debian's slapd package) for tests: an mdb database under a
//! temp directory, configured from a generated slapd.conf, listening only on a Unix socket
//! (`ldapi://`) in that directory, so no port is needed. Entries are loaded with `ldapadd` /
//! `ldapmodify` / `ldapdelete` (Debian's ldap-utils) as the root DN. Dropping it kills slapd.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const SUFFIX: &str = "dc=example,dc=org";
pub const ROOT_DN: &str = "cn=admin,dc=example,dc=org";
pub const ROOT_PASSWORD: &str = "test-root-password";

pub struct Slapd {
    dir: TempDir,
    child: Child,
    url: String,
}

fn slapd_binary() -> PathBuf {
    for p in ["/usr/sbin/slapd", "/usr/local/sbin/slapd"] {
        if std::path::Path::new(p).is_file() {
            return p.into();
        }
    }
    panic!("slapd not found: install the Debian packages slapd and ldap-utils (tests/run.sh does)");
}

/// Percent-encodes a socket path for an `ldapi://` URL.
fn encode_path(path: &str) -> String {
    const KEPT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_');
    percent_encoding::utf8_percent_encode(path, KEPT).to_string()
}

impl Slapd {
    /// Starts slapd with the base entries `dc=example,dc=org` and `ou=people` under it.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cms-ldap-")
            .tempdir()
            .expect("temp dir");
        let db = dir.path().join("db");
        std::fs::create_dir(&db).expect("db dir");
        let socket = dir.path().join("ldapi");
        let conf = dir.path().join("slapd.conf");
        std::fs::write(
            &conf,
            format!(
                "include /etc/ldap/schema/core.schema\n\
                 include /etc/ldap/schema/cosine.schema\n\
                 include /etc/ldap/schema/nis.schema\n\
                 include /etc/ldap/schema/inetorgperson.schema\n\
                 modulepath /usr/lib/ldap\n\
                 moduleload back_mdb\n\
                 pidfile {dir}/slapd.pid\n\
                 sizelimit 100\n\
                 database mdb\n\
                 maxsize 268435456\n\
                 suffix \"{SUFFIX}\"\n\
                 rootdn \"{ROOT_DN}\"\n\
                 rootpw {ROOT_PASSWORD}\n\
                 directory {db}\n",
                dir = dir.path().display(),
                db = db.display(),
            ),
        )
        .expect("slapd.conf");
        let url = format!(
            "ldapi://{}",
            encode_path(socket.to_str().expect("UTF-8 path"))
        );
        let child = Command::new(slapd_binary())
            .arg("-f")
            .arg(&conf)
            .arg("-h")
            .arg(&url)
            .args(["-d", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start slapd");
        let mut slapd = Self { dir, child, url };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if socket.exists() && slapd.try_add(&format!(
                "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n\
                 dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n"
            )) {
                break;
            }
            if let Ok(Some(status)) = slapd.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = slapd.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!("slapd exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "slapd did not come up in 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        slapd
    }

    /// The `ldapi://` URL of the server.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes the root password to a file (for a `bind_password_file` setting).
    pub fn password_file(&self) -> PathBuf {
        let path = self.dir.path().join("bind-password");
        std::fs::write(&path, format!("{ROOT_PASSWORD}\n")).expect("password file");
        path
    }

    fn ldap_tool(&self, tool: &str, args: &[&str], input: &str) -> std::process::Output {
        let mut child = Command::new(tool)
            .args(["-x", "-H", &self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {tool} (install ldap-utils): {e}"));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write LDIF");
        child.wait_with_output().expect("wait")
    }

    fn try_add(&self, ldif: &str) -> bool {
        self.ldap_tool("ldapadd", &[], ldif).status.success()
    }

    /// `ldapadd` of an LDIF text.
    pub fn add(&self, ldif: &str) {
        let out = self.ldap_tool("ldapadd", &[], ldif);
        assert!(
            out.status.success(),
            "ldapadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ldapmodify` of an LDIF text (changetype modify records).
    pub fn modify(&self, ldif: &str) {
        let out = self.ldap_tool("ldapmodify", &[], ldif);
        assert!(
            out.status.success(),
            "ldapmodify: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ldapdelete` of one DN.
    pub fn delete(&self, dn: &str) {
        let out = self.ldap_tool("ldapdelete", &[dn], "");
        assert!(
            out.status.success(),
            "ldapdelete: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An inetOrgPerson entry under `ou=people` (or under `ou=<sub>,ou=people`).
    pub fn person_ldif(uid: &str, cn: &str, sn: &str, mail: &str, sub_ou: Option<&str>) -> String {
        let parent = match sub_ou {
            Some(ou) => format!("ou={ou},ou=people,{SUFFIX}"),
            None => format!("ou=people,{SUFFIX}"),
        };
        format!(
            "dn: uid={uid},{parent}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {cn}\nsn: {sn}\nmail: {mail}\n\n"
        )
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
