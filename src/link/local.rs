//! An in-process client: a program that embeds tern publishes and subscribes through a
//! session link, without a socket, with the session, QoS, retained and policy rules a network
//! client has ([`crate::BrokerHandle::connect_local`]).
//!
//! Owns the local client's inbox (deliveries handed over but not yet taken by the program)
//! and when they are acknowledged: a message taken with `recv` is acknowledged when the
//! program asks for the next one (or disconnects), so a program that dies while handling a
//! message of a persistent session gets it again (flagged `dup`) when it resumes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use bytestring::ByteString;

use super::{Link, Outbox, RetainedCollector, Written};
use crate::auth::Principal;
use crate::broker::{signal, Broker};
use crate::message::Message;
use crate::protocol::{topic, Properties, ProtocolVersion, QoS, SubscriptionOptions};
use crate::session::Delivery;

/// Deliveries handed to the inbox before the program takes them; the session's queue (and
/// flow control) hold the rest.
const INBOX: usize = 64;

/// How an in-process client connects.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub client_id: String,
    /// Start a new session, discarding any stored one.
    pub clean_start: bool,
    /// Seconds the session outlives the client (0: ends with it; `u32::MAX`: never).
    pub session_expiry: u32,
    /// The user the embedding program acts as. It is not authenticated (the program vouches
    /// for it); the ACL applies to it as to a network client with that user name.
    pub username: Option<String>,
}

impl LocalOptions {
    /// A clean, non-persistent session for `client_id`, anonymous.
    pub fn new(client_id: impl Into<String>) -> Self {
        LocalOptions { client_id: client_id.into(), clean_start: true, session_expiry: 0, username: None }
    }

    /// A persistent session: kept (with its subscriptions and QoS 1/2 messages, on disk)
    /// while the client is away, for `secs` seconds (`u32::MAX`: for ever).
    pub fn persistent(mut self, secs: u32) -> Self {
        self.clean_start = false;
        self.session_expiry = secs;
        self
    }

    pub fn username(mut self, user: impl Into<String>) -> Self {
        self.username = Some(user.into());
        self
    }
}

/// Why a local operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    #[error("invalid client id: empty, longer than limits.max_client_id_length, or a bridge's (`$bridge/...`)")]
    InvalidClientId,
    #[error("invalid topic name or filter")]
    InvalidTopic,
    #[error("QoS above mqtt.maximum_qos")]
    QosNotSupported,
    #[error("not authorised by the ACL")]
    NotAuthorized,
    #[error("refused with reason code 0x{0:02X}")]
    Refused(u8),
    /// The store failed to write it: nothing was acknowledged.
    #[error("the message could not be stored")]
    NotStored,
    /// The session was taken over, the client was cut off, or the broker is stopping.
    #[error("disconnected (reason 0x{0:02X})")]
    Disconnected(u8),
}

/// A message delivered to an in-process client.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// It may have been handed over before (the program did not ask for the next message
    /// before the broker or the program stopped).
    pub dup: bool,
}

/// An in-process MQTT client. Dropping it without `disconnect` ends its connection as if
/// the network had gone (the session stays, per its expiry).
pub struct LocalClient {
    link: Option<Link>,
    expiry: u32,
    inbox: VecDeque<(Delivery, Option<u16>, bool)>,
    /// The message last handed to the program, acknowledged when it asks for the next.
    unacked: Option<(QoS, u16)>,
}

struct Inbox<'a>(&'a mut VecDeque<(Delivery, Option<u16>, bool)>);

impl Outbox for Inbox<'_> {
    fn has_room(&self) -> bool {
        self.0.len() < INBOX
    }

    fn publish(&mut self, d: &Delivery, packet_id: Option<u16>, dup: bool, _now: Instant) -> Written {
        self.0.push_back((d.clone(), packet_id, dup));
        Written::Yes
    }

    fn pubrel(&mut self, packet_id: u16) {
        // The program has the message already (PUBREC was ours); only the release is left.
        let _ = packet_id;
    }
}

