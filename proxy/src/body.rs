//! The one body type that flows through the proxy, both ways.
//!
//! An enum rather than a boxed trait object, so that forwarding a request or response costs no allocation. The
//! response side can carry an [`EndOfStream`] hook: whatever must happen when the body is done (stats, returning
//! an HTTP/1 connection to its pool) runs when the last frame passes, or on drop if the client went away first.

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project::{pin_project, pinned_drop};
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// Errors that end a body early.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Called once when a body ends (`complete` is false when it was dropped or failed before its end).
pub trait EndOfStream {
    fn end(&mut self, complete: bool, bytes: u64);

    /// Called when the body's trailers pass (before [`EndOfStream::end`]); gRPC carries `grpc-status` here.
    fn trailers(&mut self, _trailers: &http::HeaderMap) {}
}

/// How many hooks a body holds: the upstream request's, the downstream request's, and two for HTTP filters.
const HOOKS: usize = 4;

#[pin_project(project = KindProj)]
enum Kind {
    Empty,
    Full(Option<Bytes>),
    Incoming(#[pin] Incoming),
    Tee(TeeReader),
}

/// A downstream request body shared by the attempts of one request, so that a retry can send it again.
///
/// The first attempt streams the body as it arrives and keeps a copy of what passed, up to a limit. A retry
/// replays the copy and then goes on reading where the downstream body stands. Once more than the limit has
/// passed, the copy is dropped and no further attempt can be made ([`Tee::replayable`] turns false): Envoy's
/// `per_request_buffer_limit_bytes`.
#[derive(Clone)]
pub struct Tee(std::rc::Rc<std::cell::RefCell<TeeState>>);

struct TeeState {
    source: Option<Incoming>,
    kept: Vec<Bytes>,
    kept_bytes: usize,
    trailers: Option<http::HeaderMap>,
    limit: usize,
    overflowed: bool,
    ended: bool,
}

impl Tee {
    pub fn new(source: Incoming, limit: usize) -> Tee {
        Tee(std::rc::Rc::new(std::cell::RefCell::new(TeeState {
            source: Some(source),
            kept: Vec::new(),
            kept_bytes: 0,
            trailers: None,
            limit,
            overflowed: false,
            ended: false,
        })))
    }

    /// Whether another attempt can be sent the whole body.
    pub fn replayable(&self) -> bool {
        !self.0.borrow().overflowed
    }

