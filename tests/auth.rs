//! Password files over real sockets: lines written by Debian's `mosquitto_passwd` and by
//! `tern passwd`, wrong passwords and unknown users refused alike, anonymous clients refused
//! once there is a password file, a failed reload keeping the old users, and SCRAM-SHA-256
//! enhanced authentication whose user name then feeds the ACL.

mod common;

use std::path::PathBuf;

use base64::Engine as _;
use common::*;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

// Written by Debian 12's mosquitto_passwd 2.0.11: `-b -c f alice 'correct horse'` ($7$,
// PBKDF2-SHA512, 101 rounds) and `-H sha512 -b f bob hunter2` ($6$).
const MOSQ_ALICE: &str = "alice:$7$101$SROzHdnDswAX4RsB$5ak0PoUzdDY1RSnqw29p6XOg/2e8JZwANMEXPbSV425r9mKUX9VsiVYtmqBthqP5FB3yvBn0mqTsgVDC9X6Elg==";
const MOSQ_BOB: &str =
    "bob:$6$Wz6TQq9bCNu130DL$1oXZ8YAVbRW0JIK2MaZ+41uFmz7eCfjWIRAt1WSLlwTW6Ik/5et1F1GwXfPBghbJP4if5w0NkIC70dbQSl7LgQ==";

struct Files {
    _dir: tempfile::TempDir,
    passwd: PathBuf,
    acl: PathBuf,
}

/// A password file with alice ($7$), bob ($6$), carol (argon2id, written by `tern passwd`)
/// and dave (SCRAM-SHA-256, `tern passwd --scram`), and an ACL giving each their own tree.
fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, format!("{MOSQ_ALICE}\n{MOSQ_BOB}\n")).unwrap();
    for args in [["-b", "carol", "s3cret"], ["-b", "--scram", "dave"]] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.arg("passwd").arg(args[0]);
        if args[1] == "--scram" {
            cmd.arg("--scram").arg(&passwd).arg("dave").arg("pencil");
        } else {
            cmd.arg(&passwd).arg(args[1]).arg(args[2]);
        }
        let out = cmd.output().expect("run tern passwd");
        assert!(out.status.success(), "tern passwd: {}", String::from_utf8_lossy(&out.stderr));
    }
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "pattern readwrite home/%u/#\n").unwrap();
    Files { _dir: dir, passwd, acl }
}

async fn password_broker(f: &Files) -> TestBroker {
    let (p, a) = (f.passwd.clone(), f.acl.clone());
    start_with(move |c| {
        c.auth.password_file = Some(p);
        c.auth.acl_file = Some(a);
    })
    .await
}

async fn connack(b: &TestBroker, c: Connect) -> u8 {
    let mut raw = Raw::open(b.addr).await;
    raw.handshake(&c).await.code
}

