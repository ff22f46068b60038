//! Configuration from the environment (the names of the operations contract, plus a few of our
//! own), validated completely before anything connects or binds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use chat_log::LogConfig;

/// Which parts of the system this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Every role in one process (one machine).
    All,
    /// WebSocket edge: holds client sockets, appends and pushes events.
    Edge,
    /// Consumes room logs into the projection store.
    Projector,
    /// HTTP API over the projection store.
    Api,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Edge => "edge",
            Role::Projector => "projector",
            Role::Api => "api",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Role as clap::ValueEnum>::from_str(s, true)
            .map_err(|_| format!("unknown role {s:?} (all, edge, projector, api)"))
    }
}

/// Where projections are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// Embedded SQLite in the data directory.
    Sqlite,
    /// ScyllaDB nodes and keyspace.
    Scylla {
        nodes: Vec<String>,
        keyspace: String,
        /// The address as given, for the driver.
        uri: String,
        /// `CHAT_SCYLLA_USER` and `CHAT_SCYLLA_PASSWORD`.
        login: Option<chat_store::ScyllaLogin>,
    },
}

/// How tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthConfig {
    /// A generated secret in the data directory; issuer and audience `chat-dev`.
    Development,
    /// Operator-provided keys.
    Configured {
        hs256_secret: Option<String>,
        /// The secret before `hs256_secret` (`CHAT_JWT_HS256_SECRET_PREVIOUS`), still accepted
        /// while tokens signed with it are out: a rotation without refusing them.
        hs256_previous: Option<String>,
        public_keys: Option<PathBuf>,
        issuer: String,
        audience: String,
    },
}

pub use chat_edge::Rate;

/// How the self-started nats-server syncs its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsSync {
    /// fsync every write: no acknowledged event is lost even on power loss (the default).
    Always,
    /// nats-server's own default interval (faster; a power loss can lose recent writes).
    Default,
    /// A specific interval, e.g. `1s`.
    Interval(Duration),
}

/// Everything a `chatd run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub role: Role,
    /// HTTP + WebSocket listen address (port 0: any free port).
    pub listen: SocketAddr,
    /// A second listener for probes and scrapes only (`/healthz`, `/readyz`, `/metrics`), outside
    /// `CHAT_MAX_HTTP_CONNECTIONS` and open until the process exits (`CHAT_OPS_LISTEN`).
    pub ops_listen: Option<SocketAddr>,
    /// Embedded store, development secret and the self-started nats-server's data.
    pub data_dir: PathBuf,
    /// An external NATS; `None` starts our own nats-server.
    pub nats_url: Option<String>,
    /// Credentials and TLS for `nats_url`.
    pub nats: crate::nats_security::NatsSecurity,
    /// The nats-server binary to start when `nats_url` is unset.
    pub nats_server_bin: Option<PathBuf>,
    /// File sync policy of the self-started nats-server.
    pub nats_sync: NatsSync,
    pub store: StoreConfig,
    pub auth: AuthConfig,
    pub send_rate: Rate,
    /// WebSocket Origin allow-list; `None`: only no Origin or one matching Host.
    pub allowed_origins: Option<Vec<String>>,
    /// Room log layout and timeouts.
    pub log: LogConfig,
    /// How long a drain may take before remaining connections are cut.
    pub drain_grace: Duration,
    /// How long after SIGTERM the process goes on serving (and accepting) with `/readyz` at
    /// 503, so balancers stop sending it new connections before it stops accepting.
    pub drain_delay: Duration,
    /// How long a WebSocket client may take to send its `auth` frame.
    pub auth_timeout: Duration,
    /// The largest WebSocket frame accepted (larger: close 1009).
    pub max_frame_bytes: usize,
    /// The most characters a message's text may have.
    pub max_text_chars: usize,
    /// Which share of the rooms this process projects (`CHAT_PROJECTOR_PARTITION`, `0/1`).
    pub partition: chat_projector::Partition,
    /// How often the projector compares the stream list with its checkpoints.
    pub reconcile_every: Duration,
    /// How long live events may wait for a fuller projector commit (`CHAT_PROJECTOR_LINGER`).
    pub projector_linger: Duration,
    /// How long a room's membership is cached before it is re-read from the log.
    pub membership_ttl: Duration,
    /// Rate limits of the edge (`send` is `send_rate`).
    pub rates: chat_edge::Rates,
    /// Outbound queue per WebSocket session: frames and bytes.
    pub outbound_frames: usize,
    pub outbound_bytes: usize,
    /// How long a full outbound queue may stay full before the client is closed with 4008.
    pub slow_grace: Duration,
    /// WebSocket pings this often; a client silent for `idle_timeout` is closed.
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// How often edges share what their per-user buckets gave out (`CHAT_RATE_SHARE`);
    /// `None` (`0`): each edge limits on its own.
    pub rate_share: Option<Duration>,
    /// More refusals than a limit's burst within this window: close 4029.
    pub flood_window: Duration,
    /// HTTP connections not (yet) upgraded to WebSockets, at most (`CHAT_MAX_HTTP_CONNECTIONS`):
    /// more wait in the listen queue until one ends.
    pub max_http_connections: usize,
    /// How long a client may take to send a request's head, or keep an idle connection open
    /// between requests (`CHAT_HTTP_HEADER_TIMEOUT`).
    pub http_header_timeout: Duration,
    /// How long a request's body and its answer may take (`CHAT_HTTP_REQUEST_TIMEOUT`).
    pub http_request_timeout: Duration,
    /// Connection caps of an edge: in total and per user.
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    /// The most rooms one `subscribe` frame may name.
    pub max_rooms_per_subscribe: usize,
    /// Streams in the NATS account past which no room is created (`CHAT_MAX_ROOMS`; 0: none).
    pub max_rooms: u64,
    /// Rooms a user may be a member of and still create one (`CHAT_MAX_ROOMS_PER_USER`; 0:
    /// no cap).
    pub max_rooms_per_user: usize,
    /// How long an append with an unknown outcome is retried (same id) before `unavailable`.
    pub append_retry: Duration,
    /// Appends one session may have in flight (`CHAT_APPENDS_IN_FLIGHT`).
    pub appends_in_flight: usize,
    /// A typing indicator without a renewal ends after this long (the contract's 5 s).
    pub typing_expiry: Duration,
    /// Presence: renewal interval, expiry of a silent edge's users, coalescing interval.
    pub presence: chat_edge::PresenceConfig,
    /// Delivered cursors: how often each room's are appended (one event per room).
    pub delivered: chat_edge::DeliveredConfig,
}

