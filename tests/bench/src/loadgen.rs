//! The load generator: real WebSocket clients (and, for the baselines, raw NATS publishers and
//! subscribers) in a process of their own, so that no client work shares a runtime with the
//! harness or with the server under test.
//!
//! `chat-bench loadgen` reads one [`Plan`] as the first line of its stdin, runs it with many
//! clients on one tokio runtime, and prints JSON lines on stdout: progress (`{"phase":…}`) and a
//! last `{"result":…}`. Later stdin lines are commands (the idle-memory plan waits for
//! `subscribe`, then for end of input). Tokens are minted here from the HS256 secret chatd is
//! configured with. Any failure (a refused frame, a closed socket, a frame that does not come in
//! time) ends the process with an error on stderr and a non-zero status.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use chat_log::LogConfig;
use chat_model::{Event, EventBody, RoomId, UserId};
use futures::stream::{FuturesUnordered, SplitSink};
use futures::{FutureExt, SinkExt, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::message_text;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long an awaited reply (welcome, subscribed, ack, echo) may take before the run fails.
const FRAME_DEADLINE: Duration = Duration::from_secs(30);
/// How long the last subscriber or receiver of a round may take to get everything.
const ROUND_DEADLINE: Duration = Duration::from_secs(120);
/// Connections opened at once while setting up (the server's accept backlog is finite).
const CONNECT_CONCURRENCY: usize = 64;

/// How the clients' tokens are signed (HS256), matching chatd's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Auth {
    pub secret: String,
    pub issuer: String,
    pub audience: String,
}

impl Auth {
    /// A token for `user`, valid for a day.
    pub fn token(&self, user: &str) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = json!({
            "sub": user, "iss": self.issuer, "aud": self.audience, "exp": now + 86_400,
        });
        Ok(jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes()),
        )?)
    }
}

/// Users that share a room.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Group {
    pub room: String,
    pub users: Vec<String>,
}

/// What one load generator process does.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Plan {
    SendAck(SendAckPlan),
    Fanout(FanoutPlan),
    Latency(LatencyPlan),
    Idle(IdlePlan),
    Presence(PresencePlan),
}

/// `edge_send_ack`: each client sends `per_client` messages per round to its group's room with
/// at most `window` unacknowledged; the raw side publishes as many pre-encoded events round
/// robin to `raw_rooms` with `raw_in_flight` acks outstanding. After an uncounted warm-up round,
/// rounds alternate which side goes first. Each side's counted rounds are charged the CPU time
/// `chat_pids` used in them. Result: `{"ours":[msg/s per round], "raw":[…], "ours_cpu_s":[per
/// pid], "raw_cpu_s":[…], "messages": per side}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SendAckPlan {
    pub ws_url: String,
    pub nats_url: String,
    pub auth: Auth,
    /// One client per user.
    pub groups: Vec<Group>,
    pub raw_rooms: Vec<String>,
    pub window: usize,
    pub per_client: usize,
    pub raw_in_flight: usize,
    pub rounds: usize,
    /// Whether to measure the raw side (a rate probe needs only ours).
    pub raw: bool,
    /// chatd and its nats-server: both sides' appends go through that nats-server, and chatd
    /// projects both.
    pub chat_pids: Vec<u32>,
}

/// `edge_fanout`: the same client code against chatd and against the bare broadcast server:
/// `subscribers` subscribed clients, and one sender (also subscribed, so that its own echoes
/// pace it: at most `window` sent and not yet seen back). Warm-up round, then alternating rounds;
/// then the same again with the sender `saturated_window` ahead. Each side's counted rounds are
/// charged the CPU time its processes used in them. Result: `{"paced": R, "saturated": R}`, each
/// `{"ours":[deliveries/s per round], "bare":[…], "ours_cpu_s":[per chat pid], "bare_cpu_s":[…],
/// "deliveries": per side}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FanoutPlan {
    pub chat_ws: String,
    pub bare_ws: String,
    pub auth: Auth,
    pub room: String,
    pub sender: String,
    pub subscribers: Vec<String>,
    pub messages: usize,
    pub window: usize,
    pub saturated_window: usize,
    pub rounds: usize,
    /// The processes serving our side (chatd, its nats-server) and the bare side.
    pub chat_pids: Vec<u32>,
    pub bare_pids: Vec<u32>,
}

/// `edge_latency`: senders (each group's users) paced together at `rate` messages/s, one
/// receiver per room measuring send → delivery; the raw side publishes at the same rate from as
/// many tasks and a core subscriber of the republish subjects measures publish → delivery.
/// Without a `rate`, [`LATENCY_PROBES`] first rounds on our side send unpaced, and half the
/// median rate they sustained (messages over the time until the last one is delivered and
/// acked) is the rate. Warm-up round, then alternating rounds. Result: `{"ours":{…percentiles…},
/// "raw":{…}, "rate":…, "max_rate":…, "max_rate_rounds":[…]}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LatencyPlan {
    pub ws_url: String,
    pub nats_url: String,
    pub auth: Auth,
    pub groups: Vec<Group>,
    /// One receiver per group, in the same order.
    pub receivers: Vec<String>,
    pub raw_rooms: Vec<String>,
    pub rate: Option<f64>,
    pub messages: usize,
    pub rounds: usize,
}

/// `edge_idle_memory`: open one connection per client and report `authenticated`; on
/// `subscribe`, subscribe each to its room and report `subscribed`; hold everything open until
/// stdin ends.
#[derive(Debug, Serialize, Deserialize)]
pub struct IdlePlan {
    pub ws_url: String,
    pub auth: Auth,
    pub groups: Vec<Group>,
}

/// `presence_churn`: `observers` connect and subscribe to `room` and stay, counting the presence
/// frames they receive; then, for each `churn N` or `connect-only N` line on stdin, the first N
/// churners (all without N) run cycles for `seconds`: connect, subscribe (`churn`: a presence change, online) or not
/// (`connect-only`: the same sockets and sessions without presence), stay for an online time,
/// close (`churn`: a change, offline), stay away for an offline time. Online and offline times
/// are spread over 0.25–1.75 × `mean_online_ms`. After the phase, waits until the observers'
/// counts stay still for `settle_ms`, then prints `{"phase":"done",…}`: changes made, presence
/// frames received (per-user and `changed:N` ones), seconds.
#[derive(Debug, Serialize, Deserialize)]
pub struct PresencePlan {
    pub ws_url: String,
    pub auth: Auth,
    pub room: String,
    pub observers: Vec<String>,
    pub churners: Vec<String>,
    pub seconds: f64,
    pub mean_online_ms: u64,
    pub settle_ms: u64,
}

