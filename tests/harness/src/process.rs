//! The project's own binary as a child process: started with an environment, read until its
//! `ready` line, signalled or killed, and reaped on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a chatd may take to print its ready line (a cold JetStream included).
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// The process exited (or closed stdout) before printing its ready line.
#[derive(Debug)]
pub struct ExitedEarly {
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

/// A running `chatd` (or any binary that prints `ready http=http://ADDR ws=…`).
pub struct Chatd {
    child: Option<Child>,
    /// `host:port` from the ready line.
    http_addr: String,
    /// `host:port` from an `ops http=http://ADDR` line before it (`CHAT_OPS_LISTEN`).
    ops_addr: Option<String>,
    /// Captured stderr (the process's logs), for failure messages.
    stderr_path: PathBuf,
    /// Keeps the stderr file's directory alive.
    _logs: tempfile::TempDir,
}

impl Chatd {
    /// Starts `bin args…` with `env` added to a clean copy of this environment and waits for its
    /// ready line. Panics with the process's logs if it does not get ready.
    pub fn start(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Chatd {
        Chatd::try_start(bin, args, env).unwrap_or_else(|e| {
            panic!(
                "{} did not get ready (exit {:?}); its stderr:\n{}",
                bin.display(),
                e.status,
                e.stderr
            )
        })
    }

    /// Like `start`, but returns how it failed instead of panicking.
    pub fn try_start(
        bin: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Chatd, ExitedEarly> {
        let logs = tempfile::Builder::new()
            .prefix("chatd-logs-")
            .tempdir()
            .expect("temp dir");
        let stderr_path = logs.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        // Its own process group, as a shell job is: see [`Chatd::signal_group`].
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        for var in [
            "NATS_URL",
            "CHAT_ROLE",
            "CHAT_STORE",
            "CHAT_JWT_HS256_SECRET",
            "CHAT_JWT_PUBLIC_KEYS",
        ] {
            cmd.env_remove(var);
        }
        // NATS credentials and TLS settings of the caller's environment (`NATS_USER`, …).
        for (var, _) in std::env::vars_os() {
            let name = var.to_string_lossy();
            if name.starts_with("NATS_") && name != "NATS_SERVER_BIN" {
                cmd.env_remove(&var);
            }
        }
        cmd.env("CHAT_LOG", "info,async_nats=warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("stdout");

        // Read stdout on a thread so the deadline holds even if the process says nothing.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + READY_DEADLINE;
        let read_stderr = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let mut ops_addr = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("ops http=http://") {
                        ops_addr = Some(addr.trim().to_owned());
                    }
                    if let Some(addr) = line
                        .strip_prefix("ready http=http://")
                        .and_then(|rest| rest.split_whitespace().next())
                    {
                        return Ok(Chatd {
                            child: Some(child),
                            http_addr: addr.to_owned(),
                            ops_addr,
                            stderr_path,
                            _logs: logs,
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if left > Duration::ZERO => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(ExitedEarly {
                            status: Some(status),
                            stderr: read_stderr(&stderr_path),
                        });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    return Err(ExitedEarly {
                        status,
                        stderr: read_stderr(&stderr_path),
                    });
                }
            }
        }
    }

    /// `host:port` of its HTTP listener.
    pub fn http_addr(&self) -> &str {
        &self.http_addr
    }

    /// `host:port` of its operations listener, if it has one (`CHAT_OPS_LISTEN`).
    pub fn ops_addr(&self) -> Option<&str> {
        self.ops_addr.as_deref()
    }

    /// `ws://host:port/v1/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.http_addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("process running")
    }

    /// GET `path`; `(status, body)`.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        crate::http_get_addr(&self.http_addr, path)
    }

    /// The process's logs so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.pid() as i32), signal);
    }

    /// Sends `signal` to the process and every process of its group, as a terminal's Ctrl-C
    /// reaches a foreground job.
    pub fn signal_group(&self, signal: Signal) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.pid() as i32), signal);
    }

    /// Waits for the process to exit, up to `deadline`; `None` if it is still running.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + deadline;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Chatd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a process is gone (or a zombie nobody reaped, which is as good as gone).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}
