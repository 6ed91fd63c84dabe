//! The gradient concurrency controller, as Envoy's `GradientController`
//! (`source/extensions/filters/http/adaptive_concurrency/controller/gradient_controller.cc`), without timers:
//! the caller passes the time to every method, and [`Gradient::advance`] fires whatever timer is due.
//!
//! # The algorithm
//!
//! An ideal round-trip time (minRTT) is measured by pinning the concurrency limit low (`min_concurrency`) until
//! `request_count` latency samples are in; their `sample_aggregate_percentile` is the minRTT. Requests sent
//! before the window began are not sampled. The next measurement starts `interval` plus a random jitter of up
//! to `jitter × interval` later, or at once after the limit was set to its minimum five windows in a row.
//!
//! Outside a minRTT window, every `concurrency_update_interval` the window's samples are summarised the same way
//! (sampleRTT) and the limit recomputed:
//!
//! ```text
//! gradient  = clamp(minRTT × (1 + buffer) / sampleRTT, 0.5, 2.0)
//! limit'    = old_limit × gradient
//! new_limit = clamp(trunc(limit' + sqrt(limit')), min_concurrency_limit, max_concurrency_limit)
//! ```
//!
//! A window without samples leaves the limit alone. With `fixed_value`, minRTT is that value and never sampled.
//!
//! Two differences from Envoy, both in how, not what: samples are kept exactly and the percentile is the
//! nearest-rank one (Envoy's circllhist approximates it in log-linear bins), and timers are lazy — a timer that
//! fell due while no request came is fired, at its due time, by the next call.

use crate::upstream::lb::Rng;
use std::time::Duration;
use tokio::time::Instant;

/// The controller's configuration (`GradientControllerConfig`), with Envoy's defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct GradientConfig {
    /// `sample_aggregate_percentile`, as a fraction (default 0.5).
    pub sample_aggregate_percentile: f64,
    /// `concurrency_limit_params.max_concurrency_limit` (default 1000).
    pub max_concurrency_limit: u32,
    /// `concurrency_limit_params.concurrency_update_interval` (required).
    pub concurrency_update_interval: Duration,
    /// `concurrency_limit_params.min_concurrency_limit`: the floor of the calculated limit (default
    /// `min_concurrency`).
    pub min_concurrency_limit: u32,
    /// `min_rtt_calc_params.interval`.
    pub min_rtt_interval: Duration,
    /// `min_rtt_calc_params.fixed_value`: minRTT is this and is never sampled.
    pub fixed_min_rtt: Option<Duration>,
    /// `min_rtt_calc_params.request_count` (default 50).
    pub request_count: u32,
    /// `min_rtt_calc_params.jitter`, as a fraction (default 0.15).
    pub jitter: f64,
    /// `min_rtt_calc_params.min_concurrency`: the limit while measuring minRTT (default 3).
    pub min_concurrency: u32,
    /// `min_rtt_calc_params.buffer`, as a fraction (default 0.25).
    pub buffer: f64,
}

impl GradientConfig {
    /// Envoy's defaults around a required update interval and minRTT interval.
    pub fn with_intervals(update: Duration, min_rtt_interval: Duration) -> Self {
        GradientConfig {
            sample_aggregate_percentile: 0.5,
            max_concurrency_limit: 1000,
            concurrency_update_interval: update,
            min_concurrency_limit: 3,
            min_rtt_interval,
            fixed_min_rtt: None,
            request_count: 50,
            jitter: 0.15,
            min_concurrency: 3,
            buffer: 0.25,
        }
    }
}

/// What the controller last computed, for the `gradient_controller.*` gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Readings {
    /// The last gradient (Envoy reports it ×1000 in the `gradient` gauge).
    pub gradient: f64,
    /// The last burst headroom, `sqrt(limit')` (`burst_queue_size`).
    pub burst_headroom: f64,
    pub min_rtt: Duration,
    pub sample_rtt: Duration,
}

