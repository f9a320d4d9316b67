//! Typed settings: embedded defaults, an optional TOML file, then `TERN__SECTION__KEY`
//! environment overrides, validated with errors that name the file, the key and the fix.
//!
//! Owns the meaning and defaults of every configuration key. Knows nothing of sockets or
//! sessions; other modules read the typed values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The documented default configuration, shipped in the binary. A unit test keeps it equal to
/// `Config::default()`, so the file cannot drift from the code.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a value has the wrong type.
    #[error("{origin}: {message}")]
    Load { origin: String, message: String },
    /// A value parsed but is not acceptable.
    #[error("{origin}: key `{key}`: {message}")]
    Invalid { origin: String, key: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listener: Vec<Listener>,
    pub storage: Storage,
    pub auth: Auth,
    pub limits: Limits,
    pub mqtt: Mqtt,
    /// Topics whose messages jump the queue: each session sends higher levels first.
    pub priority: Vec<Priority>,
    /// Connections to peer brokers (`[[bridge]]`), with mosquitto's meaning.
    pub bridge: Vec<Bridge>,
    /// `$SYS` topics and the HTTP listener of `/metrics` and the status page.
    pub metrics: MetricsConfig,
    /// Several tern nodes as one broker over NATS JetStream (`[cluster]`); absent = one node.
    pub cluster: Option<Cluster>,
}

/// `[cluster]`: this node's place in a tern cluster that routes messages over NATS (core
/// NATS for QoS 0, JetStream for QoS 1/2 and retained messages).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// NATS server urls (`nats://host:port`, `tls://host:port`); the client fails over between them.
    pub nats: Vec<String>,
    /// This node's name, unique in the cluster: its durable consumer and the origin of what
    /// it publishes.
    pub node: String,
    /// Prefix of every subject, stream and bucket, so two tern clusters can share one NATS.
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// JetStream replicas of the streams; default min(3, number of `nats` urls) for a stream
    /// this node creates (an existing stream keeps its own unless this is set).
    #[serde(default)]
    pub replicas: Option<usize>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    /// A NATS `.creds` file (JWT and nkey seed).
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// CA certificates (PEM) that NATS servers' certificates are checked against; implies TLS.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// How long a QoS 1/2 publisher's acknowledgement waits for JetStream's before it is
    /// answered as a store failure.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// Seconds a QoS 1/2 message is kept in the messages stream (for nodes catching up).
    #[serde(default = "default_cluster_max_age_secs")]
    pub max_age_secs: u64,
    /// Bytes the messages stream keeps at most (oldest dropped first).
    #[serde(default = "default_cluster_max_bytes")]
    pub max_bytes: i64,
    /// How long a QoS 1/2 message of a shared subscription, taken by a node whose members
    /// then left, waits before JetStream gives it to another node's members.
    #[serde(default = "default_share_ack_wait_ms")]
    pub share_ack_wait_ms: u64,
    /// How often this node tells the others it is alive (a key in `<name>_nodes`).
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A node whose heartbeat has not changed for this long is dead: another node
    /// publishes its clients' wills.
    #[serde(default = "default_node_timeout_ms")]
    pub node_timeout_ms: u64,
    /// CONNECTs whose client id is being claimed in the cluster at once; past it a CONNECT is
    /// refused with 0x88 Server unavailable (3.1.1: 0x03), so that a reconnect storm cannot
    /// pile up unbounded requests to NATS.
    #[serde(default = "default_max_pending_claims")]
    pub max_pending_claims: usize,
}

fn default_cluster_name() -> String {
    "tern".into()
}
fn default_ack_timeout_ms() -> u64 {
    5_000
}
fn default_cluster_max_age_secs() -> u64 {
    24 * 3600
}
fn default_max_pending_claims() -> usize {
    1024
}
fn default_cluster_max_bytes() -> i64 {
    256 << 20
}
fn default_share_ack_wait_ms() -> u64 {
    5_000
}
fn default_heartbeat_ms() -> u64 {
    1_000
}
fn default_node_timeout_ms() -> u64 {
    5_000
}

impl Cluster {
    /// `[cluster]` with `nats` and `node` and every other key at its default.
    pub fn new(nats: Vec<String>, node: &str) -> Cluster {
        Cluster {
            nats,
            node: node.into(),
            name: default_cluster_name(),
            replicas: None,
            user: None,
            password: None,
            token: None,
            creds_file: None,
            tls_ca_file: None,
            ack_timeout_ms: default_ack_timeout_ms(),
            max_age_secs: default_cluster_max_age_secs(),
            max_bytes: default_cluster_max_bytes(),
            share_ack_wait_ms: default_share_ack_wait_ms(),
            heartbeat_ms: default_heartbeat_ms(),
            node_timeout_ms: default_node_timeout_ms(),
            max_pending_claims: default_max_pending_claims(),
        }
    }

    /// JetStream replicas: as configured, else min(3, number of NATS urls).
    pub fn replicas(&self) -> usize {
        self.replicas.unwrap_or_else(|| self.nats.len().clamp(1, 3))
    }
}

/// A cluster, node or stream name: a NATS subject token and stream name both accept it.
fn cluster_name_ok(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `[metrics]`: what tern tells about itself.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Seconds between updates of the `$SYS/broker/...` topics (mosquitto's `sys_interval`);
    /// 0 = no `$SYS` topics.
    pub sys_interval: u64,
    /// `host:port` of the HTTP listener serving `/metrics` (Prometheus), the status page `/`
    /// and `/api/status`; empty = no listener.
    pub bind: String,
    /// HTTP connections served at once; more are closed unanswered.
    pub max_connections: usize,
    /// Seconds an HTTP connection may take to send its request and receive the answer.
    pub request_timeout_secs: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { sys_interval: 10, bind: String::new(), max_connections: 16, request_timeout_secs: 10 }
    }
}

