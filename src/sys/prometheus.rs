//! `/metrics`: the broker's `Stats` in the Prometheus text format (0.0.4), written by the
//! Prometheus org's client crate from a collector that reads one snapshot per scrape (the
//! counters live in the broker; nothing is registered twice). Every name starts `tern_`;
//! README.md, "Prometheus metrics", lists them and config/grafana-tern.json uses them.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::broker::{DropCause, Stats};

pub(super) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

const QOS: [&str; 3] = ["0", "1", "2"];

/// The text of one scrape.
pub(super) fn render(stats: Stats) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(stats)));
    let mut out = String::with_capacity(8 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

#[derive(Debug)]
struct Snapshot(Stats);

/// One metric without labels.
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    m.encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: impl EncodeGaugeValue) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    m.encode_gauge(&v)
}

/// A counter with one label, one series per `(label value, count)`.
fn counters<'a, V: EncodeCounterValue + 'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (&'a str, V)>,
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, v) in series {
        let labels = [(label, value)];
        m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let e = &mut e;
        {
            let mut m =
                e.encode_descriptor("tern_build_info", "The running tern's version.", None, MetricType::Gauge)?;
            m.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?.encode_gauge(&1u64)?;
        }
        gauge(e, "tern_uptime_seconds", "Seconds since the broker started.", s.uptime_secs)?;
        gauge(e, "tern_clients_connected", "Sessions with a connection attached now.", s.connected)?;
        counter(
            e,
            "tern_connections",
            "Connections attached to a session since the start (CONNECTs accepted, bridges and in-process clients).",
            s.connections_total,
        )?;
        gauge(e, "tern_sessions", "Sessions held, connected or not.", s.sessions)?;
        counter(
            e,
            "tern_sessions_expired",
            "Sessions ended because their client stayed away too long.",
            s.sessions_expired,
        )?;
        gauge(e, "tern_subscriptions", "Subscriptions held by all sessions.", s.subscriptions)?;
        gauge(e, "tern_retained_messages", "Retained messages, the $SYS tree left out.", s.retained)?;

        let q = |a: &[u64; 3]| QOS.into_iter().zip(*a).collect::<Vec<_>>();
        counters(e, "tern_messages_received", "PUBLISH messages received, by QoS.", "qos", q(&s.publish_received))?;
        counters(
            e,
            "tern_messages_sent",
            "PUBLISH messages sent, by the QoS they went out with.",
            "qos",
            q(&s.publish_sent),
        )?;
        counters(
            e,
            "tern_publish_payload_bytes_received",
            "Payload bytes of the PUBLISH messages received, by QoS.",
            "qos",
            q(&s.publish_bytes_received),
        )?;
        counters(
            e,
            "tern_publish_payload_bytes_sent",
            "Payload bytes of the PUBLISH messages sent, by QoS.",
            "qos",
            q(&s.publish_bytes_sent),
        )?;
        counter(
            e,
            "tern_packets_received",
            "MQTT packets of every kind received from network clients.",
            s.packets_received,
        )?;
        counter(e, "tern_packets_sent", "MQTT packets of every kind sent to network clients.", s.packets_sent)?;
        counter(e, "tern_bytes_received", "Bytes read from network clients.", s.bytes_received)?;
        counter(e, "tern_bytes_sent", "Bytes written to network clients.", s.bytes_sent)?;
        counters(
            e,
            "tern_messages_dropped",
            "Messages that did not reach a subscriber, by cause.",
            "cause",
            DropCause::ALL.iter().map(|c| c.name()).zip(s.dropped),
        )?;

        gauge(
            e,
            "tern_queued_messages",
            "Messages waiting in sessions' queues, in memory and on disk.",
            s.queued_messages,
        )?;
        gauge(e, "tern_queued_bytes", "Bytes of the messages waiting in sessions' queues.", s.queued_bytes)?;
        gauge(e, "tern_inflight_messages", "QoS 1/2 messages sent and not yet acknowledged.", s.inflight)?;
        gauge(
            e,
            "tern_queued_memory_bytes",
            "Queue memory counted against limits.max_queued_memory.",
            s.queued_memory,
        )?;

        {
            let h = &s.commit_latency;
            let mut m = e.encode_descriptor(
                "tern_store_commit_seconds",
                "Time the store took to write and sync one group commit.",
                None,
                MetricType::Histogram,
            )?;
            m.encode_histogram::<NoLabelSet>(h.sum_us as f64 / 1e6, h.count, &h.cumulative(), None)?;
        }
        gauge(
            e,
            "tern_store_pending_bytes",
            "Bytes of store writes waiting for the commit thread.",
            s.store_pending_bytes,
        )?;
        gauge(
            e,
            "tern_store_failed",
            "1 once the store cannot write any more (the broker then exits), else 0.",
            u64::from(s.store_failure.is_some()),
        )?;

        gauge(
            e,
            "tern_publishers_waiting",
            "Connections whose publishes wait for a full subscriber's queue (flow control).",
            s.publishers_waiting,
        )?;
        counter(
            e,
            "tern_flow_waits",
            "Times a connection started waiting for a full subscriber's queue.",
            s.flow_waits,
        )?;
        gauge(
            e,
            "tern_inputs_paused",
            "Connections not read while the store catches up or while they hold limits.max_held_acks.",
            s.inputs_paused,
        )?;
        gauge(e, "tern_acks_held", "Acknowledgements held until the store has their effects on disk.", s.acks_held)?;
        counter(
            e,
            "tern_slow_consumers_disconnected",
            "Subscribers disconnected for a full queue without progress (limits.slow_consumer_secs).",
            s.slow_consumers,
        )?;

        if !s.bridges.is_empty() {
            let mut m = e.encode_descriptor(
                "tern_bridge_up",
                "1 while the bridge is connected to its peer, else 0.",
                None,
                MetricType::Gauge,
            )?;
            for (name, up) in &s.bridges {
                m.encode_family(&[("bridge", name.as_str())])?.encode_gauge(&u64::from(*up))?;
            }
        }
        if let Some(c) = &s.cluster {
            gauge(
                e,
                "tern_cluster_connected",
                "1 while this node is connected to NATS, else 0.",
                u64::from(c.connected),
            )?;
            counter(e, "tern_cluster_forwarded", "Messages of this node's clients handed to NATS.", c.forwarded)?;
            counter(e, "tern_cluster_received", "Messages from other nodes delivered here.", c.received)?;
            counter(
                e,
                "tern_cluster_ack_failures",
                "QoS 1/2 acknowledgements refused: JetStream did not take the message in time.",
                c.ack_failures,
            )?;
            counter(
                e,
                "tern_cluster_publish_errors",
                "QoS 0 messages or retained updates NATS could not take.",
                c.publish_errors,
            )?;
            counter(e, "tern_cluster_takeovers", "Client ids this node took over from another node.", c.takeovers)?;
            counter(
                e,
                "tern_cluster_claims_refused",
                "CONNECTs refused (0x88/0x03): client id not claimable (busy, NATS unreachable, lost race).",
                c.claims_refused,
            )?;
        }
        Ok(())
    }
}