    /// A body for one attempt: what was kept, then the rest of the source.
    pub fn attempt(&self) -> Body {
        Body::from_kind(Kind::Tee(TeeReader {
            tee: self.clone(),
            next: 0,
            trailers_sent: false,
        }))
    }
}

/// One attempt's reading position in a [`Tee`].
pub struct TeeReader {
    tee: Tee,
    /// Index into `kept` of the next chunk to replay.
    next: usize,
    trailers_sent: bool,
}

impl TeeReader {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut st = self.tee.0.borrow_mut();
        if self.next < st.kept.len() {
            let b = st.kept[self.next].clone();
            self.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if st.ended {
            if !self.trailers_sent {
                self.trailers_sent = true;
                if let Some(t) = st.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(src) = st.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(src).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                st.ended = true;
                st.source = None;
                self.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e) as BoxError))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if !st.overflowed {
                        st.kept_bytes += d.len();
                        if st.kept_bytes > st.limit {
                            st.overflowed = true;
                            st.kept.clear();
                        } else {
                            st.kept.push(d.clone());
                        }
                    }
                    self.next = st.kept.len();
                } else if let Some(t) = frame.trailers_ref() {
                    st.trailers = Some(t.clone());
                    st.ended = true;
                    st.source = None;
                    self.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn at_end(&self) -> bool {
        let st = self.tee.0.borrow();
        self.next >= st.kept.len() && st.ended && (self.trailers_sent || st.trailers.is_none())
            || (self.next >= st.kept.len() && st.source.as_ref().is_some_and(|s| s.is_end_stream()))
    }
}

/// A request or response body.
#[pin_project(PinnedDrop)]
pub struct Body {
    #[pin]
    kind: Kind,
    /// The upstream request's, the downstream request's, and HTTP filters' (adaptive concurrency, admission
    /// control).
    hooks: [Option<Box<dyn EndOfStream>>; HOOKS],
    bytes: u64,
    /// Route timeout and stream idle timeout over a response body.
    watchdog: Option<Box<Watchdog>>,
    /// Marked on every frame: the stream's last activity, which the idle timeout watches.
    activity: Option<Activity>,
    /// Counts data bytes (request bodies, for the access log).
    counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// The last time a stream moved, shared by its request and response bodies.
pub type Activity = std::rc::Rc<std::cell::Cell<Instant>>;

/// Ends a body with an error when the route's deadline passes, the stream has been idle too long, or the
/// attempt's per-try idle timer ([`TryIdle`]) runs out.
pub struct Watchdog {
    pub deadline: Option<Instant>,
    pub idle: Option<(Duration, Activity)>,
    try_idle: Option<TryIdle>,
    /// Whether the sleep already accounts for the armed per-try idle timer.
    try_idle_armed: bool,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Watchdog {
    /// `None` when there is nothing to watch.
    pub fn new(deadline: Option<Instant>, idle: Option<(Duration, Activity)>) -> Option<Box<Watchdog>> {
        Watchdog::with_try_idle(deadline, idle, None)
    }

    /// As [`Watchdog::new`], also watching an attempt's per-try idle timer.
    pub fn with_try_idle(
        deadline: Option<Instant>,
        idle: Option<(Duration, Activity)>,
        try_idle: Option<TryIdle>,
    ) -> Option<Box<Watchdog>> {
        if deadline.is_none() && idle.is_none() && try_idle.is_none() {
            return None;
        }
        let try_idle_armed = try_idle.as_ref().is_some_and(TryIdle::armed);
        let first = Watchdog::next(deadline, idle.as_ref(), try_idle.as_ref());
        Some(Box::new(Watchdog {
            deadline,
            idle,
            try_idle,
            try_idle_armed,
            sleep: Box::pin(tokio::time::sleep_until(first.unwrap_or_else(far_future))),
        }))
    }

    /// Watches new limits with this watchdog's timer, re-armed rather than allocated again (the attempt's
    /// watchdog goes on to watch its response body); `None` when there is nothing to watch.
    pub fn rearm(
        mut self: Box<Self>,
        deadline: Option<Instant>,
        idle: Option<(Duration, Activity)>,
        try_idle: Option<TryIdle>,
    ) -> Option<Box<Watchdog>> {
        if deadline.is_none() && idle.is_none() && try_idle.is_none() {
            return None;
        }
        self.try_idle_armed = try_idle.as_ref().is_some_and(TryIdle::armed);
        let first = Watchdog::next(deadline, idle.as_ref(), try_idle.as_ref());
        self.deadline = deadline;
        self.idle = idle;
        self.try_idle = try_idle;
        self.sleep.as_mut().reset(first.unwrap_or_else(far_future));
        Some(self)
    }

    fn next(
        deadline: Option<Instant>,
        idle: Option<&(Duration, Activity)>,
        try_idle: Option<&TryIdle>,
    ) -> Option<Instant> {
        let idle_at = idle.map(|(d, a)| a.get() + *d);
        let try_at = try_idle.and_then(TryIdle::expires_at);
        [deadline, idle_at, try_at].into_iter().flatten().min()
    }

    /// Ready with the reason once a limit has passed; re-arms itself when only activity moved an idle limit.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Expired> {
        match &self.try_idle {
            Some(t) if !self.try_idle_armed && t.armed() => {
                // Armed since the sleep was set (by the connection pool or the request's end): count it in.
                self.try_idle_armed = true;
                if let Some(next) = Watchdog::next(self.deadline, self.idle.as_ref(), Some(t)) {
                    self.sleep.as_mut().reset(next);
                }
            }
            Some(t) if !self.try_idle_armed => t.wake_on_arm(cx.waker()),
            _ => {}
        }
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if self.deadline.is_some_and(|d| d <= now) {
                return Poll::Ready(Expired::Deadline);
            }
            if let Some(t) = &self.try_idle {
                if t.expires_at().is_some_and(|at| at <= now) {
                    t.0.fired.set(true);
                    return Poll::Ready(Expired::TryIdle);
                }
            }
            if self.idle.as_ref().is_some_and(|(d, a)| a.get() + *d <= now) {
                return Poll::Ready(Expired::Idle);
            }
            let next = Watchdog::next(self.deadline, self.idle.as_ref(), self.try_idle.as_ref());
            self.sleep.as_mut().reset(next.unwrap_or_else(far_future));
        }
    }

