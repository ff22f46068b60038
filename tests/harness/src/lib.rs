//! Real nats-server processes for tests: one per test, on free loopback ports, with a temporary
//! store, killed on drop. A server can be stopped and started again on the same port and store
//! (to test reconnects and recovery), and three of them can form a JetStream cluster.
//!
//! The binary is `$NATS_SERVER_BIN`, else the project-local copy that
//! `nats/install-nats-server.sh` installs, else `nats-server` on PATH. When `setpriv` is present
//! the server is started with a parent-death signal, so a test process killed by its runner does
//! not leave servers behind. That signal fires when the *thread* that started the server exits:
//! start servers from the test's own thread (the body of a `#[tokio::test]` is), not from
//! `spawn_blocking`.
#![forbid(unsafe_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod operator;
mod process;
mod proxy;

pub use operator::OperatorMode;
pub use process::{process_gone, Chatd, ExitedEarly};
pub use proxy::TcpProxy;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a server may take to answer its health check after starting.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a 3-node cluster may take to elect a JetStream meta leader with both peers current
/// (it takes 1–2 s when it works), before it is started afresh.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(20);
/// Fresh clusters started before giving up.
const CLUSTER_ATTEMPTS: usize = 3;

/// Path of the nats-server binary the tests use.
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let local = workspace_root().join(".tools/nats-server/usr/sbin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

/// The workspace root (this crate lives in `tests/harness`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// One nats-server process with JetStream enabled.
///
/// nats-server picks its own free ports at first start (`-1`) and reports them in a ports file,
/// so concurrent tests never race for a port; restarts reuse the client and cluster ports.
pub struct NatsServer {
    /// `server_name`, unique within a cluster.
    name: String,
    /// Client port; 0 until the first start, then kept across restarts.
    port: u16,
    /// HTTP monitoring port of the running process, polled for `/healthz` and `/jsz`.
    monitor_port: u16,
    /// For cluster members: the cluster's name, this node's route address, and all routes.
    cluster: Option<ClusterSpec>,
    /// Extra lines for the `jetstream { }` block.
    jetstream_extra: String,
    /// Extra top-level lines (`authorization { }`, `tls { }`).
    top_extra: String,
    /// Holds the config, the JetStream store, the ports file and the log; removed on drop.
    dir: tempfile::TempDir,
    /// The running process, if started.
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a single JetStream server on free ports and waits until it is healthy.
    pub fn start() -> NatsServer {
        NatsServer::start_with_jetstream("")
    }

    /// Like `start`, with extra lines inside the `jetstream { }` block, e.g.
    /// `sync_interval: always`.
    pub fn start_with_jetstream(extra: &str) -> NatsServer {
        let mut server = NatsServer::configure("n1", None, extra);
        server.start_again();
        server
    }

    /// Like `start`, with extra top-level configuration, e.g. an `authorization { }` or `tls { }`
    /// block (the monitoring port, which the harness polls, stays open).
    pub fn start_with_config(top: &str) -> NatsServer {
        let mut server = NatsServer::configure("n1", None, "");
        server.top_extra = top.to_owned();
        server.start_again();
        server
    }

    fn configure(name: &str, cluster: Option<ClusterSpec>, jetstream_extra: &str) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("nats-test-")
            .tempdir()
            .expect("temp dir");
        NatsServer {
            name: name.to_owned(),
            port: 0,
            monitor_port: 0,
            cluster,
            jetstream_extra: jetstream_extra.to_owned(),
            top_extra: String::new(),
            dir,
            child: None,
        }
    }

    fn write_config(&self) {
        let port_or_any = |p: u16| {
            if p == 0 {
                "-1".to_owned()
            } else {
                p.to_string()
            }
        };
        let mut config = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:-1\n\
             ports_file_dir: \"{ports}\"\n\
             jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 256MB\n  max_file_store: 8GB\n  {extra}\n}}\n",
            name = self.name,
            port = port_or_any(self.port),
            ports = self.ports_dir().display(),
            store = self.store_dir().display(),
            extra = self.jetstream_extra,
        );
        config.push_str(&self.top_extra);
        config.push('\n');
        if let Some(cluster) = &self.cluster {
            let routes: Vec<String> = cluster
                .routes
                .iter()
                .map(|r| format!("nats-route://{r}"))
                .collect();
            config.push_str(&format!(
                "cluster {{\n  name: {}\n  listen: {}\n  routes: [{}]\n}}\n",
                cluster.name,
                cluster.listen,
                routes.join(", ")
            ));
        }
        fs::write(self.dir.path().join("nats.conf"), config).expect("write nats.conf");
    }

    fn ports_dir(&self) -> PathBuf {
        self.dir.path().join("ports")
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where this server's JetStream data lives.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// The server's own log (stdout and stderr), for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// PID of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process (again) on the same ports and store, and waits until it is healthy.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "server already running");
        self.spawn();
        self.wait_healthy();
    }

    fn spawn(&mut self) {
        let _ = fs::remove_dir_all(self.ports_dir());
        fs::create_dir_all(self.ports_dir()).expect("create ports dir");
        self.write_config();
        let bin = nats_server_bin();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("open server log");
        let config = self.dir.path().join("nats.conf");
        let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "KILL"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.arg("-c").arg(&config);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}. Run `make test` (it installs nats-server >= 2.10) or set NATS_SERVER_BIN",
                bin.display()
            )
        });
        self.child = Some(child);
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        let mut ports_known = false;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "nats-server exited with {status} while starting:\n{}",
                        self.log()
                    );
                }
            }
            if !ports_known {
                ports_known = self.read_ports_file();
            }
            if ports_known
                && http_get(self.monitor_port, "/healthz").is_some_and(|(code, _)| code == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server not healthy in time:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads the ports nats-server chose from the file it writes once it listens.
    fn read_ports_file(&mut self) -> bool {
        let Some(file) = fs::read_dir(self.ports_dir()).ok().and_then(|entries| {
            entries
                .filter_map(Result::ok)
                .find(|e| e.path().extension().is_some_and(|x| x == "ports"))
        }) else {
            return false;
        };
        let Ok(ports) =
            fs::read_to_string(file.path()).map(|t| serde_json::from_str::<serde_json::Value>(&t))
        else {
            return false;
        };
        let Ok(ports) = ports else { return false };
        let port_of = |key: &str| {
            ports[key][0]
                .as_str()
                .and_then(|url| url.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
        };
        let (Some(client), Some(monitor)) = (port_of("nats"), port_of("monitoring")) else {
            return false;
        };
        self.port = client;
        self.monitor_port = monitor;
        true
    }

    /// Kills the process with SIGKILL (a crash: no shutdown work) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM (a clean shutdown) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Kills the server and starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// GET on the monitoring port; `(status, body)`.
    pub fn monitor(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.monitor_port, path)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a cluster member routes to the others.
struct ClusterSpec {
    name: String,
    /// `ip:port` this node's route listener binds.
    listen: String,
    /// `ip:port` of every member's route listener (its own included; nats-server skips it).
    routes: Vec<String>,
}

/// A random address in 127.0.0.0/8 (all of it is loopback on Linux), away from 127.0.0.1.
fn random_loopback_ip() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let r = hasher.finish().to_le_bytes();
    format!("127.{}.{}.{}", 1 + r[0] % 254, r[1], 1 + r[2] % 254)
}

/// Three JetStream servers on loopback, routed to each other.
pub struct Cluster {
    pub nodes: Vec<NatsServer>,
}

impl Cluster {
    /// Starts a 3-node cluster and waits until JetStream has a meta leader that every node
    /// knows, with both of its peers current.
    ///
    /// nats-server 2.10 sometimes bootstraps the meta group from the first two nodes that
    /// route to each other and never takes the third in as a current peer (the leader reports a
    /// cluster size of 2 for good). That is the server's start-up, not what any test exercises,
    /// so such a cluster is stopped and a fresh one (new address, new directories) started, up
    /// to `CLUSTER_ATTEMPTS` times; the last failure panics with the meta state and the logs.
    pub fn start() -> Cluster {
        let mut attempt = 1;
        loop {
            let cluster = Cluster::start_once();
            match cluster.wait_for_meta_leader() {
                Ok(()) => return cluster,
                Err(state) if attempt >= CLUSTER_ATTEMPTS => {
                    let logs: Vec<String> = cluster.nodes.iter().map(|n| n.log()).collect();
                    panic!(
                        "cluster not ready in time ({attempt} attempts); meta state {state}\nlogs:\n{}",
                        logs.join("\n----\n")
                    );
                }
                Err(state) => {
                    eprintln!(
                        "cluster not ready in time (attempt {attempt}): {state}; starting afresh"
                    );
                    attempt += 1;
                }
            }
        }
    }

    fn start_once() -> Cluster {
        // Routes listen on fixed ports of a loopback address of this cluster's own, so no other
        // test's server can take them; client and monitoring ports are picked by each server.
        let ip = random_loopback_ip();
        let routes: Vec<String> = (0..3).map(|i| format!("{ip}:{}", 6222 + i)).collect();
        let mut nodes: Vec<NatsServer> = (0..3)
            .map(|i| {
                let spec = ClusterSpec {
                    name: "test".to_owned(),
                    listen: routes[i].clone(),
                    routes: routes.clone(),
                };
                NatsServer::configure(&format!("n{}", i + 1), Some(spec), "")
            })
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        for node in &mut nodes {
            node.wait_healthy();
        }
        Cluster { nodes }
    }

    /// Waits for the meta leader (see [`Cluster::start`]); the meta state seen last if it is not
    /// there by the deadline.
    fn wait_for_meta_leader(&self) -> Result<(), String> {
        let deadline = Instant::now() + CLUSTER_DEADLINE;
        loop {
            // Every node names the same leader, and the leader (the only node that lists its
            // peers) reports both of them current.
            let metas: Vec<serde_json::Value> = self
                .nodes
                .iter()
                .filter_map(|n| n.monitor("/jsz"))
                .filter_map(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                .map(|v| v["meta_cluster"].clone())
                .collect();
            let leader = metas
                .first()
                .and_then(|m| m["leader"].as_str())
                .unwrap_or("");
            let agreed = metas.len() == self.nodes.len()
                && !leader.is_empty()
                && metas.iter().all(|m| m["leader"].as_str() == Some(leader));
            let peers_current = metas.iter().any(|m| {
                m["replicas"].as_array().is_some_and(|peers| {
                    peers.len() == self.nodes.len() - 1
                        && peers.iter().all(|p| p["current"] == true)
                })
            });
            let ready = agreed && peers_current;
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{metas:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every node's client URL, comma-separated, as async-nats accepts them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A minimal HTTP/1.0 GET against 127.0.0.1:port; `None` if nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_addr(&format!("127.0.0.1:{port}"), path)
}

/// A minimal HTTP/1.0 GET against `host:port`; `(status, body)`, or `None` if nothing answers.
pub fn http_get_addr(addr: &str, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, &[], None)
}

/// A minimal HTTP/1.0 request against `host:port` with extra headers and an optional body;
/// `(status, body)`, or `None` if nothing answers.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<(u16, String)> {
    let (code, _, body) = http_exchange(addr, method, path, headers, body)?;
    Some((code, body))
}

/// Like [`http_request`], with the response's head too: (status, head, body).
pub fn http_exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<(u16, String, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        // JSON unless the caller says otherwise.
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Some((code, head.to_owned(), body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_starts_restarts_on_the_same_port_and_dies_on_drop() {
        let mut server = NatsServer::start();
        let port = server.port();
        let pid = server.pid().unwrap();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        server.restart();
        assert_eq!(server.port(), port);
        assert_ne!(server.pid().unwrap(), pid);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        let pid = server.pid().unwrap();
        drop(server);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "server outlived its handle"
        );
    }

    #[test]
    fn three_nodes_form_a_jetstream_cluster() {
        let cluster = Cluster::start();
        let (_, body) = cluster.nodes[0].monitor("/jsz").unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["meta_cluster"]["cluster_size"], 3, "{body}");
    }
}

#[cfg(test)]
mod shipped_configs {
    use super::*;

    /// Every nats-server configuration the project ships parses (`nats-server -t`) once given
    /// its secrets, and is refused without them (none admits a client or a route without
    /// credentials).
    #[test]
    fn shipped_nats_configs_are_valid() {
        let root = workspace_root().join("nats");
        let mut configs = vec![root.join("production.conf")];
        for entry in fs::read_dir(root.join("cluster")).unwrap() {
            configs.push(entry.unwrap().path());
        }
        assert!(configs.len() >= 4);
        let secrets = [
            (
                "CHAT_NATS_NKEY",
                "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4",
            ),
            ("CHAT_NATS_ROUTE_PASSWORD", "pw"),
            ("CHAT_NATS_ROUTE_1", "nats-route://route:pw@n1:6222"),
            ("CHAT_NATS_ROUTE_2", "nats-route://route:pw@n2:6222"),
            ("CHAT_NATS_ROUTE_3", "nats-route://route:pw@n3:6222"),
        ];
        for config in configs {
            let check = || {
                let mut command = Command::new(nats_server_bin());
                command.arg("-t").arg("-c").arg(&config);
                for (name, _) in secrets {
                    command.env_remove(name);
                }
                command
            };
            let without = check().output().unwrap();
            assert!(
                !without.status.success()
                    && String::from_utf8_lossy(&without.stderr).contains("CHAT_NATS_NKEY"),
                "{} starts without the client nkey",
                config.display()
            );
            let out = check().envs(secrets).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}{}",
                config.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