impl LocalClient {
    pub(crate) fn connect(broker: &Arc<Broker>, opts: LocalOptions) -> Result<LocalClient, LocalError> {
        let cfg = &broker.config;
        if opts.client_id.is_empty()
            || opts.client_id.len() > cfg.limits.max_client_id_length
            || crate::broker::client_id_reserved(&opts.client_id)
        {
            return Err(LocalError::InvalidClientId);
        }
        let client_id = ByteString::from(opts.client_id);
        let principal = Arc::new(Principal {
            client_id: client_id.clone(),
            username: opts.username.map(ByteString::from),
            cert_identity: None,
            // Not from any listener.
            listener: usize::MAX,
        });
        let attached = broker.attach(&client_id, opts.clean_start, opts.session_expiry, ProtocolVersion::V5, None);
        let window = usize::from(cfg.limits.max_inflight);
        let mut link = Link::new(Arc::clone(broker), attached, principal, window);
        let mut inbox = VecDeque::new();
        // Resumed: what was handed over but not acknowledged comes again first, flagged. A
        // QoS 2 message past PUBREC was taken already; its PUBREL is done here.
        link.resend_inflight(&mut Inbox(&mut inbox));
        let released: Vec<u16> = {
            let cell = link.handle.lock();
            cell.state
                .inflight()
                .filter(|f| f.state == crate::session::OutState::AwaitingComp)
                .map(|f| f.packet_id)
                .collect()
        };
        for pid in released {
            let _ = link.pubcomp(pid);
        }
        Ok(LocalClient { link: Some(link), expiry: opts.session_expiry, inbox, unacked: None })
    }

    fn link(&self) -> Result<&Link, LocalError> {
        self.link.as_ref().ok_or(LocalError::Disconnected(crate::protocol::reason::SESSION_TAKEN_OVER))
    }

    /// Waits until one of `bits` (or a kick) is signalled to this client.
    async fn signals(link: &Link) -> u8 {
        std::future::poll_fn(|cx| link.control.poll_signals(cx)).await
    }

    /// Waits until the store has processed `ticket`: Ok when it is durable.
    async fn durable(link: &Link, ticket: u64) -> Result<(), LocalError> {
        if ticket == 0 {
            return Ok(());
        }
        loop {
            match link.broker.outcome(ticket) {
                Some(true) => return Ok(()),
                Some(false) => return Err(LocalError::NotStored),
                None => {}
            }
            link.broker.wait_durable(ticket, &link.control);
            if link.broker.outcome(ticket).is_none() {
                let bits = Self::signals(link).await;
                if bits & signal::KICK != 0 {
                    // Keep the kick for `recv`, which ends the client.
                    link.control.signal(signal::KICK);
                    return Err(LocalError::Disconnected(link.control.reason()));
                }
                // Other signals (deliveries, flow) are for `recv`: raise them again.
                link.control.signal(bits & !signal::DURABLE);
            }
        }
    }

    /// Waits until the cluster has the other nodes' copy of a message: Ok when it does.
    async fn replicated(link: &Link, r: &crate::broker::Replicated) -> Result<(), LocalError> {
        // Other signals (deliveries, flow) are for `recv`: kept, and raised again at the end
        // (raised at once, they would wake this wait again and again until the answer).
        let mut other = 0;
        let result = loop {
            match r.outcome() {
                Some(true) => break Ok(()),
                Some(false) => break Err(LocalError::NotStored),
                None => {}
            }
            let bits = Self::signals(link).await;
            if bits & signal::KICK != 0 {
                other |= signal::KICK;
                break Err(LocalError::Disconnected(link.control.reason()));
            }
            other |= bits & !signal::DURABLE;
        };
        if other != 0 {
            link.control.signal(other);
        }
        result
    }

    /// Publishes a message. At QoS 1 and 2 it returns once the message is stored (it is then
    /// as safe as an acknowledged network publish); while subscribers' queues are full it
    /// waits for room, as a network publisher is slowed (at most `limits.slow_consumer_secs`).
    pub async fn publish(
        &mut self,
        topic_name: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), LocalError> {
        let link = self.link()?;
        let cfg = &link.broker.config;
        if !topic::valid_topic_name(topic_name)
            || topic_name.len() > cfg.limits.max_topic_length
            || crate::topics::level_count(topic_name) > cfg.limits.max_topic_levels
        {
            return Err(LocalError::InvalidTopic);
        }
        if qos as u8 > cfg.mqtt.maximum_qos {
            return Err(LocalError::QosNotSupported);
        }
        if retain && !cfg.mqtt.retain_available {
            return Err(LocalError::Refused(crate::protocol::reason::RETAIN_NOT_SUPPORTED));
        }
        if !link.may_publish(topic_name) {
            return Err(LocalError::NotAuthorized);
        }
        let msg = Message::received(
            ByteString::from(topic_name),
            payload.into(),
            qos,
            retain,
            Properties::default(),
            link.client_id().clone(),
        );
        let mut full = Vec::new();
        let routed = link.publish(msg, None, &mut full);
        link.wait_for_room(full).await;
        if qos == QoS::AtMostOnce {
            return Ok(());
        }
        Self::durable(link, routed.ticket).await?;
        match routed.replicated {
            Some(r) => Self::replicated(link, &r).await,
            None => Ok(()),
        }
    }

