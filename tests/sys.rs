//! The `$SYS/broker/...` tree over real sockets: its values follow connections and publishes,
//! each topic is published again only when its value changed, clients cannot write to it
//! (v5: 0x87; 3.1.1: acknowledged and dropped, as mosquitto) but for a client's own bridge
//! state topic, `#` does not match it, and an ACL that denies it keeps a user out.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

/// Long enough for a few `sys_interval = 1` updates.
const TICKS: Duration = Duration::from_secs(8);

async fn sys_broker() -> TestBroker {
    start_with(|c| c.metrics.sys_interval = 1).await
}

/// A `$SYS/#` subscriber: every PUBLISH it got, in order, with its retain flag (a retained
/// copy sent on subscribe has it; a live update does not [MQTT-3.3.1-9]).
struct Watcher {
    raw: Raw,
    seen: Vec<(String, String, bool)>,
}

impl Watcher {
    async fn open(b: &TestBroker, id: &str) -> Watcher {
        let mut raw = connect_v311(b.addr, id).await;
        raw.subscribe(1, "$SYS/#", 0).await;
        Watcher { raw, seen: Vec::new() }
    }

    /// The last value seen on `$SYS/broker/<topic>`.
    fn last(&self, topic: &str) -> Option<&str> {
        let full = format!("$SYS/broker/{topic}");
        self.seen.iter().rev().find(|(t, _, _)| *t == full).map(|(_, v, _)| v.as_str())
    }

    /// Reads until `$SYS/broker/<topic>`'s latest value satisfies `ok`; panics after `limit`.
    async fn wait_for(&mut self, topic: &str, limit: Duration, ok: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + limit;
        loop {
            if let Some(v) = self.last(topic) {
                if ok(v) {
                    return v.to_string();
                }
            }
            let left = until.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "$SYS/broker/{topic} never got the expected value; last {:?}", self.last(topic));
            match self.raw.next_event(left).await {
                Event::Packet(p) => {
                    let m = parse_publish(&p, false);
                    let v = String::from_utf8(m.payload).expect("utf-8 payload");
                    self.seen.push((m.topic, v, m.retain));
                }
                Event::Closed => panic!("watcher disconnected"),
                Event::Timeout => {}
            }
        }
    }
}

fn number(v: &str) -> u64 {
    v.parse().unwrap_or_else(|_| panic!("not a number: {v:?}"))
}

#[tokio::test]
async fn values_follow_clients_and_publishes_and_are_sent_only_when_changed() {
    let b = sys_broker().await;
    let mut w = Watcher::open(&b, "watcher").await;
    w.wait_for("clients/connected", TICKS, |v| v == "1").await;
    w.wait_for("version", TICKS, |v| v == format!("tern version {}", env!("CARGO_PKG_VERSION"))).await;

    let mut a = connect_v311(b.addr, "a").await;
    let _b2 = connect_v5(b.addr, "b").await;
    w.wait_for("clients/connected", TICKS, |v| v == "3").await;
    w.wait_for("clients/total", TICKS, |v| v == "3").await;

    let publishes = number(&w.wait_for("publish/messages/received", TICKS, |_| true).await);
    let packets = number(&w.wait_for("messages/received", TICKS, |_| true).await);
    for i in 0..5u16 {
        a.publish("plain/topic", b"hello", 1, 10 + i).await;
    }
    // Only the five publishes: the $SYS updates themselves are not counted as received.
    let want = (publishes + 5).to_string();
    w.wait_for("publish/messages/received", TICKS, |v| v == want).await;
    // mosquitto's messages/received counts packets of every kind (the PUBLISHes at least).
    w.wait_for("messages/received", TICKS, |v| number(v) >= packets + 5).await;

    drop(a);
    w.wait_for("clients/connected", TICKS, |v| v == "2").await;
    // A few more updates, so that unchanged values had the chance to be sent again.
    let up = number(&w.wait_for("uptime", TICKS, |v| v.ends_with(" seconds")).await.replace(" seconds", ""));
    w.wait_for("uptime", TICKS, |v| number(&v.replace(" seconds", "")) >= up + 3).await;

    // Live updates (not the retained copies sent on subscribe) of one topic always differ
    // from the one before: a value is published again only when it changed.
    let mut previous: HashMap<&str, &str> = HashMap::new();
    let mut live_updates: HashMap<&str, usize> = HashMap::new();
    for (topic, value, retained) in &w.seen {
        if !retained {
            assert_ne!(previous.get(topic.as_str()), Some(&value.as_str()), "{topic} sent again unchanged: {value}");
            *live_updates.entry(topic).or_default() += 1;
        }
        previous.insert(topic, value);
    }
    let live = |t: &str| live_updates.get(format!("$SYS/broker/{t}").as_str()).copied().unwrap_or(0);
    assert!(live("version") <= 1, "version sent {} times", live("version"));
    assert!(live("uptime") >= 3, "uptime updated {} times", live("uptime"));
    for t in ["clients/maximum", "messages/stored", "retained messages/count", "load/connections/1min"] {
        assert!(w.last(t).is_some(), "no $SYS/broker/{t}");
    }
    assert_eq!(w.last("tern/store/state"), Some("ok"));
    assert_eq!(w.last("tern/dropped/queue_full"), Some("0"));
    assert!(w.last("tern/store/commit latency/p99").is_some_and(|v| v.parse::<f64>().is_ok()));
}

