//! `[[priority]]`: a session's queue sends higher levels first, in order within a level.

mod common;

use common::*;

#[tokio::test]
async fn queued_messages_go_out_by_priority_then_in_order() {
    let b = start_with(|c| {
        c.priority = vec![
            tern::config::Priority { filter: "alarms/#".into(), level: 9 },
            tern::config::Priority { filter: "+/door".into(), level: 5 },
        ]
    })
    .await;
    let session = Connect::v311("prio").clean(false);
    let (mut s, _) = connect_with(b.addr, &session).await;
    s.subscribe(1, "#", 1).await;
    s.disconnect().await;

    let mut p = connect_v311(b.addr, "prio-pub").await;
    let sent = [
        ("t/1", "n1"),
        ("alarms/fire", "a1"),
        ("front/door", "d1"),
        ("t/2", "n2"),
        ("alarms/flood", "a2"),
        ("back/door", "d2"),
        ("t/3", "n3"),
    ];
    for (i, (topic, payload)) in sent.iter().enumerate() {
        p.publish(topic, payload.as_bytes(), 1, i as u16 + 1).await;
    }

    let (mut s, ack) = connect_with(b.addr, &session).await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        got.push(String::from_utf8(s.recv_publish_ack().await.payload).unwrap());
    }
    assert_eq!(got, vec!["a1", "a2", "d1", "d2", "n1", "n2", "n3"]);
}

#[tokio::test]
async fn bad_priority_level_is_named() {
    let c = tern::Config {
        priority: vec![tern::config::Priority { filter: "a/#".into(), level: 12 }],
        ..Default::default()
    };
    let err = c.validate("p.toml").unwrap_err().to_string();
    assert!(err.contains("priority[0].level"), "{err}");
}