/// The gradient controller's state. Not synchronised: the filter keeps it behind a mutex.
#[derive(Debug)]
pub struct Gradient {
    cfg: GradientConfig,
    limit: u32,
    /// The limit to restore when the minRTT window ends; non-zero exactly while a window is open.
    deferred_limit: u32,
    /// Latency samples of the current window, in microseconds.
    samples: Vec<u64>,
    consecutive_min: u32,
    /// Requests sent before this instant are not sampled (the start of the last minRTT window).
    min_rtt_epoch: Instant,
    next_min_rtt: Option<Instant>,
    next_sample_reset: Option<Instant>,
    readings: Readings,
}

impl Gradient {
    /// A controller created at `now`: it starts in a minRTT window (unless minRTT is fixed), with the limit at
    /// `min_concurrency`.
    pub fn new(cfg: GradientConfig, now: Instant) -> Self {
        let mut g = Gradient {
            limit: cfg.min_concurrency,
            deferred_limit: 0,
            samples: Vec::new(),
            consecutive_min: 0,
            min_rtt_epoch: now,
            next_min_rtt: None,
            next_sample_reset: Some(now + cfg.concurrency_update_interval),
            readings: Readings {
                min_rtt: cfg.fixed_min_rtt.unwrap_or_default(),
                ..Readings::default()
            },
            cfg,
        };
        if g.sampling_min_rtt() {
            g.enter_min_rtt_window(now);
        }
        g
    }

    pub fn config(&self) -> &GradientConfig {
        &self.cfg
    }

    /// The current concurrency limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn in_min_rtt_window(&self) -> bool {
        self.deferred_limit > 0
    }

    pub fn readings(&self) -> Readings {
        self.readings
    }

    /// When the next timer falls due (the caller need not call [`Gradient::advance`] before).
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.next_min_rtt, self.next_sample_reset) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn sampling_min_rtt(&self) -> bool {
        self.cfg.fixed_min_rtt.is_none()
    }

    /// Fire every timer due at `now`, each at its due time, in order.
    pub fn advance(&mut self, now: Instant) {
        loop {
            let min_rtt_due = self.next_min_rtt.filter(|t| *t <= now);
            let reset_due = self.next_sample_reset.filter(|t| *t <= now);
            let min_rtt_first = match (min_rtt_due, reset_due) {
                (Some(a), Some(b)) => a <= b,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return,
            };
            match (min_rtt_first, min_rtt_due, reset_due) {
                (true, Some(a), _) => {
                    self.next_min_rtt = None;
                    self.enter_min_rtt_window(a);
                }
                (_, _, Some(b)) => self.on_sample_reset_timer(b, now),
                _ => return,
            }
        }
    }

    /// `sample_reset_timer_`: recompute the limit from the window's samples and re-arm; during a minRTT window
    /// it lapses (the end of the window re-arms it).
    fn on_sample_reset_timer(&mut self, due: Instant, now: Instant) {
        if self.in_min_rtt_window() {
            self.next_sample_reset = None;
            return;
        }
        let interval = self.cfg.concurrency_update_interval;
        if self.samples.is_empty() {
            // An empty window changes nothing, so a run of them is skipped in one step.
            let behind = now.saturating_duration_since(due).as_nanos() / interval.as_nanos().max(1);
            let skip = u32::try_from(behind + 1).unwrap_or(u32::MAX);
            self.next_sample_reset = Some(due + interval.saturating_mul(skip));
            return;
        }
        let sample_rtt = self.aggregate_and_clear();
        self.readings.sample_rtt = sample_rtt;
        let new_limit = self.calculate_new_limit(sample_rtt);
        self.update_limit(new_limit, due);
        self.next_sample_reset = Some(due + interval);
    }

    fn enter_min_rtt_window(&mut self, now: Instant) {
        if self.in_min_rtt_window() {
            return;
        }
        self.deferred_limit = self.limit;
        // Envoy's min_concurrency_limit change: a probe never raises a limit already below min_concurrency.
        let probe = self.cfg.min_concurrency.min(self.limit);
        self.update_limit(probe, now);
        self.samples.clear();
        self.min_rtt_epoch = now;
    }

    fn end_min_rtt_window(&mut self, now: Instant, rng: &mut Rng) {
        let min_rtt = self.aggregate_and_clear();
        self.readings.min_rtt = min_rtt;
        let restore = self.deferred_limit;
        self.update_limit(restore, now);
        self.deferred_limit = 0;
        self.next_min_rtt = Some(now + jittered(self.cfg.min_rtt_interval, self.cfg.jitter, rng));
        self.next_sample_reset = Some(now + self.cfg.concurrency_update_interval);
    }

    /// Record the latency of a request sent at `sent` whose response came at `now`.
    pub fn record(&mut self, sent: Instant, now: Instant, rng: &mut Rng) {
        self.advance(now);
        if sent < self.min_rtt_epoch {
            return;
        }
        let micros = u64::try_from(now.saturating_duration_since(sent).as_micros()).unwrap_or(u64::MAX);
        self.samples.push(micros);
        if self.in_min_rtt_window() && self.samples.len() >= self.cfg.request_count as usize {
            self.end_min_rtt_window(now, rng);
        }
    }

    /// The configured percentile of the window's samples (nearest rank), clearing them.
    fn aggregate_and_clear(&mut self) -> Duration {
        let n = self.samples.len();
        if n == 0 {
            return Duration::ZERO;
        }
        let rank = (self.cfg.sample_aggregate_percentile * n as f64).ceil() as usize;
        let idx = rank.saturating_sub(1).min(n - 1);
        let (_, v, _) = self.samples.select_nth_unstable(idx);
        let v = *v;
        self.samples.clear();
        Duration::from_micros(v)
    }

    fn calculate_new_limit(&mut self, sample_rtt: Duration) -> u32 {
        let min_rtt = self.readings.min_rtt.as_micros() as f64;
        let buffered = min_rtt + min_rtt * self.cfg.buffer;
        let sample = (sample_rtt.as_micros() as f64).max(1.0);
        let gradient = (buffered / sample).clamp(0.5, 2.0);
        let limit = f64::from(self.limit) * gradient;
        let headroom = limit.sqrt();
        self.readings.gradient = gradient;
        self.readings.burst_headroom = headroom;
        let new_limit = (limit + headroom) as u32;
        new_limit
            .min(self.cfg.max_concurrency_limit)
            .max(self.cfg.min_concurrency_limit)
    }

    fn update_limit(&mut self, new_limit: u32, now: Instant) {
        let old = self.limit;
        self.limit = new_limit;
        let floor = self.cfg.min_concurrency_limit;
        if !self.in_min_rtt_window() && old == floor && new_limit == floor {
            self.consecutive_min += 1;
        } else {
            self.consecutive_min = 0;
        }
        // Five windows in a row at the minimum suggest a stale minRTT: measure it again now.
        if self.consecutive_min >= 5 && self.sampling_min_rtt() {
            self.next_min_rtt = Some(now);
        }
    }
}

