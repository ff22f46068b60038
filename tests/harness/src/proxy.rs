//! A TCP proxy on loopback that a test can cut: while cut it refuses new connections and drops
//! (not delays) everything the server sends, so a client behind it loses messages for real.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Forwards connections from its own port to `upstream`.
pub struct TcpProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Bytes from the server thrown away while cut.
    dropped: Arc<AtomicU64>,
    /// The accept loop and every connection's copy loops; aborted on drop.
    _tasks: JoinSet<()>,
}

impl TcpProxy {
    /// Starts a proxy on 127.0.0.1 to `upstream` (`host:port`). Needs a Tokio runtime.
    pub async fn start(upstream: String) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cut = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        let cut_accept = cut.clone();
        let dropped_pipe = dropped.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                if cut_accept.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                connections.spawn(pipe(
                    client,
                    server,
                    cut_accept.clone(),
                    dropped_pipe.clone(),
                ));
            }
        });
        TcpProxy {
            addr,
            cut,
            dropped,
            _tasks: tasks,
        }
    }

    /// `nats://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Refuse new connections and drop what servers send on existing ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// How many bytes from servers were thrown away while cut.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Forward normally again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

async fn pipe(client: TcpStream, server: TcpStream, cut: Arc<AtomicBool>, dropped: Arc<AtomicU64>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if cut.load(Ordering::SeqCst) {
                        dropped.fetch_add(n as u64, Ordering::SeqCst);
                        continue; // lost on the way
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    // When either side ends, the whole connection ends (as a broken link would).
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}
