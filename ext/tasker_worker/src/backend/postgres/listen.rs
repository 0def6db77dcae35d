//! LISTEN/NOTIFY: the channels, and the listener that forwards notifications to the engine.

use super::within;
use crate::backend::{Notification, NotificationSender};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use std::time::Duration;
use tracing::warn;
use uuid::Uuid;

pub(super) const STEPS_READY: &str = "tasker_steps_ready";

pub(super) const TASKS_FINISHED: &str = "tasker_tasks_finished";

/// Tasks that stopped starting steps; payload `cancelled:<uuid>,...` or `error:<uuid>,...`.
pub(super) const TASKS_HALTED: &str = "tasker_tasks_halted";

/// The LISTEN connection is asked `SELECT 1` after this long without a message...
pub(super) const LISTENER_HEARTBEAT: Duration = Duration::from_secs(5);

/// ...and replaced if it does not answer within this.
pub(super) const LISTENER_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// A `tasker_tasks_halted` payload: the tasks, and whether they were cancelled.
pub(super) fn parse_halted(payload: &str) -> (Vec<Uuid>, bool) {
    let (kind, uuids) = payload.split_once(':').unwrap_or(("error", payload));
    let tasks = uuids
        .split(',')
        .filter_map(|s| Uuid::parse_str(s).ok())
        .collect();
    (tasks, kind == "cancelled")
}

/// LISTEN on a connection of its own (never one of the pool's, so that a pool of one still
/// has a connection for work), forwarding notifications to the engine. A connection that has
/// been quiet for `LISTENER_HEARTBEAT` is asked `SELECT 1`; one that does not answer within
/// `LISTENER_HEARTBEAT_TIMEOUT` died silently (a NAT or firewall dropped it without a FIN) and
/// is replaced. After a replacement the engine hears `Reconnected`: it claims and checks its
/// waiters, since notifications may have been missed.
pub(super) async fn listen(options: PgConnectOptions, inbox: NotificationSender) {
    let mut first = true;
    loop {
        let mut listener = match connect_listener(&options).await {
            Ok(listener) => listener,
            Err(e) => {
                warn!(error = %e, "the LISTEN connection cannot connect; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if !first && inbox.send(Notification::Reconnected).is_err() {
            return;
        }
        first = false;
        loop {
            let message = match tokio::time::timeout(LISTENER_HEARTBEAT, listener.try_recv()).await
            {
                Ok(Ok(Some(n))) if n.channel() == STEPS_READY => Notification::StepsReady,
                Ok(Ok(Some(n))) if n.channel() == TASKS_HALTED => {
                    let (tasks, cancelled) = parse_halted(n.payload());
                    Notification::TasksHalted { tasks, cancelled }
                }
                Ok(Ok(Some(n))) => Notification::TasksFinished(
                    n.payload()
                        .split(',')
                        .filter_map(|s| Uuid::parse_str(s).ok())
                        .collect(),
                ),
                Ok(Ok(None)) => {
                    warn!("the LISTEN connection closed; reconnecting");
                    break;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "the LISTEN connection failed; reconnecting");
                    break;
                }
                Err(_quiet) => {
                    let check = sqlx::query("SELECT 1").execute(&mut listener);
                    match tokio::time::timeout(LISTENER_HEARTBEAT_TIMEOUT, check).await {
                        Ok(Ok(_)) => continue,
                        Ok(Err(e)) => warn!(error = %e, "the LISTEN connection failed a heartbeat; reconnecting"),
                        Err(_) => warn!(
                            "the LISTEN connection did not answer a heartbeat within {}s; reconnecting",
                            LISTENER_HEARTBEAT_TIMEOUT.as_secs()
                        ),
                    }
                    break;
                }
            };
            if inbox.send(message).is_err() {
                return;
            }
        }
        drop(listener);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(super) async fn connect_listener(
    options: &PgConnectOptions,
) -> Result<PgListener, sqlx::Error> {
    let connect = async {
        // A pool of one: the listener's own connection, re-established on demand.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(options.clone())
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener
            .listen_all([STEPS_READY, TASKS_FINISHED, TASKS_HALTED])
            .await?;
        Ok(listener)
    };
    within(Duration::from_secs(10), "connecting", connect).await
}
