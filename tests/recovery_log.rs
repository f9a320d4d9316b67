//! The start-up line that says what recovery brought back and how long it took: the built
//! binary is given state (a persistent session with queued QoS 1 messages, retained messages,
//! a QoS 2 message received and not released), stopped, and started again on the same store.

mod common;

use common::process::TernProcess;
use common::{connect_with, Connect};

/// The last "state recovered from the store" line of the log.
fn recovery_line(log: &str) -> &str {
    log.lines().rev().find(|l| l.contains("state recovered from the store")).unwrap_or_default()
}

#[test]
fn restart_logs_what_was_recovered_and_how_long_it_took() {
    let mut tern = TernProcess::new();
    tern.start(&[]);
    let first = recovery_line(&tern.log()).to_owned();
    assert!(first.contains("sessions=0") && first.contains("read 0 records, 0 B"), "first start: {first}");

    let addr = tern.addr();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        // A persistent subscriber that goes away: what is published for it is queued.
        let (mut keeper, _) = connect_with(addr, &Connect::v311("keeper").clean(false)).await;
        keeper.subscribe(1, "q/#", 1).await;
        keeper.disconnect().await;

        // A persistent publisher: three QoS 1 messages for the keeper, two retained messages
        // nobody subscribes to, and a QoS 2 message left unreleased (no PUBREL).
        let (mut publisher, _) = connect_with(addr, &Connect::v311("publisher").clean(false)).await;
        for (i, pid) in (1..=3).zip(10u16..) {
            publisher.publish(&format!("q/{i}"), b"queued", 1, pid).await;
        }
        publisher.publish_retain("r/a", b"A", 1, 20, true).await;
        publisher.publish_retain("r/b", b"B", 1, 21, true).await;
        publisher.send(&common::publish("x/2", b"held", 2, 30)).await;
        publisher.expect_ack(0x50, 30).await;
        publisher.disconnect().await;
    });
    tern.terminate();

    tern.start(&[]);
    let log = tern.log();
    let line = recovery_line(&log);
    assert_ne!(line, first, "no recovery line from the second start:\n{log}");
    for field in ["sessions=2", "subscriptions=1", "queued=3", "retained=2", "inbound_qos2=1", "wills=0", "discarded=0"]
    {
        assert!(line.contains(field), "`{field}` missing from: {line}");
    }
    // 2 sessions, 1 subscription, 3 queued messages, 1 inbound id, 2 retained messages.
    assert!(line.contains("(read 9 records, "), "records read: {line}");
    let took = line
        .split("state recovered from the store in ")
        .nth(1)
        .and_then(|rest| rest.split(" s ").next())
        .and_then(|s| s.parse::<f64>().ok());
    assert!(took.is_some_and(|s| (0.0..10.0).contains(&s)), "duration in seconds: {line}");

    // The state is really there: the keeper gets its three messages.
    rt.block_on(async {
        let (mut keeper, ack) = connect_with(addr, &Connect::v311("keeper").clean(false)).await;
        assert!(ack.session_present, "keeper's session was not recovered");
        for i in 1..=3 {
            let p = keeper.recv_publish_ack().await;
            assert_eq!((p.topic.as_str(), p.payload.as_slice()), (format!("q/{i}").as_str(), &b"queued"[..]));
        }
    });
    tern.terminate();
}
