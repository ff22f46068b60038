//! The HTTP server: the router on hyper's HTTP/1 connections, with the bounds `axum::serve`
//! does not set. A connection that has not sent a request's head within
//! `CHAT_HTTP_HEADER_TIMEOUT` (an idle keep-alive connection included) is closed, and at most
//! `CHAT_MAX_HTTP_CONNECTIONS` connections that are not WebSockets are open at once: at that
//! many the server stops accepting, and new connections wait in the listen queue until one ends
//! (a request answered, an upgrade to a WebSocket, a timeout). A burst of reconnecting clients
//! is served in turn, not turned away. Without these, clients that connect and send nothing, or half a
//! request, hold a descriptor each for as long as they like, until the process has none left
//! for anything (its NATS connection, its store, new clients). WebSocket sessions are counted
//! and capped by the edge once upgraded.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;

/// The bounds of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_http_connections: usize,
    pub header_timeout: Duration,
}

/// Times the server had `max_http_connections` open and waited for one to end before accepting
/// more (`chat_http_accept_waits_total`).
pub static ACCEPT_WAITS: AtomicU64 = AtomicU64::new(0);

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting, lets every
/// connection finish the request it is answering (idle ones close at once) and returns once
/// they have. Upgraded connections are the edge's from then on.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    bounds: Bounds,
) -> std::io::Result<()> {
    let open = Arc::new(Semaphore::new(bounds.max_http_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let permit = match open.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                ACCEPT_WAITS.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("HTTP connections at their maximum; accepting more once one ends");
                tokio::select! {
                    permit = open.clone().acquire_owned() => {
                        permit.expect("the semaphore is never closed")
                    }
                    () = &mut shutdown => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of descriptors, most likely: what is open must end first.
                    tracing::error!(error = %e, "accept failed; retrying in a second");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        // No Nagle: acks and events are small frames that must not wait for the peer's
        // delayed ACK.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.header_timeout);
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            // Its place is free once it has ended or been handed to a WebSocket session.
            drop(permit);
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors of one connection that `accept` reports (the listener is fine).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
