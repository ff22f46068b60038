//! `chatd`: run the chat backend, or mint a development token.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chat_model::UserId;
use chatd::config::{parse_duration, AuthConfig, Config, Role, StoreConfig};
use chatd::nats_child::NatsChild;
use chatd::{devauth, lock_data_dir, serve};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Event-sourced chat backend: WebSocket edges, projectors and an HTTP API over NATS JetStream.
///
/// Configuration comes from the environment (CHAT_LISTEN, CHAT_DATA_DIR, NATS_URL, CHAT_STORE,
/// CHAT_JWT_*, ...); see the README.
#[derive(Parser)]
#[command(name = "chatd", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (the default). Starts its own nats-server when NATS_URL is unset.
    Run {
        /// Which role to run (overrides CHAT_ROLE).
        #[arg(long, value_enum)]
        role: Option<Role>,
    },
    /// Print a token for USER, signed with the development secret of CHAT_DATA_DIR (or with
    /// CHAT_JWT_HS256_SECRET when set).
    Token {
        /// The user id (the token's `sub`).
        #[arg(value_parser = parse_user)]
        user: String,
        /// Display name (the `name` claim).
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 30m, 24h.
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Rebuild the projection store (or one room of it) from the room logs. Stop the projector
    /// role first, or rebuild into a new file with --into and switch to it.
    Rebuild {
        /// Only this room.
        #[arg(long, value_parser = parse_room)]
        room: Option<String>,
        /// Write into this new SQLite file (it must not exist yet) instead of the configured
        /// store.
        #[arg(long)]
        into: Option<std::path::PathBuf>,
        /// Also clear from the store the rooms no log has (a whole rebuild), or the room
        /// (--room) when its log is gone. Without it the rebuild refuses, clearing nothing: the
        /// usual cause is another deployment's NATS_URL or CHAT_PREFIX.
        #[arg(long)]
        force: bool,
    },
    /// Read room logs straight from their streams: export or follow a room, verify logs.
    Log {
        #[command(subcommand)]
        command: LogCmd,
    },
    /// Print a digest of the store's rows (or one room's): equal digests, equal contents.
    Digest {
        #[arg(long, value_parser = parse_room)]
        room: Option<String>,
        /// Read this SQLite file instead of the configured store.
        #[arg(long)]
        store: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum LogCmd {
    /// Print ROOM's events as JSON lines in sequence order, as appended (edits and deletes are
    /// events of their own); an entry that does not decode is printed with its bytes.
    Export {
        #[arg(value_parser = parse_room)]
        room: String,
        /// First sequence to print.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        from: u64,
        /// Last sequence to print, at least --from (default: the head when the export starts).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        to: Option<u64>,
        /// After the head, go on printing each new event as it is stored, until interrupted.
        #[arg(long, conflicts_with = "to")]
        follow: bool,
    },
    /// Check a room's log (or every room's): stream settings, no gaps, every event decodes,
    /// no id twice, every event allowed by the room's rules; a SHA-256 of the log to compare
    /// copies. One JSON line per room; exit status 3 if any room has a problem (1: could not check).
    Verify {
        /// Only this room.
        #[arg(value_parser = parse_room)]
        room: Option<String>,
    },
}

/// A room id argument: refused as a usage error (status 2) when it is not one.
fn parse_room(text: &str) -> Result<String, String> {
    chat_model::RoomId::parse(text)
        .map(|room| room.as_str().to_owned())
        .map_err(|e| e.to_string())
}

/// A user id argument: refused as a usage error (status 2) when it is not one.
fn parse_user(text: &str) -> Result<String, String> {
    UserId::parse(text)
        .map(|user| user.as_str().to_owned())
        .map_err(|e| e.to_string())
}

/// The longest lifetime `chatd token` gives: ten years.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A token's lifetime: a duration, not zero (a token that is born expired is a mistake), at
/// most [`MAX_TTL`] (beyond that, `exp` would overflow before it means anything).
fn parse_ttl(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        ttl if ttl.is_zero() => Err("must be more than 0".to_owned()),
        ttl if ttl > MAX_TTL => Err("must be at most 87600h (ten years)".to_owned()),
        ttl => Ok(ttl),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Log {
        command: LogCmd::Export {
            from, to: Some(to), ..
        },
    }) = &cli.command
    {
        if from > to {
            use clap::CommandFactory as _;
            let mut cli = Cli::command();
            let export = cli
                .find_subcommand_mut("log")
                .and_then(|log| log.find_subcommand_mut("export"))
                .map(|export| export.clone().bin_name("chatd log export"));
            export
                .unwrap_or(cli)
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("--from {from} is after --to {to}"),
                )
                .exit();
        }
    }
    let telemetry = match chatd::telemetry::Telemetry::init() {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("chatd: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let code = run_command(cli);
    telemetry.shutdown();
    code
}

fn run_command(cli: Cli) -> ExitCode {
    let config = match Config::from_env_noting_unread() {
        Ok((config, unread)) => {
            for variable in unread {
                tracing::warn!(variable, "set, but chatd does not read it (misspelled?)");
            }
            config
        }
        Err(e) => {
            eprintln!("chatd: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Cmd::Run { role: None }) {
        Cmd::Run { role } => run(config, role),
        Cmd::Token { user, name, ttl } => token(&config, &user, name.as_deref(), ttl),
        Cmd::Rebuild { room, into, force } => rebuild(config, room, into, force),
        Cmd::Digest { room, store } => digest(config, room, store),
        Cmd::Log { command } => match log_command(config, command) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(3),
            Err(e) => Err(e),
        },
    };
    // The reader of our output went away (`chatd log export … | head`): it has what it wanted.
    let reader_gone = |e: &anyhow::Error| {
        e.chain().any(|cause| {
            cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if reader_gone(&e) => ExitCode::SUCCESS,
        // No usable nats-server to start: restarting cannot fix that either.
        Err(e) if e.chain().any(|c| c.is::<chatd::nats_child::NoNatsServer>()) => {
            eprintln!("chatd: invalid configuration: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("chatd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(mut config: Config, role: Option<Role>) -> anyhow::Result<()> {
    if let Some(role) = role {
        config.role = role;
    }
    // Our own nats-server and the SQLite store live in the data dir: one process per dir.
    let uses_data_dir = config.nats_url.is_none() || matches!(config.store, StoreConfig::Sqlite);
    let _lock = if uses_data_dir {
        Some(lock_data_dir(&config.data_dir)?)
    } else {
        None
    };
    let verifier = match chatd::build_verifier(&config) {
        Ok(verifier) => Arc::new(verifier),
        Err(e) => {
            eprintln!("chatd: invalid configuration: {e:#}");
            std::process::exit(2);
        }
    };
    fit_connections_to_fd_limit(&mut config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    // Before the wait for nats-server below (a minute at most): SIGHUP's default is to end the
    // process, and a `systemctl reload` may come at any time.
    let hangups = {
        let _runtime = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    };
    let (nats, url) = nats_for(&config)?;
    let grace = config.drain_grace;
    let shutdown = CancellationToken::new();
    let result = runtime.block_on(async {
        tokio::spawn(cancel_on_signals(shutdown.clone()));
        match hangups {
            Ok(hangups) => drop(tokio::spawn(reload_keys_on_sighup(verifier.clone(), hangups))),
            Err(e) => tracing::error!(error = %e, "cannot listen for SIGHUP: token keys are read at start only"),
        }
        serve(config, url, verifier, shutdown).await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Some(nats) = nats {
        nats.stop(grace.max(Duration::from_secs(5)));
    }
    result
}

/// `NATS_URL`, or a nats-server of our own started in the data dir (call this from the main
/// thread: the child's parent-death signal follows the thread that started it).
/// [`nats_for`] for a maintenance command (`rebuild`, `log`): one that reads the logs a server
/// wrote. Without `NATS_URL` it starts nats-server on the data dir's log, which must be there:
/// a fresh, empty one (a data dir that is not the server's) would answer that there are no
/// rooms, and a rebuild would clear the store.
fn maintenance_nats_for(config: &Config) -> anyhow::Result<(Option<NatsChild>, String)> {
    require_log_dir(config)?;
    nats_for(config)
}

/// Without `NATS_URL`, a maintenance command reads the log of the nats-server `chatd run` keeps
/// in the data dir: an error if there is none (checked before anything is written there, so a
/// mistyped `CHAT_DATA_DIR` leaves nothing behind).
fn require_log_dir(config: &Config) -> anyhow::Result<()> {
    if config.nats_url.is_none() {
        let dir = config.data_dir.join("nats");
        anyhow::ensure!(
            dir.is_dir(),
            "no NATS_URL, and no log in {} (the nats-server `chatd run` starts keeps it there): \
             set NATS_URL, or CHAT_DATA_DIR to the server's data dir",
            dir.display()
        );
    }
    Ok(())
}

fn nats_for(config: &Config) -> anyhow::Result<(Option<NatsChild>, String)> {
    match &config.nats_url {
        Some(url) => Ok((None, url.clone())),
        None => {
            let child = NatsChild::start(
                &config.data_dir,
                config.nats_server_bin.as_deref(),
                &config.nats_sync,
            )?;
            let url = child.url().to_owned();
            Ok((Some(child), url))
        }
    }
}

/// SIGHUP: reads `CHAT_JWT_PUBLIC_KEYS` again (an identity provider's rotated keys), without a
/// restart that would close every session. A file that does not read leaves the keys as they
/// were.
async fn reload_keys_on_sighup(
    verifier: Arc<chat_auth::Verifier>,
    mut hangups: tokio::signal::unix::Signal,
) {
    while hangups.recv().await.is_some() {
        match verifier.reload_public_keys() {
            Ok(Some(chat_auth::Reloaded {
                keys,
                changed: true,
            })) => tracing::info!(keys, "token public keys reloaded (SIGHUP)"),
            Ok(Some(chat_auth::Reloaded {
                keys,
                changed: false,
            })) => tracing::warn!(
                keys,
                "SIGHUP: the token public keys file is as it was: nothing changed"
            ),
            Ok(None) => {
                tracing::info!("SIGHUP: no CHAT_JWT_PUBLIC_KEYS to reload (secrets come from the environment: restart for those)")
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: token public keys not reloaded; the previous keys stay")
            }
        }
    }
}

/// First SIGINT/SIGTERM: drain. A second one: exit at once.
async fn cancel_on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for signals");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutdown requested");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting without draining");
    std::process::exit(130);
}

/// The store a maintenance command works on: a given SQLite file, or the configured store.
async fn maintenance_store(
    config: &Config,
    sqlite: Option<std::path::PathBuf>,
) -> anyhow::Result<Arc<dyn chat_store::Store>> {
    match sqlite {
        Some(path) => Ok(Arc::new(
            chat_store::SqliteStore::open(&path)
                .with_context(|| format!("open {}", path.display()))?,
        )),
        None => chatd::open_store(config).await,
    }
}

fn rebuild(
    config: Config,
    room: Option<String>,
    into: Option<std::path::PathBuf>,
    force: bool,
) -> anyhow::Result<()> {
    let room = room.map(chat_model::RoomId::parse).transpose()?;
    if let Some(path) = &into {
        // A new file only: an existing one may be a store some process is using (the live
        // one, say), and a rebuild clears what it rewrites.
        if path.exists() {
            anyhow::bail!(
                "{} exists: --into writes a new file (remove it first, or choose another path)",
                path.display()
            );
        }
    }
    let (_lock, nats, url) = if into.is_some() {
        // Into a file of its own: the logs may be read beside a running chatd, as `chatd log`
        // reads them.
        log_nats(&config)?
    } else {
        // In place: an SQLite store (or the nats-server) lives in the data dir, and nothing else
        // may write it meanwhile. A shared ScyllaDB store has no such lock: its projectors must
        // be stopped by hand.
        let uses_data_dir =
            config.nats_url.is_none() || matches!(config.store, StoreConfig::Sqlite);
        let lock = if uses_data_dir {
            require_log_dir(&config)?;
            Some(lock_data_dir(&config.data_dir).context(
                "a rebuild in place needs the server on this data dir stopped; or rebuild into \
                 a new file beside it with --into",
            )?)
        } else {
            eprintln!(
                "chatd: rebuilding a shared store in place: stop its projectors first (nothing \
                 here can tell whether they run)"
            );
            None
        };
        let (nats, url) = maintenance_nats_for(&config)?;
        (lock, nats, url)
    };
    let runtime = tokio::runtime::Runtime::new().context("start runtime")?;
    let result = runtime.block_on(async {
        let log = chatd::connect(&url, &config).await?;
        let store = maintenance_store(&config, into.clone()).await?;
        eprintln!(
            "chatd: rebuilding from the logs under prefix {:?} at {}",
            config.log.prefix, url
        );
        // Every room, whatever CHAT_PROJECTOR_PARTITION the environment carries (a projector's,
        // say): a store rebuilt from a share of the logs would be missing the other rooms.
        if config.partition != chat_projector::Partition::ALL {
            eprintln!(
                "chatd: CHAT_PROJECTOR_PARTITION={} is a projector's share; a rebuild covers every room",
                config.partition
            );
        }
        let report = chat_projector::rebuild(
            &log,
            &store,
            room.as_ref(),
            chat_projector::Partition::ALL,
            force,
        )
        .await?;
        say(format_args!(
            "rebuilt {} rooms, {} events, {} dead letters",
            report.rooms, report.events, report.dead_letters
        ))?;
        anyhow::Ok(())
    });
    if let Some(nats) = nats {
        nats.stop(Duration::from_secs(5));
    }
    if let (Err(_), Some(path)) = (&result, &into) {
        // Nothing half-built is left behind to be mistaken for a store.
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
    }
    result
}

fn digest(
    config: Config,
    room: Option<String>,
    store: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let room = room.map(chat_model::RoomId::parse).transpose()?;
    // A digest of a store that is not there would be the empty store's, and equal to any
    // other mistyped path's: refuse instead (opening would create it).
    let sqlite_path = match (&store, &config.store) {
        (Some(path), _) => Some(path.clone()),
        (None, StoreConfig::Sqlite) => Some(config.data_dir.join("store.db")),
        (None, _) => None,
    };
    if let Some(path) = sqlite_path.filter(|path| !path.is_file()) {
        anyhow::bail!("no store at {}", path.display());
    }
    let runtime = tokio::runtime::Runtime::new().context("start runtime")?;
    runtime.block_on(async {
        let store = maintenance_store(&config, store).await?;
        if let Some(room) = &room {
            let held = store.checkpoints().await?;
            if !held.iter().any(|(r, _)| r == room) {
                anyhow::bail!("room {room}: not in the store");
            }
        }
        say(store.digest(room.as_ref()).await?)?;
        anyhow::Ok(())
    })
}

/// Descriptors kept for the process itself (NATS, the store, its own nats-server's pipes), at
/// most: a quarter of a small limit. HTTP connections have theirs besides.
const FDS_RESERVED: u64 = 1024;

/// Raises the open-file limit to its hard limit, as Go programs do at start (the nats-server
/// started here inherits it): the usual soft limit, 1024, stops `accept` long before
/// `CHAT_MAX_CONNECTIONS`, and a connection that cannot be accepted waits unanswered. If even
/// the hard limit is too low for `CHAT_MAX_CONNECTIONS`, the cap is lowered to fit, with a
/// warning, so that clients past it are refused with 503 rather than left waiting.
fn fit_connections_to_fd_limit(config: &mut Config) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    // An unlimited hard limit still stops at the kernel's per-process maximum.
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let wanted = hard.min(ceiling);
    let limit = if soft < wanted && setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).is_ok() {
        wanted
    } else {
        soft
    };
    tracing::debug!(limit, "open-file limit");
    // HTTP connections that are not WebSockets get an eighth of a small limit at most.
    let http = (config.max_http_connections as u64).min((limit / 8).max(1));
    if http < config.max_http_connections as u64 {
        tracing::warn!(
            fd_limit = limit,
            configured = config.max_http_connections,
            cap = http,
            "the open-file limit is too low for CHAT_MAX_HTTP_CONNECTIONS; capped lower"
        );
        config.max_http_connections = http as usize;
    }
    if !matches!(config.role, Role::All | Role::Edge) {
        return;
    }
    let room = limit.saturating_sub(FDS_RESERVED.min(limit / 4) + http);
    if (config.max_connections as u64) > room {
        tracing::warn!(
            fd_limit = limit,
            configured = config.max_connections,
            cap = room,
            "the open-file limit is too low for CHAT_MAX_CONNECTIONS; connections are capped \
             lower (raise the hard limit, e.g. LimitNOFILE= or ulimit -Hn, to allow more)"
        );
        config.max_connections = room as usize;
    }
}

/// The NATS a log command reads: `NATS_URL`; else the nats-server of a chatd running on the
/// data dir (reading a log beside a running server is safe); else one of our own, started in
/// the data dir for the command's duration.
fn log_nats(
    config: &Config,
) -> anyhow::Result<(
    Option<std::fs::File>,
    Option<chatd::nats_child::NatsChild>,
    String,
)> {
    if let Some(url) = &config.nats_url {
        return Ok((None, None, url.clone()));
    }
    require_log_dir(config)?;
    match lock_data_dir(&config.data_dir) {
        Ok(lock) => {
            let (nats, url) = maintenance_nats_for(config)?;
            Ok((Some(lock), nats, url))
        }
        Err(busy) => match chatd::nats_child::running_url(&config.data_dir) {
            Some(url) => Ok((None, None, url)),
            None => Err(busy
                .context("the chatd on this data dir uses an external NATS: set NATS_URL to it")),
        },
    }
}

/// Runs a `chatd log` command; `Ok(false)`: it ran and found problems.
fn log_command(config: Config, command: LogCmd) -> anyhow::Result<bool> {
    let (_lock, nats, url) = log_nats(&config)?;
    let runtime = tokio::runtime::Runtime::new().context("start runtime")?;
    let result = runtime.block_on(async {
        let log = chatd::connect(&url, &config).await?;
        match command {
            LogCmd::Export {
                room,
                from,
                to,
                follow,
            } => {
                let room = chat_model::RoomId::parse(&room)?;
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                let to = to.unwrap_or(0);
                let exported = tokio::select! {
                    done = chatd::logtool::export(&log, &room, from, to, follow, &mut out) => done?,
                    _ = tokio::signal::ctrl_c(), if follow => 0,
                };
                drop(out);
                tracing::debug!(exported, "export done");
                anyhow::Ok(true)
            }
            LogCmd::Verify { room } => {
                let named = room.is_some();
                let rooms = match room {
                    Some(room) => vec![chat_model::RoomId::parse(&room)?],
                    None => log
                        .rooms()
                        .await
                        .map_err(|e| anyhow::anyhow!("list rooms: {e}"))?
                        .into_iter()
                        .map(|(room, _)| room)
                        .collect(),
                };
                if rooms.is_empty() {
                    // Nothing verified is not a pass (a check run from cron would hide it): the
                    // usual cause is another deployment's CHAT_PREFIX or NATS_URL.
                    eprintln!(
                        "chatd: no rooms under prefix {:?} at {}: nothing verified (set \
                         CHAT_PREFIX and NATS_URL as the server has them)",
                        config.log.prefix, url
                    );
                    return anyhow::Ok(false);
                }
                let mut all_ok = true;
                let mut unchecked = 0usize;
                for room in rooms {
                    // A room named that cannot be read is an error (exit 1). Among all rooms,
                    // one that cannot be read now is reported (a line with `ok: null`) and the
                    // others are still verified: the run then exits 3 if a room failed, else 1,
                    // since not being able to check is not a finding about the log.
                    let verdict = match log.room_exists(&room).await {
                        Ok(true) => chatd::logtool::verify_room(&log, &room).await,
                        Ok(false) if named => {
                            anyhow::bail!("no room {room} in this deployment's log")
                        }
                        Ok(false) => Err(anyhow::anyhow!("its stream is gone")),
                        Err(e) => Err(e.into()),
                    };
                    match verdict {
                        Err(e) if named => return Err(e),
                        Ok(verdict) => {
                            all_ok &= verdict.ok();
                            say(verdict.to_json(&room))?;
                        }
                        Err(e) => {
                            unchecked += 1;
                            eprintln!("chatd: room {room} not verified: {e:#}");
                            let line = serde_json::json!({
                                "room": room.as_str(),
                                "ok": null,
                                "error": format!("{e:#}"),
                            });
                            say(line)?;
                        }
                    }
                }
                if all_ok && unchecked > 0 {
                    anyhow::bail!("{unchecked} room(s) could not be verified");
                }
                anyhow::Ok(all_ok)
            }
        }
    });
    if let Some(nats) = nats {
        nats.stop(Duration::from_secs(5));
    }
    result
}

fn token(config: &Config, user: &str, name: Option<&str>, ttl: Duration) -> anyhow::Result<()> {
    let user = UserId::parse(user)?;
    let token = match &config.auth {
        AuthConfig::Development => {
            // The secret `chatd run` made: a new one here would sign tokens no server takes.
            let path = config.data_dir.join(devauth::SECRET_FILE);
            anyhow::ensure!(
                path.is_file(),
                "no development secret at {}: `chatd run` creates it in its data dir; set \
                 CHAT_DATA_DIR to that of the server the token is for",
                path.display()
            );
            let secret = devauth::dev_secret(&config.data_dir)?;
            devauth::mint_hs256(secret.as_bytes(), devauth::DEV_ISSUER, devauth::DEV_AUDIENCE, &user, name, ttl)?
        }
        AuthConfig::Configured { hs256_secret: Some(secret), issuer, audience, .. } => {
            devauth::mint_hs256(secret.as_bytes(), issuer, audience, &user, name, ttl)?
        }
        AuthConfig::Configured { hs256_secret: None, .. } => anyhow::bail!(
            "only HS256 tokens can be minted here; with CHAT_JWT_PUBLIC_KEYS, tokens come from your identity provider"
        ),
    };
    say(token)?;
    Ok(())
}

/// Writes one line to standard output. Unlike `println!`, a reader gone (`| head`) or a full
/// disk is an error the caller returns (exit 0 for the former, see `main`), not a panic.
fn say(line: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}