/// `[[bridge]]`: tern connects to a peer broker as a client and forwards messages between
/// them per its `topics`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bridge {
    /// Names the bridge: its local session (`$bridge/<name>`), its state topic
    /// (`$SYS/broker/connection/<name>/state`), its log lines.
    pub name: String,
    /// `host:port` of the peer; several for fail-over, tried in order, the first again once
    /// it is back.
    pub addresses: Vec<String>,
    #[serde(default)]
    pub protocol: BridgeProtocol,
    /// Client id at the peer; default `tern-bridge-<name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Start a new session at the peer on each connection (messages for tern queued there
    /// while the bridge was down are then lost).
    #[serde(default)]
    pub clean_start: bool,
    #[serde(default = "default_bridge_keepalive")]
    pub keepalive: u16,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// 3.1.1 bridges: announce themselves as a bridge (protocol level | 0x80, mosquitto's
    /// `try_private`) so a mosquitto peer does not send back what they publish; without it
    /// if the peer refuses.
    #[serde(default = "default_true")]
    pub try_private: bool,
    pub topics: Vec<BridgeTopic>,
    /// Connect to the peer over TLS (`[bridge.tls]`); unset: plain TCP.
    #[serde(default)]
    pub tls: Option<BridgeTls>,
}

/// `[bridge.tls]`: TLS to the peer broker, with mosquitto's `bridge_cafile`,
/// `bridge_certfile`, `bridge_keyfile` and `bridge_insecure`. The files are read when the
/// broker starts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeTls {
    /// PEM CA certificate(s) the peer's certificate must chain to.
    pub ca_file: PathBuf,
    /// The bridge's client certificate chain (PEM, leaf first), for peers that require one;
    /// with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the peer's certificate must carry; default: the host part of the address
    /// connected to (an IP address is checked against the certificate's IP SANs).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Skip the name check (the chain is still verified): any certificate from `ca_file`'s CA
    /// is then accepted as the peer. Dangerous; for tests and broken certificates only.
    #[serde(default)]
    pub insecure: bool,
}

/// The name checked in a bridge peer's certificate by default: the host part of its
/// `host:port` address, without an IPv6 address's brackets.
pub fn bridge_host(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

impl Bridge {
    /// A bridge named `name` to `address` with the defaults of every other key.
    pub fn new(name: &str, address: &str, protocol: BridgeProtocol, topics: Vec<BridgeTopic>) -> Bridge {
        Bridge {
            name: name.into(),
            addresses: vec![address.into()],
            protocol,
            client_id: None,
            clean_start: false,
            keepalive: default_bridge_keepalive(),
            username: None,
            password: None,
            try_private: true,
            topics,
            tls: None,
        }
    }
}

fn default_bridge_keepalive() -> u16 {
    60
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BridgeProtocol {
    #[default]
    V5,
    V311,
}

/// One `topic` line of a mosquitto bridge: `pattern` is subscribed as `local_prefix +
/// pattern` here (direction `out`) and/or as `remote_prefix + pattern` at the peer (`in`);
/// a message's topic keeps its part after the prefix, which is swapped.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeTopic {
    pub pattern: String,
    #[serde(default)]
    pub direction: BridgeDirection,
    #[serde(default)]
    pub qos: u8,
    #[serde(default)]
    pub local_prefix: String,
    #[serde(default)]
    pub remote_prefix: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BridgeDirection {
    #[default]
    Out,
    In,
    Both,
}

impl BridgeDirection {
    pub fn outward(self) -> bool {
        matches!(self, BridgeDirection::Out | BridgeDirection::Both)
    }

    pub fn inward(self) -> bool {
        matches!(self, BridgeDirection::In | BridgeDirection::Both)
    }
}

/// `[[priority]] filter = "alarms/#", level = 9`: messages on topics the filter matches are
/// sent before those of lower levels (0 for everything else), first in first out per level.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Priority {
    pub filter: String,
    /// 1 to 9.
    pub level: u8,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// `host:port`; port 0 picks a free port (tests).
    pub bind: String,
    /// What runs over the accepted sockets.
    #[serde(default)]
    pub kind: ListenerKind,
    /// Certificates for `kind = "tls"` and `kind = "wss"`; required there, refused elsewhere.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// `kind = "ws"` / `"wss"`: the HTTP path of the WebSocket endpoint; requests for any
    /// other path get 404. Unset: `DEFAULT_WS_PATH`.
    #[serde(default)]
    pub path: Option<String>,
    /// `kind = "ws"` / `"wss"`: the web origins (`https://app.example.com`) whose pages may
    /// connect; a browser request from any other origin gets 403. Empty: any origin. A request
    /// without an `Origin` header (not from a browser) is always let through.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

/// The path a WebSocket listener serves when its `path` is unset (what MQTT.js, Paho and
/// mosquitto's clients use by default).
pub const DEFAULT_WS_PATH: &str = "/mqtt";

impl Listener {
    /// A plain TCP listener on `bind`.
    pub fn tcp(bind: &str) -> Listener {
        Listener { bind: bind.into(), kind: ListenerKind::Tcp, tls: None, path: None, allowed_origins: Vec::new() }
    }

    /// A listener of `kind` on `bind` with these certificates (`kind = "tls"` or `"wss"`),
    /// every other key at its default.
    pub fn with_tls(bind: &str, kind: ListenerKind, tls: Tls) -> Listener {
        Listener { kind, tls: Some(tls), ..Listener::tcp(bind) }
    }

    /// The WebSocket endpoint's path (`path`, or `DEFAULT_WS_PATH`).
    pub fn ws_path(&self) -> &str {
        self.path.as_deref().unwrap_or(DEFAULT_WS_PATH)
    }

    /// Whether every client of this listener is known by its certificate (mutual TLS with the
    /// certificate's CN as the user name), so it needs no password file to be safe.
    pub fn identifies_clients(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.require_client_cert && t.use_identity_as_username && t.client_ca.is_some())
    }

    pub fn is_loopback(&self) -> bool {
        self.bind.parse::<SocketAddr>().map(|a| a.ip().is_loopback()).unwrap_or(false)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// MQTT over plain TCP.
    #[default]
    Tcp,
    /// MQTT over TLS (1.2 or 1.3).
    Tls,
    /// MQTT over WebSocket (MQTT 5.0 section 6), over plain HTTP.
    Ws,
    /// MQTT over WebSocket over TLS (HTTPS).
    Wss,
}

impl ListenerKind {
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }

    /// Whether connections start with a TLS handshake (`tls` settings are required).
    pub fn uses_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }

    /// Whether MQTT runs inside a WebSocket (`path` and `allowed_origins` apply).
    pub fn is_websocket(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }
}