#[tokio::test]
async fn clients_cannot_publish_to_sys_but_to_their_own_bridge_state() {
    let b = sys_broker().await;
    let mut w = Watcher::open(&b, "watcher").await;
    w.wait_for("clients/connected", TICKS, |v| v == "1").await;

    // v5: refused with 0x87 Not authorized, at QoS 1 and 2.
    let mut v5 = connect_v5(b.addr, "v5").await;
    let props: &[u8] = &[];
    v5.send(&publish_full(b"$SYS/broker/clients/connected", b"666", 1, 7, true, false, Some(props))).await;
    let p = v5.read_packet().await;
    assert_eq!(hex(&p), hex(&[0x40, 0x03, 0x00, 0x07, 0x87]), "PUBACK 0x87");
    v5.send(&publish_full(b"$SYS/broker/uptime", b"666", 2, 8, false, false, Some(props))).await;
    let p = v5.read_packet().await;
    assert_eq!(hex(&p), hex(&[0x50, 0x03, 0x00, 0x08, 0x87]), "PUBREC 0x87");

    // 3.1.1: acknowledged and dropped (there is no way to tell the client), as mosquitto does.
    let mut v3 = connect_v311(b.addr, "v3").await;
    v3.publish_retain("$SYS/broker/clients/connected", b"666", 1, 9, true).await;
    v3.publish("$SYS/new/topic", b"666", 0, 0).await;

    // A client may write its own bridge state topic (a mosquitto bridge's notification).
    v5.send(&publish_full(b"$SYS/broker/connection/v5/state", b"1", 1, 10, true, false, Some(props))).await;
    assert_eq!(v5.expect_ack(0x40, 10).await, 0x00);
    // ...but not another client's.
    v5.send(&publish_full(b"$SYS/broker/connection/v3/state", b"1", 1, 11, true, false, Some(props))).await;
    let p = v5.read_packet().await;
    assert_eq!(hex(&p), hex(&[0x40, 0x03, 0x00, 0x0B, 0x87]), "PUBACK 0x87 for another client's state");

    w.wait_for("connection/v5/state", TICKS, |v| v == "1").await;
    w.wait_for("clients/connected", TICKS, |v| v == "3").await;
    assert!(
        !w.seen.iter().any(|(t, v, _)| v == "666" || t.starts_with("$SYS/new") || t.contains("connection/v3")),
        "a client's write reached $SYS: {:?}",
        w.seen.iter().filter(|(_, v, _)| v == "666").collect::<Vec<_>>()
    );
    // A fresh subscriber sees the broker's own retained value, not the client's.
    let mut late = connect_v311(b.addr, "late").await;
    late.subscribe(1, "$SYS/broker/clients/connected", 0).await;
    let m = late.recv_publish().await;
    assert!(m.retain && m.payload != b"666", "{m:?}");
}

