//! chatd: the chat backend as a library. `main.rs` parses the command line and configuration,
//! starts a nats-server if none is configured, and calls [`serve`].
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod devauth;
pub mod http;
pub mod logtool;
pub mod metrics;
pub mod nats_child;
pub mod nats_security;
pub mod server;
pub mod telemetry;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_auth::Verifier;
use chat_log::RoomLog;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{AuthConfig, Config, Role, StoreConfig};

/// Connections the operations listener (`CHAT_OPS_LISTEN`) holds at once: probes and scrapes.
const OPS_MAX_CONNECTIONS: usize = 64;

/// How long to wait for NATS and JetStream to answer at start.
const NATS_START_DEADLINE: Duration = Duration::from_secs(60);

/// How long an operator's command waits for JetStream on a NATS that answers: long enough for
/// a nats-server just started, short enough that one without JetStream is reported at once.
const COMMAND_JETSTREAM_WAIT: Duration = Duration::from_secs(10);

/// Runs this process's role until `signalled` is cancelled, then drains: `/readyz` turns 503 at
/// once, the process serves on for `CHAT_DRAIN_DELAY`, then stops accepting and closes what is
/// open within the grace period.
///
/// Prints the contract's `ready http=… ws=…` line on stdout once it accepts connections.
pub async fn serve(
    config: Config,
    nats_url: String,
    verifier: Arc<Verifier>,
    signalled: CancellationToken,
) -> anyhow::Result<()> {
    let role = config.role;
    // Before any instrument is made: one made earlier would report nowhere.
    metrics::ensure_installed();
    let listener = listen(config.listen)
        .with_context(|| format!("listen on {} (CHAT_LISTEN)", config.listen))?;
    let addr = listener.local_addr().context("listen address")?;
    // Until NATS answers, a second handle on the same socket answers `/healthz` (alive) and
    // `503 starting` to everything else; the server proper takes over the socket after it.
    let listener = listener.into_std().context("listen socket")?;
    let starting = CancellationToken::new();
    let early = TcpListener::from_std(listener.try_clone().context("listen socket")?)
        .context("listen socket")?;
    let bounds = server::Bounds {
        max_http_connections: config.max_http_connections,
        header_timeout: config.http_header_timeout,
    };
    let early = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(server::serve(
        early,
        http::starting_router(),
        starting.clone().cancelled_owned(),
        bounds,
    )));
    // The operations listener, if any, answers from the start too (alive, not ready), until the
    // server proper takes it over: after the store is open and the roles are up, not just NATS.
    let ops_starting = CancellationToken::new();
    let ops_bounds = server::Bounds {
        max_http_connections: OPS_MAX_CONNECTIONS,
        header_timeout: config.http_header_timeout,
    };
    let ops = match config.ops_listen {
        None => None,
        Some(ops_addr) => {
            let listener = listen(ops_addr)
                .with_context(|| format!("listen on {ops_addr} (CHAT_OPS_LISTEN)"))?;
            let bound = listener.local_addr().context("ops listen address")?;
            let listener = listener.into_std().context("ops listen socket")?;
            let early = TcpListener::from_std(listener.try_clone().context("ops listen socket")?)
                .context("ops listen socket")?;
            let early = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(server::serve(
                early,
                http::starting_router(),
                ops_starting.clone().cancelled_owned(),
                ops_bounds,
            )));
            Some((listener, bound, early))
        }
    };
    // A signal while NATS has not answered yet (it is unreachable, say) ends the wait: there is
    // nothing to drain.
    let log = tokio::select! {
        log = connect_log(&nats_url, &config, true, addr) => log?,
        () = signalled.cancelled() => {
            tracing::info!("shutdown requested before nats answered; stopping");
            return Ok(());
        }
    };
    hand_over(&starting, early, "CHAT_LISTEN").await;
    let listener = TcpListener::from_std(listener).context("listen socket")?;
    let draining = Arc::new(AtomicBool::new(false));
    // What every part of the process stops on: `signalled`, `drain_delay` later.
    let shutdown = CancellationToken::new();
    // Owned: gone with this function, however it returns.
    let _drain_delay = tokio_util::task::AbortOnDropHandle::new(tokio::spawn({
        let (shutdown, draining, delay) = (shutdown.clone(), draining.clone(), config.drain_delay);
        async move {
            signalled.cancelled().await;
            draining.store(true, Ordering::SeqCst);
            if !delay.is_zero() {
                tracing::info!(?delay, "draining: not ready, serving on for the delay");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => {}
                }
            }
            shutdown.cancel();
        }
    }));
    let store = open_store_with(&config, role == Role::All).await?;
    if matches!(role, Role::Edge | Role::Api) && config.store == StoreConfig::Sqlite {
        tracing::warn!(
            role = ?role,
            "the edge and api roles read the store a projector writes, and a SQLite store is \
             this process's own: no projector fills it, so room lists stay empty and WebSocket \
             appends are refused (run CHAT_ROLE=all with SQLite, or use CHAT_STORE=scylla://…)"
        );
    }
    let mut tasks = tokio::task::JoinSet::new();

    // The projector's commits, for the readers of the store in this process.
    let commits = Arc::new(chat_store::Commits::default());
    let projector = matches!(role, Role::All | Role::Projector).then(|| {
        let stats = Arc::new(chat_projector::ProjectorStats::default());
        let projector_config = chat_projector::ProjectorConfig {
            partition: config.partition,
            reconcile_every: config.reconcile_every,
            live_linger: config.projector_linger,
            commits: commits.clone(),
            ..chat_projector::ProjectorConfig::default()
        };
        tasks.spawn(chat_projector::run_supervised(
            log.clone(),
            store.clone(),
            projector_config,
            stats.clone(),
            shutdown.clone(),
        ));
        stats
    });
    let rooms = (role != Role::Projector).then(|| {
        chat_rooms::Rooms::new(
            log.clone(),
            store.clone(),
            chat_rooms::RoomsConfig {
                membership_ttl: config.membership_ttl,
                dedup_window: config.log.duplicate_window,
                limits: chat_rooms::Limits {
                    max_text_chars: config.max_text_chars,
                    ..chat_rooms::Limits::default()
                },
                // Only a projector of every room commits what any page may ask for.
                commits: (role == Role::All && config.partition == chat_projector::Partition::ALL)
                    .then(|| commits.clone()),
                projector_here: role == Role::All,
                max_rooms: config.max_rooms,
                max_rooms_per_user: config.max_rooms_per_user,
                ..chat_rooms::RoomsConfig::default()
            },
        )
    });
    // Per-user rate limits: one set of buckets per process, for its edge and its HTTP API
    // alike, kept in step with the other processes (`CHAT_RATE_SHARE`).
    let limits = rooms.is_some().then(|| {
        chat_edge::UserLimits::start(
            config.rates,
            config.rate_share,
            log.client().clone(),
            &config.log.prefix,
            shutdown.clone(),
        )
    });
    let edge = match (&rooms, &limits, role) {
        (Some(rooms), Some(limits), Role::All | Role::Edge) => Some(chat_edge::EdgeState::new(
            verifier.clone(),
            edge_config(&config),
            shutdown.clone(),
            rooms.clone(),
            chat_edge::Hub::with_typing_expiry(log.clone(), 4_096, config.typing_expiry),
            limits.clone(),
        )),
        _ => None,
    };

    let state = http::AppState {
        draining: draining.clone(),
        nats: log.client().clone(),
        verifier: verifier.clone(),
        rooms: rooms.clone(),
        projector: projector.clone(),
        edge: edge.as_ref().map(|e| e.stats.clone()),
        limits,
    };
    metrics::observe(&state);
    let mut app = http::router(state.clone());
    if let Some(edge) = &edge {
        app = app.merge(chat_edge::router(edge.clone()));
    }
    let request_timeout = config.http_request_timeout;
    let app = app
        .method_not_allowed_fallback(http::method_not_allowed)
        // Inside the span and the histogram, so a request cut off is recorded with its 503.
        // (Unrouted requests are answered without their body being read: nothing to bound.)
        .route_layer(axum::middleware::from_fn(move |request, next| {
            http::bounded(request_timeout, request, next)
        }))
        .route_layer(axum::middleware::from_fn(http::traced));

    let stop_accepting = {
        let shutdown = shutdown.clone();
        let draining = draining.clone();
        async move {
            shutdown.cancelled().await;
            draining.store(true, Ordering::SeqCst);
            tracing::info!("draining");
        }
    };
    let server = tokio::spawn(server::serve(listener, app, stop_accepting, bounds));
    // Serves until this function returns: probes and scrapes see the whole drain.
    let _ops = match ops {
        None => None,
        Some((listener, bound, early)) => {
            hand_over(&ops_starting, early, "CHAT_OPS_LISTEN").await;
            let listener = TcpListener::from_std(listener).context("ops listen socket")?;
            println!("ops http=http://{bound}");
            tracing::info!(%bound, "operations listener (healthz, readyz, metrics)");
            Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
                server::serve(
                    listener,
                    http::ops_router(state.clone()),
                    std::future::pending(),
                    ops_bounds,
                ),
            )))
        }
    };

    println!("ready http=http://{addr} ws=ws://{addr}/v1/ws");
    let _ = std::io::stdout().flush();
    tracing::info!(role = role.as_str(), %addr, nats = %nats_url, "ready");
    tracing::info!(role = role.as_str(), store = store.backend(), "serving");

    // The server task ends only after a shutdown request (its graceful-shutdown future waits
    // for one) or on an error; a drain gets `drain_grace` at most. WebSocket sessions live on
    // after their HTTP connection is upgraded, so the drain also waits for them, whichever
    // finished first: each finishes the frame it is answering (an append gets its ack), then
    // closes with 1001.
    let mut server = server;
    let mut finished = None;
    tokio::select! {
        // Only an error (or a shutdown that raced this select) ends the server here.
        result = &mut server => finished = Some(result),
        _ = shutdown.cancelled() => {}
    }
    let drain_started = tokio::time::Instant::now();
    let drained = if !shutdown.is_cancelled() {
        finished
    } else {
        let sessions = async {
            if let Some(edge) = &edge {
                edge.sessions.close();
                edge.sessions.wait().await;
                // Then what the sessions left behind: their last delivered cursors.
                edge.background.close();
                edge.background.wait().await;
            }
        };
        let server = async {
            match finished {
                Some(result) => result,
                None => (&mut server).await,
            }
        };
        tokio::time::timeout(config.drain_grace, async {
            let (result, ()) = tokio::join!(server, sessions);
            result
        })
        .await
        .ok()
    };
    match drained {
        Some(result) => result.context("http server task")?.context("http server")?,
        None => {
            tracing::warn!(grace = ?config.drain_grace, "drain grace elapsed; closing what is left");
            // Sessions still waiting on their appends close with 1001 now: a second for their
            // close frames to go out, rather than sockets dropped without one.
            if let Some(edge) = &edge {
                edge.hurry.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(1), edge.sessions.wait()).await;
            }
        }
    }
    if !shutdown.is_cancelled() {
        anyhow::bail!("http server stopped without a shutdown request");
    }
    // The projector writes what it has queued and stops, within what is left of the grace (a
    // few seconds at least): a store that does not answer is not waited for (what was not
    // written is read from the log again at the next start).
    let left = (drain_started + config.drain_grace)
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_secs(3));
    let joined = tokio::time::timeout(left, async {
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                tracing::error!(error = %e, "projector task failed");
            }
        }
    })
    .await;
    if joined.is_err() {
        tracing::warn!("the projector did not stop in time; stopping it");
        tasks.shutdown().await;
    }
    // What is still buffered for NATS goes out, within what is left of the grace (a second at
    // least): with NATS unreachable a flush would wait for it forever.
    let left = (drain_started + config.drain_grace)
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_secs(1));
    match tokio::time::timeout(left, log.client().flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "flush nats on shutdown"),
        Err(_) => {
            tracing::warn!("nats unreachable at shutdown; what was buffered for it is dropped")
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Stops a starting server (`stop` is its shutdown) and waits a second at most for the requests
/// it holds; connections arriving meanwhile wait in the socket's queue for the server proper.
async fn hand_over<T>(
    stop: &CancellationToken,
    early: tokio_util::task::AbortOnDropHandle<T>,
    listener: &str,
) {
    stop.cancel();
    if tokio::time::timeout(Duration::from_secs(1), early)
        .await
        .is_err()
    {
        tracing::debug!(
            listener,
            "a request to the starting server outlived the start; dropped"
        );
    }
}

/// The edge's settings from the process configuration.
fn edge_config(config: &Config) -> chat_edge::EdgeConfig {
    chat_edge::EdgeConfig {
        allowed_origins: config.allowed_origins.clone(),
        auth_timeout: config.auth_timeout,
        max_frame_bytes: config.max_frame_bytes,
        outbound_frames: config.outbound_frames,
        outbound_bytes: config.outbound_bytes,
        slow_grace: config.slow_grace,
        ping_interval: config.ping_interval,
        idle_timeout: config.idle_timeout,
        rates: config.rates,
        flood_window: config.flood_window,
        max_connections: config.max_connections,
        max_connections_per_user: config.max_connections_per_user,
        max_rooms_per_subscribe: config.max_rooms_per_subscribe,
        append_retry: config.append_retry,
        appends_in_flight: config.appends_in_flight,
        presence: config.presence,
        delivered: config.delivered,
        ..chat_edge::EdgeConfig::default()
    }
}

/// Opens the projection store the configuration names.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn chat_store::Store>> {
    open_store_with(config, false).await
}

