//! Packets from the client once connected: decoding with the spec's answers to bad input,
//! PUBLISH routing with its acknowledgements, the QoS handshakes, SUBSCRIBE/UNSUBSCRIBE,
//! re-authentication and DISCONNECT.

use super::*;

impl Conn {
    pub(super) fn process_input(&mut self) -> Result<(), Close> {
        let max = self.broker.config.limits.max_packet_size as usize;
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
            let before = self.rbuf.len();
            match protocol::decode(&mut self.rbuf, Some(self.version), max) {
                Ok(Some(p)) => match self.flow.as_mut() {
                    // Waiting for room: only acknowledgements of this client's own deliveries
                    // go through (they let its queue drain: two clients publishing to each
                    // other must not stall each other); the rest waits, in order (a PINGRESP
                    // tells some clients everything before it was handled).
                    Some(f) if !matches!(p, Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_)) => {
                        f.put_aside(p, before - self.rbuf.len());
                    }
                    _ => self.handle_packet(p)?,
                },
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
        match p {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(r) => {
                let ack = self.handle.lock().state.puback(r.packet_id);
                self.forget_stored(ack);
                Self::check_ack(ack, "PUBACK")
            }
            Packet::PubRec(r) => {
                let ack = self.handle.lock().state.pubrec(r.packet_id, r.reason < 0x80);
                let mut ticket = 0;
                if let Ack::Done(Some(seq)) = ack {
                    let op = if r.reason < 0x80 {
                        Op::SetInflight {
                            client: self.client_id.clone(),
                            seq,
                            state: InflightState::Released(r.packet_id),
                        }
                    } else {
                        Op::DeleteQueued { client: self.client_id.clone(), seq }
                    };
                    ticket = self.broker.persist(vec![op]);
                }
                Self::check_ack(ack, "PUBREC")?;
                // PUBREL lets the receiver forget the id; after a crash we must then resend
                // PUBREL, never the PUBLISH, so it waits until "released" is durable.
                // An unknown id still gets PUBREL with success, as mosquitto answers (0x92
                // would also be allowed): the client then completes and forgets it.
                if r.reason < 0x80 {
                    self.respond(ticket, Packet::PubRel(PubResp::new(r.packet_id)), Vec::new());
                }
                Ok(())
            }
            Packet::PubRel(r) => {
                // PUBCOMP even for an unknown id (success, as mosquitto): the client may be
                // retrying after our PUBCOMP was lost.
                let (known, persistent) = {
                    let mut cell = self.handle.lock();
                    (cell.state.inbound_qos2_release(r.packet_id), cell.persistent())
                };
                // PUBCOMP lets the publisher reuse the id; were the id still stored after a
                // crash, its next message with that id would be taken for a duplicate and
                // lost. So PUBCOMP waits for the delete to be durable.
                let mut ticket = 0;
                if known && persistent {
                    ticket = self
                        .broker
                        .persist(vec![Op::DeleteInbound { client: self.client_id.clone(), packet_id: r.packet_id }]);
                }
                self.respond(ticket, Packet::PubComp(PubResp::new(r.packet_id)), Vec::new());
                Ok(())
            }
            Packet::PubComp(r) => {
                let ack = self.handle.lock().state.pubcomp(r.packet_id);
                self.forget_stored(ack);
                Self::check_ack(ack, "PUBCOMP")
            }
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => {
                // Behind any held acknowledgement: a PINGRESP tells some clients that
                // everything sent before the PINGREQ was handled.
                self.respond(0, Packet::PingResp, Vec::new());
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

    /// A delivery that ended deletes its stored copy.
    pub(super) fn forget_stored(&self, ack: Ack) {
        if let Ack::Done(Some(seq)) = ack {
            self.broker.persist(vec![Op::DeleteQueued { client: self.client_id.clone(), seq }]);
        }
    }

    pub(super) fn on_publish(&mut self, mut p: Publish) -> Result<(), Close> {
        let cfg = Arc::clone(&self.broker.config);
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
        if !self.broker.may_publish(&self.principal, &p.topic) {
            // v5 hears why (0x87); a 3.1.1 client has no way to, so its message is
            // acknowledged and dropped, as mosquitto does.
            debug!(client_id = %self.client_id, topic = %p.topic, "publish not authorised");
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
                    self.route(p, None);
                }
            }
            QoS::AtLeastOnce => {
                let mut ticket = 0;
                if ack_reason == reason::SUCCESS {
                    let (n, t) = self.route(p, None);
                    ticket = t;
                    if n == 0 && v5 {
                        ack_reason = reason::NO_MATCHING_SUBSCRIBERS;
                    }
                }
                let ack = PubResp { packet_id: pid, reason: ack_reason, properties: Properties::default() };
                self.respond(ticket, Packet::PubAck(ack), Vec::new());
            }
            QoS::ExactlyOnce => {
                let mut ticket = 0;
                if ack_reason == reason::SUCCESS {
                    let (first, pending, persistent) = {
                        let mut cell = self.handle.lock();
                        let first = cell.state.inbound_qos2_begin(pid);
                        (first, cell.state.inbound_qos2_len(), cell.persistent())
                    };
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
                        // resent PUBLISH is still recognised as a duplicate.
                        let extra =
                            persistent.then(|| Op::PutInbound { client: self.client_id.clone(), packet_id: pid });
                        // PUBREC stays 0x00 without subscribers (mosquitto sends 0x10 only
                        // in PUBACK).
                        ticket = self.route(p, extra).1;
                    }
                    // A duplicate (same id before PUBREL) is acknowledged again but not
                    // delivered again [MQTT-4.3.3-9].
                }
                let ack = PubResp { packet_id: pid, reason: ack_reason, properties: Properties::default() };
                self.respond(ticket, Packet::PubRec(ack), Vec::new());
            }
        }
        Ok(())
    }

