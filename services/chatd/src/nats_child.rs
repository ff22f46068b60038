//! The nats-server that `chatd run` starts for itself when `NATS_URL` is unset.
//!
//! It listens on a free loopback port, keeps its JetStream store under `<data>/nats/`, and is
//! started through `setpriv --pdeathsig TERM`, so it stops when chatd dies, even by SIGKILL.
//! The parent-death signal is tied to the thread that spawned it: start it from the main thread.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::NatsSync;

/// How long a fresh nats-server may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// The oldest nats-server that has what the room log needs.
const MIN_VERSION: (u32, u32) = (2, 10);

/// A running nats-server owned by this process.
pub struct NatsChild {
    /// The process (setpriv execs into nats-server, so this is its pid).
    child: Option<Child>,
    /// `nats://127.0.0.1:PORT`
    url: String,
    /// The server's own log file, quoted when it fails.
    log_file: PathBuf,
}

impl NatsChild {
    /// Starts nats-server with its store in `<data_dir>/nats` and waits until it accepts
    /// connections.
    pub fn start(
        data_dir: &Path,
        bin: Option<&Path>,
        sync: &NatsSync,
    ) -> anyhow::Result<NatsChild> {
        let bin = find_binary(bin)?;
        let dir = data_dir.join("nats");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolve {}", dir.display()))?;
        // nats-server picks a free port itself and reports it in the ports file: no race with
        // other processes between choosing a port and binding it.
        let ports_dir = dir.join("ports");
        let _ = fs::remove_dir_all(&ports_dir);
        fs::create_dir_all(&ports_dir)
            .with_context(|| format!("create {}", ports_dir.display()))?;
        let sync_line = match sync {
            NatsSync::Always => "  sync_interval: always\n".to_owned(),
            NatsSync::Default => String::new(),
            NatsSync::Interval(d) => format!("  sync_interval: \"{}ms\"\n", d.as_millis()),
        };
        let log_file = dir.join("nats-server.log");
        let config = format!(
            "# Written by chatd at every start; edits are overwritten.\n\
             server_name: chatd-local\n\
             listen: 127.0.0.1:-1\n\
             ports_file_dir: \"{ports}\"\n\
             pid_file: \"{pid}\"\n\
             log_file: \"{log}\"\n\
             jetstream {{\n  store_dir: \"{store}\"\n{sync_line}}}\n",
            ports = ports_dir.display(),
            pid = dir.join("nats-server.pid").display(),
            log = log_file.display(),
            store = dir.join("jetstream").display(),
        );
        let config_path = dir.join("nats.conf");
        fs::write(&config_path, config)
            .with_context(|| format!("write {}", config_path.display()))?;

        let log_start = fs::metadata(&log_file).map(|m| m.len()).unwrap_or(0);
        let mut cmd = match which_all("setpriv").into_iter().next() {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "TERM"]).arg(&bin);
                c
            }
            None => {
                tracing::warn!(
                    "setpriv not found: nats-server may outlive chatd if chatd is killed"
                );
                Command::new(&bin)
            }
        };
        cmd.arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // A process group of its own: a terminal's Ctrl-C (sent to the whole foreground group)
        // reaches chatd only, which drains through this server and then stops it. Without
        // this the server quit at once, and chatd's drain waited out its grace for it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut nats = NatsChild {
            child: Some(child),
            url: String::new(),
            log_file,
        };

        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = nats
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                nats.child = None;
                bail!(
                    "nats-server exited with {status} while starting; its log ({}):\n{}",
                    nats.log_file.display(),
                    tail(&nats.log_file, log_start)
                );
            }
            if let Some(port) = reported_port(&ports_dir) {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    nats.url = format!("nats://127.0.0.1:{port}");
                    tracing::info!(bin = %bin.display(), port, pid = nats.pid(), "started nats-server");
                    return Ok(nats);
                }
            }
            if Instant::now() > deadline {
                bail!("nats-server did not accept connections within {START_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Stops the server cleanly (SIGTERM), killing it if it takes longer than `grace`.
    pub fn stop(mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                tracing::info!("nats-server stopped");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(?grace, "nats-server did not stop in time; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for NatsChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The URL of the nats-server a running chatd started in `data_dir`, from its ports file.
pub fn running_url(data_dir: &Path) -> Option<String> {
    let port = reported_port(&data_dir.join("nats").join("ports"))?;
    Some(format!("nats://127.0.0.1:{port}"))
}

/// The client port nats-server wrote to its ports file (`{"nats":["nats://127.0.0.1:PORT"],…}`).
fn reported_port(ports_dir: &Path) -> Option<u16> {
    let file = fs::read_dir(ports_dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let ports: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(file.path()).ok()?).ok()?;
    ports["nats"][0].as_str()?.rsplit(':').next()?.parse().ok()
}

/// Every `name` on the PATH, in its order.
fn which_all(name: &str) -> Vec<PathBuf> {
    let Some(path) = std::env::var_os("PATH") else {
        return Vec::new();
    };
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .filter(|p| p.is_file())
        .collect()
}

/// Where `make run` installs a nats-server when none is on the PATH (`nats/install-nats-server.sh`),
/// relative to the project's root.
const PROJECT_LOCAL: &str = ".tools/nats-server/usr/sbin/nats-server";

/// The nats-server `make run` installed for this checkout: under the current directory, or
/// under the project that built this binary (`target/release/chatd` is two levels below it).
fn project_local() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from(PROJECT_LOCAL)];
    if let Some(root) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .and_then(Path::parent)
    {
        candidates.push(root.join(PROJECT_LOCAL));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// No usable nats-server: none found, or only ones too old. Restarting cannot fix it, so chatd
/// exits with the configuration-error status (2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoNatsServer(String);

/// `NATS_SERVER_BIN` when set; else the first nats-server new enough of those on the PATH and
/// the one `make run` installed (a distribution's older nats-server on the PATH is passed over,
/// as `nats/install-nats-server.sh` passes it over).
fn find_binary(configured: Option<&Path>) -> Result<PathBuf, NoNatsServer> {
    let candidates: Vec<PathBuf> = match configured {
        Some(bin) => vec![bin.to_path_buf()],
        None => which_all("nats-server")
            .into_iter()
            .chain(project_local())
            .collect(),
    };
    if candidates.is_empty() {
        return Err(NoNatsServer(
            "no nats-server found: set NATS_URL to use a running NATS, set NATS_SERVER_BIN, or \
             start with `make run`, which installs one"
                .into(),
        ));
    }
    let mut refused = Vec::new();
    for candidate in candidates {
        match server_version(&candidate) {
            Ok(found) if found >= MIN_VERSION => return Ok(candidate),
            Ok(found) => refused.push(format!(
                "{} is version {}.{}",
                candidate.display(),
                found.0,
                found.1
            )),
            Err(e) => refused.push(format!("{}: {e}", candidate.display())),
        }
    }
    Err(NoNatsServer(format!(
        "{}; nats-server {}.{} or newer is needed (`bash nats/install-nats-server.sh` installs \
         one and prints its path, for NATS_SERVER_BIN)",
        refused.join("; "),
        MIN_VERSION.0,
        MIN_VERSION.1
    )))
}

/// The (major, minor) version a nats-server binary reports.
fn server_version(bin: &Path) -> Result<(u32, u32), String> {
    let output = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let version = text
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|t| t.matches('.').count() >= 1 && !t.starts_with('.'))
        .unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
}

/// What the log file gained since `from` (at most the last 4 KiB of it).
fn tail(path: &Path, from: u64) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return "(no log)".to_owned();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(4096));
    let mut text = String::new();
    let _ = file
        .seek(SeekFrom::Start(start))
        .and_then(|_| file.read_to_string(&mut text));
    text
}
