//! The fan-out baseline: a bare WebSocket broadcast server (`chat-bench broadcast-server`), run
//! as a process of its own like chatd and driven by the same client code.
//!
//! It does the least a chat server's fan-out must do and nothing else: no tokens checked, no log,
//! no persistence, no JSON parsing. It accepts WebSocket upgrades (selecting `chat.v1`, as a
//! client offering it expects), greets with a minimal `welcome`, answers `subscribe` with
//! `subscribed`, and broadcasts every other text frame of the designated sender (the connection
//! whose URL query says `role=sender`) verbatim to every connection, the sender included. Each
//! connection's writer writes whatever is queued for it and then flushes once, the cheapest way
//! tungstenite offers. Prints `ready http=http://ADDR ws=ws://ADDR/v1/ws` like chatd, so the
//! harness starts it the same way.
//!
//! `--read-buffer BYTES` sets tungstenite's per-connection read buffer (default 128 KiB, which
//! tungstenite zero-fills on the first read, so it is resident for every open connection): the
//! idle-memory benchmark uses it to show what that buffer alone costs.

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames the broadcast channel holds for a connection that is behind. The benchmark's sender
/// paces itself by its own echoes, so no connection should ever fall this far behind; one that
/// does is dropped (its client then fails the run rather than report a rate with losses).
const CAPACITY: usize = 65_536;

const WELCOME: &str = r#"{"type":"welcome","user":"","rooms":[]}"#;
const SUBSCRIBED: &str = r#"{"type":"subscribed","rid":"s"}"#;

/// Entry point of `chat-bench broadcast-server [--read-buffer BYTES]`: serves until killed.
pub async fn serve(args: &[String]) -> anyhow::Result<()> {
    let mut config = WebSocketConfig::default();
    match args {
        [] => {}
        [flag, bytes] if flag == "--read-buffer" => {
            config = config.read_buffer_size(bytes.parse()?);
        }
        other => anyhow::bail!("unexpected arguments {other:?} (--read-buffer BYTES)"),
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, _) = broadcast::channel::<Utf8Bytes>(CAPACITY);
    println!("ready http=http://{addr} ws=ws://{addr}/v1/ws");
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(connection(stream, tx.clone(), config));
    }
}

// The handshake callback's error type is tungstenite's (an HTTP response), and it never fails.
#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream, tx: broadcast::Sender<Utf8Bytes>, config: WebSocketConfig) {
    let mut is_sender = false;
    let handshake = |request: &Request, mut response: Response| {
        is_sender = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "role=sender"));
        response.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("chat.v1"),
        );
        Ok::<_, ErrorResponse>(response)
    };
    let accepted =
        tokio_tungstenite::accept_hdr_async_with_config(stream, handshake, Some(config)).await;
    let Ok(ws) = accepted else {
        return;
    };
    // Subscribe before greeting, so nothing sent after the greeting is missed.
    let mut rx = tx.subscribe();
    let (mut sink, mut stream) = ws.split();
    if sink.send(Message::text(WELCOME)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            frame = rx.recv() => match frame {
                Ok(text) => {
                    if sink.feed(Message::Text(text)).await.is_err() {
                        return;
                    }
                    while let Ok(text) = rx.try_recv() {
                        if sink.feed(Message::Text(text)).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    eprintln!("broadcast-server: a connection fell {n} frames behind; dropped");
                    return;
                }
                Err(RecvError::Closed) => return,
            },
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if text.contains(r#""type":"subscribe""#) {
                        if sink.send(Message::text(SUBSCRIBED)).await.is_err() {
                            return;
                        }
                    } else if is_sender {
                        let _ = tx.send(text);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}
