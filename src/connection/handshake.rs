//! The CONNECT handshake: reading the first packet, validating it, enhanced authentication,
//! attaching the session and writing CONNACK, then resending what was in flight.

use super::*;

pub(super) enum ConnectError {
    Io,
    Decode(DecodeError),
}

pub(super) async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    max_packet: usize,
    read: &mut usize,
) -> Result<Box<Connect>, ConnectError> {
    match read_packet(stream, rbuf, None, max_packet, read).await? {
        Packet::Connect(c) => Ok(c),
        _ => Err(ConnectError::Decode(DecodeError::Protocol("first packet must be CONNECT"))),
    }
}

/// Reads one whole packet during the handshake (before the main loop owns the socket);
/// adds the bytes it read to `read`.
pub(super) async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet: usize,
    read: &mut usize,
) -> Result<Packet, ConnectError> {
    loop {
        match protocol::decode(rbuf, version, max_packet) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(ConnectError::Decode(e)),
        }
        rbuf.reserve(1024);
        match stream.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Err(ConnectError::Io),
            Ok(n) => *read += n,
        }
    }
}

impl Conn {
    /// Validates CONNECT, attaches the session and sends CONNACK. None when refused.
    pub(super) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        c: Box<Connect>,
        info: ConnInfo,
        broker: &Arc<Broker>,
        stream: &mut S,
        rbuf: &mut BytesMut,
    ) -> Option<Conn> {
        let cfg = &broker.config;
        let peer = info.peer;
        let v = c.protocol;
        let v5 = v.is_v5();
        let refuse = |v3code: u8, v5code: u8| if v5 { v5code } else { v3code };

        // Copied out of the packet: a slice would keep the whole CONNECT read buffer alive
        // for as long as the client stays connected.
        let mut client_id = ByteString::from(&*c.client_id);
        let mut assigned = None;
        let mut failure = None;
        if client_id.is_empty() {
            if v == ProtocolVersion::V31 || (v == ProtocolVersion::V311 && !c.clean_start) {
                // [MQTT-3.1.3-8]: empty id needs clean session in 3.1.1; 3.1 requires an id.
                failure = Some(refuse(reason::v3::IDENTIFIER_REJECTED, reason::CLIENT_IDENTIFIER_NOT_VALID));
            } else {
                let id: ByteString = format!("tern-{:016x}", random_u64()).into();
                client_id = id.clone();
                if v5 {
                    assigned = Some(id);
                }
            }
        } else if client_id.len() > cfg.limits.max_client_id_length || crate::broker::client_id_reserved(&client_id) {
            // MQTT 3.1 capped ids at 23 bytes; like mosquitto, tern accepts longer ones from
            // 3.1 clients too, limited only by limits.max_client_id_length.
            failure = Some(refuse(reason::v3::IDENTIFIER_REJECTED, reason::CLIENT_IDENTIFIER_NOT_VALID));
        }
        // Who the client is: CONNECT's user name, or the CN of its verified certificate on a
        // `use_identity_as_username` listener (then CONNECT's name and password are not used),
        // or the name an enhanced-authentication method proved.
        let certified =
            cfg.listener.get(info.listener).and_then(|l| l.tls.as_ref()).is_some_and(|t| t.use_identity_as_username);
        let mut username = match certified {
            true => info.cert_identity.as_deref().map(ByteString::from),
            false => c.username.as_deref().map(ByteString::from),
        };
        if certified && username.is_none() && failure.is_none() {
            // A certificate without a CN gives no user name to authorise.
            failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::NOT_AUTHORIZED));
        }
        // Enhanced authentication [4.12]: settled before the session is touched.
        let mut auth: Option<Box<ConnAuth>> = None;
        let mut auth_data = None;
        if let (None, Some(name)) = (failure, &c.properties.authentication_method) {
            match broker.auth.find(name) {
                // No such method here [MQTT-4.12.0-1].
                None => failure = Some(reason::BAD_AUTHENTICATION_METHOD),
                Some(method) => {
                    let deadline = Duration::from_secs(cfg.limits.connect_timeout_secs);
                    let exchange = authenticate(&method, name, &c, stream, rbuf, cfg.limits.max_packet_size as usize);
                    match tokio::time::timeout(deadline, exchange).await {
                        Ok(Ok((data, identity))) => {
                            auth_data = data;
                            if let Some(name) = identity {
                                username = Some(name.into());
                            }
                            auth = Some(Box::new(ConnAuth { method, name: ByteString::from(&**name), exchange: None }));
                        }
                        Ok(Err(Some(code))) => failure = Some(code),
                        Ok(Err(None)) | Err(_) => return None,
                    }
                }
            }
        }
        if failure.is_none() && auth.is_none() {
            let login = Login {
                client_id: &client_id,
                username: username.as_deref(),
                password: c.password.as_deref(),
                certified,
                listener: info.listener,
            };
            let deadline = Duration::from_secs(cfg.limits.connect_timeout_secs);
            match tokio::time::timeout(deadline, broker.policy.authenticate(login)).await {
                Ok(Ok(())) => {}
                // 3.1.1 clients get 0x05 for both, as from mosquitto.
                Ok(Err(Refusal::BadCredentials)) => {
                    failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::BAD_USER_NAME_OR_PASSWORD))
                }
                Ok(Err(Refusal::NotAuthorized)) | Err(_) => {
                    failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::NOT_AUTHORIZED))
                }
            }
        }
        let principal = Arc::new(Principal {
            client_id: client_id.clone(),
            username,
            cert_identity: info.cert_identity.clone(),
            listener: info.listener,
        });
        if let (None, Some(w)) = (failure, &c.will) {
            // The will is published with its owner's rights: a will it could not publish is
            // refused now rather than dropped later without a word.
            if !broker.may_publish(&principal, &w.topic) {
                failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::NOT_AUTHORIZED));
            }
        }
        if let (None, Some(w)) = (failure, &c.will) {
            if (w.qos as u8) > cfg.mqtt.maximum_qos {
                failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::QOS_NOT_SUPPORTED));
            } else if w.retain && !cfg.mqtt.retain_available {
                failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::RETAIN_NOT_SUPPORTED));
            } else if !topic_within_limits(&w.topic, cfg) {
                failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::TOPIC_NAME_INVALID));
            } else if w.properties.user_properties.len() > cfg.limits.max_user_properties {
                failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::QUOTA_EXCEEDED));
            }
        }
        // In a cluster, the id must be this node's before its session is touched: another
        // node serving it is told to let go first (its client gets 0x8E).
        let mut claim = 0;
        if let (None, Some(owners)) = (failure, broker.owners()) {
            match owners.claim(&client_id).await {
                Ok(nonce) => claim = nonce,
                Err(why) => {
                    info!(client_id = %client_id, %peer, ?why, "client id not claimed in the cluster");
                    failure = Some(refuse(reason::v3::SERVER_UNAVAILABLE, reason::SERVER_UNAVAILABLE));
                }
            }
        }
        let session_expiry = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            EXPIRY_NEVER
        };
        // In a cluster, the will is kept where the other nodes find it before the client
        // hears it is connected: if this node dies, one of them publishes it.
        let mut will_rev = 0;
        if let (None, Some(wills), Some(w)) = (failure, broker.cluster_wills(), &c.will) {
            let (m, delay) = will_message(w, &client_id);
            match wills.put(&client_id, Broker::will_record(&m, delay.min(session_expiry), &principal, v)).await {
                Ok(rev) => will_rev = rev,
                Err(()) => {
                    info!(client_id = %client_id, %peer, "will not kept in the cluster");
                    failure = Some(refuse(reason::v3::SERVER_UNAVAILABLE, reason::SERVER_UNAVAILABLE));
                }
            }
        }
        // In a cluster, a persistent session lives in the cluster: taken on here (or
        // discarded by a clean start) once the id is this node's, refused if unreachable.
        let mut resumed = None;
        if let (None, Some(sessions)) = (failure, broker.cluster_sessions()) {
            match sessions.prepare(&client_id, c.clean_start, session_expiry).await {
                Ok(r) => resumed = r,
                Err(why) => {
                    info!(client_id = %client_id, %peer, ?why, "cluster session unavailable");
                    failure = Some(refuse(reason::v3::SERVER_UNAVAILABLE, reason::SERVER_UNAVAILABLE));
                }
            }
        }
        let clustered = broker.cluster_sessions().is_some() && (session_expiry > 0 || resumed.is_some());
        if let (Some(_), Some(owners)) = (failure, broker.owners().filter(|_| claim != 0)) {
            // Claimed, then refused: no connection will tell the owners it is over.
            owners.released(&client_id, claim);
        }
        if let (Some(_), Some(wills)) = (failure, broker.cluster_wills().filter(|_| will_rev != 0)) {
            // Kept, then refused: no connection will end to take it back.
            wills.done(&client_id, will_rev).await;
        }
        if let Some(code) = failure {
            info!(client_id = %c.client_id, %peer, transport = info.kind.name(), protocol = v.name(), code, "connection refused");
            refuse_connack(stream, v, code).await;
            return None;
        }

        // The will as it would be published, for the store (persistent sessions only).
        let stored_will = match (&c.will, session_expiry) {
            (Some(w), e) if e > 0 => {
                let (m, delay) = will_message(w, &client_id);
                Some((Arc::new(m), delay))
            }
            _ => None,
        };
        let attached = if clustered {
            broker.attach_clustered(&client_id, v, resumed.as_ref())
        } else {
            broker.attach(
                &client_id,
                c.clean_start,
                session_expiry,
                v,
                stored_will.as_ref().map(|(m, d)| (&**m, *d, &*principal)),
            )
        };
        let session_present = if clustered { resumed.is_some() } else { attached.session_present };
        if let (true, Some(sessions)) = (clustered, broker.cluster_sessions()) {
            let started =
                sessions.start(&attached.handle, attached.connection_id, session_expiry, resumed.is_some()).await;
            if let Err(why) = started {
                info!(client_id = %client_id, %peer, ?why, "cluster session not recorded; connection refused");
                sessions.stop(&client_id, attached.connection_id, false);
                broker.detach(&attached.handle, attached.connection_id, 0);
                if let (true, Some(owners)) = (claim != 0, broker.owners()) {
                    owners.released(&client_id, claim);
                }
                refuse_connack(stream, v, refuse(reason::v3::SERVER_UNAVAILABLE, reason::SERVER_UNAVAILABLE)).await;
                return None;
            }
        }
        if let (true, Some(owners)) = (claim != 0, broker.owners()) {
            // Another node asked for the id between the claim and the attach: it found no
            // connection to close then, so this one closes itself (the owners hook marks the
            // claim before it looks for a connection, and the attach set the connection
            // before this looks at the claim: one of the two sees the other).
            if !owners.holds(&client_id, claim) {
                attached.control.kick(reason::SESSION_TAKEN_OVER);
            }
        }

        let mut keep_alive = c.keep_alive;
        let mut props = Properties::default();
        if v5 {
            let max_ka = cfg.limits.max_keepalive;
            if max_ka > 0 && (keep_alive == 0 || keep_alive > max_ka) {
                keep_alive = max_ka;
                props.server_keep_alive = Some(max_ka);
            }
            props.assigned_client_identifier = assigned;
            if let Some(a) = &auth {
                props.authentication_method = Some(a.name.clone());
                props.authentication_data = auth_data;
            }
            if cfg.mqtt.receive_maximum != u16::MAX {
                props.receive_maximum = Some(cfg.mqtt.receive_maximum);
            }
            if cfg.mqtt.maximum_qos < 2 {
                props.maximum_qos = Some(cfg.mqtt.maximum_qos);
            }
            if !cfg.mqtt.retain_available {
                props.retain_available = Some(0);
            }
            // Absent means the protocol maximum, so only a lower limit is announced.
            if cfg.limits.max_packet_size < 268_435_460 {
                props.maximum_packet_size = Some(cfg.limits.max_packet_size);
            }
            if cfg.mqtt.topic_alias_maximum > 0 {
                props.topic_alias_maximum = Some(cfg.mqtt.topic_alias_maximum);
            }
            if !cfg.mqtt.wildcard_subscriptions {
                props.wildcard_subscription_available = Some(0);
            }
            if !cfg.mqtt.subscription_identifiers {
                props.subscription_identifiers_available = Some(0);
            }
            if !cfg.mqtt.shared_subscriptions {
                props.shared_subscription_available = Some(0);
            }
        }
        let client_receive_max = c.properties.receive_maximum.unwrap_or(u16::MAX);
        let window = usize::from(cfg.limits.max_inflight.min(client_receive_max));
        let client_max_packet = c.properties.maximum_packet_size.map_or(usize::MAX, |m| m as usize);

        info!(
            client_id = %client_id,
            %peer,
            transport = info.kind.name(),
            protocol = v.name(),
            clean_start = c.clean_start,
            keep_alive,
            session_present,
            "client connected"
        );

        let link = Link::new(Arc::clone(broker), attached, principal, window);
        let mut conn = Conn {
            link,
            version: v,
            peer,
            keep_alive,
            auth,
            will: c.will.as_ref().map(|w| {
                // Same as the client id: own the bytes instead of pinning the read buffer.
                Box::new(LastWill {
                    topic: ByteString::from(&*w.topic),
                    payload: bytes::Bytes::copy_from_slice(&w.payload),
                    ..w.clone()
                })
            }),
            session_expiry,
            bridge_peer: c.bridge,
            connect_expiry_zero: session_expiry == 0,
            client_max_packet,
            out_aliases: match c.properties.topic_alias_maximum {
                Some(max) if v5 && max > 0 => Some(Box::new(aliases::OutboundAliases::new(max))),
                _ => None,
            },
            inbound_aliases: None,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            held: VecDeque::new(),
            durable_wait: 0,
            signals: 0,
            flow: None,
            broken_stream: false,
            paused: false,
            claim,
            will_rev,
        };
        // MQTT 3.1's CONNACK has no session present flag (the byte is reserved).
        let session_present = session_present && v != ProtocolVersion::V31;
        let ack = Packet::ConnAck(ConnAck { session_present, code: reason::SUCCESS, properties: props });
        let fits = protocol::encoded_len(&ack, v) <= conn.client_max_packet;
        if fits {
            protocol::encode(&ack, v, &mut conn.wbuf);
        }
        drop(ack);
        if !fits {
            // [MQTT-3.1.2-25]: not even CONNACK fits the client's limit; nothing can be sent.
            Box::pin(conn.finish(Close::Silent("client Maximum Packet Size below CONNACK size".into()), stream)).await;
            return None;
        }
        conn.resend_inflight();
        Some(conn)
    }
}