/// Entry point of `chat-bench loadgen`.
pub async fn main() -> anyhow::Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let plan = stdin
        .next_line()
        .await?
        .context("expected the plan as the first line of stdin")?;
    let plan: Plan = serde_json::from_str(&plan).context("parse the plan")?;
    let result = match plan {
        Plan::SendAck(plan) => send_ack(plan).await?,
        Plan::Fanout(plan) => fanout(plan).await?,
        Plan::Latency(plan) => latency(plan).await?,
        Plan::Idle(plan) => idle(plan, stdin).await?,
        Plan::Presence(plan) => presence(plan, stdin).await?,
    };
    println!("{}", json!({ "result": result }));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The client: the contract's handshake and the frames the benchmarks need.

/// A random (version 4) id for a message, from the thread's generator: `Uuid::new_v4` asks
/// the kernel for every id, a system call per message the load generator sends.
fn fresh_id() -> Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// The clients' WebSocket settings. tungstenite zero-fills its whole read buffer before every
/// read (128 KiB by default), and a client reads an ack or a burst of a few KiB at a time: with
/// the default, zeroing was ~8% of the load generator's CPU, taken from the server under test.
/// 16 KiB holds any burst either server writes in one go.
fn client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 * 1024)
}

/// Connects as `user` with the token in the subprotocol and waits for the `welcome`.
async fn connect(url: &str, auth: &Auth, user: &str) -> anyhow::Result<Ws> {
    let token = auth.token(user)?;
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("chat.v1, bearer.{token}"))?,
    );
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(client_config()), true)
            .await
            .with_context(|| format!("connect {user} to {url}"))?;
    wait_for(&mut ws, "welcome")
        .await
        .with_context(|| format!("welcome of {user}"))?;
    Ok(ws)
}

/// Subscribes to `room` from its head and waits for `subscribed`; how many other frames came
/// before it.
async fn subscribe(ws: &mut Ws, room: &str) -> anyhow::Result<u64> {
    let frame = json!({"type": "subscribe", "rid": "s", "rooms": {room: null}});
    ws.send(Message::text(frame.to_string())).await?;
    wait_for(ws, "subscribed")
        .await
        .with_context(|| format!("subscribe to {room}"))
}

/// The next text frame (control frames are answered by the library); fails on close.
async fn next_text(ws: &mut Ws) -> anyhow::Result<Utf8Bytes> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(Message::Close(frame))) => bail!("closed by the server: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection ended"),
        }
    }
}

/// Like [`next_text`], failing after [`FRAME_DEADLINE`].
async fn next_text_in_time(ws: &mut Ws) -> anyhow::Result<Utf8Bytes> {
    tokio::time::timeout(FRAME_DEADLINE, next_text(ws))
        .await
        .with_context(|| format!("no frame within {FRAME_DEADLINE:?}"))?
}

/// Reads until a frame of type `kind`; others are skipped (and counted), an `error` fails.
async fn wait_for(ws: &mut Ws, kind: &str) -> anyhow::Result<u64> {
    let mut skipped = 0;
    loop {
        let text = next_text_in_time(ws).await?;
        let frame: Value = serde_json::from_str(&text)?;
        match frame["type"].as_str() {
            Some(t) if t == kind => return Ok(skipped),
            Some("error") => bail!("error while waiting for {kind}: {text}"),
            _ => skipped += 1,
        }
    }
}

/// A `send` frame (the text has nothing to escape).
fn send_frame(rid: usize, room: &str, id: Uuid, text: &str) -> Message {
    padded_send_frame(rid, room, id, text, 0)
}

