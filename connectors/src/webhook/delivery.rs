//! Delivery of webhook requests off the dataflow's threads: a bounded queue, per-device
//! ordered lanes, retries with exponential backoff and jitter, and the dead-letter file.
//!
//! A network thread runs `concurrency` lanes on a current-thread tokio runtime. An event goes
//! to the lane of its device (so the close of an anomaly never overtakes its open), and a lane
//! sends one request at a time, retrying it until it succeeds, is rejected, or runs out of
//! retries. [`Dispatcher::enqueue`] never blocks: past `queue_capacity` queued events it writes
//! the event to the dead-letter file instead, so a slow or dead receiver never stalls detection.
//!
//! The queue remembers each event it holds (queued or in a request) with the worker whose sink
//! instance queued it, until it is delivered or dead-lettered: a checkpoint stores the events
//! of each instance ([`Dispatcher::queued`]) and a restore queues them again.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use serde_json::json;
use tidewatch_api::{AnomalyEvent, ComponentError, ProcessShared, Secret};
use tokio::sync::{mpsc, watch};

use super::payload::sign;
use crate::backoff::Backoff;
use crate::dead_letter::DeadLetterFile;

/// One event to deliver.
#[derive(Debug)]
pub(crate) struct Job {
    /// Idempotency key (a header of every attempt).
    pub(crate) key: String,
    /// The request body.
    pub(crate) body: Bytes,
    /// The event (its device picks the lane; the dead-letter file records it).
    pub(crate) event: AnomalyEvent,
    /// When it was queued (delivery latency).
    pub(crate) queued_at: Instant,
    /// The worker whose sink instance queued it (its checkpoints hold it).
    pub(crate) worker: usize,
    /// Its place in the queue, set by [`Dispatcher::enqueue`].
    seq: u64,
}

impl Job {
    /// A job queued now by the instance of `worker`.
    pub(crate) fn new(key: String, body: Bytes, event: AnomalyEvent, worker: usize) -> Job {
        Job { key, body, event, queued_at: Instant::now(), worker, seq: 0 }
    }
}

/// An event in the queue, as a checkpoint stores it.
#[derive(Clone, Debug)]
pub(crate) struct Queued {
    /// The worker whose sink instance queued it.
    pub(crate) worker: usize,
    /// Its idempotency key.
    pub(crate) key: String,
    /// The event.
    pub(crate) event: AnomalyEvent,
}

