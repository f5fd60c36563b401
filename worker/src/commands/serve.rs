//! `keypool-worker serve`: the HTTP endpoint and the queue consumer, heartbeats, rechecks of
//! disabled keys, and a graceful shutdown on SIGTERM or Ctrl-C (stop taking work, let what is
//! in flight finish within the grace period, return the rest, flush settlements, last
//! heartbeat).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{hostname, ServeArgs};
use crate::db::Db;
use crate::gateway::queue;
use crate::gateway::{self, Gateway, Stats};
use crate::http::endpoint::Endpoint;
use crate::http::listener;
use crate::http::server::{self};

/// Records a clean stop, so that the worker is not reported missing (keypool_alerts).
async fn stopped(db: &Db, worker_id: &str) -> Result<(), crate::db::DbError> {
    let client = db.client().await?;
    client
        .execute("SELECT keypool_worker_stopped($1)", &[&worker_id])
        .await?;
    Ok(())
}

async fn heartbeat(db: &Db, worker_id: &str, started: SystemTime, stats: &Stats) -> Result<(), crate::db::DbError> {
    let client = db.client().await?;
    let stmt = client
        .prepare_cached("SELECT keypool_worker_heartbeat($1, $2, $3, $4, $5, $6, $7, $8)")
        .await?;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed).min(i64::MAX as u64) as i64;
    client
        .execute(
            &stmt,
            &[
                &worker_id,
                &env!("CARGO_PKG_VERSION"),
                &hostname(),
                &(std::process::id() as i32),
                &started,
                &n(&stats.served),
                &n(&stats.failed),
                &n(&stats.queue_done),
            ],
        )
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let worker_id = args.worker_id();
    let db = Db::connect(&args.db).await?;
    let gateway = Arc::new(Gateway::new(
        db.clone(),
        gateway::Settings {
            provider_timeout: args.provider_timeout,
            max_attempts: args.max_attempts,
            default_max_tokens: args.default_max_tokens,
            max_response: args.max_response,
            stamp_grants: args.stamp_grants,
        },
    )?);
    let started = SystemTime::now();
    heartbeat(&db, &worker_id, started, &gateway.stats)
        .await
        .map_err(|e| anyhow::anyhow!("cannot record a heartbeat (is pg_keypool's queue installed?): {e}"))?;

    let (stop_tx, stop_rx) = watch::channel(false);

    let beats = {
        let (db, id, stats, mut stop) = (db.clone(), worker_id.clone(), gateway.stats.clone(), stop_rx.clone());
        let every = args.heartbeat_interval;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                if let Err(e) = heartbeat(&db, &id, started, &stats).await {
                    warn!(error = %e, "heartbeat failed");
                }
            }
        })
    };

    let rechecks = tokio::spawn(gateway::recheck::run(
        db.clone(),
        gateway.http.clone(),
        args.recheck_after,
        stop_rx.clone(),
    ));

    let http = if args.no_http {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
        let addr = listener.local_addr()?;
        let mut endpoint = Endpoint::new(
            gateway.clone(),
            args.tokens(),
            args.insecure_no_auth,
            args.default_user.clone(),
            args.request_deadline,
            args.capacity_wait,
            worker_id.clone(),
        );
        endpoint.admin_tokens = args.admin_tokens();
        endpoint.metrics_token = args.metrics_token.clone();
        endpoint.max_body = args.max_body;
        endpoint.idle_timeout = args.idle_timeout;
        endpoint.body_timeout = args.body_timeout;
        endpoint.key_adds_per_minute = args.key_adds_per_minute;
        let endpoint = Arc::new(
            endpoint
                .with_max_in_flight(args.max_in_flight)
                .with_max_in_flight_per_caller(args.max_in_flight_per_caller),
        );
        if args.insecure_no_auth {
            warn!("the API routes accept requests without a token (--insecure-no-auth); the admin API still needs an admin token");
        }
        let app = server::router(endpoint);
        let mut stop = stop_rx.clone();
        let timeouts = listener::Timeouts {
            header: args.header_timeout,
            write_stall: args.idle_timeout,
        };
        info!(%addr, "HTTP endpoint listening");
        Some(tokio::spawn(async move {
            let stopping = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            listener::serve(listener, app, timeouts, stopping).await;
        }))
    };

    let consumer = if args.no_queue {
        None
    } else {
        let settings = queue::Settings {
            worker_id: worker_id.clone(),
            concurrency: args.queue_concurrency,
            lease: args.queue_lease,
            poll: args.queue_poll,
            request_deadline: args.request_deadline,
            grace: args.shutdown_grace,
        };
        Some(tokio::spawn(queue::run(gateway.clone(), settings, stop_rx.clone())))
    };
    info!(worker = %worker_id, version = env!("CARGO_PKG_VERSION"), "keypool-worker serving");

    shutdown_signal().await;
    info!(
        grace_ms = args.shutdown_grace.as_millis() as u64,
        "shutting down: no new work; finishing what is in flight"
    );
    let _ = stop_tx.send(true);

    if let Some(h) = http {
        let abort = h.abort_handle();
        if tokio::time::timeout(args.shutdown_grace, h).await.is_err() {
            warn!("HTTP requests still running after the grace period; closing them");
            abort.abort();
        }
    }
    if let Some(c) = consumer {
        // The consumer has its own grace period and returns what it could not finish.
        let _ = tokio::time::timeout(args.shutdown_grace + Duration::from_secs(10), c).await;
    }
    beats.abort();
    rechecks.abort();
    if tokio::time::timeout(Duration::from_secs(10), db.flush_settlements())
        .await
        .is_err()
    {
        warn!("settlements still unsent after 10 s");
    }
    if let Err(e) = heartbeat(&db, &worker_id, started, &gateway.stats).await {
        warn!(error = %e, "last heartbeat failed");
    }
    if let Err(e) = stopped(&db, &worker_id).await {
        warn!(error = %e, "could not record the clean stop");
    }
    info!(
        served = gateway.stats.served.load(Ordering::Relaxed),
        failed = gateway.stats.failed.load(Ordering::Relaxed),
        queue_done = gateway.stats.queue_done.load(Ordering::Relaxed),
        "stopped"
    );
    Ok(())
}