/// A TLS listener's certificates, in PEM files (mosquitto's `certfile`, `keyfile`, `cafile`,
/// `require_certificate`, `use_identity_as_username`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign client certificates; without it, clients are not asked for one.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a valid certificate (needs `client_ca`).
    #[serde(default)]
    pub require_client_cert: bool,
    /// The verified client certificate's subject CN is the client's user name; the CONNECT
    /// user name and password are then not used.
    #[serde(default)]
    pub use_identity_as_username: bool,
    /// Seconds a client may take to finish the TLS handshake.
    #[serde(default = "default_tls_handshake_timeout")]
    pub handshake_timeout_secs: u64,
}

fn default_tls_handshake_timeout() -> u64 {
    10
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    pub dir: PathBuf,
    /// `sync`, `periodic` or `none`.
    pub durability: Durability,
    pub sync_interval_ms: u64,
    /// Bytes of store writes (approximate: keys, values and a small overhead per write)
    /// allowed to wait for the disk; past this, tern stops reading from clients until the
    /// store has caught up, so a slow disk slows publishers down instead of growing memory.
    pub max_pending_bytes: usize,
}

/// Smallest `storage.max_pending_bytes` accepted.
pub const MIN_PENDING_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    Sync,
    Periodic,
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// `None` = allowed only when there is no password file and every listener is on
    /// loopback.
    pub allow_anonymous: Option<bool>,
    /// mosquitto-compatible password file (`user:hash` lines: `$7$`, `$6$`, argon2id, SCRAM).
    pub password_file: Option<PathBuf>,
    /// mosquitto-compatible ACL file; when set, whatever it does not allow is denied.
    pub acl_file: Option<PathBuf>,
    /// Password checks running at once (each is deliberately slow and may use ~19 MiB);
    /// further CONNECTs wait their turn.
    pub max_concurrent_password_checks: usize,
}

impl Default for Auth {
    fn default() -> Self {
        Auth { allow_anonymous: None, password_file: None, acl_file: None, max_concurrent_password_checks: 4 }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest packet accepted from a client, in bytes, fixed header included.
    pub max_packet_size: u32,
    pub max_connections: usize,
    /// Outbound QoS 1/2 messages awaiting acknowledgement, per client.
    pub max_inflight: u16,
    /// Messages waiting to be sent, per session (online or offline).
    pub max_queued_messages: usize,
    /// Bytes waiting to be sent, per session (payload, topic and properties, plus ~128 bytes
    /// of bookkeeping per message), in memory or (offline persistent sessions) on disk;
    /// 0 = unlimited.
    pub max_queued_bytes: usize,
    /// Bytes all sessions' queues may hold in memory together (each queue's first 64 KiB
    /// not counted); at the budget publishers are slowed, at twice it messages are dropped.
    /// 0 = unlimited.
    pub max_queued_memory: usize,
    /// Longest topic name or filter, in bytes.
    pub max_topic_length: usize,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Seconds to wait for CONNECT after the socket opens.
    pub connect_timeout_secs: u64,
    /// Highest keep-alive a client may ask for; a v5 client asking more is told the server's
    /// value (Server Keep Alive). 0 = no limit.
    pub max_keepalive: u16,
    /// Longest client identifier accepted, in bytes.
    pub max_client_id_length: usize,
    /// Retained messages kept whole in memory; beyond this, the oldest ones (once on disk)
    /// keep only their topic in memory and are read from the store when a subscription
    /// matches them.
    pub max_retained_in_memory: usize,
    /// Seconds a connected subscriber's full queue may go without progress while publishers
    /// wait on it; then the subscriber is disconnected (v5: 0x97) so they can go on.
    pub slow_consumer_secs: u64,
    /// Subscriptions one session may hold; more get SUBACK 0x97 (v5) / 0x80.
    pub max_subscriptions: usize,
    /// User properties in one PUBLISH or will; a v5 message with more is refused (0x97).
    pub max_user_properties: usize,
    /// QoS 2 messages a 3.1.1 client may leave unreleased (no PUBREL yet) before it is
    /// disconnected; v5 clients are held to `mqtt.receive_maximum` instead.
    pub max_awaiting_pubrel: usize,
    /// Acknowledgements one connection may hold while the store makes their effects durable;
    /// at this many, tern stops reading from the client until some are sent.
    pub max_held_acks: usize,
}

/// MQTT 5 capabilities announced in CONNACK.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mqtt {
    /// QoS 2 messages a client may have unreleased at once (server Receive Maximum).
    pub receive_maximum: u16,
    /// Topic aliases a client may use towards the server.
    pub topic_alias_maximum: u16,
    pub retain_available: bool,
    pub wildcard_subscriptions: bool,
    pub subscription_identifiers: bool,
    pub shared_subscriptions: bool,
    /// 0, 1 or 2.
    pub maximum_qos: u8,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listener: vec![Listener::tcp("127.0.0.1:1883")],
            storage: Storage::default(),
            auth: Auth::default(),
            limits: Limits::default(),
            mqtt: Mqtt::default(),
            priority: Vec::new(),
            bridge: Vec::new(),
            metrics: MetricsConfig::default(),
            cluster: None,
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            dir: PathBuf::from("./data"),
            durability: Durability::Sync,
            sync_interval_ms: 100,
            max_pending_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 1_048_576,
            max_connections: 100_000,
            max_inflight: 64,
            max_queued_messages: 10_000,
            max_queued_bytes: 64 * 1024 * 1024,
            max_queued_memory: 256 * 1024 * 1024,
            max_topic_length: 65_535,
            max_topic_levels: 128,
            connect_timeout_secs: 10,
            max_keepalive: 0,
            max_client_id_length: 65_535,
            max_retained_in_memory: 100_000,
            slow_consumer_secs: 10,
            max_subscriptions: 10_000,
            max_user_properties: 128,
            max_awaiting_pubrel: 1_000,
            max_held_acks: 1_000,
        }
    }
}

