//! The event loops that serve the HTTP door's connections: one thread per
//! CPU (`--http-threads`), each running its own current-thread tokio
//! runtime (its own epoll and timers). The accept loop hands each new
//! connection to the next loop in turn, and its requests are read,
//! answered and written there.
//!
//! Why not the process's work-stealing runtime: a keep-alive request is a
//! read, a few microseconds of work and a write, and on the shared runtime
//! its task is woken by whichever worker polled the driver and is often
//! moved or stolen. With a loop per thread each thread sleeps in its own
//! `epoll_wait` and handles what its connections bring. Same-run A/B on 2
//! cores (`wrk -t2` against `/healthz`, 6 rounds alternating): 10.6 % more
//! requests per second at 100 connections, 19 % at 1,000.
//!
//! A WebSocket session upgraded from a connection does not stay: its socket
//! is taken back from hyper and registered with the process's runtime, and
//! the session runs there ([`crate::chat::ws::WsIo::take`]). The hub wakes
//! every session's writer from its own thread: a current-thread runtime
//! writes to its eventfd for each such wake (the shared one wakes a worker
//! only when one is parked), and a socket left registered with a loop wakes
//! that loop's thread for every readiness event only to pass it on. Either
//! way `bench/chat_fanout` scenario b (1,000 clients) took 30 % more CPU.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The HTTP door's event-loop threads.
pub struct Loops {
    loops: Vec<Loop>,
    next: AtomicUsize,
    /// Ends every loop.
    stop: CancellationToken,
}

/// A running loop: its runtime's handle and the thread that drives it.
struct Loop {
    handle: Handle,
    thread: JoinHandle<()>,
}

impl Loops {
    /// Starts `n` loops (0: one per CPU). A loop that cannot be started
    /// (no thread or runtime to be had) is left out with a warning, its
    /// share going to the others; with none, connections run on the
    /// caller's runtime.
    pub fn start(n: usize) -> Loops {
        let n = if n == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            n
        };
        let stop = CancellationToken::new();
        let loops = (0..n)
            .filter_map(|i| {
                start_one(i, &stop)
                    .inspect_err(|e| tracing::warn!("http: cannot start event loop {i}: {e}"))
                    .ok()
            })
            .collect();
        Loops {
            loops,
            next: AtomicUsize::new(0),
            stop,
        }
    }

    /// Runs `fut` on the next loop, tracked by `tracker`; on the caller's
    /// runtime when there is no loop.
    pub fn spawn<F>(&self, tracker: &TaskTracker, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.loops.is_empty() {
            tracker.spawn(fut);
            return;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.loops.len();
        tracker.spawn_on(fut, &self.loops[i].handle);
    }

    /// Ends the loops (what still runs on them is dropped: call it once
    /// the connections and sessions are done) and waits for their threads.
    pub async fn stop(self) {
        self.stop.cancel();
        let loops = self.loops;
        // Joining blocks: not on this runtime's thread.
        let _ = tokio::task::spawn_blocking(move || {
            for l in loops {
                let _ = l.thread.join();
            }
        })
        .await;
    }
}

/// One loop: a current-thread runtime driven by a thread of its own until `stop`.
fn start_one(i: usize, stop: &CancellationToken) -> std::io::Result<Loop> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("http-{i}"))
        .spawn(move || rt.block_on(stop.cancelled()))?;
    Ok(Loop { handle, thread })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_on_the_loop_threads_in_turn_and_stop_ends_them() {
        let loops = Loops::start(2);
        let tracker = TaskTracker::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..4 {
            let tx = tx.clone();
            loops.spawn(&tracker, async move {
                let name = std::thread::current().name().map(str::to_string);
                // A timer and a socket work on the loop's own runtime.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                assert!(l.local_addr().is_ok());
                tx.send(name).unwrap();
            });
        }
        drop(tx);
        tracker.close();
        tracker.wait().await;
        let mut names = Vec::new();
        while let Some(n) = rx.recv().await {
            names.push(n.unwrap_or_default());
        }
        names.sort();
        assert_eq!(names, ["http-0", "http-0", "http-1", "http-1"]);
        // stop joins the threads: it returns only once both have ended.
        tokio::time::timeout(std::time::Duration::from_secs(10), loops.stop())
            .await
            .expect("the loop threads end on stop");
    }
}
