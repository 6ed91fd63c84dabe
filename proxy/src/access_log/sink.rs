//! Where log lines go: files, stdout and stderr, buffered so that logging never waits for a disk.
//!
//! This is Envoy's `AccessLogManagerImpl` and `AccessLogFileImpl` (`source/common/access_log/`):
//! - a request appends its line to the destination's in-memory buffer under a mutex that only ever guards a
//!   `Vec` append (no I/O happens under it);
//! - a background thread (one per [`Manager`]) writes the buffers out every flush interval (Envoy's
//!   `--file-flush-interval-msec`, 10 s by default) and as soon as a buffer holds more than 64 KiB
//!   (`MIN_FLUSH_SIZE`); [`Manager::flush_all`] writes everything out at shutdown;
//! - [`Manager::reopen_all`] (admin `/reopen_logs`) closes and reopens every file, for log rotation;
//! - destinations are shared by path and live as long as the manager, like Envoy's file cache.
//!
//! Failures are counted under Envoy's names, rooted at `filesystem.` (docs
//! `configuration/observability/access_log/stats.rst`): `write_buffered` (lines appended to a buffer),
//! `write_completed` and `write_failed` (buffer writes to the file), `flushed_by_timer`, `reopen_failed`, and the
//! gauge `write_total_buffered` (bytes waiting). A write that fails (a full disk) drops what it was writing; a
//! file that cannot be reopened (its directory was removed) is retried at each flush, and what was buffered for
//! it meanwhile is dropped and counted as `write_failed`. Each failure is reported by `tracing::warn!` when it
//! starts, not at every flush. Remora departs from Envoy in three ways: it does not keep the data of a file it
//! cannot open (Envoy's buffer then grows without bound), it caps a buffer at [`MAX_BUFFERED`] bytes (lines
//! beyond are dropped and counted as `write_failed`), and on reopen it writes what was buffered to the old file
//! before switching, so lines logged before a rotation end up in the rotated file.

use crate::stats::{Counter, Gauge, Scope};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::time::Instant;

/// Envoy's default `--file-flush-interval-msec`.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// A buffer larger than this is written out without waiting for the timer (Envoy's `MIN_FLUSH_SIZE`).
pub const MIN_FLUSH_SIZE: usize = 64 * 1024;

/// A buffer never grows beyond this; lines that would are dropped.
pub const MAX_BUFFERED: usize = 16 * 1024 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Envoy's `AccessLogFileStats`, shared by every destination of a manager.
#[derive(Clone, Debug)]
struct FileStats {
    write_buffered: Counter,
    write_completed: Counter,
    write_failed: Counter,
    flushed_by_timer: Counter,
    reopen_failed: Counter,
    write_total_buffered: Gauge,
}

impl FileStats {
    fn new(root: &Scope) -> Self {
        let s = root.scope("filesystem.");
        FileStats {
            write_buffered: s.counter("write_buffered"),
            write_completed: s.counter("write_completed"),
            write_failed: s.counter("write_failed"),
            flushed_by_timer: s.counter("flushed_by_timer"),
            reopen_failed: s.counter("reopen_failed"),
            write_total_buffered: s.gauge("write_total_buffered"),
        }
    }
}

/// A destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    File(PathBuf),
    Stdout,
    Stderr,
}

/// Wakes the flush thread early.
#[derive(Debug, Default)]
struct Wake {
    state: Mutex<WakeState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct WakeState {
    requested: bool,
    exit: bool,
}

impl Wake {
    fn notify(&self, f: impl FnOnce(&mut WakeState)) {
        f(&mut lock(&self.state));
        self.cv.notify_one();
    }
}

/// One destination: its buffer, and its file.
#[derive(Debug)]
pub(crate) struct Sink {
    target: Target,
    /// What requests have logged and nobody has written yet. Only ever held for an append or a swap.
    buf: Mutex<Vec<u8>>,
    /// The open file (held while writing, so writes to one destination stay in order).
    io: Mutex<Io>,
    /// Set once written to: from then on the flush timer counts this destination (Envoy starts a file's
    /// timer at its first write).
    started: AtomicBool,
    /// A flush past `MIN_FLUSH_SIZE` has been asked for and not yet done.
    flush_requested: AtomicBool,
    /// A line was dropped because the buffer was full, and that has been reported.
    overflowing: AtomicBool,
    wake: Arc<Wake>,
    stats: FileStats,
}

#[derive(Debug)]
struct Io {
    /// `None` for stdout and stderr, and for a file that could not be (re)opened.
    file: Option<File>,
    /// The previous buffer, emptied, swapped in at the next flush so buffers are reused.
    spare: Vec<u8>,
    /// The last write or open failed (reported once, until it succeeds again).
    failing: bool,
}

fn open(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Sink {
    /// Append one line; never blocks on I/O.
    pub(crate) fn write(&self, line: &[u8]) {
        let over = {
            let mut buf = lock(&self.buf);
            if buf.len() + line.len() > MAX_BUFFERED {
                drop(buf);
                self.stats.write_failed.inc();
                if !self.overflowing.swap(true, Relaxed) {
                    tracing::warn!(
                        target = ?self.target,
                        "access log buffer is full ({MAX_BUFFERED} bytes); dropping lines until it is written out"
                    );
                }
                return;
            }
            buf.extend_from_slice(line);
            buf.len() > MIN_FLUSH_SIZE
        };
        self.stats.write_buffered.inc();
        self.stats.write_total_buffered.add(line.len() as i64);
        if !self.started.load(Relaxed) {
            self.started.store(true, Relaxed);
        }
        if over && !self.flush_requested.swap(true, Relaxed) {
            self.wake.notify(|s| s.requested = true);
        }
    }

    /// Write out what is buffered.
    pub(crate) fn flush(&self) {
        let mut io = lock(&self.io);
        self.flush_locked(&mut io);
    }

    fn flush_locked(&self, io: &mut Io) {
        let mut data = std::mem::take(&mut io.spare);
        std::mem::swap(&mut *lock(&self.buf), &mut data);
        self.flush_requested.store(false, Relaxed);
        if data.is_empty() {
            io.spare = data;
            return;
        }
        self.overflowing.store(false, Relaxed);
        let result = match &self.target {
            Target::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&data).and_then(|()| out.flush())
            }
            Target::Stderr => io::stderr().lock().write_all(&data),
            Target::File(path) => {
                if io.file.is_none() {
                    self.try_open(io, path);
                }
                match &mut io.file {
                    Some(f) => f.write_all(&data),
                    None => Err(io::Error::other("the file is not open")),
                }
            }
        };
        match result {
            Ok(()) => {
                self.stats.write_completed.inc();
                if std::mem::take(&mut io.failing) {
                    tracing::info!(target = ?self.target, "access log writes succeed again");
                }
            }
            Err(e) => {
                self.stats.write_failed.inc();
                if !std::mem::replace(&mut io.failing, true) {
                    tracing::warn!(
                        target = ?self.target,
                        error = %e,
                        "access log write failed; dropping {} buffered bytes (and more, until writes succeed)",
                        data.len()
                    );
                }
            }
        }
        self.stats.write_total_buffered.add(-(data.len() as i64));
        data.clear();
        io.spare = data;
    }

