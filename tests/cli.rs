//! `tern check-config`: the built binary checks a configuration file, and every file it names,
//! as start-up would, without opening the store or binding a port. Exit status 0 and
//! `FILE: OK` with a summary line on stdout, or 1 with an error on stderr that names the
//! configuration file, the key and the fix.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `tern check-config ARGS` with no `TERN__` variables but those given.
fn check_config(args: &[&Path], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
    cmd.arg("check-config").args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TERN__") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run tern check-config")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit status 1 with stderr holding every one of `needles`; returns stderr.
fn assert_refused(out: &Output, needles: &[&str]) -> String {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "exit status; stdout:\n{stdout}\nstderr:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr does not name `{n}`:\n{stderr}");
    }
    assert!(!stdout.contains("OK"), "stdout says OK for a refused file:\n{stdout}");
    stderr
}

/// A directory with a config file `tern.toml` holding `body` after a loopback listener and a
/// storage directory that does not exist yet.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(body: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = format!(
            "[[listener]]\nbind = \"127.0.0.1:1883\"\n\n[storage]\ndir = \"{}\"\n\n{body}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("tern.toml"), config).expect("write config");
        Setup { dir }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("tern.toml")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn a_good_file_is_ok_with_a_summary_and_nothing_is_opened_or_bound() {
    // The listener's port is taken, and the store directory does not exist: check-config
    // touches neither.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let s = Setup::new("");
    let config = std::fs::read_to_string(s.file()).expect("read config").replace("1883", &port.to_string());
    std::fs::write(s.file(), config).expect("write config");
    let out = check_config(&[&s.file()], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some(format!("{}: OK", s.file().display()).as_str()), "{stdout}");
    let summary = lines.next().unwrap_or_default();
    assert!(summary.contains(&format!("listeners: tcp 127.0.0.1:{port}")), "{summary}");
    assert!(summary.contains(&format!("storage dir: {}", s.path("data").display())), "{summary}");
    assert!(!s.path("data").exists(), "check-config created the store directory");
}

#[test]
fn the_embedded_default_is_ok() {
    let out = check_config(&[], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert!(stdout.starts_with("embedded default config: OK\n"), "{stdout}");
    assert!(stdout.contains("listeners: tcp 127.0.0.1:1883") && stdout.contains("storage dir: ./data"), "{stdout}");
}

#[test]
fn a_bad_value_names_the_file_and_the_key() {
    let s = Setup::new("[limits]\nmax_inflight = 0\n");
    let file = s.file().display().to_string();
    assert_refused(&check_config(&[&s.file()], &[]), &[&file, "limits.max_inflight", "at least 1"]);

    let s = Setup::new("[limits]\nmax_inflihgt = 3\n");
    let file = s.file().display().to_string();
    assert_refused(&check_config(&[&s.file()], &[]), &[&file, "max_inflihgt"]);
}

#[test]
fn environment_overrides_are_checked_as_start_up_applies_them() {
    let s = Setup::new("");
    let file = s.file().display().to_string();
    let out = check_config(&[&s.file()], &[("TERN__LIMITS__MAX_INFLIGHT", "0")]);
    assert_refused(&out, &[&file, "limits.max_inflight"]);
    let out = check_config(&[&s.file()], &[("TERN__LIMITS__MAX_INFLIGHT", "128")]);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", text(&out.stderr));
}

#[test]
fn a_tls_listener_whose_certificate_is_missing_names_the_path_and_key() {
    let pki = common::tls::TestPki::new();
    let missing = pki.dir.path().join("nowhere.crt");
    let listener = |cert: &Path| {
        format!(
            "[[listener]]\nbind = \"127.0.0.1:8883\"\nkind = \"tls\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            cert.display(),
            pki.server_key_path().display()
        )
    };
    let s = Setup::new(&listener(&missing));
    let file = s.file().display().to_string();
    let missing = missing.display().to_string();
    assert_refused(&check_config(&[&s.file()], &[]), &[&file, &missing, "listener[1].tls.cert"]);

    // The same listener with the real certificate: the files are read and match.
    let s = Setup::new(&listener(&pki.server_cert_path()));
    let out = check_config(&[&s.file()], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert!(stdout.contains("tls 127.0.0.1:8883"), "{stdout}");

    // A key that is not the certificate's is refused, as at start-up.
    let (_, other_key) = pki.client_cert("someone");
    let body = listener(&pki.server_cert_path())
        .replace(&pki.server_key_path().display().to_string(), &other_key.display().to_string());
    let s = Setup::new(&body);
    assert_refused(&check_config(&[&s.file()], &[]), &["listener[1].tls.key", "does not belong"]);
}

#[test]
fn a_bridge_ca_file_that_is_missing_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("peer-ca.crt");
    let s = Setup::new(&format!(
        "[[bridge]]\nname = \"up\"\naddresses = [\"127.0.0.1:8883\"]\ntopics = [{{ pattern = \"#\" }}]\n[bridge.tls]\nca_file = \"{}\"\n",
        ca.display()
    ));
    let ca = ca.display().to_string();
    assert_refused(&check_config(&[&s.file()], &[]), &[&ca, "bridge[0].tls.ca_file"]);
}

#[test]
fn a_malformed_acl_file_names_the_file_and_line() {
    let s = Setup::new("");
    let acl = s.path("acl");
    std::fs::write(&acl, "user alice\ntopic readwrite alice/#\ntopic sideways x\n").expect("write acl");
    std::fs::write(
        s.file(),
        std::fs::read_to_string(s.file()).expect("read") + &format!("[auth]\nacl_file = \"{}\"\n", acl.display()),
    )
    .expect("write config");
    let file = s.file().display().to_string();
    let at_line = format!("{}:3:", acl.display());
    assert_refused(&check_config(&[&s.file()], &[]), &[&file, &at_line, "sideways", "auth.acl_file"]);
}

#[test]
fn a_missing_password_file_says_how_to_make_one() {
    let s = Setup::new("[auth]\npassword_file = \"/nonexistent/tern/passwd\"\n");
    let file = s.file().display().to_string();
    assert_refused(
        &check_config(&[&s.file()], &[]),
        &[&file, "/nonexistent/tern/passwd", "auth.password_file", "tern passwd -c"],
    );
}

#[test]
fn a_missing_config_file_and_bad_arguments_are_refused() {
    let s = Setup::new("");
    let gone = s.path("gone.toml");
    assert_refused(&check_config(&[&gone], &[]), &[&gone.display().to_string(), "not found"]);
    let out = check_config(&[&s.file(), &s.file()], &[]);
    assert_eq!(out.status.code(), Some(2), "two files: a usage error");
}

#[test]
fn the_shipped_production_config_only_lacks_its_files() {
    // config/tern.toml is valid as it stands; what it needs on a new machine is the password
    // file (and then the certificates) that check-config asks for.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tern.toml");
    let text = std::fs::read_to_string(&shipped).expect("read config/tern.toml");
    let config = tern::Config::from_toml(&text, "config/tern.toml").expect("config/tern.toml is valid");
    assert_eq!(config.storage.dir, Path::new("/var/lib/tern"));
    if !Path::new("/etc/tern/passwd").exists() {
        assert_refused(&check_config(&[&shipped], &[]), &["config/tern.toml", "/etc/tern/passwd", "tern passwd -c"]);
    }
}
