//! Administration through the front door: a system set up from nothing with `cmsctl` alone,
//! against the five services as real processes over mTLS and a real slapd. Operators, master
//! keys, templates from the sample policy files, users by CSV and by LDAP sync, cards; and for
//! each command, the one-line error that one bad input gets.

use std::path::{Path, PathBuf};
use std::process::Output;

use cms_kit::pki::LeafSpec;
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;
use cms_tests::cluster::Cluster;
use cms_tests::ldap::{ROOT_DN, SUFFIX, Slapd};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An operator's certificate and key, as cmsctl arguments.
struct As(Vec<String>);

impl As {
    fn admin() -> Self {
        Self(Vec::new())
    }

    fn operator(cluster: &Cluster, name: &str) -> Self {
        let tls = cluster.pki.issue(
            &format!("operator-{name}"),
            &LeafSpec::new(cluster.pki.id(&format!("operator/{name}")), 30),
        );
        Self(vec![
            "--cert".into(),
            tls.cert.display().to_string(),
            "--key".into(),
            tls.key.display().to_string(),
        ])
    }

    fn cert(&self) -> &str {
        &self.0[1]
    }
}

fn ctl(cluster: &Cluster, who: &As, args: &[&str]) -> Output {
    let mut all: Vec<&str> = who.0.iter().map(String::as_str).collect();
    all.extend_from_slice(args);
    tokio::task::block_in_place(|| cluster.cmsctl(&all))
}