impl Default for Mqtt {
    fn default() -> Self {
        Mqtt {
            receive_maximum: 20,
            topic_alias_maximum: 10,
            retain_available: true,
            wildcard_subscriptions: true,
            subscription_identifiers: true,
            shared_subscriptions: true,
            maximum_qos: 2,
        }
    }
}

impl Config {
    /// Defaults, then `file` (when given), then `TERN__SECTION__KEY` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let origin = match file {
            Some(p) => p.display().to_string(),
            None => "embedded default config".to_string(),
        };
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Load {
                    origin,
                    message: "file not found or not a regular file; pass an existing TOML file to -c".into(),
                });
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("TERN").prefix_separator("__").separator("__").try_parsing(true),
        );
        let raw = builder.build().map_err(|e| ConfigError::Load { origin: origin.clone(), message: e.to_string() })?;
        let cfg: Config = raw.try_deserialize().map_err(|e| ConfigError::Load {
            origin: origin.clone(),
            message: format!("{e} (see config/default.toml for every key and its type)"),
        })?;
        cfg.validate(&origin)?;
        Ok(cfg)
    }

    /// Parses TOML text directly (tests, embedded default).
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|e| ConfigError::Load { origin: origin.into(), message: e.to_string() })?;
        let cfg: Config =
            raw.try_deserialize().map_err(|e| ConfigError::Load { origin: origin.into(), message: e.to_string() })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad =
            |key: &str, message: String| Err(ConfigError::Invalid { origin: origin.into(), key: key.into(), message });
        if self.listener.is_empty() {
            return bad("listener", "at least one [[listener]] with `bind = \"host:port\"` is required".into());
        }
        for (i, l) in self.listener.iter().enumerate() {
            if l.bind.parse::<SocketAddr>().is_err() {
                return bad(
                    &format!("listener[{i}].bind"),
                    format!("`{}` is not an IP address and port, e.g. \"127.0.0.1:1883\" or \"0.0.0.0:1883\"", l.bind),
                );
            }
            match (l.kind, &l.tls) {
                (kind, None) if kind.uses_tls() => {
                    return bad(
                        &format!("listener[{i}].tls"),
                        format!(
                        "a `kind = \"{}\"` listener needs `tls = {{ cert = \"server.crt\", key = \"server.key\" }}`",
                        kind.name()
                    ),
                    )
                }
                (ListenerKind::Tcp, Some(_)) => {
                    return bad(
                        &format!("listener[{i}].kind"),
                        "this listener has `tls` settings; set `kind = \"tls\"` (or remove `tls`)".into(),
                    )
                }
                (ListenerKind::Ws, Some(_)) => {
                    return bad(
                        &format!("listener[{i}].kind"),
                        "this listener has `tls` settings; for WebSocket over TLS set `kind = \"wss\"` (or remove \
                         `tls` for plain `ws`)"
                            .into(),
                    )
                }
                _ => {}
            }
            if let Err((key, message)) = check_websocket(l) {
                return bad(&format!("listener[{i}].{key}"), message);
            }
            if let Some(t) = &l.tls {
                if t.require_client_cert && t.client_ca.is_none() {
                    return bad(
                        &format!("listener[{i}].tls.client_ca"),
                        "`require_client_cert = true` needs `client_ca`, the CA file that signs client certificates"
                            .into(),
                    );
                }
                if t.use_identity_as_username && !t.require_client_cert {
                    return bad(
                        &format!("listener[{i}].tls.require_client_cert"),
                        "`use_identity_as_username = true` needs `require_client_cert = true`".into(),
                    );
                }
                if t.handshake_timeout_secs == 0 {
                    return bad(
                        &format!("listener[{i}].tls.handshake_timeout_secs"),
                        "must be at least 1 second".into(),
                    );
                }
            }
        }
        // Safe by default: a listener reachable from other machines never lets unknown
        // clients in unless the operator says so.
        if self.auth.allow_anonymous != Some(true) && self.auth.password_file.is_none() {
            if let Some((i, l)) =
                self.listener.iter().enumerate().find(|(_, l)| !l.is_loopback() && !l.identifies_clients())
            {
                return bad(
                    "auth.password_file",
                    format!(
                        "listener[{i}] (`{}`) is reachable from other machines but no client could log in: set \
                         `auth.password_file` (see `tern passwd`), or `auth.allow_anonymous = true` to accept \
                         anyone, or bind it to 127.0.0.1",
                        l.bind
                    ),
                );
            }
        }
        if self.auth.max_concurrent_password_checks == 0 {
            return bad("auth.max_concurrent_password_checks", "must be at least 1".into());
        }
        let l = &self.limits;
        if l.max_packet_size < 64 || l.max_packet_size > 268_435_460 {
            return bad("limits.max_packet_size", "must be between 64 and 268435460 bytes".into());
        }
        if l.max_inflight == 0 {
            return bad("limits.max_inflight", "must be at least 1".into());
        }
        if l.max_queued_messages == 0 {
            return bad("limits.max_queued_messages", "must be at least 1".into());
        }
        if l.max_connections == 0 {
            return bad("limits.max_connections", "must be at least 1".into());
        }
        if l.max_topic_length == 0 || l.max_topic_length > 65_535 {
            return bad("limits.max_topic_length", "must be between 1 and 65535".into());
        }
        if l.max_topic_levels == 0 {
            return bad("limits.max_topic_levels", "must be at least 1".into());
        }
        if l.connect_timeout_secs == 0 {
            return bad("limits.connect_timeout_secs", "must be at least 1 second".into());
        }
        if l.max_subscriptions == 0 {
            return bad("limits.max_subscriptions", "must be at least 1".into());
        }
        if l.max_awaiting_pubrel == 0 {
            return bad("limits.max_awaiting_pubrel", "must be at least 1".into());
        }
        if l.max_held_acks == 0 {
            return bad("limits.max_held_acks", "must be at least 1".into());
        }
        if l.slow_consumer_secs == 0 {
            return bad("limits.slow_consumer_secs", "must be at least 1 second".into());
        }
        if l.max_client_id_length == 0 {
            return bad("limits.max_client_id_length", "must be at least 1".into());
        }
        if self.mqtt.receive_maximum == 0 {
            return bad("mqtt.receive_maximum", "must be between 1 and 65535".into());
        }
        if self.mqtt.maximum_qos > 2 {
            return bad("mqtt.maximum_qos", "must be 0, 1 or 2".into());
        }
        for (i, p) in self.priority.iter().enumerate() {
            if !(1..=9).contains(&p.level) {
                return bad(&format!("priority[{i}].level"), "must be between 1 and 9 (0 is every other topic)".into());
            }
            if !crate::protocol::topic::valid_topic_filter(&p.filter) || p.filter.starts_with("$share/") {
                return bad(
                    &format!("priority[{i}].filter"),
                    format!("`{}` is not a topic filter, e.g. \"alarms/#\" or \"+/door\"", p.filter),
                );
            }
        }
        if self.storage.sync_interval_ms == 0 {
            return bad("storage.sync_interval_ms", "must be at least 1".into());
        }
        if self.storage.max_pending_bytes < MIN_PENDING_BYTES {
            // Below one read buffer's worth, nearly every read would wait for a commit.
            return bad("storage.max_pending_bytes", format!("must be at least {MIN_PENDING_BYTES} (64 KiB)"));
        }
        let m = &self.metrics;
        if !m.bind.is_empty() && m.bind.parse::<SocketAddr>().is_err() {
            return bad(
                "metrics.bind",
                format!(
                    "`{}` is not an IP address and port, e.g. \"127.0.0.1:9883\"; leave it empty for no HTTP listener",
                    m.bind
                ),
            );
        }
        if m.sys_interval > 86_400 {
            return bad("metrics.sys_interval", "must be at most 86400 seconds (0 turns $SYS off)".into());
        }
        if m.max_connections == 0 {
            return bad("metrics.max_connections", "must be at least 1".into());
        }
        if m.request_timeout_secs == 0 {
            return bad("metrics.request_timeout_secs", "must be at least 1 second".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, b) in self.bridge.iter().enumerate() {
            if b.name.is_empty() || b.name.contains(['/', '+', '#']) || !names.insert(&b.name) {
                return bad(&format!("bridge[{i}].name"), "a unique name without '/', '+' or '#' is required".into());
            }
            if b.addresses.is_empty() {
                return bad(&format!("bridge[{i}].addresses"), "at least one \"host:port\" is required".into());
            }
            // mosquitto's `address` takes a host alone (port 1883); tern would only fail to
            // connect, at every try, so a copied line is caught here.
            let has_port = |a: &str| a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if let Some(a) = b.addresses.iter().find(|a| !has_port(a)) {
                return bad(
                    &format!("bridge[{i}].addresses"),
                    format!("`{a}` has no port: write \"{a}:1883\" (mosquitto's default port)"),
                );
            }
            if b.topics.is_empty() {
                return bad(&format!("bridge[{i}].topics"), "at least one topic entry is required".into());
            }
            for (j, t) in b.topics.iter().enumerate() {
                let key = format!("bridge[{i}].topics[{j}]");
                let filters = [format!("{}{}", t.local_prefix, t.pattern), format!("{}{}", t.remote_prefix, t.pattern)];
                if filters.iter().any(|f| !crate::protocol::topic::valid_topic_filter(f))
                    || t.pattern.starts_with("$share/")
                {
                    return bad(
                        &format!("{key}.pattern"),
                        format!("`{}` with its prefixes is not a topic filter", t.pattern),
                    );
                }
                if t.qos > 2 {
                    return bad(&format!("{key}.qos"), "must be 0, 1 or 2".into());
                }
            }
            if let Some(tls) = &b.tls {
                if tls.cert_file.is_some() != tls.key_file.is_some() {
                    let missing = if tls.cert_file.is_some() { "key_file" } else { "cert_file" };
                    return bad(
                        &format!("bridge[{i}].tls.{missing}"),
                        "a client certificate needs both `cert_file` (PEM chain) and `key_file` (its private \
                         key); set both, or neither to connect without one"
                            .into(),
                    );
                }
                let not_a_name = |n: &str| rustls_pki_types::ServerName::try_from(n).is_err();
                match &tls.server_name {
                    Some(n) if not_a_name(n) => {
                        return bad(
                            &format!("bridge[{i}].tls.server_name"),
                            format!("`{n}` is not a DNS name or IP address, e.g. \"mqtt.example.com\""),
                        )
                    }
                    Some(_) => {}
                    None => {
                        if let Some(a) = b.addresses.iter().find(|a| not_a_name(bridge_host(a))) {
                            return bad(
                                &format!("bridge[{i}].tls.server_name"),
                                format!(
                                    "the host of address `{a}` cannot be checked against the peer's certificate; \
                                     set `server_name` to the name the certificate carries"
                                ),
                            );
                        }
                    }
                }
            }
        }
        if let Some(c) = &self.cluster {
            self.validate_cluster(c, origin)?;
        }
        Ok(())
    }

    fn validate_cluster(&self, c: &Cluster, origin: &str) -> Result<(), ConfigError> {
        let bad =
            |key: &str, message: String| Err(ConfigError::Invalid { origin: origin.into(), key: key.into(), message });
        if c.nats.is_empty() {
            return bad("cluster.nats", "at least one NATS url is required, e.g. [\"nats://127.0.0.1:4222\"]".into());
        }
        if let Some(u) = c.nats.iter().find(|u| u.parse::<async_nats::ServerAddr>().is_err()) {
            return bad("cluster.nats", format!("`{u}` is not a NATS url: write \"nats://host:4222\""));
        }
        if !cluster_name_ok(&c.node) {
            return bad(
                "cluster.node",
                format!("`{}` is not a node name: 1 to 32 of A-Z a-z 0-9 _ -, unique in the cluster", c.node),
            );
        }
        if !cluster_name_ok(&c.name) {
            return bad("cluster.name", format!("`{}` is not a cluster name: 1 to 32 of A-Z a-z 0-9 _ -", c.name));
        }
        if c.replicas.is_some_and(|r| !(1..=5).contains(&r)) {
            return bad("cluster.replicas", "must be 1 to 5 (JetStream's limit); 3 for a 3-server NATS cluster".into());
        }
        if c.token.is_some() && (c.user.is_some() || c.password.is_some()) {
            return bad("cluster.token", "use either `token` or `user` and `password`, not both".into());
        }
        if c.creds_file.is_some() && (c.token.is_some() || c.user.is_some()) {
            return bad(
                "cluster.creds_file",
                "a credentials file is a login of its own: drop `token` or `user`/`password`, or the file".into(),
            );
        }
        if c.user.is_some() != c.password.is_some() {
            let missing = if c.user.is_some() { "password" } else { "user" };
            return bad(&format!("cluster.{missing}"), "`user` and `password` go together: set both or neither".into());
        }
        if c.ack_timeout_ms == 0 || c.ack_timeout_ms > 600_000 {
            return bad("cluster.ack_timeout_ms", "must be 1 to 600000 milliseconds (default 5000)".into());
        }
        if c.max_age_secs == 0 {
            return bad("cluster.max_age_secs", "must be at least 1 second (default 86400)".into());
        }
        if c.max_bytes < 1 << 20 {
            return bad("cluster.max_bytes", "must be at least 1048576 bytes (default 268435456)".into());
        }
        if !(100..=600_000).contains(&c.share_ack_wait_ms) {
            return bad("cluster.share_ack_wait_ms", "must be 100 to 600000 milliseconds (default 5000)".into());
        }
        if !(100..=60_000).contains(&c.heartbeat_ms) {
            return bad("cluster.heartbeat_ms", "must be 100 to 60000 milliseconds (default 1000)".into());
        }
        if c.node_timeout_ms < 2 * c.heartbeat_ms || c.node_timeout_ms > 3_600_000 {
            return bad(
                "cluster.node_timeout_ms",
                "must be at least twice cluster.heartbeat_ms and at most 3600000 (default 5000)".into(),
            );
        }
        if c.max_pending_claims == 0 {
            return bad("cluster.max_pending_claims", "must be at least 1 (default 1024)".into());
        }
        Ok(())
    }

    /// Anonymous access: the explicit setting, or allowed only when every listener is loopback.
    pub fn anonymous_allowed(&self) -> bool {
        // A password file means "clients log in", as in mosquitto, even on loopback.
        self.auth
            .allow_anonymous
            .unwrap_or_else(|| self.auth.password_file.is_none() && self.listener.iter().all(Listener::is_loopback))
    }
}