/// How requests are made.
#[derive(Clone, Debug)]
pub(crate) struct RequestSettings {
    pub(crate) url: Uri,
    pub(crate) content_type: HeaderValue,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// HMAC key, when requests are signed.
    pub(crate) secret: Option<Secret>,
    pub(crate) signature_header: HeaderName,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_retries: u32,
    pub(crate) backoff_initial_ms: u64,
    pub(crate) backoff_max_ms: u64,
    pub(crate) concurrency: usize,
    pub(crate) queue_capacity: usize,
    /// The TLS configuration of `https://` URLs.
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

/// The counters of one webhook sink component (label `component_id`).
#[derive(Clone, Debug)]
pub(crate) struct WebhookMetrics {
    /// Events delivered (a 2xx answer).
    pub(crate) delivered: IntCounter,
    /// Requests made, by result: `2xx`, `4xx`, `5xx`, `other_status`, `timeout`, `network`.
    pub(crate) attempts: IntCounterVec,
    /// Requests repeated after a retryable failure.
    pub(crate) retries: IntCounter,
    /// Events written to the dead-letter file, by reason: `max_retries`, `rejected`,
    /// `queue_full`, `shutdown`.
    pub(crate) dead_letters: IntCounterVec,
    /// Events not sent, by reason: `cooldown`, `duplicate`.
    pub(crate) suppressed: IntCounterVec,
    /// Events queued and not yet delivered or dead-lettered.
    pub(crate) queue_depth: IntGauge,
    /// Seconds from queueing to the 2xx answer.
    pub(crate) latency: Histogram,
}

fn metric_error(error: prometheus::Error) -> ComponentError {
    ComponentError::Internal(format!("webhook metric: {error}"))
}

impl WebhookMetrics {
    pub(crate) fn new(component_id: &str) -> Result<WebhookMetrics, ComponentError> {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help).const_label("component_id", component_id)
        };
        Ok(WebhookMetrics {
            delivered: IntCounter::with_opts(opts(
                "tidewatch_webhook_delivered_total",
                "Events a webhook receiver accepted (2xx).",
            ))
            .map_err(metric_error)?,
            attempts: IntCounterVec::new(
                opts("tidewatch_webhook_requests_total", "Webhook requests made, by result."),
                &["result"],
            )
            .map_err(metric_error)?,
            retries: IntCounter::with_opts(opts(
                "tidewatch_webhook_retries_total",
                "Webhook requests repeated after a retryable failure.",
            ))
            .map_err(metric_error)?,
            dead_letters: IntCounterVec::new(
                opts(
                    "tidewatch_webhook_dead_letters_total",
                    "Events written to the dead-letter file instead of being delivered, by reason.",
                ),
                &["reason"],
            )
            .map_err(metric_error)?,
            suppressed: IntCounterVec::new(
                opts(
                    "tidewatch_webhook_suppressed_total",
                    "Events not sent because of the cooldown or as duplicates, by reason.",
                ),
                &["reason"],
            )
            .map_err(metric_error)?,
            queue_depth: IntGauge::with_opts(opts(
                "tidewatch_webhook_queue_depth",
                "Events queued for a webhook receiver and not yet delivered or dead-lettered.",
            ))
            .map_err(metric_error)?,
            latency: Histogram::with_opts(
                HistogramOpts::new(
                    "tidewatch_webhook_delivery_seconds",
                    "Seconds from queueing an event to its receiver's 2xx answer.",
                )
                .const_label("component_id", component_id)
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0,
                ]),
            )
            .map_err(metric_error)?,
        })
    }

    /// Every collector, for registration.
    pub(crate) fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.delivered.clone()),
            Box::new(self.attempts.clone()),
            Box::new(self.retries.clone()),
            Box::new(self.dead_letters.clone()),
            Box::new(self.suppressed.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.latency.clone()),
        ]
    }
}

/// The dead-letter file: one JSON line per event that was not delivered.
#[derive(Debug)]
pub(crate) struct DeadLetters {
    file: DeadLetterFile,
    url: String,
}

impl DeadLetters {
    pub(crate) fn open(
        shared: &ProcessShared,
        path: PathBuf,
        component: &str,
        url: &str,
        metrics: WebhookMetrics,
    ) -> Result<DeadLetters, ComponentError> {
        let file = DeadLetterFile::open(shared, path, component, metrics.dead_letters)?;
        Ok(DeadLetters { file, url: url.to_owned() })
    }

    /// Appends `job` with why it was not delivered, and flushes (dead letters are rare and
    /// must survive a crash that follows).
    pub(crate) fn write(&self, job: &Job, reason: &'static str, attempts: u32, last_error: &str) {
        let fields = json!({
            "url": self.url,
            "attempts": attempts,
            "last_error": last_error,
            "idempotency_key": job.key,
            "event": job.event,
            "body": String::from_utf8_lossy(&job.body),
        });
        self.file.write(reason, fields, "webhook event");
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|since| since.as_secs()).unwrap_or(0)
}

/// What one request came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Delivered,
    /// Worth trying again (5xx, 408, 425, 429, timeouts, network errors); the receiver's
    /// `Retry-After`, if any.
    Retry(String, Option<Duration>),
    /// Will not succeed by repeating (other 4xx, 3xx).
    Rejected(String),
}

