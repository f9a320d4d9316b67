//! ACL files over real sockets: read, write, readwrite and deny; `%u` and `%c` patterns and
//! the user names that must not reach them; `$SYS` never writable (but for a bridge's own state topic); wills published with
//! their owner's rights; and rights revoked by a reload stop queued and retained deliveries.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

const ACL: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic read shared/#
topic deny shared/secret

user ed
topic readwrite #

pattern readwrite users/%u/#
pattern read clients/%c/#
";

async fn acl_broker(text: &str) -> (TestBroker, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acl");
    std::fs::write(&path, text).unwrap();
    let p = path.clone();
    let b = start_with(move |c| c.auth.acl_file = Some(p)).await;
    (b, path, dir)
}

async fn as_user(b: &TestBroker, id: &str, user: &str) -> Raw {
    connect_with(b.addr, &Connect::v5(id).user(user)).await.0
}

/// Publishes at QoS 1 over v5 and returns the PUBACK reason code.
async fn puback_code(c: &mut Raw, topic: &str, pid: u16) -> u8 {
    c.send(&publish_full(topic.as_bytes(), b"m", 1, pid, false, false, Some(&[]))).await;
    let p = c.read_packet().await;
    let (h, body) = split_packet(&p);
    assert_eq!(h, 0x40, "expected PUBACK, got {}", hex(&p));
    assert_eq!(u16::from_be_bytes([body[0], body[1]]), pid);
    body.get(2).copied().unwrap_or(0)
}

/// Every PUBLISH that arrives until the connection has been quiet for a moment, acknowledged.
/// The publishes `c` receives (acknowledged): at least `n`, waited for up to 10 s (a loaded
/// machine may take long), then any more until the connection is quiet for `QUIET`.
async fn drain(c: &mut Raw, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let wait = if got.len() < n { deadline.saturating_duration_since(Instant::now()) } else { QUIET };
        if wait.is_zero() {
            return got;
        }
        match c.next_event(wait).await {
            Event::Packet(p) if p[0] >> 4 == 3 => {
                let m = parse_publish(&p, c.v5);
                c.ack(&m).await;
                got.push((m.topic, m.payload));
            }
            Event::Packet(p) => panic!("unexpected packet {}", hex(&p)),
            Event::Closed => panic!("connection closed"),
            Event::Timeout if got.len() < n => {}
            Event::Timeout => return got,
        }
    }
}

#[tokio::test]
async fn read_write_and_deny() {
    let (b, _path, _dir) = acl_broker(ACL).await;
    let mut alice = as_user(&b, "a1", "alice").await;
    let mut ed = as_user(&b, "e1", "ed").await;

    assert!(puback_code(&mut alice, "alice/x", 1).await < 0x80, "own tree is writable");
    assert_eq!(puback_code(&mut alice, "shared/x", 2).await, 0x87, "read-only tree");
    assert_eq!(puback_code(&mut alice, "elsewhere", 3).await, 0x87, "no entry = deny");

    assert_eq!(
        alice.subscribe_many(4, &[("shared/#", 1), ("shared/secret", 1), ("alice/#", 1)]).await,
        vec![1, 0x87, 1]
    );
    for t in ["shared/ok", "shared/secret", "shared/ok/2"] {
        ed.publish(t, t.as_bytes(), 1, 10).await;
    }
    let topics: Vec<String> = drain(&mut alice, 2).await.into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, vec!["shared/ok", "shared/ok/2"], "deny wins over the readable tree");
}

#[tokio::test]
async fn anonymous_section_and_v311_answers() {
    let (b, _path, _dir) = acl_broker(ACL).await;
    let mut anon = connect_v311(b.addr, "anon").await;
    assert_eq!(anon.subscribe_many(1, &[("public/#", 1), ("alice/#", 1)]).await, vec![1, 0x80]);
    // 3.1.1 has no way to say "not authorised" in PUBACK: acknowledged and dropped.
    anon.publish("public/news", b"x", 1, 2).await;
    assert!(drain(&mut anon, 0).await.is_empty(), "anonymous clients may not write public/#");
    let mut ed = as_user(&b, "e1", "ed").await;
    ed.publish("public/news", b"from ed", 1, 3).await;
    assert_eq!(drain(&mut anon, 1).await, vec![("public/news".to_string(), b"from ed".to_vec())]);
}

