//! `make bench`: each benchmark measures our code and a baseline doing the same work with raw
//! async-nats, in the same run, interleaved, on the same nats-server; it prints one JSON line per
//! result with the ratio. Absolute numbers move with the machine's load; ratios much less.
//!
//! Usage: `chat-bench [--quick] [NAME…]` (names: room_log_append, room_log_append_latency,
//! room_log_read, room_log_read_bulk, room_log_append_sync_always, projection_throughput, history_page_reads,
//! room_list_reads, projection_lag, edge_send_ack, edge_fanout, edge_latency, edge_idle_memory,
//! presence_churn). `edge_fanout` also prints `edge_fanout_saturated`.
//!
//! The edge benchmarks run the chatd release binary and drive it from this same binary started
//! again as a load generator (`chat-bench loadgen`, plan on stdin) and, for the fan-out
//! baseline, as a bare broadcast server (`chat-bench broadcast-server`); see [`edge`].

mod broadcast;
mod edge;
mod loadgen;
mod projection;

use std::time::{Duration, Instant};

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::HeaderMap;
use bytes::Bytes;
use chat_harness::NatsServer;
use chat_log::{LogConfig, RoomLog};
use chat_model::{Event, EventBody, RoomId, UserId};
use futures::StreamExt;
use serde_json::json;

/// Appends in flight for the pipelined benchmark.
const IN_FLIGHT: usize = 256;
/// Interleaved rounds of ours and baseline; the median round is reported.
const ROUNDS: usize = 7;

struct Sizes {
    pipelined: usize,
    sequential: usize,
    read: usize,
    /// Events per round with fsync on every write (a few thousand writes/s at best).
    durable: usize,
}

/// ~200 bytes of text, as in the measured facts of the architecture notes (nothing in it needs
/// escaping in JSON).
fn message_text(i: usize) -> String {
    format!("{i:08} {}", "lorem ipsum dolor sit amet ".repeat(7))
}

fn event(i: usize) -> Event {
    let text = message_text(i);
    Event {
        id: uuid::Uuid::new_v4(),
        user: UserId::parse("bench-user").unwrap(),
        ts: 1_763_900_000_000,
        body: EventBody::Message {
            text,
            thread: None,
            reply_to: None,
        },
    }
}

/// CPU time a process has used, user and system, in seconds (`/proc/<pid>/stat`).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
        panic!("no CPU times for process {pid}");
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (utime + stime) / hz
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1e6
}

fn emit(bench: &str, ours: f64, baseline: f64, unit: &str, extra: serde_json::Value) {
    let ratio = ours / baseline;
    let mut line = json!({
        "bench": bench,
        "ours": (ours * 100.0).round() / 100.0,
        "baseline": (baseline * 100.0).round() / 100.0,
        "ratio": (ratio * 1000.0).round() / 1000.0,
        "unit": unit,
    });
    if let (Some(line), Some(extra)) = (line.as_object_mut(), extra.as_object()) {
        line.extend(extra.clone());
    }
    println!("{line}");
}

struct Bench {
    log: RoomLog,
    raw: async_nats::jetstream::Context,
    next_room: usize,
}

impl Bench {
    /// A fresh room (its stream created through the room log, so both sides publish to
    /// identical streams).
    async fn room(&mut self) -> RoomId {
        self.next_room += 1;
        let room = RoomId::parse(format!("bench-{}", self.next_room)).unwrap();
        self.log.ensure_room(&room).await.unwrap();
        room
    }

