//! The one body type that flows through the proxy, both ways.
//!
//! An enum rather than a boxed trait object, so that forwarding a request or response costs no allocation. The
//! response side can carry an [`EndOfStream`] hook: whatever must happen when the body is done (stats, returning
//! an HTTP/1 connection to its pool) runs when the last frame passes, or on drop if the client went away first.

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project::{pin_project, pinned_drop};
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
}

/// The last time a stream moved, shared by its request and response bodies.
pub type Activity = std::rc::Rc<std::cell::Cell<Instant>>;

/// Ends a body with an error when the route's deadline passes or the stream has been idle too long.
pub struct Watchdog {
    pub deadline: Option<Instant>,
    pub idle: Option<(Duration, Activity)>,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Watchdog {
    /// `None` when there is nothing to watch.
    pub fn new(deadline: Option<Instant>, idle: Option<(Duration, Activity)>) -> Option<Box<Watchdog>> {
        let first = Watchdog::next(deadline, idle.as_ref())?;
        Some(Box::new(Watchdog {
            deadline,
            idle,
            sleep: Box::pin(tokio::time::sleep_until(first)),
        }))
    }

    fn next(deadline: Option<Instant>, idle: Option<&(Duration, Activity)>) -> Option<Instant> {
        let idle_at = idle.map(|(d, a)| a.get() + *d);
        match (deadline, idle_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Ready with the reason once a limit has passed; re-arms itself when only activity moved the idle limit.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Expired> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if self.deadline.is_some_and(|d| d <= now) {
                return Poll::Ready(Expired::Deadline);
            }
            match Watchdog::next(self.deadline, self.idle.as_ref()) {
                Some(next) if next > now => self.sleep.as_mut().reset(next),
                _ => return Poll::Ready(Expired::Idle),
            }
        }
    }
}

/// Which limit a [`Watchdog`] saw pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    Deadline,
    Idle,
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