#[tokio::test]
async fn patterns_substitute_whole_names_only() {
    let (b, _path, _dir) = acl_broker(ACL).await;
    let mut alice = as_user(&b, "a1", "alice").await;
    assert!(puback_code(&mut alice, "users/alice/status", 1).await < 0x80);
    assert_eq!(puback_code(&mut alice, "users/bob/status", 2).await, 0x87);

    // User names that are filters or paths never match a %u pattern (CVE-2017-7650).
    for (i, name) in ["+", "#", "alice/x", "a/b"].into_iter().enumerate() {
        let mut c = as_user(&b, &format!("odd{i}"), name).await;
        assert_eq!(puback_code(&mut c, "users/alice/status", 1).await, 0x87, "user {name:?}");
        assert_eq!(
            c.subscribe_many(2, &[("users/alice/#", 1), ("users/a/b/#", 1)]).await,
            vec![0x87, 0x87],
            "user {name:?}"
        );
    }

    // %c: each client reads its own tree.
    let mut dev = as_user(&b, "dev1", "nobody").await;
    assert_eq!(dev.subscribe_many(1, &[("clients/dev1/#", 0), ("clients/dev2/#", 0)]).await, vec![0, 0x87]);
    let mut plus = as_user(&b, "+", "nobody").await;
    assert_eq!(plus.subscribe_many(1, &[("clients/+/#", 0)]).await, vec![0x87], "client id `+`");
}

#[tokio::test]
async fn sys_is_never_writable() {
    // Without any ACL, and with an ACL that grants everything.
    let open = start().await;
    let (granted, _path, _dir) = acl_broker("user ed\ntopic readwrite #\ntopic readwrite $SYS/#\n").await;
    for b in [&open, &granted] {
        let mut ed = as_user(b, "e1", "ed").await;
        assert_eq!(puback_code(&mut ed, "$SYS/broker/uptime", 1).await, 0x87);
        assert_eq!(puback_code(&mut ed, "$SYS", 2).await, 0x87);
    }
}

/// mosquitto's bridges (`notifications true`, their default) publish their state, retained, to
/// `$SYS/broker/connection/<client id>/state` and make it their will: that one topic is a
/// client's to write, as far as the ACL allows, and no other `$SYS` topic.
#[tokio::test]
async fn a_client_may_write_its_own_bridge_state_topic() {
    let open = start().await;
    let mut watcher = connect_v311(open.addr, "state-watcher").await;
    watcher.subscribe(1, "$SYS/broker/connection/+/state", 1).await;
    let will = Will { retain: true, ..Will::new("$SYS/broker/connection/mosq-b/state", b"0", 1) };
    let mut bridge = Raw::open(open.addr).await;
    let ack = bridge.handshake(&Connect::v311("mosq-b").will(will)).await;
    assert_eq!(ack.code, 0, "a will on its own state topic");
    let mut v5 = as_user(&open, "mosq-b5", "anyone").await;
    assert_eq!(puback_code(&mut v5, "$SYS/broker/connection/mosq-b5/state", 1).await, 0);
    assert_eq!(puback_code(&mut v5, "$SYS/broker/connection/mosq-b/state", 2).await, 0x87, "another's");
    assert_eq!(puback_code(&mut v5, "$SYS/broker/connection/mosq-b5/state/x", 3).await, 0x87);
    drop(bridge);
    let mut got: Vec<_> = drain(&mut watcher, 2).await;
    got.sort();
    let want = |t: &str, p: &str| (format!("$SYS/broker/connection/{t}/state"), p.as_bytes().to_vec());
    assert_eq!(got, vec![want("mosq-b", "0"), want("mosq-b5", "m")]);

    // With an ACL, only if it allows it (`#` does not cover `$SYS`).
    let (strict, _path, _dir) = acl_broker("user ed\ntopic readwrite #\n").await;
    let mut ed = as_user(&strict, "e1", "ed").await;
    assert_eq!(puback_code(&mut ed, "$SYS/broker/connection/e1/state", 1).await, 0x87);
    let (granted, _path, _dir) =
        acl_broker("user ed\ntopic readwrite #\npattern write $SYS/broker/connection/%c/state\n").await;
    let mut ed = as_user(&granted, "e1", "ed").await;
    assert_eq!(puback_code(&mut ed, "$SYS/broker/connection/e1/state", 1).await, 0x10, "accepted, no subscribers");
    assert_eq!(puback_code(&mut ed, "$SYS/broker/uptime", 2).await, 0x87);
}