/// `interval + random % ceil(interval_ms × jitter)` milliseconds, as Envoy's `applyJitter`.
pub fn jittered(interval: Duration, jitter: f64, rng: &mut Rng) -> Duration {
    let ms = interval.as_millis() as u64;
    let range = (ms as f64 * jitter).ceil() as u64;
    if jitter <= 0.0 || range == 0 {
        return interval;
    }
    Duration::from_millis(ms + rng.next_u64() % range)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg() -> GradientConfig {
        let mut c = GradientConfig::with_intervals(100 * MS, Duration::from_secs(10));
        c.request_count = 5;
        c.jitter = 0.0;
        c
    }

    /// Record `n` requests of latency `rtt`, sent now, answered after `rtt` (the clock advances).
    async fn samples(g: &mut Gradient, rng: &mut Rng, n: u32, rtt: Duration) {
        let sent = Instant::now();
        tokio::time::advance(rtt).await;
        for _ in 0..n {
            g.record(sent, Instant::now(), rng);
        }
    }

    /// One sample window: `n` samples of `rtt`, then the clock runs to the next timer, which fires.
    async fn window(g: &mut Gradient, rng: &mut Rng, n: u32, rtt: Duration) {
        samples(g, rng, n, rtt).await;
        let due = g.next_deadline().expect("a timer is armed");
        let now = Instant::now();
        if due > now {
            tokio::time::advance(due - now).await;
        }
        g.advance(Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn starts_in_a_min_rtt_window_pinned_to_min_concurrency() {
        let mut rng = Rng::seeded(1);
        let mut g = Gradient::new(cfg(), Instant::now());
        assert!(g.in_min_rtt_window());
        assert_eq!(g.limit(), 3);
        samples(&mut g, &mut rng, 4, 10 * MS).await;
        assert!(g.in_min_rtt_window(), "needs request_count samples");
        samples(&mut g, &mut rng, 1, 10 * MS).await;
        assert!(!g.in_min_rtt_window());
        assert_eq!(g.readings().min_rtt, 10 * MS);
        // The limit goes back to what it was before the window (min_concurrency at start).
        assert_eq!(g.limit(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn limit_follows_envoys_formula() {
        let mut rng = Rng::seeded(1);
        let mut g = Gradient::new(cfg(), Instant::now());
        samples(&mut g, &mut rng, 5, 10 * MS).await;
        // sampleRTT == minRTT: gradient = 1.25 / 1 = 1.25; limit' = 3 × 1.25 = 3.75; + sqrt(3.75) = 5.68 → 5.
        window(&mut g, &mut rng, 3, 10 * MS).await;
        assert_eq!(g.limit(), 5);
        assert!((g.readings().gradient - 1.25).abs() < 1e-9);
        assert!((g.readings().burst_headroom - 3.75f64.sqrt()).abs() < 1e-9);

        // Latency far above minRTT: gradient clamps at 0.5; 5 × 0.5 = 2.5 + 1.58 = 4.08 → 4.
        window(&mut g, &mut rng, 3, 100 * MS).await;
        assert_eq!(g.readings().gradient, 0.5);
        assert_eq!(g.limit(), 4);

        // Much faster than minRTT: gradient clamps at 2.0; 4 × 2 = 8 + 2.83 = 10.83 → 10.
        window(&mut g, &mut rng, 3, MS).await;
        assert_eq!(g.readings().gradient, 2.0);
        assert_eq!(g.limit(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn limit_is_clamped_to_its_bounds() {
        let mut rng = Rng::seeded(1);
        let mut c = cfg();
        c.max_concurrency_limit = 6;
        let mut g = Gradient::new(c, Instant::now());
        samples(&mut g, &mut rng, 5, 10 * MS).await;
        for _ in 0..5 {
            window(&mut g, &mut rng, 2, MS).await;
        }
        assert_eq!(g.limit(), 6);
        // Slow: 6 × 0.5 = 3 + 1.73 = 4.73 → 4; then 4 × 0.5 = 2 + 1.41 → 3 (the floor).
        window(&mut g, &mut rng, 2, 100 * MS).await;
        assert_eq!(g.limit(), 4);
        window(&mut g, &mut rng, 2, 100 * MS).await;
        assert_eq!(g.limit(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn percentile_summarises_the_window() {
        let mut rng = Rng::seeded(1);
        let mut c = cfg();
        c.sample_aggregate_percentile = 0.9;
        c.request_count = 10;
        let mut g = Gradient::new(c, Instant::now());
        let sent = Instant::now();
        for i in 1..=10u64 {
            tokio::time::advance(MS).await;
            let _ = i;
            g.record(sent, Instant::now(), &mut rng);
        }
        // Latencies 1..=10 ms; the 90th percentile by nearest rank is the 9th.
        assert_eq!(g.readings().min_rtt, 9 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_sent_before_the_window_are_not_sampled() {
        let mut rng = Rng::seeded(1);
        let mut g = Gradient::new(cfg(), Instant::now());
        samples(&mut g, &mut rng, 5, 10 * MS).await;
        let early = Instant::now();
        // The next window opens at +10 s (no jitter).
        tokio::time::advance(Duration::from_secs(10)).await;
        g.advance(Instant::now());
        assert!(g.in_min_rtt_window());
        for _ in 0..10 {
            g.record(early, Instant::now(), &mut rng);
        }
        assert!(
            g.in_min_rtt_window(),
            "samples from before the window are dropped"
        );
        samples(&mut g, &mut rng, 5, 20 * MS).await;
        assert!(!g.in_min_rtt_window());
        assert_eq!(g.readings().min_rtt, 20 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_pins_the_limit_and_restores_it() {
        let mut rng = Rng::seeded(1);
        let mut g = Gradient::new(cfg(), Instant::now());
        samples(&mut g, &mut rng, 5, 10 * MS).await;
        for _ in 0..4 {
            window(&mut g, &mut rng, 2, MS).await;
        }
        let grown = g.limit();
        assert!(grown > 3);
        tokio::time::advance(Duration::from_secs(10)).await;
        g.advance(Instant::now());
        assert!(g.in_min_rtt_window());
        assert_eq!(g.limit(), 3);
        // No limit updates during the window, however long.
        tokio::time::advance(Duration::from_secs(1)).await;
        g.advance(Instant::now());
        assert_eq!(g.limit(), 3);
        samples(&mut g, &mut rng, 5, 10 * MS).await;
        assert_eq!(g.limit(), grown);
    }

    #[tokio::test(start_paused = true)]
    async fn five_windows_at_the_minimum_force_a_new_measurement() {
        let mut rng = Rng::seeded(1);
        let mut g = Gradient::new(cfg(), Instant::now());
        samples(&mut g, &mut rng, 5, 10 * MS).await;
        for i in 0..5 {
            assert!(!g.in_min_rtt_window(), "window {i}");
            window(&mut g, &mut rng, 2, 100 * MS).await;
            assert_eq!(g.limit(), 3);
        }
        // The fifth consecutive minimum arms the minRTT timer at once, and it fires.
        assert!(g.in_min_rtt_window());
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_delays_the_next_window() {
        let mut rng = Rng::seeded(7);
        let d = jittered(Duration::from_secs(10), 0.15, &mut rng);
        assert!(
            d >= Duration::from_secs(10) && d < Duration::from_millis(11_500),
            "{d:?}"
        );
        assert_eq!(
            jittered(Duration::from_secs(10), 0.0, &mut rng),
            Duration::from_secs(10)
        );

        let mut c = cfg();
        c.jitter = 0.5;
        let mut g = Gradient::new(c, Instant::now());
        samples(&mut g, &mut rng, 5, 10 * MS).await;
        let next = g.next_min_rtt.expect("armed") - Instant::now();
        assert!(
            next >= Duration::from_secs(10) && next < Duration::from_secs(15),
            "{next:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_min_rtt_never_samples() {
        let mut rng = Rng::seeded(1);
        let mut c = cfg();
        c.fixed_min_rtt = Some(10 * MS);
        let mut g = Gradient::new(c, Instant::now());
        assert!(!g.in_min_rtt_window());
        assert_eq!(g.limit(), 3);
        window(&mut g, &mut rng, 3, 10 * MS).await;
        assert_eq!(g.limit(), 5);
        for _ in 0..10 {
            window(&mut g, &mut rng, 2, 100 * MS).await;
        }
        assert!(!g.in_min_rtt_window());
    }

    #[tokio::test(start_paused = true)]
    async fn min_concurrency_limit_is_the_floor_apart_from_the_probe() {
        let mut rng = Rng::seeded(1);
        let mut c = cfg();
        c.min_concurrency = 10;
        c.min_concurrency_limit = 2;
        let mut g = Gradient::new(c, Instant::now());
        assert_eq!(g.limit(), 10);
        samples(&mut g, &mut rng, 5, 10 * MS).await;
        for _ in 0..6 {
            window(&mut g, &mut rng, 2, 100 * MS).await;
        }
        assert_eq!(
            g.limit(),
            2,
            "the calculated limit may fall below the probe concurrency"
        );
        // A probe does not raise a limit below min_concurrency.
        tokio::time::advance(Duration::from_secs(10)).await;
        g.advance(Instant::now());
        assert!(g.in_min_rtt_window());
        assert_eq!(g.limit(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_is_skipped_without_changing_the_limit() {
        let mut rng = Rng::seeded(1);
        let mut g = Gradient::new(cfg(), Instant::now());
        samples(&mut g, &mut rng, 5, 10 * MS).await;
        samples(&mut g, &mut rng, 2, 10 * MS).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        g.advance(Instant::now());
        assert_eq!(g.limit(), 5, "one update from the one window with samples");
        assert!(g.next_deadline().expect("armed") > Instant::now());
    }
}