/// Answers a refused CONNECT with CONNACK `code` and closes (within a second: the client
/// may not read).
async fn refuse_connack<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, v: ProtocolVersion, code: u8) {
    let _ = send(stream, &refusal(v, code)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

/// The enhanced-authentication state of a connection.
pub(super) struct ConnAuth {
    pub(super) method: Arc<dyn AuthMethod>,
    pub(super) name: ByteString,
    /// A re-authentication in progress.
    pub(super) exchange: Option<Box<dyn AuthExchange>>,
}

/// Runs the CONNECT-time exchange: AUTH 0x18 back and forth until the method decides.
/// Ok((data for CONNACK, the user name the method proved)); Err(Some(code)) to refuse with
/// CONNACK; Err(None) when the connection is gone.
pub(super) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    method: &Arc<dyn AuthMethod>,
    name: &ByteString,
    c: &Connect,
    stream: &mut S,
    rbuf: &mut BytesMut,
    max_packet: usize,
) -> Result<(Option<bytes::Bytes>, Option<String>), Option<u8>> {
    let data = c.properties.authentication_data.as_deref();
    let (mut exchange, mut step) = method.start(&c.client_id, c.username.as_deref(), data);
    loop {
        let challenge = match step {
            AuthStep::Success(d) => return Ok((d, exchange.identity())),
            AuthStep::Fail(code) => return Err(Some(code)),
            AuthStep::Continue(d) => d,
        };
        let properties = Properties {
            authentication_method: Some(name.clone()),
            authentication_data: challenge,
            ..Default::default()
        };
        let mut w = BytesMut::new();
        protocol::encode(
            &Packet::Auth(Auth { reason: reason::CONTINUE_AUTHENTICATION, properties }),
            ProtocolVersion::V5,
            &mut w,
        );
        send(stream, &w).await.map_err(|_| None)?;
        match read_packet(stream, rbuf, Some(ProtocolVersion::V5), max_packet, &mut 0).await {
            Ok(Packet::Auth(a))
                if a.reason == reason::CONTINUE_AUTHENTICATION
                    && a.properties.authentication_method.as_ref() == Some(name) =>
            {
                step = exchange.next(a.properties.authentication_data.as_deref());
            }
            // Anything else during the exchange is a Protocol Error [MQTT-4.12.0-4].
            Ok(_) => return Err(Some(reason::PROTOCOL_ERROR)),
            Err(ConnectError::Decode(e)) => return Err(Some(e.reason_code())),
            Err(ConnectError::Io) => return Err(None),
        }
    }
}

/// Unpredictable enough for assigned client ids, without a dependency: std's hasher is
/// seeded randomly per process, and mixing in the time and a counter keeps ids distinct.
pub(super) fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

/// A CONNECT's will as it would be published, and its Will Delay Interval (taken out of its
/// properties: it is not sent to subscribers).
fn will_message(w: &LastWill, client_id: &ByteString) -> (Message, u32) {
    let mut props = w.properties.clone();
    let delay = props.will_delay_interval.take().unwrap_or(0);
    let m = Message::received(
        ByteString::from(&*w.topic),
        bytes::Bytes::copy_from_slice(&w.payload),
        w.qos,
        w.retain,
        props,
        client_id.clone(),
    );
    (m, delay)
}
