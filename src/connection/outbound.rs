//! Packets to the client: the session's queue drained into the write buffer within the
//! in-flight window, and acknowledgements held until the store has made their effects durable.

use super::*;

impl Conn {
    /// Sends an acknowledgement now, or holds it until `ticket` is durable (and behind any
    /// acknowledgement already held, to keep their order).
    /// While publishes wait for room (flow control), every acknowledgement is held too.
    pub(super) fn respond(&mut self, ticket: u64, packet: Packet, then: Vec<Delivery>) {
        if ticket == 0 && self.held.is_empty() && self.flow.is_none() {
            self.encode(packet);
            self.broker.deliver_retained(&self.handle, then);
        } else {
            self.held.push_back(HeldAck { ticket, packet, then });
            self.broker.metrics.acks_held.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends the held acknowledgements whose store work is done. A failed store write turns
    /// PUBACK/PUBREC/SUBACK into failures (v5 reason 0x80, 3.1.1 SUBACK 0x80); a 3.1.1
    /// publisher has no way to hear "not stored" but losing its connection, so it does.
    pub(super) fn release_held(&mut self) -> Result<(), Close> {
        if self.flow.is_some() {
            return Ok(());
        }
        while let Some(front) = self.held.front() {
            let Some(ok) = self.broker.outcome(front.ticket) else { break };
            let Some(HeldAck { mut packet, then, .. }) = self.held.pop_front() else { break };
            self.broker.metrics.acks_held.fetch_sub(1, Ordering::Relaxed);
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
                    _ => {}
                }
            }
            self.encode(packet);
            self.broker.deliver_retained(&self.handle, then);
        }
        Ok(())
    }

    pub(super) fn encode(&mut self, p: Packet) {
        protocol::encode(&p, self.version, &mut self.wbuf);
    }

    /// Moves queued deliveries into the write buffer while the in-flight window allows.
    /// Returns true if it stopped because the buffer is full (more may be waiting).
    pub(super) fn drain(&mut self) -> bool {
        let handle = Arc::clone(&self.handle);
        let mut cell = handle.lock();
        if cell.owner != self.connection_id {
            return false; // taken over; the kick will end this connection
        }
        let now = Instant::now();
        let mut sent = 0u64;
        let mut ops = Vec::new();
        let full = loop {
            if self.wbuf.len() >= WRITE_BATCH {
                break true;
            }
            let Some(out) = cell.state.next_outgoing(self.window, now) else { break false };
            cell.progress += 1;
            let (Outgoing::Unacked(d) | Outgoing::Tracked(_, d)) = &out;
            if !self.broker.policy.may_receive(&self.principal, &d.msg.topic) {
                // The right to read was revoked after the message was queued (or retained,
                // or subscribed): it is dropped as if delivered, and counted.
                if let Outgoing::Tracked(pid, _) = out {
                    if let Some(seq) = cell.state.discard(pid) {
                        ops.push(Op::DeleteQueued { client: self.client_id.clone(), seq });
                    }
                }
                cell.state.dropped += 1;
                self.broker.metrics.messages_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (d, pid) = match out {
                Outgoing::Unacked(d) => (d, None),
                Outgoing::Tracked(pid, d) => {
                    if let (Some(seq), QoS::ExactlyOnce) = (d.store_seq, d.qos) {
                        // A QoS 2 message must go out again with the same id after a crash,
                        // or the receiver would take it for a new one [MQTT-4.3.3]: its id is
                        // durable before the PUBLISH is written (see `write_ticket`).
                        ops.push(Op::SetInflight {
                            client: self.client_id.clone(),
                            seq,
                            state: InflightState::Sent(pid),
                        });
                    }
                    (d, Some(pid))
                }
            };
            if !self.write_publish(&d, pid, d.maybe_sent, now) {
                // [MQTT-3.1.2-25]: too large for this client; discard as if delivered.
                if let Some(seq) = pid.and_then(|pid| cell.state.discard(pid)) {
                    ops.push(Op::DeleteQueued { client: self.client_id.clone(), seq });
                }
                cell.state.dropped += 1;
                self.broker.metrics.messages_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            sent += 1;
        };
        for seq in cell.state.take_discarded() {
            ops.push(Op::DeleteQueued { client: self.client_id.clone(), seq });
        }
        cell.wake_publishers();
        drop(cell);
        let ticket = self.broker.persist(ops);
        self.write_ticket = self.write_ticket.max(ticket);
        if sent > 0 {
            self.broker.metrics.messages_sent.fetch_add(sent, Ordering::Relaxed);
        }
        full
    }

    /// Encodes one delivery into the write buffer, unless it exceeds the client's Maximum
    /// Packet Size (then false). Topic aliases are applied only to packets really written, or
    /// the client would miss a definition.
    pub(super) fn write_publish(&mut self, d: &Delivery, packet_id: Option<u16>, dup: bool, now: Instant) -> bool {
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
        if self.client_max_packet != usize::MAX && out.encoded_len(self.version) > self.client_max_packet {
            return false;
        }
        match self.out_aliases.as_mut().map_or(aliases::AliasUse::None, |a| a.apply(&m.topic)) {
            aliases::AliasUse::None => {}
            aliases::AliasUse::Define(a) => out.topic_alias = Some(a),
            aliases::AliasUse::Reuse(a) => {
                out.topic_alias = Some(a);
                out.topic = b"";
            }
        }
        out.encode(self.version, &mut self.wbuf);
        true
    }

    /// False while the write buffer holds QoS 2 PUBLISHes whose packet ids are not durable.
    pub(super) fn write_ready(&mut self) -> bool {
        if self.write_ticket == 0 {
            return true;
        }
        if self.broker.outcome(self.write_ticket).is_some() {
            self.write_ticket = 0;
            return true;
        }
        false
    }
}
