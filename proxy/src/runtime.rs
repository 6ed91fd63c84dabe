//! Worker threads: each runs a single-threaded tokio runtime with a `LocalSet`, owns its connections and its
//! upstream pools, and never hands a request to another thread (Envoy's threading model).

use crate::upstream::lb::Rng;
use crate::upstream::pool::Pools;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;

/// Spawns hyper's background tasks on the current worker's `LocalSet`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// What one worker owns.
pub struct Worker {
    pub id: usize,
    pub pools: Rc<Pools>,
    pub rng: crate::filters::SharedRng,
    connections: Cell<usize>,
    idle: tokio::sync::Notify,
}

impl Worker {
    pub fn new(id: usize) -> Rc<Worker> {
        Rc::new(Worker {
            id,
            pools: Pools::new(),
            rng: Rc::new(RefCell::new(Rng::from_entropy())),
            connections: Cell::new(0),
            idle: tokio::sync::Notify::new(),
        })
    }

    /// Count a downstream connection for as long as the guard lives.
    pub fn track_connection(self: &Rc<Self>) -> ConnectionGuard {
        self.connections.set(self.connections.get() + 1);
        ConnectionGuard(self.clone())
    }

    /// Resolves once this worker has no downstream connection open.
    pub async fn connections_closed(&self) {
        while self.connections.get() > 0 {
            self.idle.notified().await;
        }
    }

    /// A fresh UUID4 for `x-request-id`.
    pub fn new_request_id(&self) -> http::HeaderValue {
        let mut rng = self.rng.borrow_mut();
        crate::util::uuid4(rng.next_u64(), rng.next_u64())
    }
}

/// Keeps a worker's connection count.
pub struct ConnectionGuard(Rc<Worker>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let n = self.0.connections.get().saturating_sub(1);
        self.0.connections.set(n);
        if n == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Start `n` worker threads; each builds its runtime and runs `main(worker)` to completion.
pub fn spawn_workers<F, Fut>(n: usize, main: F) -> std::io::Result<Vec<std::thread::JoinHandle<()>>>
where
    F: Fn(Rc<Worker>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
    (0..n)
        .map(|id| {
            let main = main.clone();
            std::thread::Builder::new()
                .name(format!("remora-worker-{id}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(worker = id, error = %e, "cannot start worker runtime");
                            return;
                        }
                    };
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&rt, main(Worker::new(id)));
                    // Whatever is still running (connections past the drain time) ends with the runtime.
                })
        })
        .collect()
}