#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

/// `CHAT_ALLOWED_ORIGINS`: origins as browsers send them, `scheme://host[:port]`. A trailing
/// `/` is dropped (browsers never send one); a path could never match, so it is refused.
fn parse_origins(list: &str) -> Result<Vec<String>, ConfigError> {
    list.split(',')
        .map(|o| o.trim().trim_end_matches('/'))
        .filter(|o| !o.is_empty())
        .map(|o| match o.split_once("://") {
            Some((scheme, host))
                if !scheme.is_empty() && !host.is_empty() && !host.contains('/') =>
            {
                Ok(o.to_owned())
            }
            _ => Err(err(
                "CHAT_ALLOWED_ORIGINS",
                format!(
                    "{o:?} is not an origin: write scheme://host[:port], as https://app.example"
                ),
            )),
        })
        .collect()
}

fn err(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

/// `500ms`, `30s`, `10m`, `2h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a duration like 30s or 10m, got {s:?}"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (ms, s, m, h)")),
    };
    Ok(d)
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`Config::from_env`], and the `CHAT_` variables the environment sets that it did not
    /// read: misspelled (`CHAT_PREFX`), or meant for something this build does not have.
    pub fn from_env_noting_unread() -> Result<(Config, Vec<String>), ConfigError> {
        Config::from_lookup_noting_unread(
            |k| std::env::var(k).ok().filter(|v| !v.is_empty()),
            std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()),
        )
    }

    /// [`Config::from_lookup`], and the names among `set` starting with `CHAT_` that it did
    /// not ask `get` for.
    pub fn from_lookup_noting_unread(
        get: impl Fn(&str) -> Option<String>,
        set: impl IntoIterator<Item = String>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let asked = std::cell::RefCell::new(std::collections::HashSet::new());
        let config = Config::from_lookup(|k| {
            asked.borrow_mut().insert(k.to_owned());
            get(k)
        })?;
        let asked = asked.into_inner();
        // Read by the shipped nats-server configs (nats/), not by chatd; often in the same
        // environment.
        let for_nats_server = |k: &str| k == "CHAT_NATS_NKEY" || k.starts_with("CHAT_NATS_ROUTE_");
        let mut unread: Vec<String> = set
            .into_iter()
            .filter(|k| k.starts_with("CHAT_") && !asked.contains(k) && !for_nats_server(k))
            .collect();
        unread.sort();
        Ok((config, unread))
    }

    /// Reads settings through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let role = match get("CHAT_ROLE") {
            Some(r) => r.parse().map_err(|m| err("CHAT_ROLE", m))?,
            None => Role::All,
        };
        let listen = get("CHAT_LISTEN").unwrap_or_else(|| "127.0.0.1:8080".to_owned());
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| err("CHAT_LISTEN", format!("expected IP:PORT, got {listen:?}")))?;
        let ops_listen = match get("CHAT_OPS_LISTEN") {
            None => None,
            Some(ops) => {
                let ops: SocketAddr = ops.parse().map_err(|_| {
                    err("CHAT_OPS_LISTEN", format!("expected IP:PORT, got {ops:?}"))
                })?;
                if ops.port() != 0 && ops == listen {
                    return Err(err(
                        "CHAT_OPS_LISTEN",
                        format!("{ops} is CHAT_LISTEN's address; give it a port of its own"),
                    ));
                }
                Some(ops)
            }
        };
        let data_dir = PathBuf::from(get("CHAT_DATA_DIR").unwrap_or_else(|| "./data".to_owned()));

        // Read by the telemetry set up before this: checked here so a bad one is an error.
        match get("CHAT_LOG_FORMAT").as_deref() {
            None | Some("text" | "json") => {}
            Some(other) => {
                return Err(err(
                    "CHAT_LOG_FORMAT",
                    format!("text or json, got {other:?}"),
                ))
            }
        }
        for var in ["CHAT_LOG", "CHAT_TRACE"] {
            if let Some(filter) = get(var) {
                tracing_subscriber::EnvFilter::builder()
                    .parse(&filter)
                    .map_err(|e| err(var, format!("not a filter ({e}): {filter:?}")))?;
            }
        }
        // Kept without its credentials (they go to `nats`): it is printed and logged.
        let (nats_url, nats) =
            crate::nats_security::NatsSecurity::from_lookup(get("NATS_URL").as_deref(), &get)?;
        let nats_server_bin = get("NATS_SERVER_BIN").map(PathBuf::from);
        let nats_sync = match get("CHAT_NATS_SYNC").as_deref() {
            None | Some("always") => NatsSync::Always,
            Some("default") => NatsSync::Default,
            Some(other) => NatsSync::Interval(
                parse_duration(other)
                    .and_then(|d| {
                        if d.is_zero() {
                            Err("an interval above 0 (or always)".to_owned())
                        } else {
                            Ok(d)
                        }
                    })
                    .map_err(|m| {
                        err(
                            "CHAT_NATS_SYNC",
                            format!("always, default, or an interval: {m}"),
                        )
                    })?,
            ),
        };

        let store = match get("CHAT_STORE").as_deref() {
            None | Some("sqlite") => {
                for var in ["CHAT_SCYLLA_USER", "CHAT_SCYLLA_PASSWORD"] {
                    if get(var).is_some() {
                        return Err(err(var, "applies to CHAT_STORE=scylla://… only"));
                    }
                }
                StoreConfig::Sqlite
            }
            Some(uri) => {
                let login = match (get("CHAT_SCYLLA_USER"), get("CHAT_SCYLLA_PASSWORD")) {
                    (Some(user), Some(password)) => {
                        Some(chat_store::ScyllaLogin { user, password })
                    }
                    (None, None) => None,
                    (Some(_), None) => {
                        return Err(err(
                            "CHAT_SCYLLA_PASSWORD",
                            "required with CHAT_SCYLLA_USER",
                        ))
                    }
                    (None, Some(_)) => {
                        return Err(err(
                            "CHAT_SCYLLA_USER",
                            "required with CHAT_SCYLLA_PASSWORD",
                        ))
                    }
                };
                parse_scylla_uri(uri, login).map_err(|m| err("CHAT_STORE", m))?
            }
        };

        let auth = auth_from(&get)?;
        let defaults = chat_edge::EdgeConfig::default();
        let rate = |var: &'static str, default: Rate| -> Result<Rate, ConfigError> {
            match get(var) {
                Some(r) => r.parse().map_err(|m| err(var, m)),
                None => Ok(default),
            }
        };
        let rates = chat_edge::Rates {
            send: rate("CHAT_SEND_RATE", defaults.rates.send)?,
            typing: rate("CHAT_TYPING_RATE", defaults.rates.typing)?,
            subscribe: rate("CHAT_SUBSCRIBE_RATE", defaults.rates.subscribe)?,
            history: rate("CHAT_HISTORY_RATE", defaults.rates.history)?,
            manage: rate("CHAT_MANAGE_RATE", defaults.rates.manage)?,
            frames: rate("CHAT_FRAME_RATE", defaults.rates.frames)?,
        };
        let send_rate = rates.send;
        let duration = |var: &'static str, default: Duration| -> Result<Duration, ConfigError> {
            match get(var) {
                Some(d) => parse_duration(&d)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| err(var, format!("a duration above 0, got {d:?}"))),
                None => Ok(default),
            }
        };
        let count = |var: &'static str, default: usize| -> Result<usize, ConfigError> {
            match get(var) {
                Some(n) => n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| err(var, format!("a positive integer, got {n:?}"))),
                None => Ok(default),
            }
        };
        let outbound_frames = count("CHAT_OUTBOUND_FRAMES", defaults.outbound_frames)?;
        let outbound_bytes = count("CHAT_OUTBOUND_BYTES", defaults.outbound_bytes)?;
        let slow_grace = duration("CHAT_SLOW_CLIENT_GRACE", defaults.slow_grace)?;
        let ping_interval = duration("CHAT_PING_INTERVAL", defaults.ping_interval)?;
        let idle_timeout = duration("CHAT_IDLE_TIMEOUT", defaults.idle_timeout)?;
        if idle_timeout <= ping_interval {
            return Err(err(
                "CHAT_IDLE_TIMEOUT",
                format!(
                    "must be longer than CHAT_PING_INTERVAL ({ping_interval:?}), or clients \
                     that answer every ping would still be closed"
                ),
            ));
        }
        let flood_window = duration("CHAT_FLOOD_WINDOW", defaults.flood_window)?;
        let rate_share = match get("CHAT_RATE_SHARE") {
            Some(d) => parse_duration(&d)
                .ok()
                .filter(|d| *d <= Duration::from_secs(10))
                .ok_or_else(|| {
                    err(
                        "CHAT_RATE_SHARE",
                        format!("a duration from 0 (off) to 10s, got {d:?}"),
                    )
                })
                .map(|d| (!d.is_zero()).then_some(d))?,
            None => Some(Duration::from_millis(250)),
        };
        let max_http_connections = count("CHAT_MAX_HTTP_CONNECTIONS", 1_024)?;
        let http_header_timeout = duration("CHAT_HTTP_HEADER_TIMEOUT", Duration::from_secs(10))?;
        let http_request_timeout = duration("CHAT_HTTP_REQUEST_TIMEOUT", Duration::from_secs(15))?;
        let max_connections = count("CHAT_MAX_CONNECTIONS", defaults.max_connections)?;
        let max_connections_per_user = count(
            "CHAT_MAX_CONNECTIONS_PER_USER",
            defaults.max_connections_per_user,
        )?;
        let max_rooms_per_subscribe = count(
            "CHAT_MAX_ROOMS_PER_SUBSCRIBE",
            defaults.max_rooms_per_subscribe,
        )?;
        // 0: no cap.
        let cap = |var: &'static str, default: u64| -> Result<u64, ConfigError> {
            match get(var) {
                Some(n) => n
                    .parse::<u64>()
                    .map_err(|_| err(var, format!("a whole number (0: no cap), got {n:?}"))),
                None => Ok(default),
            }
        };
        let max_rooms = cap("CHAT_MAX_ROOMS", 20_000)?;
        let max_rooms_per_user = cap("CHAT_MAX_ROOMS_PER_USER", 1_000)? as usize;
        let append_retry = duration("CHAT_APPEND_RETRY", defaults.append_retry)?;
        let appends_in_flight = count("CHAT_APPENDS_IN_FLIGHT", defaults.appends_in_flight)?;
        let typing_expiry = duration("CHAT_TYPING_TIMEOUT", Duration::from_secs(5))?;
        let presence = chat_edge::PresenceConfig {
            heartbeat: duration("CHAT_PRESENCE_HEARTBEAT", defaults.presence.heartbeat)?,
            expiry: duration("CHAT_PRESENCE_TIMEOUT", defaults.presence.expiry)?,
            flush: duration("CHAT_PRESENCE_INTERVAL", defaults.presence.flush)?,
            max_frames: count("CHAT_PRESENCE_MAX_FRAMES", defaults.presence.max_frames)?,
        };
        if presence.expiry <= presence.heartbeat {
            return Err(err(
                "CHAT_PRESENCE_TIMEOUT",
                "must be longer than CHAT_PRESENCE_HEARTBEAT, or every edge's users would flap",
            ));
        }
        let delivered = chat_edge::DeliveredConfig {
            interval: duration("CHAT_DELIVERED_INTERVAL", defaults.delivered.interval)?,
            ..defaults.delivered
        };
        let allowed_origins = get("CHAT_ALLOWED_ORIGINS")
            .map(|list| parse_origins(&list))
            .transpose()?;

        let mut log = LogConfig::default();
        if let Some(prefix) = get("CHAT_PREFIX") {
            log.prefix = prefix;
        }
        if let Some(replicas) = get("CHAT_REPLICAS") {
            log.replicas = replicas
                .parse()
                .map_err(|_| err("CHAT_REPLICAS", format!("not a number: {replicas:?}")))?;
        }
        if let Some(window) = get("CHAT_DEDUP_WINDOW") {
            log.duplicate_window =
                parse_duration(&window).map_err(|m| err("CHAT_DEDUP_WINDOW", m))?;
        }
        if let Some(timeout) = get("CHAT_NATS_TIMEOUT") {
            log.request_timeout =
                parse_duration(&timeout).map_err(|m| err("CHAT_NATS_TIMEOUT", m))?;
        }
        log.validate().map_err(|e| {
            let var = match &e {
                chat_log::ConfigError::Prefix(_) => "CHAT_PREFIX",
                chat_log::ConfigError::Replicas(_) => "CHAT_REPLICAS",
                chat_log::ConfigError::DuplicateWindow(_) => "CHAT_DEDUP_WINDOW",
                chat_log::ConfigError::Zero("request timeout") => "CHAT_NATS_TIMEOUT",
                _ => "CHAT_PREFIX/CHAT_REPLICAS/CHAT_DEDUP_WINDOW/CHAT_NATS_TIMEOUT",
            };
            err(var, e.to_string())
        })?;
        if nats_url.is_none() && log.replicas > 1 {
            return Err(err(
                "CHAT_REPLICAS",
                format!(
                    "{} replicas need a NATS cluster (NATS_URL); the nats-server chatd starts \
                     when NATS_URL is unset is a single node",
                    log.replicas
                ),
            ));
        }

        let drain_grace = match get("CHAT_DRAIN_GRACE") {
            Some(d) => parse_duration(&d).map_err(|m| err("CHAT_DRAIN_GRACE", m))?,
            None => Duration::from_secs(10),
        };
        let drain_delay = match get("CHAT_DRAIN_DELAY") {
            Some(d) => parse_duration(&d).map_err(|m| err("CHAT_DRAIN_DELAY", m))?,
            None => Duration::ZERO,
        };

        let auth_timeout = match get("CHAT_AUTH_TIMEOUT") {
            Some(d) => parse_duration(&d)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    err(
                        "CHAT_AUTH_TIMEOUT",
                        format!("a duration above 0, got {d:?}"),
                    )
                })?,
            None => Duration::from_secs(5),
        };
        let max_frame_bytes = match get("CHAT_MAX_FRAME_BYTES") {
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| (1024..=16 << 20).contains(n))
                .ok_or_else(|| {
                    err(
                        "CHAT_MAX_FRAME_BYTES",
                        format!("a byte count from 1024 to 16 MiB, got {n:?}"),
                    )
                })?,
            None => 64 * 1024,
        };

        let max_text_chars = match get("CHAT_MAX_TEXT_CHARS") {
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=60_000).contains(n))
                .ok_or_else(|| {
                    err(
                        "CHAT_MAX_TEXT_CHARS",
                        format!("a character count from 1 to 60000, got {n:?}"),
                    )
                })?,
            None => 4_000,
        };
        let partition = match get("CHAT_PROJECTOR_PARTITION") {
            Some(p) => p.parse().map_err(|m| err("CHAT_PROJECTOR_PARTITION", m))?,
            None => chat_projector::Partition::ALL,
        };
        let reconcile_every = match get("CHAT_RECONCILE_EVERY") {
            Some(d) => parse_duration(&d)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    err(
                        "CHAT_RECONCILE_EVERY",
                        format!("a duration above 0, got {d:?}"),
                    )
                })?,
            None => Duration::from_secs(30),
        };
        let projector_linger = match get("CHAT_PROJECTOR_LINGER") {
            Some(d) => parse_duration(&d)
                .ok()
                .filter(|d| *d <= Duration::from_secs(1))
                .ok_or_else(|| {
                    err(
                        "CHAT_PROJECTOR_LINGER",
                        format!("a duration from 0 to 1s, got {d:?}"),
                    )
                })?,
            None => chat_projector::ProjectorConfig::default().live_linger,
        };
        let membership_ttl = match get("CHAT_MEMBERSHIP_TTL") {
            Some(d) => parse_duration(&d).map_err(|m| err("CHAT_MEMBERSHIP_TTL", m))?,
            None => Duration::from_millis(250),
        };

        Ok(Config {
            role,
            listen,
            ops_listen,
            data_dir,
            nats_url,
            nats,
            nats_server_bin,
            nats_sync,
            store,
            auth,
            send_rate,
            allowed_origins,
            log,
            drain_grace,
            drain_delay,
            auth_timeout,
            max_frame_bytes,
            max_text_chars,
            partition,
            reconcile_every,
            projector_linger,
            membership_ttl,
            rates,
            outbound_frames,
            outbound_bytes,
            slow_grace,
            ping_interval,
            idle_timeout,
            rate_share,
            flood_window,
            max_http_connections,
            http_header_timeout,
            http_request_timeout,
            max_connections,
            max_connections_per_user,
            max_rooms_per_subscribe,
            max_rooms,
            max_rooms_per_user,
            append_retry,
            appends_in_flight,
            typing_expiry,
            presence,
            delivered,
        })
    }
}