    /// A frame of the watched body passed: the per-try idle timer starts over.
    fn on_frame(&self) {
        if let Some(t) = &self.try_idle {
            t.touch();
        }
    }
}

/// A time no timer reaches (tokio caps sleeps at about two years).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Which limit a [`Watchdog`] saw pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    Deadline,
    Idle,
    TryIdle,
}

/// One attempt's per-try idle timer (`RetryPolicy.per_try_idle_timeout`), after Envoy's
/// `UpstreamRequest::setupPerTryTimeout` and `resetPerTryIdleTimer`.
///
/// The timer is armed once the attempt has its upstream connection ([`TryIdle::connected`]) *and* the whole
/// request has been sent ([`TryIdle::request_sent`]); from then on it expires `timeout` after the later of
/// arming and the last response frame (headers or body). It keeps running while the response streams to the
/// client. Clones share the timer: the attempt's request body, the router waiting for response headers and the
/// response body each hold one.
#[derive(Clone)]
pub struct TryIdle(std::rc::Rc<TryIdleState>);

struct TryIdleState {
    timeout: Duration,
    connected: Cell<bool>,
    sent: Cell<bool>,
    last: Cell<Instant>,
    /// The router's task, woken when the timer is armed from the connection task (the request's end).
    waker: Cell<Option<std::task::Waker>>,
    fired: Cell<bool>,
}

impl TryIdle {
    pub fn new(timeout: Duration) -> TryIdle {
        TryIdle(std::rc::Rc::new(TryIdleState {
            timeout,
            connected: Cell::new(false),
            sent: Cell::new(false),
            last: Cell::new(Instant::now()),
            waker: Cell::new(None),
            fired: Cell::new(false),
        }))
    }

    /// The attempt has its upstream connection (or HTTP/2 stream slot).
    pub fn connected(&self) {
        self.0.connected.set(true);
        self.arm_if_ready();
    }

    /// The attempt's request has been sent to its end.
    pub fn request_sent(&self) {
        self.0.sent.set(true);
        self.arm_if_ready();
    }

    fn arm_if_ready(&self) {
        if self.armed() {
            self.0.last.set(Instant::now());
            if let Some(w) = self.0.waker.take() {
                w.wake();
            }
        }
    }

    pub fn armed(&self) -> bool {
        self.0.connected.get() && self.0.sent.get()
    }

    /// Whether the timer ran out.
    pub fn fired(&self) -> bool {
        self.0.fired.get()
    }

    /// Response headers or a response frame arrived: the timer starts over.
    pub fn touch(&self) {
        if self.armed() {
            self.0.last.set(Instant::now());
        }
    }

    fn expires_at(&self) -> Option<Instant> {
        self.armed().then(|| self.0.last.get() + self.0.timeout)
    }

    fn wake_on_arm(&self, waker: &std::task::Waker) {
        let w = match self.0.waker.take() {
            Some(w) if w.will_wake(waker) => w,
            _ => waker.clone(),
        };
        self.0.waker.set(Some(w));
    }

