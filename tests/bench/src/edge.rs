//! Edge benchmarks: the real `chatd` release binary, on a nats-server of its own, under load from
//! real WebSocket clients running in a process of their own (`chat-bench loadgen`, see
//! [`crate::loadgen`]), against baselines measured in the same run by the same load generator.
//!
//! Each benchmark starts a fresh nats-server and chatd (`CHAT_LISTEN=127.0.0.1:0`, a temporary
//! data dir, HS256 tokens, every rate limit out of the way), creates its rooms over the HTTP API,
//! and runs one load generator process. The baselines go to the same nats-server (raw
//! JetStream) or to a bare broadcast server process ([`crate::broadcast`]).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chat_harness::{Chatd, NatsServer};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::loadgen::{
    Auth, FanoutPlan, Group, IdlePlan, LatencyPlan, Plan, PresencePlan, SendAckPlan,
};
use crate::{cpu_seconds, emit, median};

/// Clients of `edge_send_ack` and senders of `edge_latency`: one user and connection each.
const CLIENTS: usize = 64;
/// Rooms they are spread over (`CLIENTS / ROOMS` members each).
const ROOMS: usize = 8;
/// Sends each `edge_send_ack` client keeps unacknowledged.
const WINDOW: usize = 4;
/// Acks the raw publisher keeps outstanding: as many as all clients' windows together.
const RAW_IN_FLIGHT: usize = CLIENTS * WINDOW;
/// Subscribers of the `edge_fanout` room.
const SUBSCRIBERS: usize = 200;
/// Messages the `edge_fanout` sender keeps sent but not yet echoed back to itself.
const FANOUT_WINDOW: usize = 32;
/// The same for `edge_fanout_saturated`: far enough ahead that neither server waits for the
/// sender (at 32 the bare server still does: it delivers ~1.7× more at 128).
const SATURATED_WINDOW: usize = 128;
/// Users per room in `edge_idle_memory` (a room is created with at most 1000 members).
const IDLE_ROOM_SIZE: usize = 1_000;
/// The per-connection memory target of `edge_idle_memory`, KiB.
const IDLE_TARGET_KIB: f64 = 16.0;
/// File descriptors a process needs besides its connections (NATS, store, logs, runtime).
const FD_HEADROOM: u64 = 256;

/// Sizes of the edge benchmarks (`--quick` or full).
pub struct EdgeSizes {
    /// Messages each `edge_send_ack` client sends per round.
    pub send_per_client: usize,
    pub send_rounds: usize,
    /// Messages the `edge_fanout` sender sends per round (each to 200 subscribers).
    pub fanout_messages: usize,
    pub fanout_rounds: usize,
    /// Messages per side per round of `edge_latency`.
    pub latency_messages: usize,
    pub latency_rounds: usize,
    /// Connections held open by `edge_idle_memory`.
    pub idle_connections: usize,
    /// `presence_churn`: members online for the whole run, the churner counts measured, and
    /// seconds per phase.
    pub presence_observers: usize,
    pub presence_churners: &'static [usize],
    pub presence_seconds: f64,
}

impl EdgeSizes {
    pub fn new(quick: bool) -> EdgeSizes {
        if quick {
            EdgeSizes {
                send_per_client: 40,
                send_rounds: 3,
                fanout_messages: 200,
                fanout_rounds: 3,
                latency_messages: 1_500,
                latency_rounds: 2,
                idle_connections: 1_000,
                presence_observers: 500,
                presence_churners: &[20, 200],
                presence_seconds: 10.0,
            }
        } else {
            EdgeSizes {
                send_per_client: 300,
                send_rounds: 5,
                fanout_messages: 10_000,
                fanout_rounds: 5,
                latency_messages: 10_000,
                latency_rounds: 4,
                idle_connections: 10_000,
                presence_observers: 1_000,
                presence_churners: &[20, 200, 1_000],
                presence_seconds: 30.0,
            }
        }
    }
}

/// Raises this process's open-file limit to its hard limit (children inherit it: chatd, the
/// load generator, the broadcast server). Returns `(soft, hard)` after the change.
pub fn raise_fd_limit() -> (u64, u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (0, 0);
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return (hard, hard);
    }
    (soft, hard)
}

