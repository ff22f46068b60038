//! The WebSocket upgrade, and the socket a session writes through.
//!
//! The edge upgrades connections itself rather than through axum's extractor so that it can put
//! [`LeanIo`] under the WebSocket: the frames a session writes between two flushes are gathered
//! there (one write call for a batch of events) in a buffer the connection holds only from its
//! first write to the flush: buffers are kept between flushes by each worker thread, for the
//! next connection that writes. tungstenite's own write buffer keeps its largest size for the
//! connection's life; with it set to write through, it holds one frame. An idle connection
//! holds no write buffer at all, whatever it once received.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

/// A session's WebSocket.
pub(crate) type WebSocket = WebSocketStream<LeanIo<TokioIo<Upgraded>>>;

/// Bytes gathered before they are written out even without a flush.
const GATHER: usize = 16 * 1024;

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
        let refuse = |status: StatusCode, message: &'static str| (status, message).into_response();
        if parts.version > Version::HTTP_11 {
            return Err(refuse(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "WebSockets are served over HTTP/1.1",
            ));
        }
        if parts.method != Method::GET {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "Request method must be `GET`",
            ));
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
    /// writes through to [`LeanIo`], which gathers.
    pub(crate) fn on_upgrade<F, Fut>(
        self,
        protocol: &'static str,
        config: WebSocketConfig,
        session: F,
    ) -> Response
    where
        F: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let selected = self.offered.iter().any(|p| p == protocol);
        let on_upgrade = self.on_upgrade;
        let config = config.write_buffer_size(0);
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "websocket upgrade failed");
                    return;
                }
            };
            let io = LeanIo::new(TokioIo::new(upgraded));
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
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

/// A connection whose writes are gathered until a flush (or until [`GATHER`] bytes wait), in a
/// buffer it gives back at the flush.
pub(crate) struct LeanIo<T> {
    io: T,
    out: Vec<u8>,
    /// How much of `out` is written.
    written: usize,
}

impl<T> LeanIo<T> {
    fn new(io: T) -> Self {
        LeanIo {
            io,
            out: Vec::new(),
            written: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> LeanIo<T> {
    /// Writes out what is gathered; then gives the buffer back if `release`.
    fn poll_write_out(&mut self, cx: &mut Context<'_>, release: bool) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        if release {
            if self.out.capacity() > 0 {
                give_back(std::mem::take(&mut self.out));
            }
        } else {
            self.out.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for LeanIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for LeanIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.len() >= GATHER {
            ready!(this.poll_write_out(cx, false))?;
        }
        if this.out.capacity() == 0 {
            this.out = gathering_buffer();
        }
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx, true))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx, true))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_are_gathered_until_a_flush_and_the_buffer_is_given_back() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut io = LeanIo::new(client);
        io.write_all(b"one ").await.unwrap();
        io.write_all(&[b'x'; 3000]).await.unwrap();
        // Nothing went out before the flush: it is all still gathered.
        assert_eq!(io.out.len(), 3004);
        assert_eq!(io.written, 0);
        io.flush().await.unwrap();
        assert_eq!(io.out.capacity(), 0, "the buffer is kept after its flush");
        let mut got = vec![0u8; 3004];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"one ");
        assert!(got[4..].iter().all(|&b| b == b'x'));
        // The next batch takes a buffer again, and gives it back again.
        io.write_all(b"small").await.unwrap();
        assert!(io.out.capacity() >= GATHER);
        io.flush().await.unwrap();
        assert_eq!(io.out.capacity(), 0);
        let mut small = [0u8; 5];
        server.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"small");
    }

    #[tokio::test]
    async fn past_the_gathering_limit_bytes_go_out_without_a_flush() {
        let (client, mut server) = tokio::io::duplex(256 * 1024);
        let mut io = LeanIo::new(client);
        io.write_all(&vec![b'a'; GATHER]).await.unwrap();
        io.write_all(b"b").await.unwrap();
        let mut got = vec![0u8; GATHER];
        server.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&b| b == b'a'));
    }
}