/// The WebSocket keys of one listener: only on `ws`/`wss` listeners, a path that is one,
/// origins as browsers send them. Err: the key (under `listener[i].`) and what to write.
fn check_websocket(l: &Listener) -> Result<(), (&'static str, String)> {
    if !l.kind.is_websocket() {
        if l.path.is_some() {
            return Err((
                "path",
                "`path` is for WebSocket listeners: set `kind = \"ws\"` (or \"wss\"), or remove `path`".into(),
            ));
        }
        if !l.allowed_origins.is_empty() {
            return Err((
                "allowed_origins",
                "`allowed_origins` is for WebSocket listeners: set `kind = \"ws\"` (or \"wss\"), or remove \
                 `allowed_origins`"
                    .into(),
            ));
        }
        return Ok(());
    }
    let path = l.ws_path();
    // What the request line carries before any query: the upgrade request's path is compared
    // with it byte for byte.
    if !path.starts_with('/') || path.contains(|c: char| c.is_whitespace() || c.is_control() || c == '?' || c == '#') {
        return Err((
            "path",
            format!("`{path}` is not a URL path: start it with '/', without spaces, '?' or '#', e.g. \"/mqtt\""),
        ));
    }
    for origin in &l.allowed_origins {
        if !is_origin(origin) {
            return Err((
                "allowed_origins",
                format!(
                    "`{origin}` is not a web origin: write the scheme, host and port (if not the default) as the \
                     browser's address bar shows them, without a path or trailing '/', e.g. \
                     \"https://app.example.com\" or \"http://localhost:8080\""
                ),
            ));
        }
    }
    Ok(())
}