#[tokio::test]
async fn will_needs_its_owners_write_right() {
    let (b, _path, _dir) = acl_broker(ACL).await;
    let mut raw = Raw::open(b.addr).await;
    let ack = raw.handshake(&Connect::v5("w1").user("alice").will(Will::new("shared/x", b"gone", 0))).await;
    assert_eq!(ack.code, 0x87, "will on a read-only topic");
    let mut raw = Raw::open(b.addr).await;
    let ack = raw.handshake(&Connect::v311("w2").user("alice").will(Will::new("$SYS/x", b"gone", 0))).await;
    assert_eq!(ack.code, 0x05, "will in $SYS");
    let (_ok, ack) =
        connect_with(b.addr, &Connect::v5("w3").user("alice").will(Will::new("alice/lwt", b"gone", 0))).await;
    assert_eq!(ack.code, 0);
}

/// A reload that takes away a read right stops what was queued for the client while it was
/// away and what is retained, though its subscription was made when it had the right.
#[tokio::test]
async fn revoked_read_right_stops_queued_and_retained() {
    let before = "user carol\ntopic read news/#\n\nuser ed\ntopic readwrite #\n";
    let (b, path, _dir) = acl_broker(before).await;
    let session = Connect::v5("carol-1").user("carol").clean(false).expiry(300);
    let (mut carol, _) = connect_with(b.addr, &session).await;
    carol.subscribe(1, "news/#", 1).await;
    carol.disconnect().await;

    let mut ed = as_user(&b, "e1", "ed").await;
    ed.publish_retain("news/secret", b"retained secret", 1, 1, true).await;
    ed.publish_retain("news/public", b"retained public", 1, 2, true).await;
    ed.publish("news/secret", b"queued secret", 1, 3).await;
    ed.publish("news/public", b"queued public", 1, 4).await;

    std::fs::write(&path, format!("{before}\nuser carol\ntopic deny news/secret\n")).unwrap();
    b.handle.reload().await.expect("reload");

    let (mut carol, ack) = connect_with(b.addr, &session).await;
    assert!(ack.session_present);
    let got = drain(&mut carol, 2).await;
    let payloads: Vec<&[u8]> = got.iter().map(|(_, p)| p.as_slice()).collect();
    assert_eq!(payloads, vec![&b"retained public"[..], b"queued public"], "queued while away");
    carol.subscribe(2, "news/#", 1).await;
    let got = drain(&mut carol, 1).await;
    assert_eq!(got, vec![("news/public".to_string(), b"retained public".to_vec())], "retained on subscribe");
}

#[tokio::test]
async fn failed_reload_keeps_the_old_rules() {
    let (b, path, _dir) = acl_broker(ACL).await;
    std::fs::write(&path, "user alice\ntopic readwrite alice/#\ntopic sometimes shared/#\n").unwrap();
    let errors = b.handle.reload().await.expect_err("a broken ACL file is refused");
    assert!(errors.iter().any(|e| e.contains(":3:")), "error names line 3: {errors:?}");
    let mut alice = as_user(&b, "a1", "alice").await;
    assert!(puback_code(&mut alice, "alice/x", 1).await < 0x80);
    assert_eq!(alice.subscribe_many(2, &[("shared/#", 1), ("shared/secret", 1)]).await, vec![1, 0x87]);
    // An empty file is a valid file that denies everything.
    std::fs::write(&path, "").unwrap();
    b.handle.reload().await.expect("empty ACL");
    assert_eq!(puback_code(&mut alice, "alice/x", 3).await, 0x87);
}
