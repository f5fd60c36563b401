//! The HTTP/1 connection loop under the endpoint, with the limits that apply before a request
//! reaches a handler:
//!
//! - a request's head must arrive within the header timeout, which also closes keep-alive
//!   connections left idle that long (hyper's `header_read_timeout`);
//! - a request body that stops arriving for the idle timeout fails the request (408), so a
//!   client cannot hold a handler by trickling bytes (tower-http's `RequestBodyTimeoutLayer`,
//!   put on by `server::router`);
//! - on shutdown no new connection is accepted and open ones finish their requests.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// Serves `app` on `listener` until `stop` resolves, then waits for open connections to finish
/// their requests (the caller bounds that wait).
pub async fn serve(listener: TcpListener, app: Router, header_timeout: Duration, stop: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