    /// A hook for the attempt's request body that arms the timer when the body has been sent to its end.
    pub fn request_end_hook(&self) -> Box<dyn EndOfStream> {
        Box::new(RequestSent(self.clone()))
    }
}

struct RequestSent(TryIdle);

impl EndOfStream for RequestSent {
    fn end(&mut self, complete: bool, _bytes: u64) {
        if complete {
            self.0.request_sent();
        }
    }
}

impl Body {
    pub fn empty() -> Self {
        Body::from_kind(Kind::Empty)
    }

    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        if b.is_empty() {
            Body::empty()
        } else {
            Body::from_kind(Kind::Full(Some(b)))
        }
    }

    pub fn incoming(b: Incoming) -> Self {
        Body::from_kind(Kind::Incoming(b))
    }

    fn from_kind(kind: Kind) -> Self {
        Body {
            kind,
            hooks: [None, None, None, None],
            bytes: 0,
            watchdog: None,
            activity: None,
            counter: None,
        }
    }

    /// The bytes of a body made with [`Body::full`] (local replies), not yet read.
    pub fn full_bytes(&self) -> Option<Bytes> {
        match &self.kind {
            Kind::Full(b) => b.clone(),
            _ => None,
        }
    }

    /// Run `hook` when the body ends (immediately if it is already at its end). Hooks run in the order added;
    /// a body takes four at most, and a fifth runs at once as if the body had been dropped.
    pub fn on_end(mut self, mut hook: Box<dyn EndOfStream>) -> Self {
        if self.is_end_stream() {
            hook.end(true, self.bytes);
        } else if let Some(slot) = self.hooks.iter_mut().find(|h| h.is_none()) {
            *slot = Some(hook);
        } else {
            hook.end(false, self.bytes);
        }
        self
    }

    /// End the body with an error when the watchdog fires.
    pub fn with_watchdog(mut self, watchdog: Option<Box<Watchdog>>) -> Self {
        self.watchdog = watchdog;
        self
    }

    /// Mark `activity` on every frame.
    pub fn with_activity(mut self, activity: Option<Activity>) -> Self {
        self.activity = activity;
        self
    }

    /// Add each data frame's length to `counter`.
    pub fn with_counter(mut self, counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>) -> Self {
        self.counter = counter;
        self
    }

    fn finish(hooks: &mut [Option<Box<dyn EndOfStream>>; HOOKS], complete: bool, bytes: u64) {
        for h in hooks.iter_mut() {
            if let Some(mut h) = h.take() {
                h.end(complete, bytes);
            }
        }
    }
}

/// The route timeout or the stream idle timeout expired while the body was streaming.
#[derive(Debug, thiserror::Error)]
pub enum BodyTimeout {
    #[error("upstream request timeout")]
    Route,
    #[error("stream timeout")]
    Idle,
    /// The attempt's `per_try_idle_timeout`.
    #[error("upstream per try idle timeout")]
    TryIdle,
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(w) = this.watchdog.as_mut() {
            if let Poll::Ready(why) = w.poll_expired(cx) {
                Body::finish(this.hooks, false, *this.bytes);
                let e = match why {
                    Expired::Deadline => BodyTimeout::Route,
                    Expired::Idle => BodyTimeout::Idle,
                    Expired::TryIdle => BodyTimeout::TryIdle,
                };
                return Poll::Ready(Some(Err(Box::new(e))));
            }
        }
        let mut kind = this.kind;
        let res = match kind.as_mut().project() {
            KindProj::Empty => Poll::Ready(None),
            KindProj::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            KindProj::Incoming(inc) => match inc.poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e) as BoxError))),
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            KindProj::Tee(t) => t.poll_frame(cx),
        };
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    *this.bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    for h in this.hooks.iter_mut().flatten() {
                        h.trailers(t);
                    }
                }
                if let Some(a) = this.activity.as_ref() {
                    a.set(Instant::now());
                }
                if let Some(w) = this.watchdog.as_ref() {
                    w.on_frame();
                }
                if let (Some(c), Some(d)) = (this.counter.as_ref(), f.data_ref()) {
                    c.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                // hyper stops polling a body that reports its end, so the end is noticed here.
                if kind_at_end(&kind) {
                    Body::finish(this.hooks, true, *this.bytes);
                }
            }
            Poll::Ready(None) => Body::finish(this.hooks, true, *this.bytes),
            Poll::Ready(Some(Err(_))) => Body::finish(this.hooks, false, *this.bytes),
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        kind_at_end(&self.kind)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Incoming(i) => i.size_hint(),
            Kind::Tee(_) => SizeHint::default(),
        }
    }
}