#[tokio::test]
async fn mosquitto_and_tern_passwd_lines_log_in() {
    let f = files();
    let b = password_broker(&f).await;
    for (user, pass) in [("alice", "correct horse"), ("bob", "hunter2"), ("carol", "s3cret"), ("dave", "pencil")] {
        assert_eq!(connack(&b, Connect::v311(user).login(user, pass)).await, 0, "{user} v3.1.1");
        let (mut c, _) = connect_with(b.addr, &Connect::v5(user).login(user, pass)).await;
        c.assert_alive(&format!("home/{user}/x")).await;
    }
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_refused_alike() {
    let f = files();
    let b = password_broker(&f).await;
    for c in [Connect::v311("x").login("alice", "wrong"), Connect::v311("x").login("mallory", "correct horse")] {
        assert_eq!(connack(&b, c).await, 0x05);
    }
    for c in [Connect::v5("x").login("bob", "hunter3"), Connect::v5("x").login("nobody", "hunter2")] {
        assert_eq!(connack(&b, c).await, 0x86);
    }
    // A user name without a password is a wrong password.
    assert_eq!(connack(&b, Connect::v5("x").user("alice")).await, 0x86);
    // Anonymous: a password file means clients log in, even on loopback.
    assert_eq!(connack(&b, Connect::v5("anon")).await, 0x87);
    assert_eq!(connack(&b, Connect::v311("anon")).await, 0x05);
}

#[tokio::test]
async fn failed_reload_keeps_the_old_users() {
    let f = files();
    let b = password_broker(&f).await;
    let good = std::fs::read_to_string(&f.passwd).unwrap();
    std::fs::write(&f.passwd, format!("{good}eve:plaintext\n")).unwrap();
    let errors = b.handle.reload().await.expect_err("a file with a plain-text password is refused");
    assert!(errors.iter().any(|e| e.contains(":5:")), "error names line 5: {errors:?}");
    assert_eq!(connack(&b, Connect::v5("a").login("alice", "correct horse")).await, 0);
    assert_eq!(connack(&b, Connect::v5("e").login("eve", "plaintext")).await, 0x86);

    // A good reload removes a user at once.
    std::fs::write(&f.passwd, format!("{MOSQ_BOB}\n")).unwrap();
    b.handle.reload().await.expect("reload");
    assert_eq!(connack(&b, Connect::v5("a").login("alice", "correct horse")).await, 0x86);
    assert_eq!(connack(&b, Connect::v5("b").login("bob", "hunter2")).await, 0);
}

// ---------------------------------------------------------------------------------------------
// SCRAM-SHA-256 (RFC 5802, RFC 7677) from the client's side
// ---------------------------------------------------------------------------------------------

const METHOD: &[u8] = b"SCRAM-SHA-256";
const PROP_AUTH_METHOD: u8 = 0x15;
const PROP_AUTH_DATA: u8 = 0x16;

fn binary_prop(id: u8, v: &[u8]) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(mqtt_str(v));
    out
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize().into_bytes().into()
}

/// The client side of one SCRAM-SHA-256 exchange.
struct Scram {
    user: String,
    password: String,
    client_first_bare: String,
    auth_message: String,
    salted: [u8; 32],
}

impl Scram {
    fn new(user: &str, password: &str) -> Scram {
        let client_first_bare = format!("n={user},r=fyko+d2lbbFgONRv9qkxdawL");
        Scram {
            user: user.into(),
            password: password.into(),
            client_first_bare,
            auth_message: String::new(),
            salted: [0; 32],
        }
    }

    fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Answers the server-first message with the client-final one.
    fn client_final(&mut self, server_first: &[u8]) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let server_first = String::from_utf8(server_first.to_vec()).unwrap();
        let field = |k: &str| server_first.split(',').find_map(|f| f.strip_prefix(k)).unwrap().to_string();
        let (r, salt, iterations) =
            (field("r="), b64.decode(field("s=")).unwrap(), field("i=").parse::<u32>().unwrap());
        assert!(r.starts_with("fyko+d2lbbFgONRv9qkxdawL"), "server nonce extends ours: {r} ({})", self.user);
        pbkdf2::pbkdf2_hmac::<Sha256>(self.password.as_bytes(), &salt, iterations, &mut self.salted);
        let client_key = hmac(&self.salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={r}");
        self.auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, self.auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(signature).map(|(a, b)| a ^ b).collect();
        format!("{without_proof},p={}", b64.encode(proof)).into_bytes()
    }

    /// Whether the server-final message proves the server holds the user's keys.
    fn server_verified(&self, server_final: Option<&[u8]>) -> bool {
        let b64 = base64::engine::general_purpose::STANDARD;
        let server_key = hmac(&self.salted, b"Server Key");
        let expected = format!("v={}", b64.encode(hmac(&server_key, self.auth_message.as_bytes())));
        server_final == Some(expected.as_bytes())
    }
}

fn auth_packet(reason: u8, data: &[u8]) -> Vec<u8> {
    let mut props = binary_prop(PROP_AUTH_METHOD, METHOD);
    props.extend(binary_prop(PROP_AUTH_DATA, data));
    let mut body = vec![reason];
    body.extend(common::props(&props));
    packet(0xF0, &body)
}