#[tokio::test]
async fn a_hash_subscription_does_not_see_sys() {
    let b = sys_broker().await;
    let mut w = Watcher::open(&b, "watcher").await;
    let mut all = connect_v5(b.addr, "all").await;
    all.subscribe(1, "#", 0).await;
    let mut plus = connect_v311(b.addr, "plus").await;
    plus.subscribe(1, "+/broker/#", 0).await;
    // Several updates go by, with changes (connections) in between.
    let up = number(&w.wait_for("uptime", TICKS, |_| true).await.replace(" seconds", ""));
    let extra = connect_v311(b.addr, "extra").await;
    w.wait_for("clients/connected", TICKS, |v| v == "4").await;
    drop(extra);
    w.wait_for("uptime", TICKS, |v| number(&v.replace(" seconds", "")) >= up + 2).await;
    // `#` and `+` never match a topic starting with `$` [MQTT-4.7.2-1]: only the normal
    // message arrives.
    let mut pubr = connect_v311(b.addr, "pub").await;
    pubr.publish("normal/broker/x", b"n", 0, 0).await;
    for c in [&mut all, &mut plus] {
        let m = c.recv_publish().await;
        assert_eq!(m.topic, "normal/broker/x");
        c.expect_silence(QUIET).await;
    }
}

#[tokio::test]
async fn an_acl_that_denies_sys_keeps_the_user_out() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "user ops\ntopic read $SYS/#\n\nuser app\ntopic readwrite #\ntopic deny $SYS/#\n\n\
         user partial\ntopic read $SYS/broker/clients/#\n",
    )
    .unwrap();
    let b = start_with(move |c| {
        c.metrics.sys_interval = 1;
        c.auth.acl_file = Some(acl);
    })
    .await;

    let mut app = connect_with(b.addr, &Connect::v5("app").user("app")).await.0;
    assert_eq!(app.subscribe_many(1, &[("$SYS/#", 0)]).await, vec![0x87]);
    assert_eq!(app.subscribe_many(2, &[("$SYS/broker/uptime", 0)]).await, vec![0x87]);
    app.subscribe(3, "#", 0).await;

    let mut ops = connect_with(b.addr, &Connect::v5("ops").user("ops")).await.0;
    ops.subscribe(1, "$SYS/#", 0).await;
    let mut partial = connect_with(b.addr, &Connect::v5("partial").user("partial")).await.0;
    partial.subscribe(1, "$SYS/broker/clients/connected", 0).await;

    // ops reads the tree as it changes; partial only what it may read.
    let until = Instant::now() + TICKS;
    let mut ops_topics = std::collections::HashSet::new();
    while !ops_topics.contains("$SYS/broker/uptime") || !ops_topics.contains("$SYS/broker/clients/connected") {
        assert!(Instant::now() < until, "ops never got the $SYS tree: {ops_topics:?}");
        if let Event::Packet(p) = ops.next_event(Duration::from_millis(200)).await {
            ops_topics.insert(parse_publish(&p, true).topic);
        }
    }
    let m = partial.recv_publish().await;
    assert_eq!(m.topic, "$SYS/broker/clients/connected");
    // Let another update or two go by: app (subscribed to `#`, denied `$SYS`) gets nothing.
    let seen_uptimes = {
        let mut n = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if let Event::Packet(p) = ops.next_event(Duration::from_millis(200)).await {
                n += usize::from(parse_publish(&p, true).topic == "$SYS/broker/uptime");
            }
        }
        n
    };
    assert!(seen_uptimes >= 1, "no update in 3 s");
    app.expect_silence(QUIET).await;
    match partial.next_event(QUIET).await {
        Event::Packet(p) => {
            assert_eq!(parse_publish(&p, true).topic, "$SYS/broker/clients/connected")
        }
        Event::Timeout => {}
        Event::Closed => panic!("partial disconnected"),
    }
}