    /// The raw side: the same bytes, the same `Nats-Msg-Id`, straight through async-nats.
    async fn raw_append(&self, subject: &str, id: &str, payload: Bytes) -> u64 {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, id);
        let ack = self
            .raw
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .unwrap();
        ack.await.unwrap().sequence
    }

    /// Pipelined appends through the room log (events encoded on the way in); msg/s.
    async fn ours_pipelined(&mut self, n: usize) -> f64 {
        let room = self.room().await;
        let events: Vec<Event> = (0..n).map(event).collect();
        let log = self.log.clone();
        let start = Instant::now();
        futures::stream::iter(events.iter())
            .map(|e| log.append(&room, e))
            .buffer_unordered(IN_FLIGHT)
            .for_each(|r| async move {
                r.unwrap();
            })
            .await;
        n as f64 / start.elapsed().as_secs_f64()
    }

    /// The same payloads, pre-encoded, published raw with the same window; msg/s.
    async fn raw_pipelined(&mut self, n: usize) -> f64 {
        let room = self.room().await;
        let subject = self.log.config().room_subject(&room);
        let payloads: Vec<(String, Bytes)> = (0..n)
            .map(event)
            .map(|e| (e.id.to_string(), Bytes::from(e.encode().unwrap())))
            .collect();
        let this = &*self;
        let start = Instant::now();
        futures::stream::iter(payloads)
            .map(|(id, payload)| {
                let subject = &subject;
                async move { this.raw_append(subject, &id, payload).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .for_each(|_| async {})
            .await;
        n as f64 / start.elapsed().as_secs_f64()
    }

    async fn append_throughput(&mut self, n: usize) {
        self.append_throughput_named("room_log_append", n).await;
    }

    async fn append_throughput_named(&mut self, name: &str, n: usize) {
        let (mut ours, mut baseline) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            // Alternate which side goes first, so neither always meets a warmer server.
            if round % 2 == 0 {
                ours.push(self.ours_pipelined(n).await);
                baseline.push(self.raw_pipelined(n).await);
            } else {
                baseline.push(self.raw_pipelined(n).await);
                ours.push(self.ours_pipelined(n).await);
            }
        }
        emit(
            name,
            median(ours),
            median(baseline),
            "msg/s",
            json!({ "in_flight": IN_FLIGHT, "events_per_round": n, "rounds": ROUNDS }),
        );
    }

    /// One append at a time, ours and raw alternating append by append (the order flipped every
    /// pair), so both sides sample the same moments of a noisy machine.
    async fn append_latency(&mut self, pairs: usize) {
        let ours_room = self.room().await;
        let raw_room = self.room().await;
        let raw_subject = self.log.config().room_subject(&raw_room);
        let (mut ours, mut raw) = (Vec::with_capacity(pairs), Vec::with_capacity(pairs));
        for i in 0..pairs {
            let ours_event = event(i);
            let raw_event = event(i);
            let raw_id = raw_event.id.to_string();
            let raw_payload = Bytes::from(raw_event.encode().unwrap());
            let ours_first = i % 2 == 0;
            if !ours_first {
                let start = Instant::now();
                self.raw_append(&raw_subject, &raw_id, raw_payload.clone())
                    .await;
                raw.push(start.elapsed());
            }
            let start = Instant::now();
            self.log.append(&ours_room, &ours_event).await.unwrap();
            ours.push(start.elapsed());
            if ours_first {
                let start = Instant::now();
                self.raw_append(&raw_subject, &raw_id, raw_payload).await;
                raw.push(start.elapsed());
            }
        }
        ours.sort();
        raw.sort();
        for (name, p) in [
            ("room_log_append_latency_p50", 0.5),
            ("room_log_append_latency_p99", 0.99),
        ] {
            emit(
                name,
                percentile(&ours, p),
                percentile(&raw, p),
                "us",
                json!({
                    "in_flight": 1, "samples_per_side": pairs,
                    "note": "ours encodes the event inside the timed call; sides alternate per append",
                }),
            );
        }
    }

    /// Reads `1..=n` through the room log; msg/s.
    async fn ours_read(&self, room: &RoomId, n: usize) -> f64 {
        let start = Instant::now();
        let mut reader = self.log.read_range(room, 1, n as u64);
        let mut count = 0;
        while let Some(entry) = reader.next().await {
            entry.unwrap();
            count += 1;
        }
        assert_eq!(count, n);
        n as f64 / start.elapsed().as_secs_f64()
    }

    /// Reads `n` events with a raw ordered consumer from the start; msg/s.
    async fn raw_read(&self, room: &RoomId, n: usize) -> f64 {
        let start = Instant::now();
        let stream = self
            .raw
            .get_stream_no_info(self.log.config().stream_name(room))
            .await
            .unwrap();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        for _ in 0..n {
            messages.next().await.unwrap().unwrap();
        }
        n as f64 / start.elapsed().as_secs_f64()
    }

    /// A fresh room holding `n` messages, appended pipelined.
    async fn filled_room(&mut self, n: usize) -> RoomId {
        let room = self.room().await;
        let events: Vec<Event> = (0..n).map(event).collect();
        futures::stream::iter(events.iter())
            .map(|e| self.log.append(&room, e))
            .buffer_unordered(IN_FLIGHT)
            .for_each(|r| async move {
                r.unwrap();
            })
            .await;
        room
    }

    async fn read_throughput(&mut self, n: usize) {
        let room = self.filled_room(n).await;
        let (mut ours, mut baseline) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            if round % 2 == 0 {
                ours.push(self.ours_read(&room, n).await);
                baseline.push(self.raw_read(&room, n).await);
            } else {
                baseline.push(self.raw_read(&room, n).await);
                ours.push(self.ours_read(&room, n).await);
            }
        }
        emit(
            "room_log_read",
            median(ours),
            median(baseline),
            "msg/s",
            json!({ "events": n, "rounds": ROUNDS }),
        );
    }

    /// Bulk range reads (the projector's catch-up, rebuilds, exports), decoded, on their own
    /// connection (decision 0008) against the same reads through the client library
    /// (`plain`, bulk reads on its own connection turned off); events/s and this process's CPU
    /// per event for each.
    async fn bulk_read(&mut self, plain: &RoomLog, n: usize) {
        let room = self.filled_room(n).await;
        let read = |log: RoomLog, room: RoomId| async move {
            let (cpu, start) = (process_cpu_s(), Instant::now());
            let mut reader = log.read_range(&room, 1, u64::MAX).bulk();
            let mut count = 0;
            while let Some(entry) = reader.next().await {
                entry.unwrap().decode().unwrap();
                count += 1;
            }
            assert_eq!(count, n);
            let elapsed = start.elapsed().as_secs_f64();
            (n as f64 / elapsed, (process_cpu_s() - cpu) / n as f64 * 1e6)
        };
        let (mut ours, mut baseline) = (Vec::new(), Vec::new());
        let wire_reads = self.log.wire_reads();
        for round in 0..ROUNDS {
            if round % 2 == 0 {
                ours.push(read(self.log.clone(), room.clone()).await);
                baseline.push(read(plain.clone(), room.clone()).await);
            } else {
                baseline.push(read(plain.clone(), room.clone()).await);
                ours.push(read(self.log.clone(), room.clone()).await);
            }
        }
        assert_eq!(self.log.wire_reads() - wire_reads, ROUNDS as u64);
        assert_eq!(plain.wire_reads(), 0);
        let rate = |xs: &[(f64, f64)]| median(xs.iter().map(|x| x.0).collect());
        let cpu =
            |xs: &[(f64, f64)]| (median(xs.iter().map(|x| x.1).collect()) * 100.0).round() / 100.0;
        emit(
            "room_log_read_bulk",
            rate(&ours),
            rate(&baseline),
            "msg/s",
            json!({
                "events": n, "rounds": ROUNDS,
                "baseline_is": "the same bulk reads through the client library",
                "cpu_us_per_event": cpu(&ours),
                "baseline_cpu_us_per_event": cpu(&baseline),
            }),
        );
    }
}

