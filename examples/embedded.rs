//! A program that embeds tern: it runs the broker in-process for network clients and takes
//! part itself through an in-process client, with no socket of its own.
//!
//!     cargo run --example embedded
//!     mosquitto_sub -h 127.0.0.1 -p 1884 -t 'status/#' -v      # in another terminal
//!     mosquitto_pub -h 127.0.0.1 -p 1884 -t cmd/lamp -m on -q 1
//!
//! The program answers each command on `cmd/<device>` with `status/<device>` (retained), and
//! stops on Ctrl-C. Its session is persistent: commands sent while it is stopped wait for it
//! on disk (in `./data-embedded`).

use tern::{LocalOptions, QoS};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tern::Config::default();
    config.listener[0].bind = "127.0.0.1:1884".into();
    config.storage.dir = "./data-embedded".into();
    let broker = tern::start(config).await?;
    println!("broker listening on {}", broker.local_addr());

    let mut app = broker.connect_local(LocalOptions::new("embedded-app").persistent(u32::MAX))?;
    app.subscribe("cmd/+", QoS::AtLeastOnce).await?;
    app.publish("status/app", "online", QoS::AtLeastOnce, true).await?;

    loop {
        tokio::select! {
            msg = app.recv() => {
                let msg = msg?;
                let device = msg.topic.strip_prefix("cmd/").unwrap_or(&msg.topic).to_string();
                println!("command for {device}: {}", String::from_utf8_lossy(&msg.payload));
                // Stored before `publish` returns, like an acknowledged QoS 1 PUBLISH.
                app.publish(&format!("status/{device}"), msg.payload.clone(), QoS::AtLeastOnce, true).await?;
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    app.publish("status/app", "offline", QoS::AtLeastOnce, true).await?;
    app.disconnect().await;
    broker.shutdown().await?;
    Ok(())
}
