//! Packets from the client once connected: decoding with the spec's answers to bad input,
//! PUBLISH routing with its acknowledgements, the QoS handshakes, SUBSCRIBE/UNSUBSCRIBE,
//! re-authentication and DISCONNECT.

use super::*;

/// Most QoS 0 publishes a connection delivers together (`route_q0`): with 16 subscribers,
/// 1,024 copies, which `Broker::publish_batch` holds at once. A batch reaches subscribers up
/// to that many messages past the one that filled a queue: within the slack the soft bound
/// leaves for what publishers send before they notice (`SessionState::enqueue`).
const Q0_BATCH_MAX: usize = 64;

thread_local! {
    /// The QoS 0 publishes of the connection whose input this thread is handling.
    static Q0_BATCH: std::cell::Cell<Vec<Arc<crate::message::Message>>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Conn {
    /// Handles the whole packets in the read buffer; counts them once for the lot.
    pub(super) fn process_input(&mut self) -> Result<(), Close> {
        let mut packets = 0u64;
        let result = self.process_packets(&mut packets);
        // Even when the input ends in an error: what came before it was accepted.
        self.flush_publishes();
        if packets > 0 {
            self.link.broker.metrics.packets_received.fetch_add(packets, Ordering::Relaxed);
        }
        result
    }

    fn process_packets(&mut self, packets: &mut u64) -> Result<(), Close> {
        let max = self.link.broker.config.limits.max_packet_size as usize;
        loop {
            let Some(&first) = self.rbuf.first() else { return Ok(()) };
            if self.input_blocked() {
                // The rest stays in the read buffer until the bound clears (`resume_input`).
                self.pause_input();
                return Ok(());
            }
            if let Some(close) = self.unexpected_packet_type(first) {
                return Err(close);
            }
            // Handled as `Packet::PubAck` below would be (an acknowledgement is never put
            // aside), without the `Packet`.
            if let Some(id) = protocol::bare_puback(&self.rbuf).filter(|_| max >= 4) {
                bytes::Buf::advance(&mut self.rbuf, 4);
                *packets += 1;
                Self::check_ack(self.link.puback(id), "PUBACK")?;
                continue;
            }
            let before = self.rbuf.len();
            match protocol::decode(&mut self.rbuf, Some(self.version), max) {
                Ok(Some(p)) => {
                    *packets += 1;
                    match self.flow.as_mut() {
                        // Waiting for room: only acknowledgements of this client's own
                        // deliveries go through (they let its queue drain: two clients
                        // publishing to each other must not stall each other); the rest
                        // waits, in order (a PINGRESP tells some clients everything before it
                        // was handled).
                        Some(f) if !matches!(p, Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_)) => {
                            f.put_aside(p, before - self.rbuf.len());
                        }
                        _ => self.handle_packet(p)?,
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    let what = e.to_string();
                    // A PINGREQ with a body, or a DISCONNECT with an unknown reason code, ends
                    // the connection without a DISCONNECT of ours (as mosquitto; the spec's
                    // DISCONNECT before closing is a SHOULD).
                    let silent =
                        (first == 0xC0) || (first == 0xE0 && e == DecodeError::Protocol("invalid reason code"));
                    return Err(if silent {
                        Close::Silent(what)
                    } else {
                        Close::Error { reason: e.reason_code(), what }
                    });
                }
            }
        }
    }

    /// Packet types a client never sends are refused from their first byte, before their
    /// body is even read: CONNACK, SUBACK, UNSUBACK, PINGRESP, and AUTH when no
    /// authentication method was agreed (always, for now). Protocol Error (0x82), except a
    /// SUBACK/UNSUBACK with bad flag bits, which is malformed first.
    pub(super) fn unexpected_packet_type(&self, first: u8) -> Option<Close> {
        let flags = first & 0x0F;
        let what = match first >> 4 {
            2 => "CONNACK from a client",
            9 | 11 if flags != 0 => {
                return Some(Close::Error { reason: reason::MALFORMED_PACKET, what: "bad fixed header flags".into() })
            }
            9 => "SUBACK from a client",
            11 => "UNSUBACK from a client",
            // A PINGRESP with a body is dropped without a word, as mosquitto does.
            13 if self.rbuf.get(1).is_some_and(|&len| len != 0) => {
                return Some(Close::Silent("PINGRESP from a client".into()))
            }
            13 => "PINGRESP from a client",
            15 if self.version.is_v5() && self.auth.is_none() => "AUTH without an authentication method",
            _ => return None,
        };
        Some(Self::protocol_error(what))
    }

    pub(super) fn protocol_error(what: &str) -> Close {
        Close::Error { reason: reason::PROTOCOL_ERROR, what: what.into() }
    }

    pub(super) fn handle_packet(&mut self, p: Packet) -> Result<(), Close> {
        if !matches!(p, Packet::Publish(_)) {
            // Whatever this packet does comes after the publishes before it (a PINGRESP, a
            // SUBACK, a will, a DISCONNECT).
            self.flush_publishes();
        }
        match p {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(r) => Self::check_ack(self.link.puback(r.packet_id), "PUBACK"),
            Packet::PubRec(r) => {
                let (ack, ticket, replicated) = self.link.pubrec(r.packet_id, r.reason < 0x80);
                Self::check_ack(ack, "PUBREC")?;
                // PUBREL lets the receiver forget the id; after a crash we must then resend
                // PUBREL, never the PUBLISH, so it waits until "released" is durable (in the
                // store, and in a cluster's session record).
                // An unknown id still gets PUBREL with success, as mosquitto answers (0x92
                // would also be allowed): the client then completes and forgets it.
                if r.reason < 0x80 {
                    self.respond_after(ticket, replicated, Packet::PubRel(PubResp::new(r.packet_id)), None);
                }
                Ok(())
            }
            Packet::PubRel(r) => {
                // PUBCOMP even for an unknown id (success, as mosquitto): the client may be
                // retrying after our PUBCOMP was lost.
                let ticket = self.link.qos2_released(r.packet_id);
                self.respond(ticket, Packet::PubComp(PubResp::new(r.packet_id)), None);
                Ok(())
            }
            Packet::PubComp(r) => Self::check_ack(self.link.pubcomp(r.packet_id), "PUBCOMP"),
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => {
                // Behind any held acknowledgement: a PINGRESP tells some clients that
                // everything sent before the PINGREQ was handled.
                self.respond(0, Packet::PingResp, None);
                Ok(())
            }
            Packet::Disconnect(d) => self.on_disconnect(d),
            Packet::Connect(_) => Err(Self::protocol_error("second CONNECT")),
            Packet::Auth(a) => self.on_auth(a),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(Self::protocol_error("server-to-client packet sent by client"))
            }
        }
    }

    /// An acknowledgement of the wrong kind for a message in flight (PUBREC for QoS 1,
    /// PUBACK for QoS 2...) is a Protocol Error [MQTT-4.3]; one for an unknown id is ignored.
    pub(super) fn check_ack(ack: Ack, kind: &str) -> Result<(), Close> {
        match ack {
            Ack::Done(_) | Ack::Unknown => Ok(()),
            Ack::WrongType => Err(Close::Error {
                reason: reason::PROTOCOL_ERROR,
                what: format!("{kind} does not match the QoS flow of its packet id"),
            }),
        }
    }

    pub(super) fn on_publish(&mut self, mut p: Publish) -> Result<(), Close> {
        let cfg = Arc::clone(&self.link.broker.config);
        let v5 = self.version.is_v5();
        if v5 {
            if !p.properties.subscription_identifiers.is_empty() {
                // [MQTT-3.3.4-6]
                return Err(Self::protocol_error("PUBLISH from a client with a Subscription Identifier"));
            }
            if let Some(alias) = p.properties.topic_alias.take() {
                if alias == 0 || alias > cfg.mqtt.topic_alias_maximum {
                    return Err(Close::Error {
                        reason: reason::TOPIC_ALIAS_INVALID,
                        what: format!("topic alias {alias}"),
                    });
                }
                if p.topic.is_empty() {
                    match self.inbound_aliases.as_ref().and_then(|m| m.get(&alias)) {
                        Some(t) => p.topic = t.clone(),
                        None => return Err(Self::protocol_error("unknown topic alias")),
                    }
                } else {
                    // Copied: a slice would pin the read buffer for as long as the alias lives.
                    let topic = ByteString::from(&*p.topic);
                    self.inbound_aliases.get_or_insert_with(Default::default).insert(alias, topic);
                }
            }
        }
        if p.topic.is_empty() {
            return Err(Self::protocol_error("empty topic"));
        }
        if !topic_within_limits(&p.topic, &cfg) {
            return Err(Close::Error {
                reason: reason::TOPIC_NAME_INVALID,
                what: "topic over the configured length or depth".into(),
            });
        }
        if (p.qos as u8) > cfg.mqtt.maximum_qos {
            return Err(Close::Error { reason: reason::QOS_NOT_SUPPORTED, what: "QoS above maximum".into() });
        }
        if p.retain && !cfg.mqtt.retain_available {
            return Err(Close::Error { reason: reason::RETAIN_NOT_SUPPORTED, what: "retain not available".into() });
        }
        let mut ack_reason = reason::SUCCESS;
        if v5 && p.properties.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            ack_reason = reason::PAYLOAD_FORMAT_INVALID;
        }
        if v5 && p.properties.user_properties.len() > cfg.limits.max_user_properties {
            // Each property costs far more held than on the wire; refuse rather than queue.
            ack_reason = reason::QUOTA_EXCEEDED;
        }
        if !self.link.may_publish(&p.topic) {
            // v5 hears why (0x87); a 3.1.1 client has no way to, so its message is
            // acknowledged and dropped, as mosquitto does.
            debug!(client_id = %self.link.client_id(), topic = %p.topic, "publish not authorised");
            if v5 {
                ack_reason = reason::NOT_AUTHORIZED;
            } else {
                return self.acknowledge_dropped(&p);
            }
        }
        let pid = p.packet_id.unwrap_or(0);
        match p.qos {
            QoS::AtMostOnce => {
                if ack_reason == reason::SUCCESS {
                    self.route_q0(p);
                }
            }
            QoS::AtLeastOnce => {
                let (mut ticket, mut replicated) = (0, None);
                if ack_reason == reason::SUCCESS {
                    let routed = self.route(p, None);
                    (ticket, replicated) = (routed.ticket, routed.replicated);
                    // In a cluster, other nodes' subscribers are not known here.
                    if routed.matched == 0 && v5 && replicated.is_none() {
                        ack_reason = reason::NO_MATCHING_SUBSCRIBERS;
                    }
                }
                let ack = PubResp { packet_id: pid, reason: ack_reason, properties: Properties::default() };
                self.respond_after(ticket, replicated, Packet::PubAck(ack), None);
            }
            QoS::ExactlyOnce => {
                let (mut ticket, mut replicated) = (0, None);
                if ack_reason == reason::SUCCESS {
                    let Qos2Received { first, pending, record } = self.link.qos2_received(pid);
                    if first {
                        if v5 && pending > usize::from(cfg.mqtt.receive_maximum) {
                            return Err(Close::Error {
                                reason: reason::RECEIVE_MAXIMUM_EXCEEDED,
                                what: "more unreleased QoS 2 publishes than Receive Maximum".into(),
                            });
                        }
                        if !v5 && pending > cfg.limits.max_awaiting_pubrel {
                            return Err(Close::Error {
                                reason: reason::QUOTA_EXCEEDED,
                                what: "more unreleased QoS 2 publishes than limits.max_awaiting_pubrel".into(),
                            });
                        }
                        // The id is stored with the message's effects, so after a crash a
                        // resent PUBLISH is still recognised as a duplicate. PUBREC stays 0x00
                        // without subscribers (mosquitto sends 0x10 only in PUBACK).
                        let routed = self.route(p, record);
                        (ticket, replicated) = (routed.ticket, routed.replicated);
                    }
                    // A duplicate (same id before PUBREL) is acknowledged again but not
                    // delivered again [MQTT-4.3.3-9].
                }
                let ack = PubResp { packet_id: pid, reason: ack_reason, properties: Properties::default() };
                self.respond_after(ticket, replicated, Packet::PubRec(ack), None);
            }
        }
        Ok(())
    }

    /// Acknowledges a 3.1.1 PUBLISH that is not passed on.
    fn acknowledge_dropped(&mut self, p: &Publish) -> Result<(), Close> {
        let pid = p.packet_id.unwrap_or(0);
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.respond(0, Packet::PubAck(PubResp::new(pid)), None),
            QoS::ExactlyOnce => self.respond(0, Packet::PubRec(PubResp::new(pid)), None),
        }
        Ok(())
    }

    /// Hands a client's PUBLISH to the broker; returns how many sessions it reached and what
    /// its acknowledgement waits for.
    pub(super) fn route(&mut self, p: Publish, extra: Option<Op>) -> Routed {
        let msg = self.message(p);
        self.publish_now(msg, extra)
    }

    /// A QoS 0 publish: put with the others of the same read (`Broker::publish_batch`) when it
    /// can be, routed at once when not.
    fn route_q0(&mut self, p: Publish) {
        let msg = self.message(p);
        if !self.link.broker.batchable(&msg) {
            self.publish_now(msg, None);
            return;
        }
        let len = Q0_BATCH.with(|b| {
            let mut batch = b.take();
            batch.push(Arc::new(msg));
            let len = batch.len();
            b.set(batch);
            len
        });
        if len >= Q0_BATCH_MAX {
            self.flush_publishes();
        }
    }

    fn message(&self, p: Publish) -> Message {
        let mut props = p.properties;
        props.topic_alias = None;
        Message::received(p.topic, p.payload, p.qos, p.retain, props, self.link.client_id().clone())
    }

    /// Routes `msg` behind the QoS 0 publishes before it.
    fn publish_now(&mut self, msg: Message, extra: Option<Op>) -> Routed {
        self.flush_publishes();
        let mut full = Vec::new();
        let routed = self.link.publish(msg, extra, &mut full);
        if !full.is_empty() {
            self.wait_for_room(full);
        }
        routed
    }

    /// Delivers the QoS 0 publishes `route_q0` put aside. Called before anything that must
    /// come after them, and before the connection's input handling returns: the batch never
    /// outlives one synchronous pass over the read buffer, so it is the thread's, not the
    /// connection's (an idle connection does not carry it).
    pub(super) fn flush_publishes(&mut self) {
        let mut batch = Q0_BATCH.with(std::cell::Cell::take);
        if batch.is_empty() {
            return;
        }
        let mut full = Vec::new();
        self.link.publish_batch(&mut batch, &mut full);
        Q0_BATCH.with(|b| b.set(batch));
        if !full.is_empty() {
            self.wait_for_room(full);
        }
    }

    pub(super) fn on_subscribe(&mut self, s: Subscribe) -> Result<(), Close> {
        let cfg = Arc::clone(&self.link.broker.config);
        let v5 = self.version.is_v5();
        let sub_id = s.properties.subscription_identifiers.first().copied();
        if sub_id.is_some() && !cfg.mqtt.subscription_identifiers {
            return Err(Close::Error {
                reason: reason::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                what: "subscription identifiers are disabled".into(),
            });
        }
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = RetainedCollector::new(sub_id);
        let mut ticket = 0;
        for (filter, mut opts) in s.filters {
            let shared = topic::is_shared(&filter);
            opts.no_local |= self.bridge_peer && !shared;
            if shared && opts.no_local && v5 {
                // [MQTT-3.8.3-4]
                return Err(Self::protocol_error("No Local on a shared subscription"));
            }
            let plain = topic::parse_shared(&filter).map_or(&*filter, |(_, f)| f);
            let invalid = if shared && topic::parse_shared(&filter).is_none() {
                Some(reason::TOPIC_FILTER_INVALID)
            } else if shared && !cfg.mqtt.shared_subscriptions {
                Some(reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED)
            } else if !cfg.mqtt.wildcard_subscriptions && plain.contains(['+', '#']) {
                Some(reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED)
            } else if !topic_within_limits(plain, &cfg) {
                Some(reason::TOPIC_FILTER_INVALID)
            } else {
                None
            };
            let result = match invalid {
                Some(code) => Err(code),
                None => self.link.subscribe(&filter, opts, sub_id, &mut retained),
            };
            match result {
                Ok(sub) => {
                    ticket = ticket.max(sub.ticket);
                    codes.push(sub.qos as u8);
                }
                Err(code) => codes.push(if v5 { code } else { reason::v3::SUBACK_FAILURE }),
            }
        }
        let ack = SubAck { packet_id: s.packet_id, return_codes: codes, properties: Properties::default() };
        // The retained messages are queued once the SUBACK goes out; those only on disk are
        // read as the queue drains (off this task).
        let saved = self.link.save_subscriptions();
        self.respond_after(ticket, saved, Packet::SubAck(ack), retained.finish());
        Ok(())
    }

    pub(super) fn on_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Close> {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let existed = self.link.unsubscribe(f);
            codes.push(if existed { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
        }
        if !self.version.is_v5() {
            codes.clear();
        }
        // Behind any SUBACK still held for the store, so acknowledgements keep their order.
        let ack = UnsubAck { packet_id: u.packet_id, reason_codes: codes, properties: Properties::default() };
        let saved = self.link.save_subscriptions();
        self.respond_after(0, saved, Packet::UnsubAck(ack), None);
        Ok(())
    }

    /// Re-authentication (4.12.1): AUTH 0x19 starts a new exchange with the method of CONNECT,
    /// AUTH 0x18 continues it; success is answered with AUTH 0x00, failure with DISCONNECT.
    pub(super) fn on_auth(&mut self, a: Auth) -> Result<(), Close> {
        let Some(auth) = self.auth.as_mut() else {
            return Err(Self::protocol_error("AUTH without an authentication method"));
        };
        if a.properties.authentication_method.as_deref() != Some(&*auth.name) {
            // [MQTT-4.12.1-1]: the method may not change.
            return Err(Self::protocol_error("AUTH names another authentication method"));
        }
        let data = a.properties.authentication_data.as_deref();
        let step = match (a.reason, auth.exchange.as_mut()) {
            (reason::REAUTHENTICATE, None) => {
                // The user name is the one already authorised: re-authentication may renew
                // the proof, never change who the connection is.
                let user = self.link.principal.username.as_deref();
                let (exchange, step) = auth.method.start(self.link.client_id(), user, data);
                auth.exchange = Some(exchange);
                step
            }
            (reason::CONTINUE_AUTHENTICATION, Some(exchange)) => exchange.next(data),
            _ => return Err(Self::protocol_error("AUTH out of sequence")),
        };
        let name = auth.name.clone();
        let (code, data) = match step {
            AuthStep::Continue(d) => (reason::CONTINUE_AUTHENTICATION, d),
            AuthStep::Success(d) => {
                let exchange = auth.exchange.take();
                let proved = exchange.and_then(|e| e.identity());
                if proved.is_some_and(|name| Some(name.as_str()) != self.link.principal.username.as_deref()) {
                    return Err(Close::Error {
                        reason: reason::NOT_AUTHORIZED,
                        what: "re-authenticated as another user".into(),
                    });
                }
                (reason::SUCCESS, d)
            }
            AuthStep::Fail(code) => {
                return Err(Close::Error { reason: code, what: "re-authentication failed".into() });
            }
        };
        let properties =
            Properties { authentication_method: Some(name), authentication_data: data, ..Default::default() };
        self.encode(Packet::Auth(Auth { reason: code, properties }));
        Ok(())
    }

    pub(super) fn on_disconnect(&mut self, d: Disconnect) -> Result<(), Close> {
        if let Some(e) = d.properties.session_expiry_interval {
            if self.connect_expiry_zero && e != 0 {
                return Err(Self::protocol_error("DISCONNECT raised a zero Session Expiry Interval"));
            }
            self.session_expiry = e;
        }
        Err(Close::Client { publish_will: d.reason == reason::DISCONNECT_WITH_WILL })
    }
}