/// CPU time this process has used (user and system), seconds.
fn process_cpu_s() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else {
        return 0.0;
    };
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(usage.user_time()) + secs(usage.system_time())
}

#[tokio::main]
async fn main() {
    // Raised here, so every child (chatd, the load generator, nats-server) inherits it.
    let fd_limit = edge::raise_fd_limit();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // The helper processes of the edge benchmarks.
    match args.first().map(String::as_str) {
        Some("loadgen") => return exit_on_error("loadgen", loadgen::main().await),
        Some("broadcast-server") => {
            return exit_on_error("broadcast-server", broadcast::serve(&args[1..]).await)
        }
        _ => {}
    }
    let quick = args.iter().any(|a| a == "--quick");
    args.retain(|a| a != "--quick");
    let wanted = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    let sizes = if quick {
        Sizes {
            pipelined: 5_000,
            sequential: 1_000,
            read: 5_000,
            durable: 1_000,
        }
    } else {
        Sizes {
            pipelined: 50_000,
            sequential: 15_000,
            read: 100_000,
            durable: 10_000,
        }
    };

    let server = NatsServer::start();
    eprintln!(
        "bench: nats-server {} at {}, {} cores, {}",
        chat_harness::nats_server_bin().display(),
        server.url(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        if quick { "quick sizes" } else { "full sizes" }
    );
    let log = RoomLog::connect(&server.url(), LogConfig::default())
        .await
        .unwrap();
    let raw_client = async_nats::connect(server.url()).await.unwrap();
    let raw = async_nats::jetstream::new(raw_client);
    let mut bench = Bench {
        log,
        raw,
        next_room: 0,
    };

    if wanted("room_log_append") {
        bench.append_throughput(sizes.pipelined).await;
    }
    if wanted("room_log_append_latency") {
        bench.append_latency(sizes.sequential).await;
    }
    if wanted("room_log_read") {
        bench.read_throughput(sizes.read).await;
    }
    if wanted("room_log_read_bulk") {
        let plain = RoomLog::connect(&server.url(), LogConfig::default())
            .await
            .expect("connect the room log");
        plain.set_bulk_read_auth(None);
        bench.bulk_read(&plain, sizes.read).await;
    }

    // The projection benchmarks project every room their log holds, so each gets a log of its
    // own (its own prefix on the same server): the rooms the benchmarks above filled would
    // otherwise be caught up alongside, and counted against the one room measured.
    let own_log = |prefix: &str| {
        let (url, config) = (
            server.url(),
            LogConfig {
                prefix: prefix.to_owned(),
                ..LogConfig::default()
            },
        );
        async move { RoomLog::connect(&url, config).await }
    };
    if wanted("projection_throughput") {
        let log = own_log("bench-projection").await.unwrap();
        projection::projection_throughput(&log, sizes.pipelined).await;
    }
    if wanted("history_page_reads") {
        projection::history_reads(if quick { 500 } else { 5_000 }).await;
    }
    if wanted("room_list_reads") {
        if quick {
            projection::room_list_reads(50, 200, 20).await;
        } else {
            projection::room_list_reads(200, 2_000, 50).await;
        }
    }
    if wanted("projection_lag") {
        // Half of what this machine sustains right now, measured just before.
        let max_rate = bench.ours_pipelined(sizes.pipelined / 2).await;
        let log = own_log("bench-lag").await.unwrap();
        projection::projection_lag(&log, max_rate, sizes.pipelined / 2).await;
    }

    // The production setting: every write fsynced before its ack. Same comparison, its own
    // server; the absolute numbers are the durability cost, stated beside the default's.
    if wanted("room_log_append_sync_always") {
        let durable = NatsServer::start_with_jetstream("sync_interval: always");
        let log = RoomLog::connect(&durable.url(), LogConfig::default())
            .await
            .unwrap();
        let raw = async_nats::jetstream::new(async_nats::connect(durable.url()).await.unwrap());
        let mut bench = Bench {
            log,
            raw,
            next_room: 0,
        };
        bench
            .append_throughput_named("room_log_append_sync_always", sizes.durable)
            .await;
    }
    // The server lives until every benchmark is done.
    drop(server);

    // Edge benchmarks: each starts its own nats-server and chatd.
    let edge_names = [
        "edge_send_ack",
        "edge_fanout",
        "edge_latency",
        "edge_idle_memory",
        "presence_churn",
    ];
    if edge_names.iter().any(|name| wanted(name)) {
        let chatd = edge::chatd_bin();
        let sizes = edge::EdgeSizes::new(quick);
        let mut max_send_rate = None;
        if wanted("edge_send_ack") {
            max_send_rate = Some(edge::send_ack(&chatd, &sizes).await);
        }
        if wanted("edge_fanout") {
            edge::fanout(&chatd, &sizes).await;
        }
        if wanted("edge_latency") {
            edge::latency(&chatd, &sizes, max_send_rate).await;
        }
        if wanted("edge_idle_memory") {
            edge::idle_memory(&chatd, &sizes, fd_limit).await;
        }
        if wanted("presence_churn") {
            edge::presence_churn(&chatd, &sizes).await;
        }
    }
}

/// Ends a helper process: status 1 with the error on stderr if it failed.
fn exit_on_error(what: &str, result: anyhow::Result<()>) {
    if let Err(e) = result {
        eprintln!("chat-bench {what}: {e:#}");
        std::process::exit(1);
    }
}
