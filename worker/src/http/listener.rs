//! The HTTP/1 connection loop under the endpoint, with the limits that apply before a request
//! reaches a handler or after its answer left it:
//!
//! - a request's head must arrive within the header timeout, which also closes keep-alive
//!   connections left idle that long (hyper's `header_read_timeout`);
//! - a request body that stops arriving for the idle timeout, or takes longer than the body
//!   timeout in all, fails the request (408; `server::router` puts both on);
//! - an answer the client stops reading (its socket accepts nothing) for the idle timeout closes
//!   the connection ([`Watched`]): the answer's body is dropped, which settles its reservation
//!   with what was sent and frees its in-flight permits, instead of holding both until the
//!   lease runs out;
//! - on shutdown no new connection is accepted and open ones finish their requests.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Sleep;
use tracing::{debug, warn};

/// The connection's time limits.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// For a request's head, and for the next request on an idle keep-alive connection.
    pub header: Duration,
    /// Longest time an answer may wait for the client to take any of it.
    pub write_stall: Duration,
}

/// Serves `app` on `listener` until `stop` resolves, then waits for open connections to finish
/// their requests (the caller bounds that wait).
pub async fn serve(listener: TcpListener, app: Router, timeouts: Timeouts, stop: impl Future<Output = ()>) {
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
        let io = Watched::new(stream, timeouts.write_stall);
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(timeouts.header)
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
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

/// A connection whose writes fail once the peer has taken nothing for `stall`: while a write
/// waits (the socket's buffer is full because the client does not read), a timer runs; any
/// progress stops it.
pub struct Watched<S> {
    inner: S,
    stall: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, stall: Duration) -> Watched<S> {
        Watched {
            inner,
            stall,
            timer: None,
        }
    }

    /// After a write was not ready: fails once the stall has lasted too long.
    fn waiting(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let stall = self.stall;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        ready!(timer.as_mut().poll(cx));
        self.timer = None;
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing for KEYPOOL_IDLE_TIMEOUT",
        ))
    }

    fn watch<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => match self.waiting(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            done => {
                self.timer = None;
                done
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_takes_fails_after_the_stall() {
        // A pipe of 64 bytes that nobody reads.
        let (writer, _reader) = tokio::io::duplex(64);
        let mut w = Watched::new(writer, Duration::from_secs(30));
        w.write_all(&[0u8; 64]).await.expect("room for 64 bytes");
        let started = tokio::time::Instant::now();
        let e = w.write_all(&[0u8; 1]).await.expect_err("nobody reads");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_not_cut() {
        use tokio::io::AsyncReadExt;
        let (writer, mut reader) = tokio::io::duplex(16);
        let mut w = Watched::new(writer, Duration::from_secs(30));
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut total = 0;
            while total < 160 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                total += reader.read(&mut buf).await.expect("read");
            }
            total
        });
        // 160 bytes through a 16-byte pipe read every 20 s: 200 s in all, never 30 s without progress.
        w.write_all(&[1u8; 160])
            .await
            .expect("a reader that keeps up is served");
        assert_eq!(read.await.expect("reader"), 160);
    }
}
