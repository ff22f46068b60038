//! Per-user rate limits across edges. Every `every`, each edge publishes on core NATS
//! (`<prefix>.limits`, never persisted) how many tokens its per-user buckets gave out since it
//! last did, and draws as many from its own buckets for those users. Each edge's buckets so count
//! the user's work on every edge, late by at most about one interval: a user whose sessions are
//! spread over N edges gets the allowance once, not N times (plus, at most, what one interval
//! lets through before the others hear of it).
//!
//! Best effort, as the limits are: a lost or late message costs accuracy, never a frame. While
//! NATS is away each edge limits on its own.

use std::sync::Arc;
use std::time::Duration;

use chat_model::UserId;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::limits::{Used, UserLimits};

/// Users per message at most: a message stays far below NATS's 1 MiB payload limit.
const USERS_PER_MESSAGE: usize = 4_096;

/// What one edge tells the others.
#[derive(Serialize, Deserialize)]
struct Report {
    /// The sending edge (it ignores its own reports).
    edge: String,
    /// Per user: tokens given out by kind of work (send, typing, subscribe, history).
    used: Vec<(String, Used)>,
}

/// Shares `limits` with the other edges on `client` until `shutdown`.
pub(crate) async fn run(
    limits: Arc<UserLimits>,
    client: async_nats::Client,
    subject: String,
    every: Duration,
    shutdown: CancellationToken,
) {
    let edge = uuid::Uuid::new_v4().simple().to_string();
    let Some(mut reports) =
        crate::subscribe_retrying(&client, &subject, "rate-limit", &shutdown).await
    else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let used: Vec<(String, Used)> = limits
                    .take_used()
                    .into_iter()
                    .map(|(user, used)| (user.as_str().to_owned(), used))
                    .collect();
                for chunk in used.chunks(USERS_PER_MESSAGE) {
                    let report = Report { edge: edge.clone(), used: chunk.to_vec() };
                    let Ok(payload) = serde_json::to_vec(&report) else { continue };
                    // Lost while NATS is away: the others limit on their own meanwhile.
                    if let Err(e) = client.publish(subject.clone(), payload.into()).await {
                        tracing::debug!(error = %e, "rate-limit report not sent");
                    }
                }
            }
            Some(message) = reports.next() => {
                let report: Report = match serde_json::from_slice(&message.payload) {
                    Ok(report) => report,
                    Err(e) => {
                        tracing::debug!(error = %e, "malformed rate-limit report");
                        continue;
                    }
                };
                if report.edge == edge {
                    continue;
                }
                let mut drawn = 0;
                for (user, used) in report.used {
                    if let Ok(user) = UserId::parse(&user) {
                        drawn += limits.charge(&user, used);
                    }
                }
                limits
                    .charged
                    .fetch_add(drawn, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}