    /// Acknowledges a 3.1.1 PUBLISH that is not passed on.
    fn acknowledge_dropped(&mut self, p: &Publish) -> Result<(), Close> {
        let pid = p.packet_id.unwrap_or(0);
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.respond(0, Packet::PubAck(PubResp::new(pid)), Vec::new()),
            QoS::ExactlyOnce => self.respond(0, Packet::PubRec(PubResp::new(pid)), Vec::new()),
        }
        Ok(())
    }

    /// Hands a client's PUBLISH to the broker; returns how many sessions it reached and the
    /// store ticket its acknowledgement waits for.
    pub(super) fn route(&mut self, p: Publish, extra: Option<Op>) -> (usize, u64) {
        let mut props = p.properties;
        props.topic_alias = None;
        let msg = Message::received(p.topic, p.payload, p.qos, p.retain, props, self.client_id.clone());
        let mut full = Vec::new();
        let routed = self.broker.publish_flow(Arc::new(msg), extra, &mut full);
        if !full.is_empty() {
            self.wait_for_room(full);
        }
        routed
    }

    pub(super) fn on_subscribe(&mut self, s: Subscribe) -> Result<(), Close> {
        let cfg = Arc::clone(&self.broker.config);
        let v5 = self.version.is_v5();
        let sub_id = s.properties.subscription_identifiers.first().copied();
        if sub_id.is_some() && !cfg.mqtt.subscription_identifiers {
            return Err(Close::Error {
                reason: reason::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                what: "subscription identifiers are disabled".into(),
            });
        }
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        let mut seen: HashMap<ByteString, usize> = HashMap::new();
        // Retained messages held only on disk: topic -> (highest granted QoS, subscription ids).
        let mut stored: HashMap<ByteString, (QoS, Vec<u32>)> = HashMap::new();
        let mut ticket = 0;
        for (filter, mut opts) in s.filters {
            let shared = topic::is_shared(&filter);
            if shared && opts.no_local && v5 {
                // [MQTT-3.8.3-4]
                return Err(Self::protocol_error("No Local on a shared subscription"));
            }
            let plain = topic::parse_shared(&filter).map_or(&*filter, |(_, f)| f);
            let failure = if shared && topic::parse_shared(&filter).is_none() {
                Some(reason::TOPIC_FILTER_INVALID)
            } else if shared && !cfg.mqtt.shared_subscriptions {
                Some(reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED)
            } else if !cfg.mqtt.wildcard_subscriptions && plain.contains(['+', '#']) {
                Some(reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED)
            } else if !topic_within_limits(plain, &cfg) {
                Some(reason::TOPIC_FILTER_INVALID)
            } else if self.over_subscription_limit(&filter, cfg.limits.max_subscriptions) {
                Some(reason::QUOTA_EXCEEDED)
            } else if !self.broker.policy.may_subscribe(&self.principal, plain) {
                // Unlike mosquitto 2.0, which grants every SUBSCRIBE and filters deliveries,
                // the client learns at once that it will receive nothing here.
                debug!(client_id = %self.client_id, filter = %filter, "subscription not authorised");
                Some(reason::NOT_AUTHORIZED)
            } else {
                None
            };
            if let Some(code) = failure {
                codes.push(if v5 { code } else { reason::v3::SUBACK_FAILURE });
                continue;
            }
            opts.qos = opts.qos.min(QoS::from_u8(cfg.mqtt.maximum_qos).unwrap_or(QoS::ExactlyOnce));
            let result = self.broker.subscribe(&self.handle, &filter, opts, sub_id);
            ticket = ticket.max(result.ticket);
            codes.push(opts.qos as u8);
            // Retain Handling [MQTT-3.3.1-9..11]; never for shared subscriptions [MQTT-3.8.4-?].
            let send = !result.shared
                && match opts.retain_handling {
                    0 => true,
                    1 => !result.existed,
                    _ => false,
                };
            if send {
                let matches = self.broker.retained_matches(plain);
                for m in matches.loaded {
                    let qos = m.qos.min(opts.qos);
                    // One copy per retained message however many filters of this SUBSCRIBE
                    // match it: a SUBSCRIBE of many overlapping filters must not multiply the
                    // retained store into the queue.
                    if let Some(&i) = seen.get(&m.topic) {
                        merge_retained(&mut retained[i], qos, sub_id);
                        continue;
                    }
                    seen.insert(m.topic.clone(), retained.len());
                    retained.push(retained_delivery(m, qos, sub_id));
                }
                for topic in matches.stored {
                    // Only its topic is in memory: read from the store below, once.
                    let entry = stored.entry(topic).or_insert((QoS::AtMostOnce, Vec::new()));
                    entry.0 = entry.0.max(opts.qos);
                    entry.1.extend(sub_id.filter(|id| !entry.1.contains(id)));
                }
            }
        }
        let ack = SubAck { packet_id: s.packet_id, return_codes: codes, properties: Properties::default() };
        self.respond(ticket, Packet::SubAck(ack), retained);
        if !stored.is_empty() {
            // Reading them blocks on the disk, so it happens off this task; they are queued when
            // read (MQTT allows them before the SUBACK, and they follow it in practice).
            let broker = Arc::clone(&self.broker);
            let handle = Arc::clone(&self.handle);
            tokio::spawn(async move {
                let topics = stored.keys().cloned().collect();
                let read = broker.read_stored_retained(topics).await;
                let ds = read
                    .into_iter()
                    .filter_map(|m| {
                        let (granted, ids) = stored.get(&m.topic)?;
                        let qos = m.qos.min(*granted);
                        let mut d = retained_delivery(m, qos, None);
                        d.subscription_ids = ids.clone();
                        Some(d)
                    })
                    .collect();
                broker.deliver_retained(&handle, ds);
            });
        }
        Ok(())
    }

    /// Whether subscribing to `filter` would take the session over its subscription limit
    /// (replacing one it holds never does).
    fn over_subscription_limit(&self, filter: &ByteString, max: usize) -> bool {
        let cell = self.handle.lock();
        cell.subscriptions.len() >= max && !cell.subscriptions.contains_key(filter)
    }

    pub(super) fn on_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Close> {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let existed = self.broker.unsubscribe(&self.handle, f);
            codes.push(if existed { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
        }
        if !self.version.is_v5() {
            codes.clear();
        }
        // Behind any SUBACK still held for the store, so acknowledgements keep their order.
        let ack = UnsubAck { packet_id: u.packet_id, reason_codes: codes, properties: Properties::default() };
        self.respond(0, Packet::UnsubAck(ack), Vec::new());
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
                let user = self.principal.username.as_deref();
                let (exchange, step) = auth.method.start(&self.client_id, user, data);
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
                if proved.is_some_and(|name| Some(name.as_str()) != self.principal.username.as_deref()) {
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

/// A retained message as sent on subscribe.
fn retained_delivery(msg: Arc<Message>, qos: QoS, sub_id: Option<u32>) -> Delivery {
    Delivery {
        msg,
        qos,
        retain: true,
        subscription_ids: sub_id.into_iter().collect(),
        store_seq: None,
        shared: None,
        maybe_sent: false,
        priority: 0,
    }
}

/// Another filter of the same SUBSCRIBE matched a retained message already queued.
fn merge_retained(d: &mut Delivery, qos: QoS, sub_id: Option<u32>) {
    d.qos = d.qos.max(qos);
    if let Some(id) = sub_id {
        if !d.subscription_ids.contains(&id) {
            d.subscription_ids.push(id);
        }
    }
}
