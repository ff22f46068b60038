//! The WebSocket upgrade, and the socket a session reads and writes.
//!
//! The edge upgrades connections itself rather than through axum's extractor so that it can
//! split the socket its own way: tungstenite parses what the client sends ([`ReadSide`]), and
//! the session's writer encodes what goes out ([`FrameWriter`], with [`crate::frame`]): an event
//! is framed once for every session, and the frames a session writes between two flushes are
//! gathered (one write call for a batch) in a buffer the connection holds only from its first
//! frame to the flush: buffers are kept between flushes by each worker thread, for the next
//! connection that writes. An idle connection holds no write buffer at all. What tungstenite
//! writes by itself (pongs, the reply to a client's close frame) reaches the socket through the
//! writer ([`Control`]).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use futures::task::AtomicWaker;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::frame::{self, Framed};

/// What a session reads: the client's frames, parsed by tungstenite.
pub(crate) type WsRead = WebSocketStream<ReadSide<TokioIo<Upgraded>>>;

/// Bytes a writer gathers before it writes them out (a batch stops there).
pub(crate) const GATHER: usize = 16 * 1024;

/// Spare gathering buffers kept per worker thread, at most.
const SPARE_BUFFERS: usize = 16;

/// A gathering buffer that grew past this (a large frame) is freed after its flush, not kept.
const SPARE_CAPACITY: usize = 64 * 1024;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A gathering buffer: a spare one of this thread's, or a new one.
fn gathering_buffer() -> Vec<u8> {
    SPARE
        .try_with(|spare| spare.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity(GATHER))
}

/// Keeps a flushed buffer for the next connection that writes on this thread (unless enough
/// are kept, or it is too big to keep).
fn give_back(mut buffer: Vec<u8>) {
    if buffer.capacity() > SPARE_CAPACITY {
        return;
    }
    buffer.clear();
    let _ = SPARE.try_with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARE_BUFFERS {
            spare.push(buffer);
        }
    });
}