    /// Subscribes to `filter` (`$share/group/filter` for a shared subscription). Returns the
    /// QoS granted. Retained messages that match come through `recv`.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<QoS, LocalError> {
        let link = self.link()?;
        let cfg = &link.broker.config;
        let plain = topic::parse_shared(filter).map_or(filter, |(_, f)| f);
        if !topic::valid_topic_filter(filter)
            || (topic::is_shared(filter) && topic::parse_shared(filter).is_none())
            || plain.len() > cfg.limits.max_topic_length
            || crate::topics::level_count(plain) > cfg.limits.max_topic_levels
        {
            return Err(LocalError::InvalidTopic);
        }
        let opts = SubscriptionOptions { qos, ..SubscriptionOptions::default() };
        let mut retained = RetainedCollector::new(None);
        let sub = match link.subscribe(&ByteString::from(filter), opts, None, &mut retained) {
            Ok(s) => s,
            Err(crate::protocol::reason::NOT_AUTHORIZED) => return Err(LocalError::NotAuthorized),
            Err(code) => return Err(LocalError::Refused(code)),
        };
        Self::durable(link, sub.ticket).await?;
        if let Some(batch) = retained.finish() {
            link.queue_retained(*batch);
        }
        Ok(sub.qos)
    }

    /// Removes a subscription; false if there was none.
    pub async fn unsubscribe(&mut self, filter: &str) -> Result<bool, LocalError> {
        Ok(self.link()?.unsubscribe(&ByteString::from(filter)))
    }

    /// Acknowledges the message handed over last, if any.
    fn ack_last(&mut self) {
        let (Some(link), Some((qos, pid))) = (self.link.as_ref(), self.unacked.take()) else { return };
        match qos {
            QoS::AtLeastOnce => {
                let _ = link.puback(pid);
            }
            QoS::ExactlyOnce => {
                let _ = link.pubrec(pid, true);
                let _ = link.pubcomp(pid);
            }
            QoS::AtMostOnce => {}
        }
    }

    /// The next message for this client, waiting for one. Acknowledges the previous one.
    /// Err when the client is disconnected (session taken over, cut off as a slow consumer,
    /// broker stopping); the client is then finished.
    pub async fn recv(&mut self) -> Result<Received, LocalError> {
        self.ack_last();
        loop {
            let Some(link) = self.link.as_mut() else {
                return Err(LocalError::Disconnected(crate::protocol::reason::SESSION_TAKEN_OVER));
            };
            if link.write_ready() {
                if let Some((d, pid, dup)) = self.inbox.pop_front() {
                    if let Some(pid) = pid {
                        self.unacked = Some((d.qos, pid));
                    }
                    return Ok(Received {
                        topic: d.msg.topic.clone(),
                        payload: d.msg.payload.clone(),
                        qos: d.qos,
                        retain: d.retain,
                        dup,
                    });
                }
                link.drain(&mut Inbox(&mut self.inbox));
                if !self.inbox.is_empty() {
                    continue;
                }
            } else {
                link.broker.wait_durable(link.write_ticket(), &link.control);
                if link.write_ready() {
                    continue;
                }
            }
            let bits = Self::signals(link).await;
            if bits & signal::KICK != 0 {
                let reason = link.control.reason();
                self.finish(false);
                return Err(LocalError::Disconnected(reason));
            }
        }
    }

    /// Disconnects: acknowledges the last message taken, and leaves the session to its
    /// expiry (as a DISCONNECT does).
    pub async fn disconnect(mut self) {
        self.finish(true);
    }

    fn finish(&mut self, ack: bool) {
        if ack {
            self.ack_last();
        }
        if let Some(link) = self.link.take() {
            link.detach(self.expiry);
        }
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        self.finish(false);
    }
}
