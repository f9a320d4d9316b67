//! Packets to the client: the session's queue drained into the write buffer within the
//! in-flight window, and acknowledgements held until the store has made their effects durable.

use super::*;

impl Conn {
    /// Sends an acknowledgement now, or holds it until `ticket` is durable (and behind any
    /// acknowledgement already held, to keep their order).
    /// While publishes wait for room (flow control), every acknowledgement is held too.
    pub(super) fn respond(&mut self, ticket: u64, packet: Packet, then: Option<Box<RetainedBatch>>) {
        self.respond_after(ticket, None, packet, then);
    }

    /// `respond`, also waiting for the cluster's copy of a publish (`replicated`), which
    /// wakes the connection when it is done.
    pub(super) fn respond_after(
        &mut self,
        ticket: u64,
        replicated: Option<Arc<Replicated>>,
        packet: Packet,
        then: Option<Box<RetainedBatch>>,
    ) {
        if ticket == 0 && replicated.is_none() && self.held.is_empty() && self.flow.is_none() {
            self.encode(packet);
            if let Some(batch) = then {
                self.link.queue_retained(*batch);
            }
        } else {
            self.held.push_back(HeldAck { ticket, replicated, packet, then });
            self.link.broker.metrics.acks_held.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends the held acknowledgements whose store work (and cluster copy) is done. A failed
    /// store write, or a cluster that did not take the message, turns
    /// PUBACK/PUBREC/SUBACK into failures (v5 reason 0x80, 3.1.1 SUBACK 0x80); a 3.1.1
    /// publisher has no way to hear "not stored" but losing its connection, so it does.
    pub(super) fn release_held(&mut self) -> Result<(), Close> {
        if self.flow.is_some() {
            return Ok(());
        }
        while let Some(front) = self.held.front() {
            let Some(ok) = Routed::outcome(&self.link.broker, front.ticket, front.replicated.as_deref()) else { break };
            let Some(HeldAck { mut packet, then, .. }) = self.held.pop_front() else { break };
            self.link.broker.metrics.acks_held.fetch_sub(1, Ordering::Relaxed);
            if !ok {
                match &mut packet {
                    Packet::PubAck(r) | Packet::PubRec(r) => {
                        if !self.version.is_v5() {
                            return Err(Close::Error {
                                reason: reason::UNSPECIFIED_ERROR,
                                what: "message could not be stored".into(),
                            });
                        }
                        r.reason = reason::UNSPECIFIED_ERROR;
                    }
                    Packet::SubAck(a) => a.return_codes.iter_mut().for_each(|c| *c = reason::UNSPECIFIED_ERROR),
                    Packet::PubRel(_) => {
                        // "Released" is not durable: a PUBREL now would let the client forget
                        // an id whose PUBLISH a crash would send again, as a new message. The
                        // connection ends instead, and the session's next connection gets the
                        // PUBLISH again, which the client still knows.
                        return Err(Close::Error {
                            reason: reason::UNSPECIFIED_ERROR,
                            what: "delivery state could not be stored".into(),
                        });
                    }
                    _ => {}
                }
            }
            self.encode(packet);
            if let Some(batch) = then {
                self.link.queue_retained(*batch);
            }
        }
        Ok(())
    }

    pub(super) fn encode(&mut self, p: Packet) {
        protocol::encode(&p, self.version, &mut self.wbuf);
    }

    /// Moves queued deliveries into the write buffer while the in-flight window allows.
    /// Returns true if it stopped because the buffer is full (more may be waiting).
    pub(super) fn drain(&mut self) -> bool {
        let mut out = NetOut {
            version: self.version,
            wbuf: &mut self.wbuf,
            aliases: &mut self.out_aliases,
            max_packet: self.client_max_packet,
        };
        self.link.drain(&mut out)
    }

    /// On resuming a session, unacknowledged messages go out again first, in their original
    /// order: PUBLISH with DUP, or PUBREL [MQTT-4.4.0-1].
    pub(super) fn resend_inflight(&mut self) {
        let mut out = NetOut {
            version: self.version,
            wbuf: &mut self.wbuf,
            aliases: &mut self.out_aliases,
            max_packet: self.client_max_packet,
        };
        self.link.resend_inflight(&mut out);
    }

    /// False while the write buffer holds QoS 2 PUBLISHes whose packet ids are not durable.
    pub(super) fn write_ready(&mut self) -> bool {
        self.link.write_ready()
    }
}

/// The link's deliveries encoded into the write buffer, as the client accepts them.
struct NetOut<'a> {
    version: ProtocolVersion,
    wbuf: &'a mut BytesMut,
    aliases: &'a mut Option<Box<aliases::OutboundAliases>>,
    /// Largest packet the client accepts (v5 Maximum Packet Size).
    max_packet: usize,
}

impl Outbox for NetOut<'_> {
    fn has_room(&self) -> bool {
        self.wbuf.len() < WRITE_BATCH
    }

    /// Encodes one delivery, unless it exceeds the client's Maximum Packet Size. Topic aliases
    /// are applied only to packets really written, or the client would miss a definition.
    fn publish(&mut self, d: &Delivery, packet_id: Option<u16>, dup: bool, now: Instant) -> Written {
        let v5 = self.version.is_v5();
        let m = &d.msg;
        let mut out = PublishOut {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic: m.topic.as_bytes(),
            packet_id,
            payload: &m.payload,
            properties: if v5 { &m.props_v5[..] } else { &[] },
            message_expiry: if v5 { m.remaining_expiry(now) } else { None },
            subscription_ids: if v5 { &d.subscription_ids[..] } else { &[] },
            topic_alias: None,
        };
        if self.max_packet != usize::MAX && out.encoded_len(self.version) > self.max_packet {
            return Written::TooLarge;
        }
        match self.aliases.as_mut().map_or(aliases::AliasUse::None, |a| a.apply(&m.topic)) {
            aliases::AliasUse::None => {}
            aliases::AliasUse::Define(a) => out.topic_alias = Some(a),
            aliases::AliasUse::Reuse(a) => {
                out.topic_alias = Some(a);
                out.topic = b"";
            }
        }
        out.encode(self.version, self.wbuf);
        Written::Yes
    }

    fn pubrel(&mut self, packet_id: u16) {
        protocol::encode(&Packet::PubRel(PubResp::new(packet_id)), self.version, self.wbuf);
    }
}