/// An upgrade request, checked as RFC 6455 asks (HTTP/1.1 only: the edge serves no HTTP/2
/// WebSockets).
pub(crate) struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    /// The subprotocols the client offered, in its order.
    offered: Vec<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // In the errors' JSON shape, as every other answer.
        let refuse =
            |status: StatusCode, message: &str| crate::http_error(status, "bad_request", message);
        // Not reached while chatd serves HTTP/1 only (an HTTP/2 client is disconnected by the
        // HTTP layer); kept so that enabling HTTP/2 cannot break upgrades silently.
        if parts.version > Version::HTTP_11 {
            return Err(refuse(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "WebSockets are served over HTTP/1.1",
            ));
        }
        if parts.method != Method::GET {
            // Reached by HEAD (the router serves it with GET): an upgrade needs GET itself.
            let mut response = refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket upgrade is a GET request",
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            return Err(response);
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Connection header did not include 'upgrade'",
            ));
        }
        if !header_is(&parts.headers, header::UPGRADE, "websocket") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "`Upgrade` header did not include 'websocket'",
            ));
        }
        if !header_is(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header did not include '13'",
            ));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` header missing",
            ));
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            ));
        };
        let offered = parts
            .headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        Ok(Upgrade {
            key,
            on_upgrade,
            offered,
        })
    }
}

impl Upgrade {
    /// The subprotocols the client offered.
    pub(crate) fn offered(&self) -> &[String] {
        &self.offered
    }

    /// Answers 101 (selecting `protocol` if the client offered it) and runs `session` on the
    /// socket once the connection is upgraded. `config`'s write buffer is ignored: the socket
    /// writes through [`FrameWriter`], which gathers.
    pub(crate) fn on_upgrade<F, Fut>(
        self,
        protocol: &'static str,
        config: WebSocketConfig,
        session: F,
    ) -> Response
    where
        F: FnOnce(Connection) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let selected = self.offered.iter().any(|p| p == protocol);
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "websocket upgrade failed");
                    return;
                }
            };
            let socket = Connection::new(TokioIo::new(upgraded), config).await;
            session(socket).await;
        });
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let mut response = (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
            ],
        )
            .into_response();
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            response
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        if selected {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
        }
        response
    }
}

/// Whether the header's comma-separated tokens include `token` (any case).
fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Whether the header is `value` (any case).
fn header_is(headers: &HeaderMap, name: HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

/// What the read side's WebSocket layer writes by itself (pongs, the reply to a client's close
/// frame), handed to the session's writer, which puts it on the socket between its own frames.
#[derive(Default)]
pub(crate) struct Control {
    state: Mutex<ControlState>,
    /// Set when bytes are waiting (the writer clears it when it takes them).
    pending: AtomicBool,
    /// The writer's waker, woken when bytes are waiting.
    waker: AtomicWaker,
}

#[derive(Default)]
struct ControlState {
    bytes: Vec<u8>,
    /// A close frame went out: nothing the WebSocket layer writes is sent any more.
    closed: bool,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        // Bytes and a flag: nothing a panicking holder could leave half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready when the WebSocket layer has written something (which
    /// [`FrameWriter::take_control`] then takes); registers the task to be woken otherwise.
    pub(crate) fn poll_pending(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.pending.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.pending.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Pongs waiting beyond this are dropped: RFC 6455 lets an endpoint answer only the latest of
/// several pings, and a client pinging without reading must not grow the session's memory.
const MAX_CONTROL: usize = 4 * 1024;

/// The read side of a session's socket, under tungstenite: reads go to the socket; writes (the
/// pongs and close replies tungstenite makes) go to [`Control`], whole frames at a time (the
/// WebSocket layer writes through, and this takes every write whole).
pub(crate) struct ReadSide<T> {
    io: ReadHalf<T>,
    control: Arc<Control>,
}

impl<T: AsyncRead> AsyncRead for ReadSide<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T> AsyncWrite for ReadSide<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let control = &self.control;
        let mut state = control.lock();
        let is_close = frame::walk(buf).any(|(opcode, _)| opcode == frame::OP_CLOSE);
        if !state.closed && (is_close || state.bytes.len() < MAX_CONTROL) {
            state.bytes.extend_from_slice(buf);
            drop(state);
            control.pending.store(true, Ordering::Release);
            control.waker.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The write side of a session's socket: frames are encoded into a gathering buffer (events
/// arrive already framed, see [`Framed`]) and written out at a flush, one write call for a
/// batch. The buffer is held only from the first frame to the flush: buffers are kept between
/// flushes by each worker thread, for the next connection that writes, so an idle connection
/// holds no write buffer at all, whatever it once sent.
pub(crate) struct FrameWriter<T = TokioIo<Upgraded>> {
    io: WriteHalf<T>,
    out: Vec<u8>,
    /// How much of `out` is written.
    written: usize,
    control: Arc<Control>,
    /// A close frame is in `out` (ours, or the reply to the client's): nothing more is added.
    closed: bool,
}

impl<T: AsyncWrite> FrameWriter<T> {
    fn buffer(&mut self) -> Option<&mut Vec<u8>> {
        if self.closed {
            return None;
        }
        if self.out.capacity() == 0 {
            self.out = gathering_buffer();
        }
        Some(&mut self.out)
    }

    /// Adds a text frame carrying `payload`.
    pub(crate) fn text(&mut self, payload: &str) {
        if let Some(out) = self.buffer() {
            frame::put_header(out, frame::OP_TEXT, payload.len());
            out.extend_from_slice(payload.as_bytes());
        }
    }

    /// Adds a frame encoded once for every session that sends it.
    pub(crate) fn framed(&mut self, frame: &Framed) {
        if let Some(out) = self.buffer() {
            out.extend_from_slice(frame.bytes());
        }
    }

    /// Adds a ping without a payload.
    pub(crate) fn ping(&mut self) {
        if let Some(out) = self.buffer() {
            frame::put_header(out, frame::OP_PING, 0);
        }
    }

    /// Adds a close frame (unless one is already there); nothing is added after it, and the
    /// WebSocket layer's reply to the client's close frame is no longer sent.
    pub(crate) fn close(&mut self, code: u16, reason: &str) {
        self.control.lock().closed = true;
        if let Some(out) = self.buffer() {
            frame::put_close(out, code, reason);
            self.closed = true;
        }
    }

    /// Adds a close frame without a code, unless one is there already.
    pub(crate) fn close_without_code(&mut self) {
        self.control.lock().closed = true;
        if let Some(out) = self.buffer() {
            frame::put_header(out, frame::OP_CLOSE, 0);
            self.closed = true;
        }
    }

    /// Whether a close frame went out (or waits to): the writer has nothing more to send.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Adds what the WebSocket layer wrote (pongs, the reply to the client's close frame).
    pub(crate) fn take_control(&mut self) {
        if !self.control.pending.swap(false, Ordering::AcqRel) {
            return;
        }
        let bytes = {
            let mut state = self.control.lock();
            if self.closed {
                state.closed = true;
            }
            std::mem::take(&mut state.bytes)
        };
        let has_close = frame::walk(&bytes).any(|(opcode, _)| opcode == frame::OP_CLOSE);
        if let Some(out) = self.buffer() {
            out.extend_from_slice(&bytes);
            if has_close {
                self.control.lock().closed = true;
                self.closed = true;
            }
        }
    }

    /// Where the WebSocket layer's writes wait (see [`Control::poll_pending`]).
    pub(crate) fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Bytes added and not yet written out.
    pub(crate) fn gathered(&self) -> usize {
        self.out.len() - self.written
    }

    /// Writes out what is gathered, and gives the buffer back.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        if self.out.capacity() > 0 {
            give_back(std::mem::take(&mut self.out));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// [`FrameWriter::poll_flush`] as a future.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }
}

/// A session's socket: tungstenite reads it ([`WsRead`]), the session's writer writes it.
pub(crate) struct Connection<T = TokioIo<Upgraded>> {
    pub read: WebSocketStream<ReadSide<T>>,
    pub write: FrameWriter<T>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Connection<T> {
    /// The two sides of `io`, already upgraded to a WebSocket, as the server's.
    pub(crate) async fn new(io: T, config: WebSocketConfig) -> Connection<T> {
        let (read, write) = tokio::io::split(io);
        let control = Arc::new(Control::default());
        let read = ReadSide {
            io: read,
            control: control.clone(),
        };
        // tungstenite writes through to `ReadSide`, which takes every write whole.
        let config = config.write_buffer_size(0);
        Connection {
            read: WebSocketStream::from_raw_socket(read, Role::Server, Some(config)).await,
            write: FrameWriter {
                io: write,
                out: Vec::new(),
                written: 0,
                control,
                closed: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio::io::AsyncReadExt;
    use tungstenite::Message;

    /// A server connection over an in-memory pipe, and the client's WebSocket on the other end.
    async fn pair() -> (
        Connection<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (server, client) = tokio::io::duplex(256 * 1024);
        let server = Connection::new(server, WebSocketConfig::default()).await;
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        (server, client)
    }

    #[tokio::test]
    async fn frames_are_gathered_until_a_flush_and_the_buffer_is_given_back() {
        let (server, client) = tokio::io::duplex(64 * 1024);
        let mut server = Connection::new(server, WebSocketConfig::default()).await;
        let mut client = client;
        let w = &mut server.write;
        w.text("one");
        w.framed(&Framed::text(&"x".repeat(3000)));
        // Nothing went out before the flush: it is all still gathered.
        assert_eq!(w.gathered(), 2 + 3 + 4 + 3000);
        w.flush().await.unwrap();
        assert_eq!(w.out.capacity(), 0, "the buffer is kept after its flush");
        assert_eq!(w.gathered(), 0);
        let mut got = vec![0u8; 3009];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..5], b"\x81\x03one");
        assert_eq!(&got[5..9], &[0x81, 126, 0x0B, 0xB8]);
        // The next batch takes a buffer again, and gives it back again.
        w.ping();
        assert!(w.out.capacity() >= GATHER);
        w.flush().await.unwrap();
        assert_eq!(w.out.capacity(), 0);
        let mut ping = [0u8; 2];
        client.read_exact(&mut ping).await.unwrap();
        assert_eq!(ping, [0x89, 0]);
    }

    #[tokio::test]
    async fn a_client_reads_what_the_writer_encodes() {
        let (mut server, mut client) = pair().await;
        server.write.text("hello");
        server.write.framed(&Framed::text("shared"));
        server.write.ping();
        server.write.close(4008, "too slow");
        // Nothing goes after a close frame.
        server.write.text("late");
        server.write.flush().await.unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::text("hello")
        );
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::text("shared")
        );
        assert!(matches!(client.next().await.unwrap().unwrap(), Message::Ping(p) if p.is_empty()));
        match client.next().await.unwrap().unwrap() {
            Message::Close(Some(close)) => {
                assert_eq!(u16::from(close.code), 4008);
                assert_eq!(close.reason.as_str(), "too slow");
            }
            other => panic!("expected the close frame, got {other:?}"),
        }
    }

    /// tungstenite's answers (a pong, the reply to the client's close) reach the socket through
    /// the writer, after which the writer adds nothing.
    #[tokio::test]
    async fn pongs_and_the_close_reply_go_out_through_the_writer() {
        let (mut server, mut client) = pair().await;
        client
            .send(Message::Ping(b"p1".to_vec().into()))
            .await
            .unwrap();
        client.send(Message::text("data")).await.unwrap();
        assert_eq!(
            server.read.next().await.unwrap().unwrap(),
            Message::Ping(b"p1".to_vec().into())
        );
        assert_eq!(
            server.read.next().await.unwrap().unwrap(),
            Message::text("data")
        );
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(
            server.write.control().poll_pending(&mut cx).is_ready(),
            "the pong is waiting"
        );
        server.write.take_control();
        server.write.text("after the pong");
        server.write.flush().await.unwrap();
        assert!(
            matches!(client.next().await.unwrap().unwrap(), Message::Pong(p) if p.as_ref() == b"p1")
        );
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::text("after the pong")
        );

        client.close(None).await.unwrap();
        assert!(matches!(
            server.read.next().await,
            Some(Ok(Message::Close(_)))
        ));
        // The next read writes tungstenite's reply, and ends the stream.
        assert!(!matches!(server.read.next().await, Some(Ok(_))));
        server.write.take_control();
        assert!(server.write.is_closed());
        server.write.text("never sent");
        server.write.flush().await.unwrap();
        drop(server);
        assert!(matches!(client.next().await, Some(Ok(Message::Close(_)))));
        assert!(
            !matches!(client.next().await, Some(Ok(_))),
            "nothing after the close reply"
        );
    }

    /// After our close frame, tungstenite's own reply to the client's close is not sent.
    #[tokio::test]
    async fn after_our_close_the_reply_to_the_clients_close_is_not_sent() {
        let (mut server, mut client) = pair().await;
        server.write.close(1001, "draining");
        server.write.flush().await.unwrap();
        assert!(matches!(client.next().await, Some(Ok(Message::Close(_)))));
        // tungstenite's client answers our close; the server's WebSocket layer would answer that.
        let _ = client.flush().await;
        assert!(matches!(
            server.read.next().await,
            Some(Ok(Message::Close(_)))
        ));
        let _ = server.read.next().await;
        server.write.take_control();
        server.write.flush().await.unwrap();
        drop(server);
        let mut rest = Vec::new();
        let mut raw = client.into_inner();
        raw.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.is_empty(),
            "the server wrote {rest:?} after its close frame"
        );
    }

    #[tokio::test]
    async fn unanswered_pings_do_not_grow_the_control_bytes() {
        let (mut server, mut client) = pair().await;
        for _ in 0..1_000 {
            client
                .feed(Message::Ping(vec![7u8; 100].into()))
                .await
                .unwrap();
        }
        client.flush().await.unwrap();
        for _ in 0..1_000 {
            server.read.next().await.unwrap().unwrap();
        }
        let waiting = server.write.control.lock().bytes.len();
        assert!(
            waiting <= MAX_CONTROL + 102,
            "{waiting} bytes of pongs waiting"
        );
    }
}