/// The chatd release binary: `$CHATD_BIN`, else built with `cargo build --release -p chatd`
/// (a no-op when it is up to date) next to this binary.
pub fn chatd_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("CHATD_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("own executable");
    let bin = exe.with_file_name("chatd");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = std::process::Command::new(cargo)
        .args(["build", "--release", "-q", "-p", "chatd"])
        .current_dir(chat_harness::workspace_root())
        .status();
    match built {
        Ok(status) if status.success() => {}
        other if bin.exists() => eprintln!(
            "bench: building chatd failed ({other:?}); using the existing {}",
            bin.display()
        ),
        other => panic!("cannot build chatd ({other:?}); set CHATD_BIN to a chatd binary"),
    }
    bin
}

/// `u{i}` for `i` in `range`.
fn users(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("u{i}")).collect()
}

/// A fresh nats-server and chatd, and the tokens chatd accepts.
struct Rig {
    chatd: Chatd,
    auth: Auth,
    nats: NatsServer,
    /// chatd's data directory (SQLite store), removed on drop.
    _data: tempfile::TempDir,
}

impl Rig {
    fn start(chatd_bin: &std::path::Path) -> Rig {
        let nats = NatsServer::start();
        let data = tempfile::Builder::new()
            .prefix("chat-bench-")
            .tempdir()
            .expect("temp dir");
        let auth = Auth {
            secret: format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
            issuer: "chat-bench".to_owned(),
            audience: "chat".to_owned(),
        };
        // Rate limits and connection caps out of the way: this measures capacity, not policy.
        let unlimited = "1000000/1000000";
        let env = [
            ("CHAT_LISTEN", "127.0.0.1:0".to_owned()),
            ("CHAT_DATA_DIR", data.path().display().to_string()),
            ("NATS_URL", nats.url()),
            ("CHAT_JWT_HS256_SECRET", auth.secret.clone()),
            ("CHAT_JWT_ISSUER", auth.issuer.clone()),
            ("CHAT_JWT_AUDIENCE", auth.audience.clone()),
            ("CHAT_SEND_RATE", unlimited.to_owned()),
            ("CHAT_TYPING_RATE", unlimited.to_owned()),
            ("CHAT_SUBSCRIBE_RATE", unlimited.to_owned()),
            ("CHAT_HISTORY_RATE", unlimited.to_owned()),
            ("CHAT_MANAGE_RATE", unlimited.to_owned()),
            ("CHAT_FRAME_RATE", unlimited.to_owned()),
            ("CHAT_MAX_CONNECTIONS", "100000".to_owned()),
            ("CHAT_MAX_CONNECTIONS_PER_USER", "100000".to_owned()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let chatd = Chatd::start(chatd_bin, &[], &env);
        Rig {
            chatd,
            auth,
            nats,
            _data: data,
        }
    }

    /// Creates a group room over the HTTP API: `users[0]` creates it with the others as members.
    fn create_room(&self, room: &str, users: &[String]) {
        let token = self.auth.token(&users[0]).expect("token");
        let body = json!({"room": room, "kind": "group", "name": room, "members": users[1..]});
        let auth = format!("Bearer {token}");
        let (status, answer) = chat_harness::http_request(
            self.chatd.http_addr(),
            "POST",
            "/v1/rooms",
            &[("Authorization", auth.as_str())],
            Some(&body.to_string()),
        )
        .expect("chatd answers");
        assert_eq!(status, 201, "create room {room}: {answer}");
    }

    /// `ROOMS` rooms named `{prefix}-{r}` with `CLIENTS / ROOMS` users each (`u0`…), and as many
    /// rooms `raw{prefix}-{r}` for the raw side (made by chatd too, so the streams are alike).
    fn groups(&self, prefix: &str) -> (Vec<Group>, Vec<String>) {
        let per_room = CLIENTS / ROOMS;
        let mut groups = Vec::new();
        let mut raw_rooms = Vec::new();
        for r in 0..ROOMS {
            let group = Group {
                room: format!("{prefix}-{r}"),
                users: users(r * per_room..(r + 1) * per_room),
            };
            self.create_room(&group.room, &group.users);
            groups.push(group);
            let raw = format!("raw{prefix}-{r}");
            self.create_room(&raw, &users(r * per_room..r * per_room + 1));
            raw_rooms.push(raw);
        }
        (groups, raw_rooms)
    }

    fn ws_url(&self) -> String {
        self.chatd.ws_url()
    }
}

/// A load generator child process (this binary, `loadgen`), talking JSON lines.
struct Loadgen {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Loadgen {
    async fn start(plan: &Plan) -> Loadgen {
        let exe = std::env::current_exe().expect("own executable");
        let mut child = tokio::process::Command::new(exe)
            .arg("loadgen")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the load generator");
        let mut stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let plan = serde_json::to_string(plan).expect("plan as JSON");
        stdin
            .write_all(format!("{plan}\n").as_bytes())
            .await
            .expect("hand the plan over");
        Loadgen {
            child,
            stdin: Some(stdin),
            stdout,
        }
    }

    /// The next line with `key`, within `deadline`; panics if the load generator fails.
    async fn expect(&mut self, key: &str, deadline: Duration) -> Value {
        let waiting = async {
            loop {
                match self.stdout.next_line().await {
                    Ok(Some(line)) => {
                        let value: Value = serde_json::from_str(&line)
                            .unwrap_or_else(|e| panic!("loadgen printed {line:?}: {e}"));
                        if value.get(key).is_some() {
                            return value;
                        }
                    }
                    _ => {
                        let status = self.child.wait().await;
                        panic!("the load generator ended early ({status:?}); see its errors above")
                    }
                }
            }
        };
        tokio::time::timeout(deadline, waiting)
            .await
            .unwrap_or_else(|_| panic!("the load generator printed no {key:?} in {deadline:?}"))
    }

    async fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("talk to the load generator");
    }

    /// Closes its stdin (the idle plan ends then) and returns its `result`.
    async fn finish(mut self, deadline: Duration) -> Value {
        self.stdin = None;
        let result = self.expect("result", deadline).await["result"].take();
        let status = self.child.wait().await.expect("load generator exit");
        assert!(status.success(), "load generator: {status}");
        result
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// Per-round rates as whole numbers, for the JSON line.
fn whole(rates: &[f64]) -> Vec<f64> {
    rates.iter().map(|r| r.round()).collect()
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// `edge_send_ack`: send → ack throughput of `CLIENTS` WebSocket clients (one user each, `ROOMS`
/// rooms of 8 members, not subscribed: this is the append path alone), each with `WINDOW`
/// sends unacknowledged, against raw JetStream publishing of the same number of pre-encoded
/// events, with `RAW_IN_FLIGHT` (= all clients' windows) acks outstanding, to room streams of the
/// same chatd on the same nats-server. After an uncounted warm-up round of each side, rounds
/// alternate which side goes first; medians.
///
/// Fair in that both sides append the same events to identical room streams (republish and
/// dedup on, same sizes) and chatd's projector stores both sides' events alike while they run;
/// ours pays for WebSocket framing, JSON, token-checked sessions, membership checks and the
/// event encoding, which is what the edge adds. Returns our median rate.
pub async fn send_ack(chatd_bin: &std::path::Path, sizes: &EdgeSizes) -> f64 {
    let rig = Rig::start(chatd_bin);
    let (groups, raw_rooms) = rig.groups("ack");
    let plan = Plan::SendAck(SendAckPlan {
        ws_url: rig.ws_url(),
        nats_url: rig.nats.url(),
        auth: rig.auth.clone(),
        groups,
        raw_rooms,
        window: WINDOW,
        per_client: sizes.send_per_client,
        raw_in_flight: RAW_IN_FLIGHT,
        rounds: sizes.send_rounds,
        raw: true,
        chat_pids: vec![
            rig.chatd.pid(),
            rig.nats.pid().expect("nats-server running"),
        ],
    });
    let result = Loadgen::start(&plan)
        .await
        .finish(Duration::from_secs(600))
        .await;
    let (ours, raw) = (floats(&result["ours"]), floats(&result["raw"]));
    let ours_median = median(ours.clone());
    let per_message = |side: &str| {
        let cpu = floats(&result[format!("{side}_cpu_s")]);
        let messages = result["messages"].as_f64().unwrap_or(f64::NAN);
        let us = |i: usize| cpu.get(i).map(|s| round1(s * 1e6 / messages));
        json!({"chatd": us(0), "nats_server": us(1)})
    };
    emit(
        "edge_send_ack",
        ours_median,
        median(raw.clone()),
        "msg/s",
        json!({
            "clients": CLIENTS, "rooms": ROOMS, "window_per_client": WINDOW,
            "raw_in_flight": RAW_IN_FLIGHT, "messages_per_round": CLIENTS * sizes.send_per_client,
            "rounds": sizes.send_rounds, "ours_rounds": whole(&ours), "raw_rounds": whole(&raw),
            "cpu_us_per_message": {"ours": per_message("ours"), "raw": per_message("raw")},
            "target": ">= 0.5",
        }),
    );
    ours_median
}

/// `edge_fanout`: one room, `SUBSCRIBERS` subscribed WebSocket clients and one sender; frames
/// received by all subscribers per second, against the bare broadcast server
/// ([`crate::broadcast`]) driven by the same client code in the same run (a warm-up round each,
/// then rounds rotating which side goes first; medians).
///
/// The sender is also subscribed and paces itself by its own echoes (at most `FANOUT_WINDOW`
/// sent and not yet seen back) on both servers, and a round ends when every subscriber has every
/// message. Ours persists each message before broadcasting it (and the projector stores it).
///
/// The bare server forwards the sender's frame as is, and chatd's `event` frame is about 80
/// bytes longer than the client's `send` frame (`seq`, `ts`, `user`, `kind`, `thread`,
/// `reply_to`). So that both servers deliver the same bytes, the baseline's sender pads its
/// frames by as much as chatd's frames were longer in ours' last round (`frame_bytes` shows
/// both sides' delivered frames); the ratio is against that. The bare server's rounds with the
/// sender's frames as they are run in the same rotation and are reported beside it
/// (`verbatim`).
///
/// Then `edge_fanout_saturated`: the same rounds with the sender `SATURATED_WINDOW` ahead, where
/// both servers are busy and the ratio is one of CPU costs. Both lines give each side's CPU time
/// per delivery (µs, from `/proc/<pid>/stat` around each counted round): chatd's and its
/// nats-server's, and the bare server's. Per message the persistence costs about the same
/// whatever the room's size; per delivery it is that cost over the room's subscribers.
pub async fn fanout(chatd_bin: &std::path::Path, sizes: &EdgeSizes) {
    let rig = Rig::start(chatd_bin);
    let room = "fanout".to_owned();
    let all = users(0..SUBSCRIBERS + 1);
    rig.create_room(&room, &all);
    let exe = std::env::current_exe().expect("own executable");
    let bare = Chatd::start(&exe, &["broadcast-server"], &[]);
    let plan = Plan::Fanout(FanoutPlan {
        chat_ws: rig.ws_url(),
        bare_ws: bare.ws_url(),
        auth: rig.auth.clone(),
        room,
        sender: all[0].clone(),
        subscribers: all[1..].to_vec(),
        messages: sizes.fanout_messages,
        window: FANOUT_WINDOW,
        saturated_window: SATURATED_WINDOW,
        rounds: sizes.fanout_rounds,
        chat_pids: vec![
            rig.chatd.pid(),
            rig.nats.pid().expect("nats-server running"),
        ],
        bare_pids: vec![bare.pid()],
    });
    let result = Loadgen::start(&plan)
        .await
        .finish(Duration::from_secs(600))
        .await;
    for (bench, part, window, target) in [
        ("edge_fanout", "paced", FANOUT_WINDOW, ">= 0.7"),
        (
            "edge_fanout_saturated",
            "saturated",
            SATURATED_WINDOW,
            "none (shows the cost per delivery with both servers busy)",
        ),
    ] {
        let result = &result[part];
        let ours = floats(&result["ours"]);
        let (bare_rates, verbatim) = (floats(&result["bare"]), floats(&result["verbatim"]));
        let deliveries = result["deliveries"].as_f64().unwrap_or(f64::NAN);
        let per_delivery = |cpu: &Value| -> Vec<f64> {
            floats(cpu)
                .iter()
                .map(|s| (s * 1e6 / deliveries * 1000.0).round() / 1000.0)
                .collect()
        };
        let (ours_cpu, bare_cpu, verbatim_cpu) = (
            per_delivery(&result["ours_cpu_s"]),
            per_delivery(&result["bare_cpu_s"]),
            per_delivery(&result["verbatim_cpu_s"]),
        );
        let bytes = |side: &str| median(floats(&result["frame_bytes"][side])).round();
        let verbatim_median = median(verbatim.clone());
        emit(
            bench,
            median(ours.clone()),
            median(bare_rates.clone()),
            "deliveries/s",
            json!({
                "subscribers": SUBSCRIBERS, "messages_per_round": sizes.fanout_messages,
                "sender_window": window, "rounds": sizes.fanout_rounds,
                "ours_rounds": whole(&ours), "bare_rounds": whole(&bare_rates),
                "frame_bytes": { "ours": bytes("ours"), "bare": bytes("bare") },
                "verbatim": {
                    "baseline": verbatim_median.round(),
                    "ratio": (median(ours.clone()) / verbatim_median * 1000.0).round() / 1000.0,
                    "rounds": whole(&verbatim),
                    "frame_bytes": bytes("verbatim"),
                },
                "cpu_us_per_delivery": {
                    "chatd": ours_cpu.first(), "nats_server": ours_cpu.get(1),
                    "bare": bare_cpu.first(), "verbatim": verbatim_cpu.first(),
                },
                "target": target,
            }),
        );
    }
}

/// `edge_latency`: send → delivery latency through chatd, measured at a client subscribed to
/// the room (one receiver per room; the `CLIENTS` senders spread over `ROOMS` rooms and paced
/// together at half the median rate three unpaced rounds of the same workload sustained just
/// before),
/// against raw publish → republish delivery (publishers paced the same way to room streams, a
/// core subscriber of the republish subjects) at the same rate, on the same nats-server. A
/// warm-up round each, then rounds alternate which side goes first; the percentiles pool every
/// counted round of a side. `CHAT_BENCH_LATENCY_RATE` fixes the rate instead (to compare builds).
///
/// Both sides time from just before the send (the WebSocket write, the NATS publish) to the
/// arrival at a subscriber in the same process; the message id carries the message's number.
pub async fn latency(chatd_bin: &std::path::Path, sizes: &EdgeSizes, send_ack_rate: Option<f64>) {
    let rig = Rig::start(chatd_bin);
    let (groups, raw_rooms) = rig.groups("lat");
    let receivers = users(CLIENTS..CLIENTS + ROOMS);
    for (group, receiver) in groups.iter().zip(&receivers) {
        invite(&rig, &group.room, &group.users[0], receiver);
    }
    let plan = Plan::Latency(LatencyPlan {
        ws_url: rig.ws_url(),
        nats_url: rig.nats.url(),
        auth: rig.auth.clone(),
        groups,
        receivers,
        raw_rooms,
        // A fixed rate to compare builds at (the probe's rate moves with the machine's load).
        rate: std::env::var("CHAT_BENCH_LATENCY_RATE")
            .ok()
            .map(|r| r.parse().expect("CHAT_BENCH_LATENCY_RATE: messages/s")),
        messages: sizes.latency_messages,
        rounds: sizes.latency_rounds,
    });
    let result = Loadgen::start(&plan)
        .await
        .finish(Duration::from_secs(900))
        .await;
    let (ours, raw) = (&result["ours"], &result["raw"]);
    let whole = |v: &Value| v.as_f64().map(f64::round);
    let common = json!({
        "rate": whole(&result["rate"]), "max_rate": whole(&result["max_rate"]),
        "max_rate_from": if result["max_rate"].is_null() {
            "none: CHAT_BENCH_LATENCY_RATE"
        } else {
            "the median of three unpaced rounds of this workload (the same senders and receivers) just before"
        },
        "max_rate_rounds": result["max_rate_rounds"].clone(),
        "edge_send_ack_rate": send_ack_rate.map(f64::round),
        "senders": CLIENTS, "rooms": ROOMS, "messages_per_round": sizes.latency_messages,
        "rounds": sizes.latency_rounds, "samples_per_side": ours["samples"],
    });
    let mut p99 = common.clone();
    p99["target"] = json!("<= 4");
    p99["ours_round_p99_us"] = ours["round_p99_us"].clone();
    p99["raw_round_p99_us"] = raw["round_p99_us"].clone();
    // Where our delivery time goes: send → ack is the append alone.
    p99["ours_send_to_ack_p99_us"] = ours["ack"]["p99_us"].clone();
    p99["ours_max_us"] = ours["max_us"].clone();
    p99["raw_max_us"] = raw["max_us"].clone();
    emit(
        "edge_latency_p99",
        ours["p99_us"].as_f64().unwrap_or(f64::NAN),
        raw["p99_us"].as_f64().unwrap_or(f64::NAN),
        "us",
        p99,
    );
    let mut p50 = common;
    p50["ours_send_to_ack_p50_us"] = ours["ack"]["p50_us"].clone();
    emit(
        "edge_latency_p50",
        ours["p50_us"].as_f64().unwrap_or(f64::NAN),
        raw["p50_us"].as_f64().unwrap_or(f64::NAN),
        "us",
        p50,
    );
}

/// Invites `user` to `room` over the HTTP API, as `by` (a member).
fn invite(rig: &Rig, room: &str, by: &str, user: &str) {
    let token = rig.auth.token(by).expect("token");
    let auth = format!("Bearer {token}");
    let (status, answer) = chat_harness::http_request(
        rig.chatd.http_addr(),
        "POST",
        &format!("/v1/rooms/{room}/members"),
        &[("Authorization", auth.as_str())],
        Some(&json!({ "user": user }).to_string()),
    )
    .expect("chatd answers");
    assert_eq!(status, 200, "invite {user} to {room}: {answer}");
}

/// Resident memory of a process, KiB (`VmRSS` of `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for process {pid}"))
}

/// The process's resident memory once it stops growing: read every 100 ms until two readings
/// differ by less than 0.5% (at most 5 s).
async fn settled_rss_kib(pid: u32) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut last = rss_kib(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss_kib(pid);
        if now.abs_diff(last) * 200 < last || tokio::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Resident memory of one server process around the idle plan, KiB.
struct IdleMemory {
    before: u64,
    authenticated: u64,
    subscribed: u64,
    /// The load generator's result: how long connecting and subscribing took, frames received.
    timing: Value,
}

/// Runs the idle plan against the server at `ws_url` (process `pid`), reading its resident
/// memory before the first connection, once all are authenticated, and once all are subscribed.
async fn measure_idle(pid: u32, ws_url: String, auth: &Auth, groups: &[Group]) -> IdleMemory {
    let before = settled_rss_kib(pid).await;
    let mut loadgen = Loadgen::start(&Plan::Idle(IdlePlan {
        ws_url,
        auth: auth.clone(),
        groups: groups.to_vec(),
    }))
    .await;
    let deadline = Duration::from_secs(300);
    loadgen.expect("phase", deadline).await;
    let authenticated = settled_rss_kib(pid).await;
    loadgen.say("subscribe").await;
    loadgen.expect("phase", deadline).await;
    let subscribed = settled_rss_kib(pid).await;
    let timing = loadgen.finish(deadline).await;
    IdleMemory {
        before,
        authenticated,
        subscribed,
        timing,
    }
}

/// `edge_idle_memory`: chatd's resident memory per idle authenticated connection subscribed to
/// one room (rooms of `IDLE_ROOM_SIZE` users, each user one connection), from the growth of
/// VmRSS between before the first connection and after the last `subscribed` reply. Measured in
/// two steps (all connections authenticated and welcomed; then all subscribed), so the growth
/// splits into the cost of a session and the cost of its subscription. The "baseline" is the
/// target (16 KiB), not a measurement. For reference, the same load generator plan is run
/// against the bare broadcast server, with tungstenite's default buffers and with a 4 KiB read
/// buffer: what a WebSocket connection costs before any chat state.
pub async fn idle_memory(chatd_bin: &std::path::Path, sizes: &EdgeSizes, fd_limit: (u64, u64)) {
    let (soft, hard) = fd_limit;
    let mut connections = sizes.idle_connections;
    let mut note = None;
    if soft < connections as u64 + FD_HEADROOM {
        connections = soft.saturating_sub(FD_HEADROOM) as usize;
        note = Some(format!(
            "open-file limit {soft} (hard {hard}) is too low for {} connections; measured {connections}",
            sizes.idle_connections
        ));
    }
    let per = |kib: u64| round1(kib as f64 / connections as f64);

    let rig = Rig::start(chatd_bin);
    let mut groups = Vec::new();
    for (r, first) in (0..connections).step_by(IDLE_ROOM_SIZE).enumerate() {
        let group = Group {
            room: format!("idle-{r}"),
            users: users(first..(first + IDLE_ROOM_SIZE).min(connections)),
        };
        rig.create_room(&group.room, &group.users);
        groups.push(group);
    }
    let nats_pid = rig.nats.pid().expect("nats-server running");
    let nats_before = rss_kib(nats_pid);
    let chatd = measure_idle(rig.chatd.pid(), rig.ws_url(), &rig.auth, &groups).await;
    let nats_after = rss_kib(nats_pid);
    drop(rig);

    let exe = std::env::current_exe().expect("own executable");
    let mut bare = Vec::new();
    for args in [
        &["broadcast-server"][..],
        &["broadcast-server", "--read-buffer", "4096"][..],
    ] {
        let server = Chatd::start(&exe, args, &[]);
        let auth = Auth {
            secret: "unused by the bare server".to_owned(),
            issuer: String::new(),
            audience: String::new(),
        };
        let m = measure_idle(server.pid(), server.ws_url(), &auth, &groups).await;
        bare.push(per(m.subscribed.saturating_sub(m.before)));
    }

    let mut extra = json!({
        "baseline_is": "the target, 16 KiB per connection (not a measurement)",
        "target": "<= 16 KiB/connection",
        "connections": connections, "rooms": groups.len(),
        "rss_kib_before": chatd.before, "rss_kib_authenticated": chatd.authenticated,
        "rss_kib_subscribed": chatd.subscribed,
        "session_kib_per_connection": per(chatd.authenticated.saturating_sub(chatd.before)),
        "subscription_kib_per_connection": per(chatd.subscribed.saturating_sub(chatd.authenticated)),
        "nats_server_kib_per_connection": per(nats_after.saturating_sub(nats_before)),
        "bare_tungstenite_kib_per_connection": bare[0],
        "bare_tungstenite_4k_read_buffer_kib_per_connection": bare[1],
        "fd_limit": { "soft": soft, "hard": hard },
        "connect_s": chatd.timing["connect_s"], "subscribe_s": chatd.timing["subscribe_s"],
        "frames_received_besides_replies": chatd.timing["frames_received"],
    });
    if let Some(note) = note {
        extra["note"] = json!(note);
    }
    emit(
        "edge_idle_memory",
        per(chatd.subscribed.saturating_sub(chatd.before)),
        IDLE_TARGET_KIB,
        "KiB/connection",
        extra,
    );
}

/// Members of the `presence_churn` room.
const PRESENCE_MEMBERS: usize = 2_000;
/// Mean online (and offline) time of a churner, ms.
const PRESENCE_MEAN_ONLINE_MS: u64 = 2_000;

/// One phase of the presence plan, with the CPU chatd and nats-server used in it.
struct ChurnPhase {
    report: Value,
    chatd_cpu_s: f64,
    nats_cpu_s: f64,
}

impl ChurnPhase {
    fn cycles(&self) -> f64 {
        self.report["cycles"].as_f64().unwrap_or(0.0)
    }
}

async fn churn_phase(loadgen: &mut Loadgen, command: &str, chatd: u32, nats: u32) -> ChurnPhase {
    let (chatd0, nats0) = (cpu_seconds(chatd), cpu_seconds(nats));
    loadgen.say(command).await;
    let report = loadgen.expect("phase", Duration::from_secs(600)).await;
    ChurnPhase {
        report,
        chatd_cpu_s: cpu_seconds(chatd) - chatd0,
        nats_cpu_s: cpu_seconds(nats) - nats0,
    }
}

/// `presence_churn`: a room of `PRESENCE_MEMBERS` members, `presence_observers` of them online
/// (subscribed) for the whole run; N others churn: connect, subscribe, stay online, close, stay
/// away (online and offline times spread around 2 s), for `presence_seconds` per phase. Ours is
/// the presence frames all observers received per second; the baseline is what one frame per
/// change per online member would be (observers × changes/s), so the ratio is the coalescing
/// ratio (lower is better). The CPU cost per presence change is chatd's CPU per churn cycle minus
/// its CPU per cycle of a `connect-only` phase run just before (the same churners connecting,
/// authenticating and closing without subscribing, so without presence), halved (two changes
/// per cycle); it includes the subscribe request itself.
pub async fn presence_churn(chatd_bin: &std::path::Path, sizes: &EdgeSizes) {
    let rig = Rig::start(chatd_bin);
    let room = "presence";
    let members = users(0..PRESENCE_MEMBERS);
    rig.create_room(room, &members[..IDLE_ROOM_SIZE]);
    for user in &members[IDLE_ROOM_SIZE..] {
        invite(&rig, room, &members[0], user);
    }
    let observers = members[..sizes.presence_observers].to_vec();
    let churners = members[sizes.presence_observers..].to_vec();
    let most = sizes.presence_churners.iter().copied().max().unwrap_or(0);
    assert!(
        most <= churners.len(),
        "{most} churners, {} members left",
        churners.len()
    );
    let chatd = rig.chatd.pid();
    let nats = rig.nats.pid().expect("nats-server running");
    let mut loadgen = Loadgen::start(&Plan::Presence(PresencePlan {
        ws_url: rig.ws_url(),
        auth: rig.auth.clone(),
        room: room.to_owned(),
        observers: observers.clone(),
        churners,
        seconds: sizes.presence_seconds,
        mean_online_ms: PRESENCE_MEAN_ONLINE_MS,
        // Longer than two presence flushes (CHAT_PRESENCE_INTERVAL, 1 s).
        settle_ms: 2_500,
    }))
    .await;
    loadgen.expect("phase", Duration::from_secs(300)).await;
    for &n in sizes.presence_churners {
        let plain = churn_phase(&mut loadgen, &format!("connect-only {n}"), chatd, nats).await;
        let churn = churn_phase(&mut loadgen, &format!("churn {n}"), chatd, nats).await;
        let seconds = churn.report["seconds"].as_f64().unwrap_or(f64::NAN);
        let changes = churn.report["changes"].as_f64().unwrap_or(0.0);
        let user_frames = churn.report["presence_frames"].as_f64().unwrap_or(0.0);
        let changed_frames = churn.report["changed_frames"].as_f64().unwrap_or(0.0);
        let frames_per_s = (user_frames + changed_frames) / seconds;
        let naive_per_s = observers.len() as f64 * changes / seconds;
        let per_cycle = |p: &ChurnPhase, cpu: f64| cpu / p.cycles().max(1.0);
        let chatd_us_per_change =
            (per_cycle(&churn, churn.chatd_cpu_s) - per_cycle(&plain, plain.chatd_cpu_s)) / 2.0
                * 1e6;
        let nats_us_per_change =
            (per_cycle(&churn, churn.nats_cpu_s) - per_cycle(&plain, plain.nats_cpu_s)) / 2.0 * 1e6;
        emit(
            "presence_churn",
            frames_per_s,
            naive_per_s,
            "presence frames/s",
            json!({
                "baseline_is": "observers x changes/s: one frame per change per online member",
                "members": PRESENCE_MEMBERS,
                "observers": observers.len(),
                "churners": n,
                "changes_per_s": round1(changes / seconds),
                "changes": changes,
                "user_frames": user_frames,
                "changed_frames": changed_frames,
                "frames_per_observer_per_s": round1(frames_per_s / observers.len() as f64),
                "chatd_cpu_us_per_frame": round1((churn.chatd_cpu_s - plain.chatd_cpu_s).max(0.0)
                    * 1e6 / (user_frames + changed_frames).max(1.0)),
                "chatd_cpu_us_per_change": chatd_us_per_change.round(),
                "nats_server_cpu_us_per_change": nats_us_per_change.round(),
                "chatd_cpu_s": { "churn": churn.chatd_cpu_s, "connect_only": plain.chatd_cpu_s },
                "cycles": { "churn": churn.cycles(), "connect_only": plain.cycles() },
                "seconds": seconds,
            }),
        );
    }
    loadgen.finish(Duration::from_secs(60)).await;
}