    fn try_open(&self, io: &mut Io, path: &PathBuf) {
        match open(path) {
            Ok(f) => io.file = Some(f),
            Err(e) => {
                self.stats.reopen_failed.inc();
                if !std::mem::replace(&mut io.failing, true) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot open access log file");
                }
            }
        }
    }

    /// Write out what is buffered to the current file, then close it and open the path again.
    fn reopen(&self) {
        let mut io = lock(&self.io);
        self.flush_locked(&mut io);
        if let Target::File(path) = &self.target {
            io.file = None;
            self.try_open(&mut io, path);
        }
    }
}

/// Envoy's access log manager: the destinations and the thread that writes them out.
#[derive(Debug)]
pub struct Manager {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    sinks: Mutex<Vec<Arc<Sink>>>,
    wake: Arc<Wake>,
    stats: FileStats,
    interval: Duration,
}

impl Shared {
    fn sinks(&self) -> Vec<Arc<Sink>> {
        lock(&self.sinks).clone()
    }
}

impl Manager {
    /// A manager whose stats go under `root` (the server's root scope: the names are `filesystem.*`), flushing
    /// every `flush_interval` ([`DEFAULT_FLUSH_INTERVAL`] is Envoy's).
    pub fn new(root: &Scope, flush_interval: Duration) -> io::Result<Manager> {
        let shared = Arc::new(Shared {
            sinks: Mutex::default(),
            wake: Arc::default(),
            stats: FileStats::new(root),
            interval: flush_interval.max(Duration::from_millis(1)),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("access-log-flush".into())
            .spawn(move || flush_loop(&s))?;
        Ok(Manager {
            shared,
            thread: Some(thread),
        })
    }

    /// The destination for `target`, shared with every access log already writing there. A file is opened
    /// (created, appended to) now, so a path that cannot be opened is a config error, as in Envoy.
    pub(crate) fn sink(&self, target: Target) -> io::Result<Arc<Sink>> {
        let mut sinks = lock(&self.shared.sinks);
        if let Some(s) = sinks.iter().find(|s| s.target == target) {
            return Ok(s.clone());
        }
        let file = match &target {
            Target::File(path) => Some(open(path)?),
            _ => None,
        };
        let sink = Arc::new(Sink {
            target,
            buf: Mutex::default(),
            io: Mutex::new(Io {
                file,
                spare: Vec::new(),
                failing: false,
            }),
            started: AtomicBool::new(false),
            flush_requested: AtomicBool::new(false),
            overflowing: AtomicBool::new(false),
            wake: self.shared.wake.clone(),
            stats: self.shared.stats.clone(),
        });
        sinks.push(sink.clone());
        Ok(sink)
    }

    /// Write out every buffer now (at shutdown; also safe at any time).
    pub fn flush_all(&self) {
        for s in self.shared.sinks() {
            s.flush();
        }
    }

    /// Close and reopen every file (admin `/reopen_logs`, after a log rotation renamed them). It does file I/O:
    /// call it from a blocking context.
    pub fn reopen_all(&self) {
        for s in self.shared.sinks() {
            s.reopen();
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.shared.wake.notify(|s| s.exit = true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.flush_all();
    }
}

/// The flush thread: every interval, each destination written to so far is flushed (and counted in
/// `flushed_by_timer`); in between, a destination past `MIN_FLUSH_SIZE` is flushed when it asks.
fn flush_loop(shared: &Shared) {
    let mut next_tick = Instant::now() + shared.interval;
    loop {
        let requested = {
            let mut st = lock(&shared.wake.state);
            loop {
                if st.exit {
                    return;
                }
                if st.requested {
                    break;
                }
                let now = Instant::now();
                if now >= next_tick {
                    break;
                }
                st = match shared.wake.cv.wait_timeout(st, next_tick - now) {
                    Ok((st, _)) => st,
                    Err(e) => e.into_inner().0,
                };
            }
            std::mem::take(&mut st.requested)
        };
        let now = Instant::now();
        let tick = now >= next_tick;
        if tick {
            next_tick = now + shared.interval;
        }
        for s in shared.sinks() {
            if tick && s.started.load(Relaxed) {
                shared.stats.flushed_by_timer.inc();
                s.flush();
            } else if requested && s.flush_requested.load(Relaxed) {
                s.flush();
            }
        }
    }
}
