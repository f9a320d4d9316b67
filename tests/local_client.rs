//! The in-process client (`BrokerHandle::connect_local`): an embedding program publishes and
//! subscribes without a socket, with a network client's session, QoS, retained and ACL rules,
//! and network clients see it as one of their own.

mod common;

use std::time::Duration;

use common::*;
use tern::{LocalError, LocalOptions, QoS};

async fn recv(c: &mut tern::LocalClient) -> tern::Received {
    tokio::time::timeout(WAIT, c.recv()).await.expect("no message in time").expect("client disconnected")
}

#[tokio::test]
async fn local_publishes_reach_network_subscribers_at_every_qos() {
    let b = start().await;
    let mut sub = connect_v5(b.addr, "net-sub").await;
    sub.subscribe(1, "local/#", 2).await;
    let mut app = b.handle.connect_local(LocalOptions::new("app")).expect("local connect");
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
        app.publish(&format!("local/{i}"), format!("m{i}"), qos, false).await.expect("publish");
        let m = sub.recv_publish_ack().await;
        assert_eq!(
            (m.topic.as_str(), m.payload.as_slice(), m.qos),
            (&*format!("local/{i}"), format!("m{i}").as_bytes(), i as u8)
        );
    }
    // Retained: a later network subscriber gets it.
    app.publish("local/state", "on", QoS::AtLeastOnce, true).await.expect("retained publish");
    let mut late = connect_v311(b.addr, "late").await;
    late.subscribe(1, "local/state", 1).await;
    let m = late.recv_publish_ack().await;
    assert!(m.retain && m.payload == b"on");
    app.disconnect().await;
}

#[tokio::test]
async fn network_publishes_reach_a_local_subscriber_in_order_with_retained_first() {
    let b = start().await;
    let mut p = connect_v311(b.addr, "net-pub").await;
    p.publish_retain("dev/1/state", b"retained", 1, 1, true).await;
    let mut app = b.handle.connect_local(LocalOptions::new("app")).expect("local connect");
    assert_eq!(app.subscribe("dev/+/#", QoS::ExactlyOnce).await, Ok(QoS::ExactlyOnce));
    let m = recv(&mut app).await;
    assert_eq!((&*m.topic, &m.payload[..], m.retain), ("dev/1/state", &b"retained"[..], true));
    for i in 0..100u16 {
        p.publish("dev/2/data", &i.to_be_bytes(), (i % 3) as u8, i + 10).await;
    }
    for i in 0..100u16 {
        let m = recv(&mut app).await;
        assert_eq!(&m.payload[..], i.to_be_bytes(), "message {i} in order");
        assert_eq!(m.qos as u8, (i % 3) as u8);
    }
    assert_eq!(app.unsubscribe("dev/+/#").await, Ok(true));
    p.publish("dev/2/data", b"after", 1, 500).await;
    assert!(tokio::time::timeout(QUIET, app.recv()).await.is_err(), "delivered after UNSUBSCRIBE");
}

#[tokio::test]
async fn a_persistent_local_session_gets_what_came_while_it_was_away_and_unacknowledged_again() {
    let b = start().await;
    let opts = LocalOptions::new("app-persistent").persistent(3600);
    let mut app = b.handle.connect_local(opts.clone()).expect("local connect");
    app.subscribe("jobs", QoS::AtLeastOnce).await.expect("subscribe");
    app.disconnect().await;
    let mut p = connect_v311(b.addr, "jobs-pub").await;
    for i in 0..5u8 {
        p.publish("jobs", &[i], 1, u16::from(i) + 1).await;
    }
    let mut app = b.handle.connect_local(opts.clone()).expect("resume");
    let m = recv(&mut app).await;
    assert_eq!((&m.payload[..], m.dup), (&[0u8][..], false));
    // The program stops while handling job 1 (it never asks for the next message).
    let m = recv(&mut app).await;
    assert_eq!(&m.payload[..], [1]);
    drop(app);
    let mut app = b.handle.connect_local(opts).expect("resume again");
    let m = recv(&mut app).await;
    assert_eq!((&m.payload[..], m.dup), (&[1u8][..], true), "the job being handled comes again, flagged");
    for i in 2..5u8 {
        assert_eq!(&recv(&mut app).await.payload[..], [i]);
    }
    assert!(tokio::time::timeout(QUIET, app.recv()).await.is_err(), "job 0 was acknowledged and must not come again");
}

#[tokio::test]
async fn the_acl_applies_to_local_clients_and_a_network_takeover_ends_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "user app\ntopic readwrite app/#\n").expect("acl");
    let b = start_with(|c| {
        c.auth.acl_file = Some(acl.clone());
        c.auth.allow_anonymous = Some(true);
    })
    .await;
    let mut app = b.handle.connect_local(LocalOptions::new("svc").username("app")).expect("local connect");
    assert_eq!(app.publish("other/x", "no", QoS::AtLeastOnce, false).await, Err(LocalError::NotAuthorized));
    assert_eq!(app.subscribe("other/#", QoS::AtLeastOnce).await, Err(LocalError::NotAuthorized));
    assert_eq!(app.publish("app/x", "yes", QoS::AtLeastOnce, false).await, Ok(()));
    assert_eq!(app.publish("bad/+", "x", QoS::AtMostOnce, false).await, Err(LocalError::InvalidTopic));

    // A network client with the same client id takes the session over.
    let _net = connect_v5(b.addr, "svc").await;
    let end = tokio::time::timeout(Duration::from_secs(5), app.recv()).await.expect("the local client was not told");
    assert_eq!(end.err(), Some(LocalError::Disconnected(0x8E)));
}