/// Runs a command that must succeed; returns its standard output.
fn ok(cluster: &Cluster, who: &As, args: &[&str]) -> String {
    let out = ctl(cluster, who, args);
    assert!(out.status.success(), "cmsctl {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command with `--json` that must succeed; returns the parsed answer.
fn json(cluster: &Cluster, who: &As, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let stdout = ok(cluster, who, &all);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("cmsctl {args:?}: {e}: {stdout}"))
}

/// Runs a command that must fail; returns its standard error, whose LAST line is the one-line
/// error (lines before it, such as policy violations, are details).
fn fails(cluster: &Cluster, who: &As, args: &[&str]) -> String {
    let out = ctl(cluster, who, args);
    assert!(
        !out.status.success(),
        "cmsctl {args:?} succeeded: {}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("cmsctl: error: ") || last.starts_with("cmsctl: "),
        "cmsctl {args:?}: {stderr}"
    );
    assert!(!stderr.contains("Status {"), "debug dump: {stderr}");
    stderr
}

fn str_of<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}"))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/templates")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_is_set_up_from_nothing_through_cmsctl() {
    let slapd = Slapd::start();
    let mut people = String::new();
    for (uid, cn) in [
        ("ldap1", "Lee Dap"),
        ("ldap2", "Lia Dap"),
        ("ldap3", "Lou Dap"),
    ] {
        people.push_str(&Slapd::person_ldif(
            uid,
            cn,
            "Dap",
            &format!("{uid}@example.org"),
            None,
        ));
    }
    slapd.add(&people);
    let ldap = format!(
        "\n[ldap.default]\nurl = \"{}\"\nbind_dn = \"{ROOT_DN}\"\nbind_password_file = \"{}\"\nbase_dn = \"ou=people,{SUFFIX}\"\n",
        slapd.url(),
        slapd.password_file().display()
    );
    let cluster = Cluster::start(|name| {
        if name == "directory" {
            ldap.clone()
        } else {
            String::new()
        }
    })
    .await;
    let admin = As::admin();
    let work = cluster.dir.path().join("frontdoor");
    std::fs::create_dir_all(&work).unwrap();

    // Operators: a template administrator (scoped to Finance, which limits no template) and a
    // directory administrator for every user (CSV import and LDAP sync need an unscoped
    // operator), with a certificate binding; listed, shown and updated.
    let templates_admin = As::operator(&cluster, "tina");
    let directory_admin = As::operator(&cluster, "dirk");
    let tina = json(
        &cluster,
        &admin,
        &[
            "operators",
            "create",
            "--username",
            "tina",
            "--role",
            "template-admin",
            "--display-name",
            "Tina T.",
            "--org-unit",
            "Finance",
        ],
    );
    let dirk = json(
        &cluster,
        &admin,
        &[
            "operators",
            "create",
            "--username",
            "dirk",
            "--role",
            "helpdesk",
            "--bind-cert",
            directory_admin.cert(),
        ],
    );
    assert_eq!(
        dirk["certificates"].as_array().map(Vec::len),
        Some(1),
        "{dirk}"
    );
    let dirk_id = str_of(&dirk, "id").to_owned();
    let updated = json(
        &cluster,
        &admin,
        &["operators", "update", &dirk_id, "--role", "directory-admin"],
    );
    assert_eq!(updated["roles"], serde_json::json!(["directory-admin"]));
    let listed = json(&cluster, &admin, &["operators", "list"]);
    let names: Vec<&str> = listed["operators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| str_of(o, "username"))
        .collect();
    assert!(
        names.contains(&"tina") && names.contains(&"dirk"),
        "{listed}"
    );
    let shown = json(
        &cluster,
        &admin,
        &["operators", "show", str_of(&tina, "id")],
    );
    assert_eq!(str_of(&shown["operator"], "display_name"), "Tina T.");
    let err = fails(
        &cluster,
        &admin,
        &[
            "operators",
            "create",
            "--username",
            "tina",
            "--role",
            "helpdesk",
        ],
    );
    assert!(err.contains("already exists"), "{err}");
    // A role name the gateway does not know would grant nothing: refused.
    let err = fails(
        &cluster,
        &admin,
        &[
            "operators",
            "create",
            "--username",
            "tom",
            "--role",
            "Admin",
        ],
    );
    assert!(err.contains("\"Admin\" is not a role"), "{err}");
    // A template administrator may not create operators.
    let err = fails(
        &cluster,
        &templates_admin,
        &[
            "operators",
            "create",
            "--username",
            "eve",
            "--role",
            "admin",
        ],
    );
    assert!(
        err.contains("permission denied") && err.contains("admin role"),
        "{err}"
    );

    // Master keys the templates name.
    for (reference, algorithm) in [
        ("mk-minidriver", "3des-3key"),
        ("mk-piv", "aes-128"),
        ("mk-piv-puk", "aes-128"),
    ] {
        ok(
            &cluster,
            &admin,
            &[
                "keys",
                "generate",
                "--reference",
                reference,
                "--algorithm",
                algorithm,
            ],
        );
    }

    // --json on the custody commands too; none for the ones that show secrets.
    let keys = json(&cluster, &admin, &["keys", "list"]);
    assert_eq!(keys["keys"].as_array().map(Vec::len), Some(3), "{keys}");
    let custody = json(&cluster, &admin, &["custody", "status"]);
    assert_eq!(
        str_of(&custody, "seal_state"),
        "SEAL_STATE_UNSEALED",
        "{custody}"
    );
    let err = fails(
        &cluster,
        &admin,
        &[
            "--json",
            "custody",
            "init",
            "--threshold",
            "1",
            "--shares",
            "1",
        ],
    );
    assert!(err.contains("has no --json"), "{err}");

    // Templates from the sample files, by the template administrator.
    let minidriver = examples().join("minidriver.toml");
    let piv = examples().join("piv.toml");
    let minidriver = minidriver.to_str().unwrap();
    let piv = piv.to_str().unwrap();
    ok(
        &cluster,
        &templates_admin,
        &["templates", "validate", "--file", minidriver],
    );
    let t1 = json(
        &cluster,
        &templates_admin,
        &[
            "templates",
            "create",
            "--file",
            minidriver,
            "--comment",
            "v1",
        ],
    );
    let t1_id = str_of(&t1, "id").to_owned();
    json(
        &cluster,
        &templates_admin,
        &["templates", "create", "--file", piv],
    );
    let listed = json(&cluster, &templates_admin, &["templates", "list"]);
    assert_eq!(
        listed["templates"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    let again = ok(
        &cluster,
        &templates_admin,
        &["templates", "update", &t1_id, "--file", minidriver],
    );
    assert!(again.contains("unchanged"), "{again}");
    let versions = json(
        &cluster,
        &templates_admin,
        &["templates", "versions", &t1_id],
    );
    assert_eq!(
        versions["versions"].as_array().map(Vec::len),
        Some(1),
        "{versions}"
    );
    let shown = json(&cluster, &templates_admin, &["templates", "show", &t1_id]);
    assert_eq!(
        str_of(&shown["template"]["spec"], "card_profile"),
        "CARD_PROFILE_MINIDRIVER"
    );
    // A bad policy file: every violation listed with its field, nothing stored.
    let bad = work.join("bad.toml");
    let sample = std::fs::read_to_string(minidriver).unwrap();
    std::fs::write(
        &bad,
        sample
            .replace(
                "name = \"Employee minidriver card\"",
                "name = \"Two\\nlines\"",
            )
            .replace("pin_tries = 5", "pin_tries = 0"),
    )
    .unwrap();
    let err = fails(
        &cluster,
        &templates_admin,
        &["templates", "create", "--file", bad.to_str().unwrap()],
    );
    assert!(
        err.contains("error: name: ") && err.contains("(NOT_ONE_LINE)"),
        "{err}"
    );
    assert!(
        err.contains("error: pin_policy.pin_tries: ") && err.contains("(PIN_TRIES)"),
        "{err}"
    );
    assert!(err.contains("nothing was stored"), "{err}");
    // A master key custody does not have.
    let unknown_key = work.join("unknown-key.toml");
    std::fs::write(
        &unknown_key,
        sample.replace("\"mk-minidriver\"", "\"mk-nowhere\""),
    )
    .unwrap();
    let err = fails(
        &cluster,
        &templates_admin,
        &[
            "templates",
            "create",
            "--file",
            unknown_key.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("admin_key.master_key_reference") && err.contains("MASTER_KEY_UNKNOWN"),
        "{err}"
    );
    let listed = json(&cluster, &templates_admin, &["templates", "list"]);
    assert_eq!(
        listed["templates"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    // A typo in a field name is refused before anything is sent.
    let typo = work.join("typo.json");
    std::fs::write(&typo, "{\"nmae\": \"x\"}").unwrap();
    let err = fails(
        &cluster,
        &templates_admin,
        &["templates", "validate", "--file", typo.to_str().unwrap()],
    );
    assert!(err.contains("nmae"), "{err}");
    // The directory administrator may not change templates.
    let err = fails(
        &cluster,
        &directory_admin,
        &["templates", "create", "--file", minidriver],
    );
    assert!(err.contains("permission denied"), "{err}");
    let err = fails(
        &cluster,
        &templates_admin,
        &["templates", "show", "no-such-template"],
    );
    assert!(
        err.contains("not found") || err.contains("invalid argument"),
        "{err}"
    );

    // Users: one by hand, three by CSV, three by LDAP sync.
    let alice = json(
        &cluster,
        &directory_admin,
        &[
            "users",
            "create",
            "--username",
            "alice",
            "--display-name",
            "Alice A.",
            "--email",
            "alice@example.org",
        ],
    );
    let alice_id = str_of(&alice, "id").to_owned();
    let renamed = json(
        &cluster,
        &directory_admin,
        &["users", "update", &alice_id, "--display-name", "Alice B."],
    );
    assert_eq!(str_of(&renamed, "display_name"), "Alice B.");
    let err = fails(
        &cluster,
        &directory_admin,
        &["users", "create", "--username", "alice"],
    );
    assert!(err.contains("already exists"), "{err}");
    let csv = work.join("users.csv");
    std::fs::write(
        &csv,
        "username,display_name,email,phone,org_unit,external_id\n\
         bob,Bob B.,bob@example.org,,Finance,e-1\n\
         carol,Carol C.,carol@example.org,,Finance,e-2\n\
         dave,Dave D.,dave@example.org,,IT,e-3\n",
    )
    .unwrap();
    let report = json(
        &cluster,
        &directory_admin,
        &["users", "import", csv.to_str().unwrap()],
    );
    assert_eq!(report["created"], serde_json::json!("3"), "{report}");
    let summary = ok(
        &cluster,
        &directory_admin,
        &["users", "import", csv.to_str().unwrap(), "--dry-run"],
    );
    assert!(summary.contains("unchanged 3"), "{summary}");
    let broken = work.join("broken.csv");
    std::fs::write(
        &broken,
        "username,display_name,email,phone,org_unit,external_id\n\
         erin,Erin E.,not-an-email,,IT,e-4\n",
    )
    .unwrap();
    let err = fails(
        &cluster,
        &directory_admin,
        &["users", "import", broken.to_str().unwrap()],
    );
    assert!(
        err.contains("nothing was changed") && err.contains("line 2, column email"),
        "{err}"
    );
    let synced = ok(&cluster, &directory_admin, &["ldap", "sync"]);
    assert!(synced.contains("created 3"), "{synced}");
    let again = ok(&cluster, &directory_admin, &["ldap", "sync", "--dry-run"]);
    assert!(
        again.starts_with("dry run: ") && again.contains("unchanged 3"),
        "{again}"
    );
    let err = fails(
        &cluster,
        &directory_admin,
        &["ldap", "sync", "--source", "nowhere"],
    );
    assert!(err.contains("nowhere"), "{err}");
    let disabled = json(
        &cluster,
        &directory_admin,
        &["users", "disable", &alice_id, "--reason", "left"],
    );
    assert_eq!(str_of(&disabled, "status"), "USER_STATUS_DISABLED");

    // Cards: register one for Bob, then mark it lost.
    let bob = json(
        &cluster,
        &directory_admin,
        &["users", "create", "--username", "bobby"],
    );
    let card = json(
        &cluster,
        &directory_admin,
        &[
            "cards",
            "register",
            "--user",
            str_of(&bob, "id"),
            "--card-id",
            "0102030405060708",
            "--serial",
            "SN-1",
            "--profile",
            "minidriver",
            "--template",
            &t1_id,
            "--template-version",
            "1",
        ],
    );
    let card_id = str_of(&card, "id").to_owned();
    let lost = json(
        &cluster,
        &directory_admin,
        &[
            "cards",
            "status",
            &card_id,
            "lost",
            "--reason",
            "left on a train",
        ],
    );
    assert_eq!(str_of(&lost, "status"), "CREDENTIAL_STATUS_LOST");
    let err = fails(
        &cluster,
        &directory_admin,
        &["cards", "status", &card_id, "stolen"],
    );
    assert!(
        err.contains("use active, blocked, revoked or lost"),
        "{err}"
    );
    let err = fails(
        &cluster,
        &directory_admin,
        &[
            "cards",
            "register",
            "--user",
            str_of(&bob, "id"),
            "--card-id",
            "01020G",
            "--serial",
            "SN-2",
            "--profile",
            "minidriver",
            "--template",
            &t1_id,
        ],
    );
    assert!(err.contains("--card-id"), "{err}");

    // Retire the template last: a card was issued under it.
    let retired = json(
        &cluster,
        &templates_admin,
        &["templates", "retire", &t1_id, "--reason", "replaced"],
    );
    assert_eq!(str_of(&retired, "state"), "TEMPLATE_STATE_RETIRED");

    // One bad input for each of the remaining commands: each a one-line error.
    let unknown_id = "00000000-0000-4000-8000-000000000000";
    let missing = |err: &str| err.contains("not found") || err.contains("invalid argument");
    for args in [
        &["operators", "show", unknown_id][..],
        &["operators", "update", unknown_id, "--role", "helpdesk"],
        &["templates", "versions", unknown_id],
        &["templates", "retire", unknown_id],
    ] {
        let who = if args[0] == "operators" {
            &admin
        } else {
            &templates_admin
        };
        let err = fails(&cluster, who, args);
        assert!(missing(&err), "cmsctl {args:?}: {err}");
    }
    let err = fails(&cluster, &admin, &["operators", "update", &dirk_id]);
    assert!(err.contains("nothing to change"), "{err}");
    let err = fails(&cluster, &admin, &["operators", "list", "--role", "x\ny"]);
    assert!(err.trim_end().lines().count() == 1, "{err}");
    let err = fails(
        &cluster,
        &templates_admin,
        &[
            "templates",
            "update",
            &t1_id,
            "--file",
            bad.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("(PIN_TRIES)") && err.contains("nothing was stored"),
        "{err}"
    );
    let err = fails(
        &cluster,
        &templates_admin,
        &["templates", "list", "--name", &"n".repeat(5000)],
    );
    assert!(err.trim_end().lines().count() == 1, "{err}");
    for args in [
        &["users", "disable", unknown_id][..],
        &["users", "update", unknown_id, "--email", "x@example.org"],
    ] {
        let err = fails(&cluster, &directory_admin, args);
        assert!(missing(&err), "cmsctl {args:?}: {err}");
    }
    let err = fails(&cluster, &directory_admin, &["users", "update", &alice_id]);
    assert!(err.contains("nothing to change"), "{err}");
    let empty = work.join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    let err = fails(
        &cluster,
        &directory_admin,
        &["users", "import", empty.to_str().unwrap()],
    );
    assert!(err.contains("the file is empty"), "{err}");

    // The backend saw the operator: the template's history names tina.
    let versions = json(
        &cluster,
        &templates_admin,
        &["templates", "versions", &t1_id],
    );
    assert_eq!(
        str_of(&versions["versions"][0], "created_by"),
        "tina",
        "{versions}"
    );

    // A request id given by the caller is forwarded, echoed and logged; a refusal is logged
    // too.
    let mut client = AdminServiceClient::new(cms_tests::inproc::channel(
        cluster.pki.issue(
            "operator-tina-raw",
            &LeafSpec::new(cluster.pki.id("operator/tina"), 30),
        ),
        cluster.grpc("gateway"),
        cluster.pki.id("gateway"),
    ));
    let mut request = tonic::Request::new(gw::ListTemplatesRequest {
        include_retired: true,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "frontdoor-req-42".parse().unwrap());
    let answer = client.list_templates(request).await.unwrap();
    assert_eq!(
        answer
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("frontdoor-req-42")
    );
    // The sample files say what the template service's own samples say.
    let stored: Vec<_> = answer
        .into_inner()
        .templates
        .into_iter()
        .filter_map(|t| t.spec)
        .collect();
    for expected in [
        cms_template::sample::minidriver("Employee minidriver card"),
        cms_template::sample::piv("Administrator PIV token"),
    ] {
        assert!(
            stored.contains(&expected),
            "no stored template equals the sample {:?}",
            expected.name
        );
    }
    let mut request = tonic::Request::new(gw::ListOperatorsRequest::default());
    request
        .metadata_mut()
        .insert("x-request-id", "frontdoor-req-43".parse().unwrap());
    let refused = client.list_operators(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // The gateway's decision log names who did what, never the content.
    let log = std::fs::read_to_string(cluster.layout.log_path("gateway")).unwrap_or_default();
    let decisions: Vec<&str> = log.lines().filter(|l| l.contains("admin call")).collect();
    assert!(
        decisions
            .iter()
            .any(|l| l.contains("create_template") && l.contains("tina")),
        "{decisions:#?}"
    );
    assert!(
        decisions
            .iter()
            .any(|l| l.contains("list_templates") && l.contains("frontdoor-req-42")),
        "{decisions:#?}"
    );
    assert!(
        decisions.iter().any(|l| l.contains("refused")
            && l.contains("list_operators")
            && l.contains("frontdoor-req-43")),
        "{decisions:#?}"
    );
    // A streamed sync is recorded when it ends, with its result.
    assert!(
        decisions.iter().any(|l| l.contains("sync_ldap")
            && l.contains("dirk")
            && l.contains("result=\"ok\"")
            || l.contains("sync_ldap") && l.contains("dirk") && l.contains("result=ok")),
        "{decisions:#?}"
    );
    assert!(
        !log.contains("Employee minidriver card"),
        "template content in the gateway log"
    );
    cluster.stop().await;
}