/// A `send` frame `pad` bytes longer than [`send_frame`]'s: a `"pad"` field of that size (none
/// below [`PAD_FIELD`]), which the bare broadcast server forwards with the rest of the frame.
fn padded_send_frame(rid: usize, room: &str, id: Uuid, text: &str, pad: usize) -> Message {
    let padding = match pad.checked_sub(PAD_FIELD.len()) {
        Some(n) => format!(r#","pad":"{}""#, "x".repeat(n)),
        None => String::new(),
    };
    Message::text(format!(
        r#"{{"type":"send","rid":"{rid}","room":"{room}","id":"{id}","text":"{text}"{padding}}}"#
    ))
}

/// What a `"pad"` field adds to a frame besides its padding.
const PAD_FIELD: &str = r#","pad":"""#;

fn is_ack(text: &str) -> bool {
    text.contains(r#""type":"ack""#)
}

fn is_error(text: &str) -> bool {
    text.contains(r#""type":"error""#)
}

/// A message as a subscriber receives it: chatd's `event` frame of kind `message`, or the
/// sender's own `send` frame as the bare broadcast server passes it on. Prefix and substring
/// tests that stop early on either server's frames, so that the client spends as little as it
/// can per frame, and about as much on either.
fn is_delivery(text: &str) -> bool {
    text.starts_with(r#"{"type":"send""#)
        || (text.starts_with(r#"{"type":"event""#) && text.contains(r#""kind":"message""#))
}

/// Opens `users`' connections, `CONNECT_CONCURRENCY` at a time, each subscribed to `room` if
/// given; in the order of `users`.
async fn connect_all(
    url: &str,
    auth: &Auth,
    users: &[String],
    room: Option<&str>,
) -> anyhow::Result<Vec<Ws>> {
    futures::stream::iter(users)
        .map(|user| async move {
            let mut ws = connect(url, auth, user).await?;
            if let Some(room) = room {
                subscribe(&mut ws, room).await?;
            }
            Ok::<_, anyhow::Error>(ws)
        })
        .buffered(CONNECT_CONCURRENCY)
        .try_collect()
        .await
}

fn subject(room: &str, live: bool) -> anyhow::Result<String> {
    let room = RoomId::parse(room).map_err(|e| anyhow::anyhow!("room {room:?}: {e}"))?;
    let config = LogConfig::default();
    Ok(if live {
        config.live_subject(&room)
    } else {
        config.room_subject(&room)
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The event the edge would append for `text` (what the raw side publishes, pre-encoded).
fn encoded(id: Uuid, user: &str, text: String) -> anyhow::Result<Bytes> {
    let event = Event {
        id,
        user: UserId::parse(user).map_err(|e| anyhow::anyhow!("user {user:?}: {e}"))?,
        ts: now_ms(),
        body: EventBody::Message {
            text,
            thread: None,
            reply_to: None,
        },
    };
    Ok(Bytes::from(event.encode()?))
}

// ---------------------------------------------------------------------------------------------
// edge_send_ack

/// One client of the send → ack benchmark.
struct Sender {
    ws: Ws,
    room: String,
}

impl Sender {
    /// Sends `count` messages keeping at most `window` unacknowledged; returns when all are acked.
    async fn burst(mut self, count: usize, window: usize) -> anyhow::Result<Sender> {
        let (mut sent, mut acked) = (0, 0);
        while acked < count {
            if sent < count && sent - acked < window {
                while sent < count && sent - acked < window {
                    let frame = send_frame(sent, &self.room, fresh_id(), &message_text(sent));
                    self.ws.feed(frame).await?;
                    sent += 1;
                }
                self.ws.flush().await?;
            }
            let text = next_text_in_time(&mut self.ws).await?;
            if is_ack(&text) {
                acked += 1;
            } else if is_error(&text) {
                bail!("send refused: {text}");
            }
        }
        Ok(self)
    }
}

/// Every client sends its share at once; msg/s from the first send to the last ack.
async fn send_round(
    clients: &mut Vec<Sender>,
    per_client: usize,
    window: usize,
) -> anyhow::Result<f64> {
    let total = clients.len() * per_client;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, client) in clients.drain(..).enumerate() {
        tasks.spawn(async move { client.burst(per_client, window).await.map(|c| (i, c)) });
    }
    let mut back = Vec::with_capacity(tasks.len());
    while let Some(done) = tasks.join_next().await {
        back.push(done??);
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    back.sort_by_key(|(i, _)| *i);
    clients.extend(back.into_iter().map(|(_, c)| c));
    Ok(rate)
}

/// The same number of events, pre-encoded, published raw with `in_flight` acks outstanding.
async fn raw_publish_round(
    js: &jetstream::Context,
    subjects: &[String],
    users: &[String],
    total: usize,
    in_flight: usize,
) -> anyhow::Result<f64> {
    let payloads = (0..total)
        .map(|i| {
            let id = fresh_id();
            let payload = encoded(id, &users[i % users.len()], message_text(i))?;
            Ok((
                subjects[i % subjects.len()].clone(),
                id.to_string(),
                payload,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    futures::stream::iter(payloads)
        .map(|(subject, id, payload)| async move {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, id.as_str());
            js.publish_with_headers(subject, headers, payload)
                .await?
                .await?;
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(in_flight)
        .try_for_each(|()| async { Ok(()) })
        .await?;
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn send_ack(plan: SendAckPlan) -> anyhow::Result<Value> {
    let users: Vec<String> = plan.groups.iter().flat_map(|g| g.users.clone()).collect();
    let mut clients = Vec::with_capacity(users.len());
    for group in &plan.groups {
        let sockets = connect_all(&plan.ws_url, &plan.auth, &group.users, None).await?;
        clients.extend(sockets.into_iter().map(|ws| Sender {
            ws,
            room: group.room.clone(),
        }));
    }
    let js = jetstream::new(async_nats::connect(&plan.nats_url).await?);
    let subjects = plan
        .raw_rooms
        .iter()
        .map(|r| subject(r, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let total = clients.len() * plan.per_client;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    let pids = &plan.chat_pids;
    let (mut ours_cpu, mut raw_cpu) = (vec![0.0; pids.len()], vec![0.0; pids.len()]);
    // Round 0 warms both sides up (sockets, streams, the projector's first batches) and is not
    // counted; then rounds alternate which side goes first, so neither always meets a warmer
    // server.
    for round in 0..=plan.rounds {
        let ours_first = round % 2 == 0;
        for ours_turn in [ours_first, !ours_first] {
            let before = cpu_now(pids);
            if ours_turn {
                let rate = send_round(&mut clients, plan.per_client, plan.window).await?;
                if round > 0 {
                    ours.push(rate);
                    charge(&mut ours_cpu, pids, &before);
                }
            } else if plan.raw {
                let rate =
                    raw_publish_round(&js, &subjects, &users, total, plan.raw_in_flight).await?;
                if round > 0 {
                    raw.push(rate);
                    charge(&mut raw_cpu, pids, &before);
                }
            }
        }
    }
    Ok(json!({
        "ours": ours, "raw": raw, "ours_cpu_s": ours_cpu, "raw_cpu_s": raw_cpu,
        "messages": total * plan.rounds,
    }))
}

/// CPU time each of `pids` has used so far, seconds.
fn cpu_now(pids: &[u32]) -> Vec<f64> {
    pids.iter().map(|&pid| crate::cpu_seconds(pid)).collect()
}

/// Adds to `used` what each of `pids` used since `before` (from [`cpu_now`]).
fn charge(used: &mut [f64], pids: &[u32], before: &[f64]) {
    for ((used, &pid), before) in used.iter_mut().zip(pids).zip(before) {
        *used += crate::cpu_seconds(pid) - before;
    }
}

// ---------------------------------------------------------------------------------------------
// edge_fanout

/// One server's subscribers and sender, connected for the whole run.
struct Audience {
    sender: Ws,
    subscribers: usize,
    /// Bytes added to each `send` frame (see [`padded_send_frame`]).
    pad: usize,
    /// Of the last round: the mean size of a delivered frame (as the sender saw its echoes),
    /// and how much larger than the `send` frame it was.
    delivered_bytes: f64,
    growth: f64,
    /// Each subscriber reports every `messages` deliveries it has received (or its failure).
    reports: mpsc::Receiver<Result<(), String>>,
    /// The subscribers' reader tasks.
    _readers: JoinSet<()>,
}

impl Audience {
    async fn connect(plan: &FanoutPlan, url: &str) -> anyhow::Result<Audience> {
        let sockets = connect_all(url, &plan.auth, &plan.subscribers, Some(&plan.room)).await?;
        let (tx, reports) = mpsc::channel(sockets.len().max(1));
        let mut readers = JoinSet::new();
        let per_round = plan.messages as u64;
        for mut ws in sockets {
            let tx = tx.clone();
            readers.spawn(async move {
                let mut received = 0u64;
                loop {
                    match next_text(&mut ws).await {
                        Ok(text) if is_delivery(&text) => {
                            received += 1;
                            if received.is_multiple_of(per_round) && tx.send(Ok(())).await.is_err()
                            {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = tx.send(Err(format!("subscriber: {e:#}"))).await;
                            return;
                        }
                    }
                }
            });
        }
        // The sender is told apart by the bare server through the query (chatd ignores it).
        let mut sender = connect(&format!("{url}?role=sender"), &plan.auth, &plan.sender).await?;
        subscribe(&mut sender, &plan.room).await?;
        Ok(Audience {
            sender,
            subscribers: plan.subscribers.len(),
            pad: 0,
            delivered_bytes: 0.0,
            growth: 0.0,
            reports,
            _readers: readers,
        })
    }

    /// Sends `messages` (at most `window` not yet echoed back to the sender) and waits until
    /// every subscriber has them all; deliveries/s over that time.
    async fn round(&mut self, room: &str, messages: usize, window: usize) -> anyhow::Result<f64> {
        let start = Instant::now();
        let (mut sent, mut echoed) = (0, 0);
        let (mut sent_bytes, mut echoed_bytes) = (0, 0);
        while echoed < messages {
            if sent < messages && sent - echoed < window {
                while sent < messages && sent - echoed < window {
                    let text = message_text(sent);
                    let frame = padded_send_frame(sent, room, fresh_id(), &text, self.pad);
                    sent_bytes += frame.len();
                    self.sender.feed(frame).await?;
                    sent += 1;
                }
                self.sender.flush().await?;
            }
            let text = next_text_in_time(&mut self.sender).await?;
            if is_delivery(&text) {
                echoed += 1;
                echoed_bytes += text.len();
            } else if is_error(&text) {
                bail!("send refused: {text}");
            }
        }
        for _ in 0..self.subscribers {
            match tokio::time::timeout(ROUND_DEADLINE, self.reports.recv()).await {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(e))) => bail!(e),
                Ok(None) => bail!("every subscriber is gone"),
                Err(_) => bail!("subscribers still missing messages after {ROUND_DEADLINE:?}"),
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        self.delivered_bytes = echoed_bytes as f64 / messages as f64;
        self.growth = (echoed_bytes as f64 - sent_bytes as f64) / messages as f64;
        Ok((self.subscribers * messages) as f64 / elapsed)
    }
}

async fn fanout(plan: FanoutPlan) -> anyhow::Result<Value> {
    let mut ours = Audience::connect(&plan, &plan.chat_ws).await?;
    let mut bare = Audience::connect(&plan, &plan.bare_ws).await?;
    let paced = fanout_rounds(&plan, &mut ours, &mut bare, plan.window).await?;
    let saturated = fanout_rounds(&plan, &mut ours, &mut bare, plan.saturated_window).await?;
    Ok(json!({ "paced": paced, "saturated": saturated }))
}

/// The three sides' rounds with the sender `window` ahead, and the CPU time their processes used
/// in the counted ones. The sides: ours; the bare server delivering frames as large as ours
/// (the sender pads its frames by what chatd's `event` frame adds to a `send` frame, measured
/// in ours' last round); and the bare server forwarding the sender's frames as they are.
async fn fanout_rounds(
    plan: &FanoutPlan,
    ours: &mut Audience,
    bare: &mut Audience,
    window: usize,
) -> anyhow::Result<Value> {
    #[derive(Clone, Copy, PartialEq)]
    enum Side {
        Ours,
        Bare,
        Verbatim,
    }
    #[derive(Default)]
    struct Tally {
        rates: Vec<f64>,
        cpu: Vec<f64>,
        frame_bytes: Vec<f64>,
    }
    let mut tallies: Vec<Tally> = (0..3)
        .map(|i| Tally {
            cpu: vec![
                0.0;
                if i == 0 {
                    plan.chat_pids.len()
                } else {
                    plan.bare_pids.len()
                }
            ],
            ..Tally::default()
        })
        .collect();
    let sides = [Side::Ours, Side::Bare, Side::Verbatim];
    // Round 0 warms up and is not counted (ours first, which sizes the padding); then rounds
    // rotate which side goes first.
    for round in 0..=plan.rounds {
        for i in 0..3 {
            let side = sides[(round + i) % 3];
            let pad = match side {
                Side::Bare => ours.growth.round().max(0.0) as usize,
                Side::Ours | Side::Verbatim => 0,
            };
            let (audience, pids) = match side {
                Side::Ours => (&mut *ours, &plan.chat_pids),
                Side::Bare | Side::Verbatim => (&mut *bare, &plan.bare_pids),
            };
            audience.pad = pad;
            let before = cpu_now(pids);
            let rate = audience.round(&plan.room, plan.messages, window).await?;
            let tally = &mut tallies[side as usize];
            if round > 0 {
                tally.rates.push(rate);
                tally.frame_bytes.push(audience.delivered_bytes);
                charge(&mut tally.cpu, pids, &before);
            }
        }
    }
    let [o, b, v] = &tallies[..] else {
        unreachable!("three sides")
    };
    Ok(json!({
        "ours": o.rates, "bare": b.rates, "verbatim": v.rates,
        "ours_cpu_s": o.cpu, "bare_cpu_s": b.cpu, "verbatim_cpu_s": v.cpu,
        "frame_bytes": { "ours": o.frame_bytes, "bare": b.frame_bytes, "verbatim": v.frame_bytes },
        "deliveries": plan.subscribers.len() * plan.messages * plan.rounds,
    }))
}

// ---------------------------------------------------------------------------------------------
// edge_latency

/// Send times of numbered messages, in nanoseconds since the run's epoch; message ids carry the
/// number, so a receiver (in this process) finds when its message was sent.
struct SendTimes {
    epoch: Instant,
    /// The id's upper half, the same for every message of this side.
    id_high: u64,
    sent_ns: Vec<AtomicU64>,
}

impl SendTimes {
    fn new(epoch: Instant, count: usize) -> Arc<SendTimes> {
        let id_high = SendTimes::id_of_parts(rand_u64(), 0).as_u64_pair().0;
        Arc::new(SendTimes {
            epoch,
            id_high,
            sent_ns: (0..count).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn id_of_parts(high: u64, n: u64) -> Uuid {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&high.to_be_bytes());
        bytes[8..].copy_from_slice(&n.to_be_bytes());
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    /// The (version 4) id of message `n`.
    fn id(&self, n: usize) -> Uuid {
        SendTimes::id_of_parts(self.id_high, n as u64)
    }

    /// Records that message `n` is being sent now.
    fn mark(&self, n: usize) {
        let ns = self.epoch.elapsed().as_nanos() as u64;
        self.sent_ns[n].store(ns, Ordering::Release);
    }

    /// Microseconds since message `id` was sent, if it is one of ours.
    fn latency_us(&self, id: &str) -> Option<(usize, f64)> {
        let (high, low) = Uuid::parse_str(id).ok()?.as_u64_pair();
        if high != self.id_high {
            return None;
        }
        // The variant bits overwrote the top two bits of the number.
        let n = (low & (u64::MAX >> 2)) as usize;
        let sent = self.sent_ns.get(n)?.load(Ordering::Acquire);
        let now = self.epoch.elapsed().as_nanos() as u64;
        Some((n, now.saturating_sub(sent) as f64 / 1e3))
    }
}

fn rand_u64() -> u64 {
    Uuid::new_v4().as_u64_pair().0
}

/// When message `n` of a round is due: evenly spaced at `rate`.
fn due(start: tokio::time::Instant, rate: f64, n: usize) -> tokio::time::Instant {
    start + Duration::from_secs_f64(n as f64 / rate)
}

/// Waits for `messages` samples of this round (numbers `base..base + messages`).
async fn collect_round(
    samples: &mut mpsc::Receiver<(usize, f64)>,
    base: usize,
    messages: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut got = Vec::with_capacity(messages);
    while got.len() < messages {
        match tokio::time::timeout(ROUND_DEADLINE, samples.recv()).await {
            Ok(Some((n, us))) if (base..base + messages).contains(&n) => got.push(us),
            Ok(Some(_)) => {}
            Ok(None) => bail!("every receiver is gone"),
            Err(_) => bail!(
                "{} of {messages} messages delivered after {ROUND_DEADLINE:?}",
                got.len()
            ),
        }
    }
    Ok(got)
}

/// Our side: WebSocket senders paced together, one subscribed receiver per room.
struct EdgeLatency {
    senders: Vec<(SplitSink<Ws, Message>, String)>,
    times: Arc<SendTimes>,
    /// Send → delivery at the receivers.
    samples: mpsc::Receiver<(usize, f64)>,
    /// Send → ack at the senders (where the delivery time goes: the append, or the fan-out).
    acks: mpsc::Receiver<(usize, f64)>,
    /// Receivers, and the senders' readers (timing acks, failing on errors).
    _readers: JoinSet<anyhow::Result<()>>,
}

/// The fields of a frame the latency clients look at.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type")]
    kind_of_frame: &'a str,
    kind: Option<&'a str>,
    id: Option<&'a str>,
}

/// Reads frames until the socket ends, passing `(number, µs)` of every frame that `wanted`
/// picks (by its head) and whose id is one of `times`; an `error` frame fails.
async fn time_frames<S>(
    mut stream: S,
    times: Arc<SendTimes>,
    out: mpsc::Sender<(usize, f64)>,
    wanted: fn(&Head<'_>) -> bool,
) -> anyhow::Result<()>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(message) = stream.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        let head: Head<'_> = serde_json::from_str(&text)?;
        if head.kind_of_frame == "error" {
            bail!("refused: {text}");
        }
        if !wanted(&head) {
            continue;
        }
        if let Some(sample) = head.id.and_then(|id| times.latency_us(id)) {
            out.send(sample).await?;
        }
    }
    Ok(())
}

impl EdgeLatency {
    async fn connect(plan: &LatencyPlan, times: Arc<SendTimes>) -> anyhow::Result<EdgeLatency> {
        let (tx, samples) = mpsc::channel(65_536);
        let (ack_tx, acks) = mpsc::channel(65_536);
        let mut readers = JoinSet::new();
        for (group, receiver) in plan.groups.iter().zip(&plan.receivers) {
            let mut ws = connect(&plan.ws_url, &plan.auth, receiver).await?;
            subscribe(&mut ws, &group.room).await?;
            let is_message = |h: &Head<'_>| h.kind_of_frame == "event" && h.kind == Some("message");
            readers.spawn(time_frames(ws, times.clone(), tx.clone(), is_message));
        }
        let mut senders = Vec::new();
        for group in &plan.groups {
            for ws in connect_all(&plan.ws_url, &plan.auth, &group.users, None).await? {
                let (sink, stream) = ws.split();
                let is_ack = |h: &Head<'_>| h.kind_of_frame == "ack";
                readers.spawn(time_frames(stream, times.clone(), ack_tx.clone(), is_ack));
                senders.push((sink, group.room.clone()));
            }
        }
        Ok(EdgeLatency {
            senders,
            times,
            samples,
            acks,
            _readers: readers,
        })
    }

    /// Messages `base..base + messages`, message `n` sent by sender `n % senders` when due;
    /// send → delivery and send → ack, µs.
    async fn round(
        &mut self,
        base: usize,
        messages: usize,
        rate: f64,
    ) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let count = self.senders.len();
        let start = tokio::time::Instant::now();
        let mut tasks = JoinSet::new();
        for (s, (mut sink, room)) in self.senders.drain(..).enumerate() {
            let times = self.times.clone();
            tasks.spawn(async move {
                for n in (s..messages).step_by(count) {
                    tokio::time::sleep_until(due(start, rate, n)).await;
                    let id = times.id(base + n);
                    times.mark(base + n);
                    sink.send(send_frame(n, &room, id, &message_text(n)))
                        .await?;
                }
                Ok::<_, anyhow::Error>((s, sink, room))
            });
        }
        let delivered = collect_round(&mut self.samples, base, messages).await?;
        let acked = collect_round(&mut self.acks, base, messages).await?;
        let mut back = Vec::with_capacity(count);
        while let Some(done) = tasks.join_next().await {
            back.push(done??);
        }
        back.sort_by_key(|(s, _, _)| *s);
        self.senders
            .extend(back.into_iter().map(|(_, sink, room)| (sink, room)));
        Ok((delivered, acked))
    }
}

/// The raw side: publishers paced the same way on one connection, a core subscriber of the
/// rooms' republish subjects on another.
struct RawLatency {
    js: jetstream::Context,
    subjects: Vec<String>,
    users: Vec<String>,
    /// As many publishing tasks as our side has senders.
    publishers: usize,
    times: Arc<SendTimes>,
    samples: mpsc::Receiver<(usize, f64)>,
    _receiver: JoinSet<anyhow::Result<()>>,
}

impl RawLatency {
    async fn connect(
        plan: &LatencyPlan,
        publishers: usize,
        times: Arc<SendTimes>,
    ) -> anyhow::Result<RawLatency> {
        let js = jetstream::new(async_nats::connect(&plan.nats_url).await?);
        let subscriber = async_nats::connect(&plan.nats_url).await?;
        let mut subscriptions = Vec::new();
        for room in &plan.raw_rooms {
            subscriptions.push(subscriber.subscribe(subject(room, true)?).await?);
        }
        // Make sure the server has the subscriptions before anything is published.
        subscriber.flush().await?;
        let (tx, samples) = mpsc::channel(65_536);
        let mut receiver = JoinSet::new();
        let receiver_times = times.clone();
        receiver.spawn(async move {
            let _client = subscriber;
            let mut live = futures::stream::select_all(subscriptions);
            while let Some(message) = live.next().await {
                let id = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(NATS_MESSAGE_ID))
                    .map(|v| v.as_str().to_owned());
                if let Some(sample) = id.and_then(|id| receiver_times.latency_us(&id)) {
                    tx.send(sample).await?;
                }
            }
            Ok(())
        });
        Ok(RawLatency {
            js,
            subjects: plan
                .raw_rooms
                .iter()
                .map(|r| subject(r, false))
                .collect::<anyhow::Result<_>>()?,
            users: plan.groups.iter().flat_map(|g| g.users.clone()).collect(),
            publishers,
            times,
            samples,
            _receiver: receiver,
        })
    }

    async fn round(&mut self, base: usize, messages: usize, rate: f64) -> anyhow::Result<Vec<f64>> {
        // Pre-encoded, as the other raw baselines.
        let payloads: Arc<Vec<Bytes>> = Arc::new(
            (0..messages)
                .map(|n| {
                    let user = &self.users[n % self.users.len()];
                    encoded(self.times.id(base + n), user, message_text(n))
                })
                .collect::<anyhow::Result<_>>()?,
        );
        let start = tokio::time::Instant::now();
        let mut tasks = JoinSet::new();
        for p in 0..self.publishers {
            let (js, times, payloads) = (self.js.clone(), self.times.clone(), payloads.clone());
            let subjects = self.subjects.clone();
            let publishers = self.publishers;
            tasks.spawn(async move {
                let mut acks = FuturesUnordered::new();
                for n in (p..messages).step_by(publishers) {
                    tokio::time::sleep_until(due(start, rate, n)).await;
                    let id = times.id(base + n).to_string();
                    let mut headers = HeaderMap::new();
                    headers.insert(NATS_MESSAGE_ID, id.as_str());
                    let subject = subjects[n % subjects.len()].clone();
                    times.mark(base + n);
                    let ack = js
                        .publish_with_headers(subject, headers, payloads[n].clone())
                        .await?;
                    acks.push(async move { ack.await });
                    while let Some(Some(done)) = acks.next().now_or_never() {
                        done?;
                    }
                }
                while let Some(done) = acks.next().await {
                    done?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        let got = collect_round(&mut self.samples, base, messages).await?;
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(got)
    }
}

/// p50, p99 and max of a set of microsecond samples, plus each round's p99.
fn summary(mut all: Vec<f64>, round_p99: Vec<f64>) -> Value {
    all.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        let i = ((all.len() - 1) as f64 * p).round() as usize;
        (all[i] * 10.0).round() / 10.0
    };
    json!({
        "p50_us": pct(0.5), "p99_us": pct(0.99), "max_us": pct(1.0),
        "samples": all.len(), "round_p99_us": round_p99,
    })
}

fn p99(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let i = ((sorted.len() - 1) as f64 * 0.99).round() as usize;
    (sorted[i] * 10.0).round() / 10.0
}

/// Unpaced rounds measuring `edge_latency`'s maximum rate (their median). One such round, the
/// first thing after connecting, gave anything from 11k to 19k messages/s on the same build
/// within an hour, and the latency measured at half of it followed.
const LATENCY_PROBES: usize = 3;

async fn latency(plan: LatencyPlan) -> anyhow::Result<Value> {
    let epoch = Instant::now();
    // A round more than counted for the warm-up, and the probe's.
    let count = plan.messages * (plan.rounds + 1 + LATENCY_PROBES);
    let mut ours = EdgeLatency::connect(&plan, SendTimes::new(epoch, count)).await?;
    let publishers = ours.senders.len();
    let mut raw = RawLatency::connect(&plan, publishers, SendTimes::new(epoch, count)).await?;
    let (rate, max_rate, probed) = match plan.rate {
        Some(rate) => (rate, None, Vec::new()),
        None => {
            let mut probed = Vec::with_capacity(LATENCY_PROBES);
            for probe in 0..LATENCY_PROBES {
                let base = plan.messages * (plan.rounds + 1 + probe);
                let start = Instant::now();
                ours.round(base, plan.messages, f64::INFINITY).await?;
                probed.push((plan.messages as f64 / start.elapsed().as_secs_f64()).round());
            }
            let max = crate::median(probed.clone());
            (max / 2.0, Some(max), probed)
        }
    };
    let (mut ours_all, mut raw_all) = (Vec::new(), Vec::new());
    let (mut ours_p99, mut raw_p99) = (Vec::new(), Vec::new());
    let mut ours_acks = Vec::new();
    // Round 0 warms up and is not counted; then rounds alternate which side goes first.
    for round in 0..=plan.rounds {
        let base = round * plan.messages;
        let counted = round > 0;
        let ours_first = round % 2 == 0;
        for ours_turn in [ours_first, !ours_first] {
            if ours_turn {
                let (delivered, acked) = ours.round(base, plan.messages, rate).await?;
                if counted {
                    ours_p99.push(p99(&delivered));
                    ours_all.extend(delivered);
                    ours_acks.extend(acked);
                }
            } else {
                let delivered = raw.round(base, plan.messages, rate).await?;
                if counted {
                    raw_p99.push(p99(&delivered));
                    raw_all.extend(delivered);
                }
            }
        }
    }
    let mut ours = summary(ours_all, ours_p99);
    ours["ack"] = summary(ours_acks, Vec::new());
    Ok(json!({
        "ours": ours, "raw": summary(raw_all, raw_p99), "rate": rate, "max_rate": max_rate,
        "max_rate_rounds": probed,
    }))
}

// ---------------------------------------------------------------------------------------------
// edge_idle_memory

/// How far one idle connection has come.
#[derive(Debug, PartialEq)]
enum Stage {
    Authenticated,
    Subscribed,
}

/// Waits until `clients` connections have reported `stage`; the first failure fails.
async fn wait_all(
    reports: &mut mpsc::Receiver<anyhow::Result<Stage>>,
    clients: usize,
    stage: Stage,
) -> anyhow::Result<()> {
    let mut n = 0;
    while n < clients {
        match tokio::time::timeout(ROUND_DEADLINE, reports.recv()).await {
            Ok(Some(Ok(reported))) if reported == stage => n += 1,
            Ok(Some(Ok(other))) => {
                bail!("a connection reported {other:?} while waiting for {stage:?}")
            }
            Ok(Some(Err(e))) => return Err(e.context(format!("{n} {stage:?} so far"))),
            Ok(None) => bail!("every connection is gone"),
            Err(_) => bail!("only {n} of {clients} {stage:?} after {ROUND_DEADLINE:?}"),
        }
    }
    Ok(())
}

/// Reads and counts whatever the server sends until `until` is cancelled; fails if it closes.
async fn hold(ws: &mut Ws, until: &CancellationToken, frames: &AtomicU64) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = until.cancelled() => return Ok(()),
            text = next_text(ws) => {
                text?;
                frames.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn idle(plan: IdlePlan, mut stdin: Lines<BufReader<Stdin>>) -> anyhow::Result<Value> {
    let subscribe_now = CancellationToken::new();
    let stop = CancellationToken::new();
    let clients: usize = plan.groups.iter().map(|g| g.users.len()).sum();
    let (tx, mut reports) = mpsc::channel::<anyhow::Result<Stage>>(1_024);
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    // Frames the server sends besides the replies waited for (presence, …).
    let frames = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for group in &plan.groups {
        for user in &group.users {
            let (url, auth, user, room) = (
                plan.ws_url.clone(),
                plan.auth.clone(),
                user.clone(),
                group.room.clone(),
            );
            let (gate, tx) = (gate.clone(), tx.clone());
            let (subscribe_now, stop) = (subscribe_now.clone(), stop.clone());
            let frames = frames.clone();
            tasks.spawn(async move {
                let run = async {
                    let permit = gate.acquire().await?;
                    let mut ws = connect(&url, &auth, &user).await?;
                    drop(permit);
                    tx.send(Ok(Stage::Authenticated)).await?;
                    hold(&mut ws, &subscribe_now, &frames).await?;
                    let skipped = subscribe(&mut ws, &room).await?;
                    frames.fetch_add(skipped, Ordering::Relaxed);
                    tx.send(Ok(Stage::Subscribed)).await?;
                    hold(&mut ws, &stop, &frames).await
                };
                if let Err(e) = run.await {
                    let _ = tx.send(Err(e)).await;
                }
            });
        }
    }
    drop(tx);
    let start = Instant::now();
    wait_all(&mut reports, clients, Stage::Authenticated).await?;
    let connect_s = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"phase": "authenticated", "connections": clients})
    );
    while let Some(line) = stdin.next_line().await? {
        if line.trim() == "subscribe" {
            break;
        }
    }
    let start = Instant::now();
    subscribe_now.cancel();
    wait_all(&mut reports, clients, Stage::Subscribed).await?;
    let subscribe_s = start.elapsed().as_secs_f64();
    println!("{}", json!({"phase": "subscribed", "connections": clients}));
    // Hold everything until the harness has measured and closes our stdin; a connection the
    // server closes meanwhile fails the run.
    tokio::select! {
        line = async { while stdin.next_line().await?.is_some() {} Ok::<_, anyhow::Error>(()) } => line?,
        Some(Err(e)) = reports.recv() => return Err(e.context("while idle")),
    }
    stop.cancel();
    Ok(json!({
        "connections": clients,
        "connect_s": (connect_s * 100.0).round() / 100.0,
        "subscribe_s": (subscribe_s * 100.0).round() / 100.0,
        "frames_received": frames.load(Ordering::Relaxed),
    }))
}

// ---------------------------------------------------------------------------------------------
// presence_churn

/// What the observers of `presence_churn` have received.
#[derive(Default)]
struct PresenceCounts {
    /// Per-user presence frames.
    users: AtomicU64,
    /// `changed:N` frames (read the endpoint instead).
    changed: AtomicU64,
    /// Every other frame.
    other: AtomicU64,
}

impl PresenceCounts {
    fn total(&self) -> u64 {
        self.users.load(Ordering::Relaxed)
            + self.changed.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }

    fn count(&self, text: &str) {
        let counter = if !text.contains(r#""type":"presence""#) {
            &self.other
        } else if text.contains(r#""changed":"#) {
            &self.changed
        } else {
            &self.users
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Online or offline time number `n` of `churner`: spread over 0.25–1.75 × `mean`, the same in
/// every phase and run.
fn spread(mean: u64, churner: usize, n: usize) -> Duration {
    let x = (churner
        .wrapping_mul(7_919)
        .wrapping_add(n.wrapping_mul(104_729)))
        % 1_000;
    Duration::from_millis(mean / 4 + mean * 3 * x as u64 / 2_000)
}

/// One churner's cycles until `until`; returns how many completed. Frames that arrive while it
/// is online are read and dropped.
async fn churn_cycles(
    plan: &PresencePlan,
    churner: usize,
    subscribe_too: bool,
    until: Instant,
) -> anyhow::Result<u64> {
    let user = &plan.churners[churner];
    let mut cycles = 0u64;
    // Churners start spread over one mean cycle (online and offline), not all at once.
    let start = (churner as u64).wrapping_mul(7_919) % (2 * plan.mean_online_ms.max(1));
    tokio::time::sleep(Duration::from_millis(start)).await;
    while Instant::now() < until {
        let mut ws = connect(&plan.ws_url, &plan.auth, user).await?;
        if subscribe_too {
            subscribe(&mut ws, &plan.room).await?;
        }
        let online = spread(plan.mean_online_ms, churner, 2 * cycles as usize + 1);
        let reading = async {
            loop {
                if let Err(e) = next_text(&mut ws).await {
                    return e;
                }
            }
        };
        if let Ok(e) = tokio::time::timeout(online, reading).await {
            return Err(e.context(format!("{user} while online")));
        }
        ws.close(None).await?;
        // The server's close reply, then the end.
        let _ = tokio::time::timeout(FRAME_DEADLINE, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        cycles += 1;
        let offline = spread(plan.mean_online_ms, churner, 2 * cycles as usize);
        tokio::time::sleep(offline.min(until.saturating_duration_since(Instant::now()))).await;
    }
    Ok(cycles)
}

async fn presence(plan: PresencePlan, mut stdin: Lines<BufReader<Stdin>>) -> anyhow::Result<Value> {
    let plan = Arc::new(plan);
    let counts = Arc::new(PresenceCounts::default());
    let stop = CancellationToken::new();
    let (tx, mut reports) = mpsc::channel::<anyhow::Result<Stage>>(1_024);
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut observers = JoinSet::new();
    for user in plan.observers.clone() {
        let (plan, counts, stop, gate, tx) = (
            plan.clone(),
            counts.clone(),
            stop.clone(),
            gate.clone(),
            tx.clone(),
        );
        observers.spawn(async move {
            let run = async {
                let permit = gate.acquire().await?;
                let mut ws = connect(&plan.ws_url, &plan.auth, &user).await?;
                subscribe(&mut ws, &plan.room).await?;
                drop(permit);
                tx.send(Ok(Stage::Subscribed)).await?;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        text = next_text(&mut ws) => counts.count(&text?),
                    }
                }
            };
            if let Err(e) = run.await {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    drop(tx);
    wait_all(&mut reports, plan.observers.len(), Stage::Subscribed).await?;
    // The observers' own arrivals are shown within a flush or two: let them pass first.
    settle(&counts, &mut reports, plan.settle_ms).await?;
    println!(
        "{}",
        json!({"phase": "ready", "observers": plan.observers.len()})
    );

    let mut phases = Vec::new();
    while let Some(line) = stdin.next_line().await? {
        let mut words = line.split_whitespace();
        let mode = words.next().unwrap_or_default().to_owned();
        let subscribe_too = match mode.as_str() {
            "churn" => true,
            "connect-only" => false,
            "" => continue,
            other => bail!("unknown command {other:?}"),
        };
        let n: usize = match words.next() {
            Some(n) => n.parse().context("churners")?,
            None => plan.churners.len(),
        };
        if n > plan.churners.len() {
            bail!("{n} churners asked, {} in the plan", plan.churners.len());
        }
        let (users0, changed0, other0) = (
            counts.users.load(Ordering::Relaxed),
            counts.changed.load(Ordering::Relaxed),
            counts.other.load(Ordering::Relaxed),
        );
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(plan.seconds);
        let mut churners = JoinSet::new();
        for churner in 0..n {
            let plan = plan.clone();
            churners.spawn(async move { churn_cycles(&plan, churner, subscribe_too, until).await });
        }
        let mut cycles = 0;
        while let Some(done) = churners.join_next().await {
            cycles += done??;
        }
        let seconds = start.elapsed().as_secs_f64();
        settle(&counts, &mut reports, plan.settle_ms).await?;
        let phase = json!({
            "phase": "done",
            "mode": mode,
            "churners": n,
            "seconds": (seconds * 100.0).round() / 100.0,
            "cycles": cycles,
            "changes": if subscribe_too { 2 * cycles } else { 0 },
            "presence_frames": counts.users.load(Ordering::Relaxed) - users0,
            "changed_frames": counts.changed.load(Ordering::Relaxed) - changed0,
            "other_frames": counts.other.load(Ordering::Relaxed) - other0,
        });
        println!("{phase}");
        phases.push(phase);
    }
    stop.cancel();
    while observers.join_next().await.is_some() {}
    Ok(json!({ "phases": phases }))
}

/// Waits until the observers have received nothing for `quiet_ms` (at most `ROUND_DEADLINE`);
/// an observer's failure fails the run.
async fn settle(
    counts: &PresenceCounts,
    reports: &mut mpsc::Receiver<anyhow::Result<Stage>>,
    quiet_ms: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + ROUND_DEADLINE;
    let quiet = Duration::from_millis(quiet_ms);
    let mut last = counts.total();
    let mut since = Instant::now();
    while since.elapsed() < quiet {
        if Instant::now() > deadline {
            bail!("the observers still receive frames after {ROUND_DEADLINE:?}");
        }
        tokio::select! {
            Some(Err(e)) = reports.recv() => return Err(e.context("an observer failed")),
            _ = tokio::time::sleep(quiet / 10) => {}
        }
        let now = counts.total();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    Ok(())
}