fn auth_from(get: &impl Fn(&str) -> Option<String>) -> Result<AuthConfig, ConfigError> {
    let hs256_secret = get("CHAT_JWT_HS256_SECRET");
    let public_keys = get("CHAT_JWT_PUBLIC_KEYS").map(PathBuf::from);
    let issuer = get("CHAT_JWT_ISSUER");
    let audience = get("CHAT_JWT_AUDIENCE");
    let hs256_previous = get("CHAT_JWT_HS256_SECRET_PREVIOUS");
    if hs256_secret.is_none() && public_keys.is_none() {
        // Named as given, so the message points at the variable that was set.
        if let Some(name) = [
            ("CHAT_JWT_ISSUER", &issuer),
            ("CHAT_JWT_AUDIENCE", &audience),
            ("CHAT_JWT_HS256_SECRET_PREVIOUS", &hs256_previous),
        ]
        .into_iter()
        .find_map(|(name, value)| value.is_some().then_some(name))
        {
            return Err(err(
                name,
                "given without CHAT_JWT_HS256_SECRET or CHAT_JWT_PUBLIC_KEYS",
            ));
        }
        return Ok(AuthConfig::Development);
    }
    if let Some(secret) = &hs256_secret {
        if secret.len() < 32 {
            return Err(err("CHAT_JWT_HS256_SECRET", "must be at least 32 bytes"));
        }
    }
    match (&hs256_previous, &hs256_secret) {
        (Some(_), None) => {
            return Err(err(
                "CHAT_JWT_HS256_SECRET_PREVIOUS",
                "given without CHAT_JWT_HS256_SECRET (the secret it was replaced by)",
            ))
        }
        (Some(previous), _) if previous.len() < 32 => {
            return Err(err(
                "CHAT_JWT_HS256_SECRET_PREVIOUS",
                "must be at least 32 bytes",
            ))
        }
        _ => {}
    }
    if let Some(path) = &public_keys {
        std::fs::metadata(path)
            .map_err(|e| err("CHAT_JWT_PUBLIC_KEYS", format!("{}: {e}", path.display())))?;
    }
    Ok(AuthConfig::Configured {
        hs256_secret,
        hs256_previous,
        public_keys,
        issuer: issuer
            .ok_or_else(|| err("CHAT_JWT_ISSUER", "required when tokens are configured"))?,
        audience: audience
            .ok_or_else(|| err("CHAT_JWT_AUDIENCE", "required when tokens are configured"))?,
    })
}

