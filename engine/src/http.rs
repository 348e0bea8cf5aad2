//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` and `/readyz`.
//!
//! It runs on its own thread with a single-threaded tokio runtime, so scrapes never compete
//! with the dataflow workers for a scheduler.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address is taken or not ours.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address asked for.
        address: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Whether the pipeline is ready (all workers built their dataflow, every source instance
/// reports [`Source::ready`](tidewatch_api::Source::ready)) and not stopping, and whether it
/// is alive (every worker thread makes progress).
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    sources_waiting: AtomicUsize,
    /// The last time (ms since the Unix epoch) each worker of this process stepped; empty
    /// outside a run.
    heartbeats: std::sync::RwLock<Vec<std::sync::atomic::AtomicI64>>,
}

/// A worker that has not stepped for this long is stuck (its step never takes long: it parks
/// for at most 50 ms between two).
pub const STALLED_AFTER_MS: i64 = 30_000;

impl Health {
    /// Marks the pipeline ready or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    /// One more source instance that is not ready yet.
    pub fn source_waiting(&self) {
        self.sources_waiting.fetch_add(1, Ordering::SeqCst);
    }
    /// A source instance counted by [`Health::source_waiting`] became ready (or finished).
    pub fn source_ready(&self) {
        let _ = self
            .sources_waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |waiting| waiting.checked_sub(1));
    }
    /// True once ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.sources_waiting.load(Ordering::SeqCst) == 0
    }

    /// A run of `workers` worker threads starts: each reports with [`Health::heartbeat`].
    pub fn start_workers(&self, workers: usize) {
        let now = tidewatch_api::records::now_ms();
        if let Ok(mut beats) = self.heartbeats.write() {
            *beats = (0..workers).map(|_| std::sync::atomic::AtomicI64::new(now)).collect();
        }
    }

    /// The run is over: no worker is expected to step any more.
    pub fn stop_workers(&self) {
        if let Ok(mut beats) = self.heartbeats.write() {
            beats.clear();
        }
    }

    /// Worker `worker` (of this process) stepped.
    pub fn heartbeat(&self, worker: usize) {
        if let Ok(beats) = self.heartbeats.read()
            && let Some(beat) = beats.get(worker)
        {
            beat.store(tidewatch_api::records::now_ms(), Ordering::Relaxed);
        }
    }

    /// The workers that have not stepped for [`STALLED_AFTER_MS`] (a worker thread that died
    /// or hangs); empty when all are alive.
    pub fn stalled_workers(&self) -> Vec<usize> {
        let now = tidewatch_api::records::now_ms();
        self.heartbeats
            .read()
            .map(|beats| {
                beats
                    .iter()
                    .enumerate()
                    .filter(|(_, beat)| now - beat.load(Ordering::Relaxed) > STALLED_AFTER_MS)
                    .map(|(worker, _)| worker)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A running endpoint; it stops when dropped.
#[derive(Debug)]
pub struct HttpServer {
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

async fn handle(
    request: Request<Incoming>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = "text/plain; charset=utf-8";
    Ok(match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            response(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics.render())
        }
        (&Method::GET, "/healthz") => {
            let stalled = health.stalled_workers();
            if stalled.is_empty() {
                response(StatusCode::OK, text, "ok\n".into())
            } else {
                let body =
                    format!("workers {stalled:?} made no progress for {STALLED_AFTER_MS} ms\n");
                response(StatusCode::SERVICE_UNAVAILABLE, text, body)
            }
        }
        (&Method::GET, "/readyz") => {
            if health.is_ready() {
                response(StatusCode::OK, text, "ready\n".into())
            } else {
                response(StatusCode::SERVICE_UNAVAILABLE, text, "not ready\n".into())
            }
        }
        (&Method::GET, _) => response(
            StatusCode::NOT_FOUND,
            text,
            "not found: try /metrics, /healthz, /readyz\n".into(),
        ),
        _ => response(StatusCode::METHOD_NOT_ALLOWED, text, "only GET\n".into()),
    })
}

/// Binds `address` now (so a taken port is an error at start) and serves on a thread.
pub fn serve(
    address: &str,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<HttpServer, HttpError> {
    let bind_error = |source| HttpError::Bind { address: address.to_owned(), source };
    let listener = std::net::TcpListener::bind(address).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    let (stop, mut stopped) = oneshot::channel::<()>();
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(bind_error)?;
    let thread = std::thread::Builder::new()
        .name("tidewatch-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::error!(%error, "HTTP endpoint cannot start");
                        return;
                    }
                };
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let metrics = Arc::clone(&metrics);
                            let health = Arc::clone(&health);
                            tokio::spawn(async move {
                                let service = service_fn(move |request| handle(request, Arc::clone(&metrics), Arc::clone(&health)));
                                if let Err(error) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                                    tracing::debug!(%error, "HTTP connection ended with an error");
                                }
                            });
                        }
                    }
                }
            });
        })
        .map_err(bind_error)?;
    Ok(HttpServer { address: local, stop: Some(stop), thread: Some(thread) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_stops_stepping_is_reported_stalled() {
        let health = Health::default();
        assert!(health.stalled_workers().is_empty(), "no run: nothing to report");
        health.start_workers(2);
        health.heartbeat(0);
        health.heartbeat(1);
        assert!(health.stalled_workers().is_empty());
        if let Ok(beats) = health.heartbeats.read() {
            beats[1]
                .store(tidewatch_api::records::now_ms() - STALLED_AFTER_MS - 1, Ordering::SeqCst);
        }
        assert_eq!(health.stalled_workers(), vec![1]);
        health.heartbeat(1);
        assert!(health.stalled_workers().is_empty(), "it stepped again");
        health.stop_workers();
        assert!(health.stalled_workers().is_empty());
    }
}
