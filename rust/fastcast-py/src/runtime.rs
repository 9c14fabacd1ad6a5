//! The runtime every long call runs in: work on a rayon pool with the GIL
//! released, progress reported and Ctrl-C checked between waits, a cancelled
//! run cleaned up before the exception is re-raised.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use fastcast_core::exec::Progress;
use pyo3::prelude::*;

use crate::errors::CoreError;

/// How often the executor's watcher wakes to report progress and check for Ctrl-C.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Run `work` on its own thread, inside a rayon pool of `threads`, with the GIL
/// released; wake every [`WATCH_INTERVAL`] to report progress and check for
/// Ctrl-C. On either, ask the work to cancel, wait for it to clean up, re-raise.
pub fn watch<T: Send + 'static>(
    py: Python<'_>,
    threads: Option<usize>,
    progress: Option<Bound<'_, PyAny>>,
    work: impl FnOnce(&Progress) -> fastcast_core::Result<T> + Send + 'static,
) -> PyResult<T> {
    let mut builder = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("fastcast-{i}"));
    if let Some(n) = threads {
        builder = builder.num_threads(n);
    }
    let pool = builder.build().map_err(|e| {
        pyo3::exceptions::PyValueError::new_err(format!("cannot start worker threads: {e}"))
    })?;
    // A Ctrl-C or a failing callback before any work means no work at all.
    py.check_signals()?;
    if let Some(cb) = &progress {
        cb.call1((0u64,))?;
    }
    let watch = Arc::new(Progress::default());
    let (done_tx, done_rx) = mpsc::channel();
    // Receivers are not Sync; the mutex lets the GIL-free closure borrow it.
    let done_rx = std::sync::Mutex::new(done_rx);
    let worker_watch = Arc::clone(&watch);
    let worker = std::thread::spawn(move || {
        let result = pool.install(|| work(&worker_watch));
        let _ = done_tx.send(result);
    });
    let mut interrupted: Option<PyErr> = None;
    let result = loop {
        let waited = py.detach(|| {
            let rx = done_rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv_timeout(WATCH_INTERVAL)
        });
        match waited {
            Ok(result) => break result,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(fastcast_core::Error::WorkerDied {
                    what: "the conversion thread died",
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if interrupted.is_some() {
            continue; // cancelled: wait for the workers to clean up
        }
        let reported = match &progress {
            Some(cb) => cb
                .call1((watch.bytes_done.load(Ordering::Relaxed),))
                .map(|_| ()),
            None => Ok(()),
        };
        if let Err(e) = py.check_signals().and(reported) {
            watch.cancel.store(true, Ordering::Relaxed);
            interrupted = Some(e);
        }
    };
    let _ = py.detach(|| worker.join());
    if let Some(e) = interrupted {
        return Err(e);
    }
    let value = result.map_err(CoreError)?;
    if let Some(cb) = &progress {
        cb.call1((watch.bytes_done.load(Ordering::Relaxed),))?;
    }
    Ok(value)
}

/// Free `value` on a thread of its own: a plan of 100k tensors takes tens of
/// milliseconds to free, which the caller need not wait for.
pub fn drop_later<T: Send + 'static>(value: T) {
    // If no thread can be started, the closure, and `value` with it, is dropped here.
    let _ = std::thread::Builder::new()
        .name("fastcast-drop".into())
        .spawn(move || drop(value));
}