/// Reads an AUTH packet: (reason, Authentication Data).
async fn read_auth(raw: &mut Raw) -> (u8, Vec<u8>) {
    let p = raw.read_packet().await;
    assert_eq!(p[0], 0xF0, "expected AUTH, got {}", hex(&p));
    let (_, body) = split_packet(&p);
    let (props, _) = take_props(&body[1..]);
    (body[0], props.into_iter().find(|(id, _)| *id == PROP_AUTH_DATA).map(|(_, v)| v).unwrap_or_default())
}

/// Runs a SCRAM exchange at CONNECT as `user` with `password`; returns the CONNACK code, the
/// connection and whether the server's signature was right.
async fn scram_login(b: &TestBroker, user: &str, password: &str) -> (u8, Raw, bool) {
    let mut scram = Scram::new(user, password);
    let mut c = Connect::v5("scram-client");
    c.properties.extend(binary_prop(PROP_AUTH_METHOD, METHOD));
    c.properties.extend(binary_prop(PROP_AUTH_DATA, &scram.client_first()));
    let mut raw = Raw::open(b.addr).await;
    raw.v5 = true;
    raw.send(&c.bytes()).await;
    let (reason, server_first) = read_auth(&mut raw).await;
    assert_eq!(reason, 0x18, "AUTH continue");
    raw.send(&auth_packet(0x18, &scram.client_final(&server_first))).await;
    let ack = parse_connack(&raw.read_packet().await, true);
    let verified = scram.server_verified(ack.prop(PROP_AUTH_DATA));
    (ack.code, raw, verified)
}

/// Re-authentication (AUTH 0x19) renews the proof for the same user, and cannot switch users.
#[tokio::test]
async fn scram_reauthentication_keeps_the_user() {
    let f = files();
    // A second SCRAM user to try to switch to.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["passwd", "-b", "--scram"])
        .arg(&f.passwd)
        .args(["erin", "other"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let b = password_broker(&f).await;
    let (code, mut c, _) = scram_login(&b, "dave", "pencil").await;
    assert_eq!(code, 0);

    let mut again = Scram::new("dave", "pencil");
    c.send(&auth_packet(0x19, &again.client_first())).await;
    let (reason, server_first) = read_auth(&mut c).await;
    assert_eq!(reason, 0x18);
    c.send(&auth_packet(0x18, &again.client_final(&server_first))).await;
    let (reason, server_final) = read_auth(&mut c).await;
    assert_eq!(reason, 0x00, "re-authenticated");
    assert!(again.server_verified(Some(&server_final)));
    c.assert_alive("home/dave/y").await;

    // Another user's name, with that user's right password: refused at once, at the
    // client-first message (it names a user other than the connection's), with 0x86 Bad
    // User Name or Password.
    let other = Scram::new("erin", "other");
    c.send(&auth_packet(0x19, &other.client_first())).await;
    c.expect_disconnect(0x86).await;
}

#[tokio::test]
async fn scram_sha_256_logs_in_and_names_the_user() {
    let f = files();
    let b = password_broker(&f).await;
    let (code, mut c, verified) = scram_login(&b, "dave", "pencil").await;
    assert_eq!(code, 0, "SCRAM login");
    assert!(verified, "server signature proves the server knows dave's keys");
    // The ACL sees the SCRAM user: dave's tree, not anyone else's.
    c.assert_alive("home/dave/x").await;
    assert_eq!(c.subscribe_many(5, &[("home/alice/#", 0)]).await, vec![0x87]);

    let (code, _, _) = scram_login(&b, "dave", "wrong").await;
    assert_eq!(code, 0x86, "wrong password");
    let (code, _, _) = scram_login(&b, "nobody", "pencil").await;
    assert_eq!(code, 0x86, "unknown user");
}