/// The outcome of an answer with `status`.
fn classify(status: StatusCode, retry_after: Option<Duration>) -> Outcome {
    let code = status.as_u16();
    match code {
        200..=299 => Outcome::Delivered,
        408 | 425 | 429 | 500..=599 => Outcome::Retry(format!("HTTP {status}"), retry_after),
        _ => Outcome::Rejected(format!("HTTP {status}")),
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other_status",
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not honoured: backoff applies).
fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let seconds: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

fn client(settings: &RequestSettings) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*settings.tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// One request for `job`.
async fn attempt(
    client: &HttpClient,
    settings: &RequestSettings,
    metrics: &WebhookMetrics,
    job: &Job,
) -> Outcome {
    let mut request = Request::post(settings.url.clone())
        .header(hyper::header::CONTENT_TYPE, settings.content_type.clone())
        .header(hyper::header::USER_AGENT, concat!("tidewatch/", env!("CARGO_PKG_VERSION")))
        .header("Idempotency-Key", job.key.as_str());
    if let Some(secret) = &settings.secret {
        let timestamp = unix_seconds();
        request = request.header("X-Tidewatch-Timestamp", timestamp.to_string()).header(
            settings.signature_header.clone(),
            sign(secret.expose().as_bytes(), timestamp, &job.body),
        );
    }
    for (name, value) in &settings.headers {
        request = request.header(name.clone(), value.clone());
    }
    let request = match request.body(Full::new(job.body.clone())) {
        Ok(request) => request,
        Err(error) => return Outcome::Rejected(format!("cannot build the request: {error}")),
    };
    let exchange = async {
        let response = client.request(request).await?;
        let status = response.status();
        let wait = retry_after(response.headers().get(hyper::header::RETRY_AFTER));
        // Read the answer, so that the connection is reused.
        let _ = response.into_body().collect().await;
        Ok::<_, hyper_util::client::legacy::Error>((status, wait))
    };
    match tokio::time::timeout(settings.timeout, exchange).await {
        Err(_) => {
            metrics.attempts.with_label_values(&["timeout"]).inc();
            Outcome::Retry(format!("no answer within {} ms", settings.timeout.as_millis()), None)
        }
        Ok(Err(error)) => {
            metrics.attempts.with_label_values(&["network"]).inc();
            Outcome::Retry(error_chain(&error), None)
        }
        Ok(Ok((status, wait))) => {
            metrics.attempts.with_label_values(&[status_class(status)]).inc();
            classify(status, wait)
        }
    }
}

/// An error and its sources, `: `-separated (hyper's top-level messages say little).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The events queued or in flight (mirrored in the queue-depth gauge), with a condition to
/// wait for the queue to empty.
#[derive(Debug)]
struct Pending {
    queue: Mutex<Queue>,
    drained: Condvar,
    capacity: usize,
    depth: IntGauge,
}

/// What [`Pending`] holds.
#[derive(Debug, Default)]
struct Queue {
    /// The sequence number of the next event.
    next: u64,
    /// The events, oldest first.
    jobs: BTreeMap<u64, Queued>,
    /// How many of them carry each key.
    keys: HashMap<String, usize>,
}

/// Whether [`Pending::admit`] took an event.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    /// Taken, with its sequence number.
    Taken(u64),
    /// The queue is full.
    Full,
    /// An event with the same key is queued already (only when asked to check).
    Duplicate,
}

impl Pending {
    /// Takes a place in the queue for `job`; with `unless_queued`, not when an event with its
    /// key is queued already.
    fn admit(&self, job: &Job, unless_queued: bool) -> Admission {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if unless_queued && queue.keys.contains_key(&job.key) {
            return Admission::Duplicate;
        }
        if queue.jobs.len() >= self.capacity {
            return Admission::Full;
        }
        let seq = queue.next;
        queue.next += 1;
        let queued = Queued { worker: job.worker, key: job.key.clone(), event: job.event.clone() };
        *queue.keys.entry(job.key.clone()).or_default() += 1;
        queue.jobs.insert(seq, queued);
        self.depth.set(queue.jobs.len() as i64);
        Admission::Taken(seq)
    }