/// `scylla://host:port[,host:port…]/keyspace[?rf=N][&dc=NAME]`, checked by the store's own parser (the
/// one that connects), so what starts here is what it accepts.
fn parse_scylla_uri(
    uri: &str,
    login: Option<chat_store::ScyllaLogin>,
) -> Result<StoreConfig, String> {
    if !uri.starts_with("scylla://") {
        return Err(format!(
            "expected sqlite or scylla://host:port/keyspace[?rf=N], got {uri:?}"
        ));
    }
    let (nodes, keyspace, _rf) = chat_store::parse_scylla_uri(uri).map_err(|e| e.to_string())?;
    Ok(StoreConfig::Scylla {
        nodes,
        keyspace,
        uri: uri.to_owned(),
        login,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn variables_set_but_never_read_are_named() {
        let map: HashMap<String, String> = [
            ("CHAT_PREFX", "prod"),
            ("CHAT_PREFIX", "prod"),
            ("CHAT_SEND_RAT", "5/5"),
            ("PATH", "/bin"),
            // The nats-server configs' own, often set beside chatd's.
            ("CHAT_NATS_NKEY", "U..."),
            ("CHAT_NATS_ROUTE_PASSWORD", "pw"),
            ("CHAT_NATS_ROUTE_1", "nats-route://route:pw@n1:6222"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (config, unread) =
            Config::from_lookup_noting_unread(|k| map.get(k).cloned(), map.keys().cloned())
                .unwrap();
        assert_eq!(config.log.prefix, "prod");
        assert_eq!(unread, ["CHAT_PREFX", "CHAT_SEND_RAT"]);
        // A previous secret with no secret at all is an error, not an unread variable.
        let e = self::config(&[("CHAT_JWT_HS256_SECRET_PREVIOUS", &"p".repeat(32))]).unwrap_err();
        assert_eq!(e.var, "CHAT_JWT_HS256_SECRET_PREVIOUS");
    }

    #[test]
    fn defaults_run_everything_on_one_machine() {
        let c = config(&[]).unwrap();
        assert_eq!(c.role, Role::All);
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.nats_url, None);
        assert_eq!(c.store, StoreConfig::Sqlite);
        assert_eq!(c.auth, AuthConfig::Development);
        assert_eq!(
            c.send_rate,
            Rate {
                per_second: 10,
                burst: 20
            }
        );
        assert_eq!(c.nats_sync, NatsSync::Always);
        assert_eq!(c.log.duplicate_window, Duration::from_secs(600));
    }

    #[test]
    fn every_bad_value_names_its_variable() {
        for (var, value) in [
            ("CHAT_LISTEN", "localhost"),
            ("CHAT_OPS_LISTEN", ":9090"),
            // The default CHAT_LISTEN's own address.
            ("CHAT_OPS_LISTEN", "127.0.0.1:8080"),
            ("CHAT_ROLE", "router"),
            ("CHAT_SEND_RATE", "10"),
            ("CHAT_SEND_RATE", "0/5"),
            ("CHAT_STORE", "postgres://x"),
            ("CHAT_STORE", "scylla://h:9042/"),
            ("CHAT_STORE", "scylla://h:9042/chat?rf=0"),
            ("CHAT_STORE", "scylla://h:9042/chat?replicas=3"),
            ("CHAT_DEDUP_WINDOW", "10 minutes"),
            ("CHAT_PREFIX", "Chat.X"),
            ("CHAT_REPLICAS", "three"),
            ("NATS_URL", "nats://host:notaport"),
            ("CHAT_JWT_HS256_SECRET", "short"),
            ("CHAT_NATS_SYNC", "sometimes"),
            ("CHAT_TYPING_RATE", "fast"),
            ("CHAT_MANAGE_RATE", "0/1"),
            ("CHAT_MAX_CONNECTIONS", "0"),
            ("CHAT_OUTBOUND_BYTES", "-1"),
            ("CHAT_IDLE_TIMEOUT", "0s"),
            ("CHAT_PING_INTERVAL", "soon"),
            ("CHAT_DELIVERED_INTERVAL", "0s"),
            ("CHAT_DRAIN_DELAY", "later"),
            ("CHAT_RATE_SHARE", "11s"),
            ("CHAT_NATS_TIMEOUT", "0"),
            ("CHAT_AUTH_TIMEOUT", "0s"),
            ("CHAT_NATS_SYNC", "0"),
            ("CHAT_PREFIX", "9lives"),
            ("CHAT_LOG_FORMAT", "xml"),
            ("CHAT_LOG", "foo=bar=baz"),
            ("CHAT_TRACE", "[[["),
            ("CHAT_RATE_SHARE", "often"),
            // Without a secret or key file, each names itself.
            ("CHAT_JWT_ISSUER", "idp"),
            ("CHAT_JWT_AUDIENCE", "chat"),
        ] {
            let e = config(&[(var, value)]).unwrap_err();
            assert_eq!(e.var, var, "{var}={value}: {e}");
        }
    }

    #[test]
    fn configured_tokens_need_issuer_and_audience() {
        let secret = "s".repeat(32);
        assert!(config(&[("CHAT_JWT_HS256_SECRET", &secret)]).is_err());
        let c = config(&[
            ("CHAT_JWT_HS256_SECRET", &secret),
            ("CHAT_JWT_ISSUER", "idp"),
            ("CHAT_JWT_AUDIENCE", "chat"),
        ])
        .unwrap();
        assert!(matches!(c.auth, AuthConfig::Configured { .. }));
        assert!(config(&[
            ("CHAT_JWT_PUBLIC_KEYS", "/nonexistent.pem"),
            ("CHAT_JWT_ISSUER", "i"),
            ("CHAT_JWT_AUDIENCE", "a")
        ])
        .is_err());
    }

    #[test]
    fn values_parse() {
        let c = config(&[
            (
                "CHAT_STORE",
                "scylla://10.0.0.1:9042,10.0.0.2/chat_prod?rf=3&dc=eu1",
            ),
            ("CHAT_SCYLLA_USER", "chat"),
            ("CHAT_SCYLLA_PASSWORD", "s3cret"),
            ("CHAT_SEND_RATE", "5/50"),
            ("CHAT_DEDUP_WINDOW", "2m"),
            (
                "CHAT_ALLOWED_ORIGINS",
                "https://a.example, https://b.example/",
            ),
            ("CHAT_ROLE", "edge"),
            ("NATS_URL", "nats://a:4222,nats://b:4222"),
            ("CHAT_NATS_SYNC", "1s"),
        ])
        .unwrap();
        assert_eq!(
            c.store,
            StoreConfig::Scylla {
                nodes: vec!["10.0.0.1:9042".into(), "10.0.0.2:9042".into()],
                keyspace: "chat_prod".into(),
                uri: "scylla://10.0.0.1:9042,10.0.0.2/chat_prod?rf=3&dc=eu1".into(),
                login: Some(chat_store::ScyllaLogin {
                    user: "chat".into(),
                    password: "s3cret".into()
                }),
            }
        );
        assert!(!format!("{:?}", c.store).contains("s3cret"));
        for (vars, var) in [
            (vec![("CHAT_SCYLLA_USER", "chat")], "CHAT_SCYLLA_USER"),
            (
                vec![("CHAT_ALLOWED_ORIGINS", "https://a.example/app")],
                "CHAT_ALLOWED_ORIGINS",
            ),
            (
                vec![("CHAT_ALLOWED_ORIGINS", "a.example")],
                "CHAT_ALLOWED_ORIGINS",
            ),
            (
                vec![
                    ("CHAT_STORE", "scylla://h/chat"),
                    ("CHAT_SCYLLA_USER", "chat"),
                ],
                "CHAT_SCYLLA_PASSWORD",
            ),
        ] {
            assert_eq!(config(&vars).unwrap_err().var, var);
        }
        assert_eq!(
            c.send_rate,
            Rate {
                per_second: 5,
                burst: 50
            }
        );
        assert_eq!(c.log.duplicate_window, Duration::from_secs(120));
        assert_eq!(
            c.allowed_origins.unwrap(),
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(c.role, Role::Edge);
        assert_eq!(c.nats_sync, NatsSync::Interval(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            config(&[]).unwrap().rate_share,
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            config(&[("CHAT_RATE_SHARE", "0")]).unwrap().rate_share,
            None
        );
        assert_eq!(
            config(&[("CHAT_RATE_SHARE", "50ms")]).unwrap().rate_share,
            Some(Duration::from_millis(50))
        );
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
    }
}