/// Opens the store; `sole_writer`: this process's projector is the only one writing it (every
/// role in one process), so SQLite may keep its id index in memory too.
async fn open_store_with(
    config: &Config,
    sole_writer: bool,
) -> anyhow::Result<Arc<dyn chat_store::Store>> {
    match &config.store {
        StoreConfig::Sqlite => {
            let path = config.data_dir.join("store.db");
            let store = chat_store::SqliteStore::open(&path)
                .with_context(|| format!("open the sqlite store {}", path.display()))?;
            if sole_writer {
                store
                    .filter_ids()
                    .with_context(|| format!("read the id index of {}", path.display()))?;
            }
            Ok(Arc::new(store))
        }
        StoreConfig::Scylla { uri, login, .. } => {
            let store = chat_store::ScyllaStore::connect(uri, login.as_ref())
                .await
                .with_context(|| format!("connect the scylla store {uri} (CHAT_STORE)"))?;
            Ok(Arc::new(store))
        }
    }
}

/// Connections the kernel completes and queues before chatd accepts them (capped by
/// `net.core.somaxconn`, 4,096 by default on current kernels). When thousands of clients
/// reconnect at once, and chatd accepts no more while `CHAT_MAX_HTTP_CONNECTIONS` are open, a
/// connection that finds the queue full is not answered and its client retries only after a
/// second or more. A listener gets 1,024 by default, which a burst of 10,000 can fill.
const LISTEN_BACKLOG: u32 = 4_096;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`].
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As the standard library's listeners do: a restarted chatd can bind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Connects the room log for an operator command: an unreachable NATS is an error at once.
pub async fn connect(url: &str, config: &Config) -> anyhow::Result<RoomLog> {
    connect_log(url, config, false, None).await
}

/// The token verifier the configuration asks for (development: the data dir's secret).
pub fn build_verifier(config: &Config) -> anyhow::Result<Verifier> {
    match &config.auth {
        AuthConfig::Development => {
            let secret = devauth::dev_secret(&config.data_dir)?;
            Ok(Verifier::new(devauth::DEV_ISSUER, devauth::DEV_AUDIENCE)
                .with_hs256_secret(secret.as_bytes())?)
        }
        AuthConfig::Configured {
            hs256_secret,
            hs256_previous,
            public_keys,
            issuer,
            audience,
        } => {
            let mut verifier = Verifier::new(issuer, audience);
            if let Some(secret) = hs256_secret {
                verifier = verifier
                    .with_hs256_secret(secret.as_bytes())
                    .context("CHAT_JWT_HS256_SECRET")?;
            }
            if let Some(secret) = hs256_previous {
                verifier = verifier
                    .with_hs256_secret(secret.as_bytes())
                    .context("CHAT_JWT_HS256_SECRET_PREVIOUS")?;
            }
            if let Some(path) = public_keys {
                verifier = verifier
                    .with_public_keys_file(path)
                    .context("CHAT_JWT_PUBLIC_KEYS")?;
            }
            Ok(verifier)
        }
    }
}

/// Connects the room log, waiting (up to a deadline) for JetStream to come up; with `retry`,
/// for NATS to come up too (a server started beside NATS), else failing at once if NATS cannot
/// be reached (an operator's command must not hang).
async fn connect_log(
    url: &str,
    config: &Config,
    retry: bool,
    listen: impl Into<Option<std::net::SocketAddr>>,
) -> anyhow::Result<RoomLog> {
    let listen = listen.into();
    let mut options =
        async_nats::ConnectOptions::new().name(format!("chatd-{}", config.role.as_str()));
    if retry {
        options = options.retry_on_initial_connect();
    }
    let options = config.nats.apply(options).await?;
    // The error names the URL.
    let log = RoomLog::connect_with_options(url, options, config.log.clone()).await?;
    log.set_bulk_read_auth(config.nats.bulk_read_auth());
    let js = async_nats::jetstream::new(log.client().clone());
    let wait = if retry {
        NATS_START_DEADLINE
    } else {
        COMMAND_JETSTREAM_WAIT
    };
    let deadline = Instant::now() + wait;
    let mut waited = false;
    // Wrong credentials do not fix themselves: waiting would only delay the error.
    let mut events = log.connection_events();
    let refused = || {
        anyhow::anyhow!(
            "nats at {url} refused chatd's credentials ({}): check NATS_URL's user, \
             NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_CREDS or NATS_NKEY",
            config.nats.auth.method()
        )
    };
    loop {
        let answer = tokio::select! {
            biased;
            Ok(chat_log::ConnectionEvent::Refused) = events.recv() => return Err(refused()),
            answer = js.query_account() => answer,
        };
        match answer {
            Ok(_) => return Ok(log),
            Err(e) if Instant::now() < deadline => {
                if !waited {
                    match listen {
                        Some(listen) => tracing::info!(
                            nats = %url, error = %e, %listen,
                            "waiting for nats with jetstream; /healthz answers meanwhile"
                        ),
                        None => {
                            tracing::info!(nats = %url, error = %e, "waiting for nats with jetstream")
                        }
                    }
                    waited = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => anyhow::bail!(
                "no jetstream at {url} after {wait:?} (a nats-server without `jetstream` in its \
                 configuration?): {e}"
            ),
        }
    }
}

/// Takes an exclusive lock on the data directory for the life of the returned file, so two
/// processes never share one embedded store or one nats-server store.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(dir).with_context(|| format!("create data dir {}", dir.display()))?;
    let path = dir.join("chatd.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let owner = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "data dir {} is in use by another chatd (pid {}); give each process its own CHAT_DATA_DIR",
                dir.display(),
                owner.trim()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("lock {}", path.display()))
        }
    }
    file.set_len(0)
        .and_then(|_| write!(file, "{}", std::process::id()))
        .ok();
    Ok(file)
}