    /// Gives the place of event `seq` back (it was delivered or dead-lettered).
    fn release(&self, seq: u64) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(job) = queue.jobs.remove(&seq)
            && let Some(count) = queue.keys.get_mut(&job.key)
        {
            *count -= 1;
            if *count == 0 {
                queue.keys.remove(&job.key);
            }
        }
        self.depth.set(queue.jobs.len() as i64);
        self.drained.notify_all();
    }

    /// The events queued by the instance of `worker`, oldest first.
    fn queued(&self, worker: usize) -> Vec<Queued> {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.jobs.values().filter(|job| job.worker == worker).cloned().collect()
    }

    /// Waits until the queue is empty, up to `timeout`; the number still queued.
    fn wait_empty(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        while !queue.jobs.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            queue = self
                .drained
                .wait_timeout(queue, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        queue.jobs.len()
    }
}

/// Delivers `job`: retries until delivered, rejected, out of retries, or shut down.
async fn deliver(
    client: &HttpClient,
    settings: &RequestSettings,
    shared: &LaneShared,
    job: Job,
    stop: &mut watch::Receiver<bool>,
) {
    let mut backoff =
        Backoff::new(settings.backoff_initial_ms, settings.backoff_max_ms).with_jitter();
    let mut attempts = 0u32;
    loop {
        if *stop.borrow() {
            shared.dead.write(&job, "shutdown", attempts, "the pipeline stopped before delivery");
            return;
        }
        attempts += 1;
        let outcome = tokio::select! {
            outcome = attempt(client, settings, &shared.metrics, &job) => outcome,
            _ = stop.changed() => {
                shared.dead.write(&job, "shutdown", attempts, "the pipeline stopped during a request");
                return;
            }
        };
        match outcome {
            Outcome::Delivered => {
                shared.metrics.delivered.inc();
                shared.metrics.latency.observe(job.queued_at.elapsed().as_secs_f64());
                return;
            }
            Outcome::Rejected(reason) => {
                tracing::warn!(key = %job.key, %reason, "webhook receiver rejected an event; dead-lettered");
                shared.dead.write(&job, "rejected", attempts, &reason);
                return;
            }
            Outcome::Retry(reason, _) if attempts > settings.max_retries => {
                tracing::warn!(key = %job.key, %reason, attempts, "webhook delivery failed after max_retries; dead-lettered");
                shared.dead.write(&job, "max_retries", attempts, &reason);
                return;
            }
            Outcome::Retry(reason, wait) => {
                let delay = backoff.next_delay();
                let delay = wait.map_or(delay, |wait| {
                    wait.clamp(delay, Duration::from_millis(settings.backoff_max_ms).max(delay))
                });
                tracing::debug!(key = %job.key, %reason, retry_in_ms = delay.as_millis() as u64, "webhook delivery failed; retrying");
                shared.metrics.retries.inc();
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

#[derive(Debug)]
struct LaneShared {
    metrics: WebhookMetrics,
    dead: Arc<DeadLetters>,
    pending: Arc<Pending>,
}

/// The delivery queue and its network thread.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    lanes: Mutex<Vec<mpsc::UnboundedSender<Job>>>,
    pending: Arc<Pending>,
    dead: Arc<DeadLetters>,
    stop: watch::Sender<bool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Dispatcher {
    /// Starts the network thread.
    pub(crate) fn start(
        settings: RequestSettings,
        metrics: WebhookMetrics,
        dead: Arc<DeadLetters>,
    ) -> Result<Dispatcher, ComponentError> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(
            |error| ComponentError::io("cannot start the webhook network runtime", error),
        )?;
        let pending = Arc::new(Pending {
            queue: Mutex::new(Queue::default()),
            drained: Condvar::new(),
            capacity: settings.queue_capacity,
            depth: metrics.queue_depth.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let lanes = settings.concurrency.max(1);
        let mut senders = Vec::with_capacity(lanes);
        let mut receivers = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, rx) = mpsc::unbounded_channel::<Job>();
            senders.push(tx);
            receivers.push(rx);
        }
        let shared = Arc::new(LaneShared {
            metrics: metrics.clone(),
            dead: Arc::clone(&dead),
            pending: Arc::clone(&pending),
        });
        let thread = std::thread::Builder::new()
            .name("webhook".to_owned())
            .spawn(move || {
                let client = client(&settings);
                runtime.block_on(async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    for mut rx in receivers {
                        let (client, settings, shared) =
                            (client.clone(), settings.clone(), Arc::clone(&shared));
                        let mut stop = stop_rx.clone();
                        tasks.spawn(async move {
                            while let Some(job) = rx.recv().await {
                                let seq = job.seq;
                                deliver(&client, &settings, &shared, job, &mut stop).await;
                                shared.pending.release(seq);
                            }
                        });
                    }
                    while tasks.join_next().await.is_some() {}
                });
            })
            .map_err(|error| {
                ComponentError::io("cannot start the webhook network thread", error)
            })?;
        Ok(Dispatcher {
            lanes: Mutex::new(senders),
            pending,
            dead,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues `job` on its device's lane, or dead-letters it when the queue is full or the
    /// dispatcher stopped. Never blocks on the network.
    pub(crate) fn enqueue(&self, job: Job) {
        self.enqueue_with(job, false);
    }

    /// Queues `job` like [`Dispatcher::enqueue`] unless an event with its key is queued
    /// already (a restore); `false` when it was not queued for that reason.
    pub(crate) fn enqueue_unless_queued(&self, job: Job) -> bool {
        self.enqueue_with(job, true)
    }

    fn enqueue_with(&self, mut job: Job, unless_queued: bool) -> bool {
        match self.pending.admit(&job, unless_queued) {
            Admission::Taken(seq) => job.seq = seq,
            Admission::Duplicate => return false,
            Admission::Full => {
                self.dead.write(
                    &job,
                    "queue_full",
                    0,
                    "the webhook queue was full (queue_capacity)",
                );
                return true;
            }
        }
        let lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        let rejected = if lanes.is_empty() {
            Err(job)
        } else {
            let lane = (job.event.device.route() % lanes.len() as u64) as usize;
            lanes[lane].send(job).map_err(|error| error.0)
        };
        drop(lanes);
        if let Err(job) = rejected {
            self.dead.write(&job, "shutdown", 0, "the webhook sink was closed");
            self.pending.release(job.seq);
        }
        true
    }

    /// The events queued or in flight that the instance of `worker` queued, oldest first.
    pub(crate) fn queued(&self, worker: usize) -> Vec<Queued> {
        self.pending.queued(worker)
    }

    /// Waits until every queued event was delivered or dead-lettered, up to `timeout`; the
    /// number still queued.
    pub(crate) fn drain(&self, timeout: Duration) -> usize {
        self.pending.wait_empty(timeout)
    }

    /// Stops the lanes: what is still queued or in a request goes to the dead-letter file.
    pub(crate) fn stop(&self) {
        let _ = self.stop.send(true);
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner).clear();
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified() {
        assert_eq!(classify(StatusCode::OK, None), Outcome::Delivered);
        assert_eq!(classify(StatusCode::NO_CONTENT, None), Outcome::Delivered);
        for code in [500, 502, 503, 504, 408, 429, 425] {
            let status = StatusCode::from_u16(code).expect("status");
            assert!(matches!(classify(status, None), Outcome::Retry(..)), "{code}");
        }
        for code in [400, 401, 403, 404, 410, 413, 422, 301] {
            let status = StatusCode::from_u16(code).expect("status");
            assert!(matches!(classify(status, None), Outcome::Rejected(_)), "{code}");
        }
        let wait = retry_after(Some(&HeaderValue::from_static("3")));
        assert_eq!(wait, Some(Duration::from_secs(3)));
        assert_eq!(
            retry_after(Some(&HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"))),
            None
        );
    }
}