/// `http://host[:port]` or `https://host[:port]`: the form of a browser's `Origin` header.
fn is_origin(o: &str) -> bool {
    let Some(rest) = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://")) else { return false };
    let host = match rest.rsplit_once(':') {
        // An IPv6 literal's colons are inside its brackets.
        Some((h, port)) if !port.contains(']') => {
            if port.parse::<u16>().is_err() {
                return false;
            }
            h
        }
        _ => rest,
    };
    !host.is_empty() && !host.contains(['/', '?', '#', '@', ' ', '*'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_matches_code_defaults() {
        let parsed = Config::from_toml(DEFAULT_TOML, "config/default.toml").unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[limits]\nmax_inflihgt = 3\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("x.toml") && err.contains("max_inflihgt"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::from_toml("[limits]\nmax_inflight = \"many\"\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("x.toml") && err.contains("max_inflight"), "{err}");
    }

    #[test]
    fn bad_bind_names_key_and_fix() {
        let err = Config::from_toml("[[listener]]\nbind = \"localhost\"\n", "y.toml").unwrap_err().to_string();
        assert!(err.contains("listener[0].bind") && err.contains("y.toml") && err.contains("127.0.0.1:1883"), "{err}");
    }

    #[test]
    fn cluster_is_absent_by_default_and_checked_when_given() {
        assert!(Config::default().cluster.is_none());
        let ok = "[cluster]\nnats = [\"nats://127.0.0.1:4222\", \"nats://127.0.0.1:4223\"]\nnode = \"n1\"\n";
        let c = Config::from_toml(ok, "c.toml").unwrap().cluster.unwrap();
        assert_eq!((c.node.as_str(), c.name.as_str(), c.replicas(), c.ack_timeout_ms), ("n1", "tern", 2, 5000));
        assert_eq!(c.max_pending_claims, 1024);
        for (text, key) in [
            ("[cluster]\nnats = []\nnode = \"n1\"\n", "cluster.nats"),
            ("[cluster]\nnats = [\"nats://a:1\"]\nnode = \"n.1\"\n", "cluster.node"),
            ("[cluster]\nnats = [\"nats://a:1\"]\nnode = \"n1\"\nname = \"\"\n", "cluster.name"),
            ("[cluster]\nnats = [\"nats://a:1\"]\nnode = \"n1\"\nreplicas = 0\n", "cluster.replicas"),
            ("[cluster]\nnats = [\"nats://a:1\"]\nnode = \"n1\"\nuser = \"u\"\n", "cluster.password"),
            (
                "[cluster]\nnats = [\"nats://a:1\"]\nnode = \"n1\"\ntoken = \"t\"\ncreds_file = \"n.creds\"\n",
                "cluster.creds_file",
            ),
            ("[cluster]\nnats = [\"nats://a:1\"]\nnode = \"n1\"\nack_timeout_ms = 0\n", "cluster.ack_timeout_ms"),
            ("[cluster]\nnats = [\"nats://a:1\"]\nnode = \"n1\"\nshare_ack_wait_ms = 0\n", "cluster.share_ack_wait_ms"),
            ("[cluster]\nnats = [\"nats://a:1\"]\nnode = \"n1\"\nheartbeat_ms = 0\n", "cluster.heartbeat_ms"),
            ("[cluster]\nnats = [\"nats://a:1\"]\nnode = \"n1\"\nnode_timeout_ms = 1500\n", "cluster.node_timeout_ms"),
            (
                "[cluster]\nnats = [\"nats://a:1\"]\nnode = \"n1\"\nmax_pending_claims = 0\n",
                "cluster.max_pending_claims",
            ),
        ] {
            let err = Config::from_toml(text, "c.toml").unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("c.toml"), "{key}: {err}");
        }
        let err = Config::from_toml("[cluster]\nnode = \"n1\"\n", "c.toml").unwrap_err().to_string();
        assert!(err.contains("nats"), "{err}");
    }

    #[test]
    fn metrics_settings_are_checked() {
        let c = Config::from_toml("[metrics]\nbind = \"127.0.0.1:9883\"\nsys_interval = 0\n", "m.toml").unwrap();
        assert_eq!((c.metrics.bind.as_str(), c.metrics.sys_interval), ("127.0.0.1:9883", 0));
        let err = Config::from_toml("[metrics]\nbind = \"localhost\"\n", "m.toml").unwrap_err().to_string();
        assert!(err.contains("m.toml") && err.contains("metrics.bind") && err.contains("127.0.0.1:9883"), "{err}");
        let err = Config::from_toml("[metrics]\nmax_connections = 0\n", "m.toml").unwrap_err().to_string();
        assert!(err.contains("metrics.max_connections"), "{err}");
    }

    #[test]
    fn bridge_addresses_need_a_port() {
        let cfg = |addr: &str| {
            format!("[[bridge]]\nname = \"b\"\naddresses = [\"{addr}\"]\n[[bridge.topics]]\npattern = \"#\"\n")
        };
        let err = Config::from_toml(&cfg("broker.example"), "b.toml").unwrap_err().to_string();
        assert!(err.contains("bridge[0].addresses") && err.contains("broker.example:1883"), "{err}");
        for ok in ["broker.example:1883", "10.0.0.5:8883", "[::1]:1883"] {
            Config::from_toml(&cfg(ok), "b.toml").unwrap();
        }
    }

    #[test]
    fn anonymous_default_depends_on_loopback() {
        let mut c = Config::default();
        assert!(c.anonymous_allowed());
        c.listener[0].bind = "0.0.0.0:1883".into();
        assert!(!c.anonymous_allowed());
        let err = c.validate("z.toml").unwrap_err().to_string();
        assert!(err.contains("auth.password_file") && err.contains("allow_anonymous"), "{err}");
        c.auth.allow_anonymous = Some(true);
        assert!(c.anonymous_allowed());
        c.validate("z.toml").unwrap();
    }

    #[test]
    fn backpressure_bounds_are_checked() {
        let err = Config::from_toml("[storage]\nmax_pending_bytes = 1000\n", "s.toml").unwrap_err().to_string();
        assert!(err.contains("storage.max_pending_bytes") && err.contains("65536"), "{err}");
        let err = Config::from_toml("[limits]\nmax_held_acks = 0\n", "s.toml").unwrap_err().to_string();
        assert!(err.contains("limits.max_held_acks"), "{err}");
        let c = Config::from_toml("[storage]\nmax_pending_bytes = 65536\n", "s.toml").unwrap();
        assert_eq!(c.storage.max_pending_bytes, MIN_PENDING_BYTES);
    }

    #[test]
    fn tls_listener_needs_certificates() {
        let err = Config::from_toml("[[listener]]\nbind = \"127.0.0.1:8883\"\nkind = \"tls\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listener[0].tls") && err.contains("cert"), "{err}");
        let ok =
            "[[listener]]\nbind = \"127.0.0.1:8883\"\nkind = \"tls\"\ntls = { cert = \"a.crt\", key = \"a.key\" }\n";
        let c = Config::from_toml(ok, "t.toml").unwrap();
        assert_eq!(c.listener[0].kind, ListenerKind::Tls);
        let bad = "[[listener]]\nbind = \"127.0.0.1:8883\"\nkind = \"tls\"\ntls = { cert = \"a\", key = \"b\", require_client_cert = true }\n";
        let err = Config::from_toml(bad, "t.toml").unwrap_err().to_string();
        assert!(err.contains("client_ca"), "{err}");
    }

    #[test]
    fn bridge_tls_is_checked() {
        let base = "[[bridge]]\nname = \"up\"\naddresses = [\"127.0.0.1:8883\"]\ntopics = [{ pattern = \"#\" }]\n";
        let c = Config::from_toml(&format!("{base}[bridge.tls]\nca_file = \"ca.crt\"\n"), "b.toml").unwrap();
        let tls = c.bridge[0].tls.as_ref().unwrap();
        assert_eq!((tls.ca_file.to_str(), tls.insecure, tls.server_name.as_deref()), (Some("ca.crt"), false, None));
        let err = Config::from_toml(&format!("{base}[bridge.tls]\nca_file = \"ca\"\ncert_file = \"c\"\n"), "b.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bridge[0].tls.key_file") && err.contains("b.toml"), "{err}");
        let err =
            Config::from_toml(&format!("{base}[bridge.tls]\ncert_file = \"c\"\n"), "b.toml").unwrap_err().to_string();
        assert!(err.contains("ca_file"), "{err}");
        let err =
            Config::from_toml(&format!("{base}[bridge.tls]\nca_file = \"ca\"\nserver_name = \"a b\"\n"), "b.toml")
                .unwrap_err()
                .to_string();
        assert!(err.contains("bridge[0].tls.server_name"), "{err}");
        assert_eq!(bridge_host("peer.example.com:8883"), "peer.example.com");
        assert_eq!(bridge_host("[::1]:8883"), "::1");
        assert_eq!(bridge_host("10.0.0.1:8883"), "10.0.0.1");
    }

    #[test]
    fn websocket_listeners_are_checked() {
        let ws = |extra: &str| format!("[[listener]]\nbind = \"127.0.0.1:8080\"\nkind = \"ws\"\n{extra}");
        let c = Config::from_toml(&ws(""), "w.toml").unwrap();
        assert_eq!((c.listener[0].kind, c.listener[0].ws_path()), (ListenerKind::Ws, DEFAULT_WS_PATH));
        let c = Config::from_toml(
            &ws("path = \"/ws\"\nallowed_origins = [\"https://app.example.com\", \"http://localhost:8080\", \"http://[::1]:3000\"]\n"),
            "w.toml",
        )
        .unwrap();
        assert_eq!((c.listener[0].ws_path(), c.listener[0].allowed_origins.len()), ("/ws", 3));

        // ws refuses certificates, wss needs them.
        let err =
            Config::from_toml(&ws("tls = { cert = \"a.crt\", key = \"a.key\" }\n"), "w.toml").unwrap_err().to_string();
        assert!(err.contains("w.toml") && err.contains("listener[0].kind") && err.contains("wss"), "{err}");
        let wss = "[[listener]]\nbind = \"127.0.0.1:8443\"\nkind = \"wss\"\n";
        let err = Config::from_toml(wss, "w.toml").unwrap_err().to_string();
        assert!(err.contains("listener[0].tls") && err.contains("kind = \"wss\"") && err.contains("cert"), "{err}");
        let c = Config::from_toml(&format!("{wss}tls = {{ cert = \"a.crt\", key = \"a.key\" }}\n"), "w.toml").unwrap();
        assert!(c.listener[0].kind.uses_tls() && c.listener[0].kind.is_websocket());
        let mtls = format!(
            "{wss}tls = {{ cert = \"a\", key = \"b\", use_identity_as_username = true, require_client_cert = true }}\n"
        );
        let err = Config::from_toml(&mtls, "w.toml").unwrap_err().to_string();
        assert!(err.contains("listener[0].tls.client_ca"), "{err}");

        // The WebSocket keys belong to WebSocket listeners.
        let tcp = "[[listener]]\nbind = \"127.0.0.1:1883\"\n";
        let err = Config::from_toml(&format!("{tcp}path = \"/mqtt\"\n"), "w.toml").unwrap_err().to_string();
        assert!(err.contains("listener[0].path") && err.contains("kind = \"ws\""), "{err}");
        let err =
            Config::from_toml(&format!("{tcp}allowed_origins = [\"http://a\"]\n"), "w.toml").unwrap_err().to_string();
        assert!(err.contains("listener[0].allowed_origins"), "{err}");

        for bad_path in ["mqtt", "/a b", "/mqtt?x=1", ""] {
            let err = Config::from_toml(&ws(&format!("path = \"{bad_path}\"\n")), "w.toml").unwrap_err().to_string();
            assert!(err.contains("listener[0].path") && err.contains("\"/mqtt\""), "{bad_path}: {err}");
        }
        for bad_origin in [
            "app.example.com",
            "https://app.example.com/",
            "https://a.example/x",
            "ftp://a",
            "https://",
            "http://a:x",
            "*",
        ] {
            let err = Config::from_toml(&ws(&format!("allowed_origins = [\"{bad_origin}\"]\n")), "w.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("listener[0].allowed_origins") && err.contains("https://app.example.com"),
                "{bad_origin}: {err}"
            );
        }
    }
}