fn kind_at_end(kind: &Kind) -> bool {
    match kind {
        Kind::Empty => true,
        Kind::Full(b) => b.is_none(),
        Kind::Incoming(i) => i.is_end_stream(),
        Kind::Tee(t) => t.at_end(),
    }
}

#[pinned_drop]
impl PinnedDrop for Body {
    fn drop(self: Pin<&mut Self>) {
        let this = self.project();
        Body::finish(this.hooks, false, *this.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test(start_paused = true)]
    async fn per_try_idle_starts_with_connection_and_request_sent_and_restarts_on_frames() {
        let t = TryIdle::new(Duration::from_millis(100));
        let mut w = Watchdog::with_try_idle(None, None, Some(t.clone())).unwrap();
        // Not armed: it never fires, whatever the time.
        let waited = tokio::time::timeout(Duration::from_secs(10), poll_fn(|cx| w.poll_expired(cx))).await;
        assert!(waited.is_err());
        // Connected, but the request is still being sent: still not armed.
        t.connected();
        let waited = tokio::time::timeout(Duration::from_secs(10), poll_fn(|cx| w.poll_expired(cx))).await;
        assert!(waited.is_err());
        assert!(!t.armed());

        // The request's end arms it while the watchdog waits (from elsewhere, as hyper's connection task does):
        // the waiting task is woken and counts the timer in; a frame 60 ms later starts it over.
        let start = Instant::now();
        let other = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            t.request_sent();
            tokio::time::sleep(Duration::from_millis(60)).await;
            t.touch();
        };
        let (why, ()) = tokio::join!(poll_fn(|cx| w.poll_expired(cx)), other);
        assert_eq!(why, Expired::TryIdle);
        assert_eq!(start.elapsed(), Duration::from_millis(30 + 60 + 100));
        assert!(t.fired());
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_limit_to_pass_wins() {
        let t = TryIdle::new(Duration::from_millis(100));
        t.connected();
        t.request_sent();
        let start = Instant::now();
        let mut w =
            Watchdog::with_try_idle(Some(start + Duration::from_millis(50)), None, Some(t.clone())).unwrap();
        assert_eq!(poll_fn(|cx| w.poll_expired(cx)).await, Expired::Deadline);
        assert!(!t.fired());

        // A stream idle timeout longer than the per-try idle timeout: the per-try one fires first.
        let t = TryIdle::new(Duration::from_millis(100));
        t.connected();
        t.request_sent();
        let activity: Activity = std::rc::Rc::new(Cell::new(Instant::now()));
        let start = Instant::now();
        let mut w = Watchdog::with_try_idle(
            None,
            Some((Duration::from_millis(300), activity)),
            Some(t.clone()),
        )
        .unwrap();
        assert_eq!(poll_fn(|cx| w.poll_expired(cx)).await, Expired::TryIdle);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_request_counts_as_sent_at_once() {
        let t = TryIdle::new(Duration::from_millis(100));
        let _body = Body::empty().on_end(t.request_end_hook());
        assert!(!t.armed());
        t.connected();
        assert!(t.armed());
        // A body dropped before its end does not arm it.
        let t = TryIdle::new(Duration::from_millis(100));
        drop(Body::full("abc").on_end(t.request_end_hook()));
        t.connected();
        assert!(!t.armed());
    }
}
