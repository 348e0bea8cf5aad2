//! SIGINT/SIGTERM handling: the first signal asks for a graceful stop (sources end, data
//! drains, sinks flush); a second one exits at once with status 130.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Installs the handlers on a background thread; `on_stop` runs at the first signal.
pub fn install<F>(on_stop: F) -> std::io::Result<()>
where
    F: Fn() + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let stopping = Arc::new(AtomicBool::new(false));
    std::thread::Builder::new().name("tidewatch-signals".into()).spawn(move || {
        runtime.block_on(async move {
            let Ok(mut terminate) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                tracing::warn!("cannot listen for SIGTERM");
                return;
            };
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
                if stopping.swap(true, Ordering::SeqCst) {
                    tracing::warn!("second signal: exiting without draining");
                    std::process::exit(130);
                }
                tracing::info!("signal received: draining and stopping");
                on_stop();
            }
        });
    })?;
    Ok(())
}
