//! `retry_priority: envoy.retry_priorities.previous_priorities` (`PreviousPrioritiesConfig`): retries spread
//! over priorities that have not been attempted yet, even those that would normally take no load.
//!
//! After Envoy's `PreviousPrioritiesRetryPriority` (`source/extensions/retry/priority/previous_priorities/`)
//! and the config's documentation:
//! - Every attempted host's priority is remembered. While fewer than `update_frequency` attempts were made,
//!   the cluster's own priority load is used. At every `update_frequency`-th attempt, the priorities attempted
//!   so far join the excluded set and the load is rebuilt from the levels' health and degraded availability
//!   (`min(100, overprovisioning × healthy / hosts)`, as the cluster computes it) with the excluded levels at
//!   zero: `load(P) = availability(P) × 100 / min(100, Σ availability)`, healthy levels first, then degraded,
//!   passes repeated until the 100 are handed out. Attempts between updates keep the last rebuilt load.
//! - When the excluded levels leave nothing available, the excluded set and the attempted priorities are
//!   reset ("essentially starting from the beginning"); when nothing is available at all, the cluster's own
//!   load is used.
//!
//! Panic stays the cluster's: a level chosen by this load that is in panic balances over all its hosts.

/// A priority load replacing the cluster's for one attempt: percent per level, healthy then degraded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriorityLoadOverride {
    pub healthy: Vec<u32>,
    pub degraded: Vec<u32>,
}

/// One request's previous-priorities state.
#[derive(Clone, Debug)]
pub struct PreviousPriorities {
    update_frequency: u32,
    /// The priority of each host attempted since the start (or the last reset).
    attempted: Vec<usize>,
    excluded: Vec<bool>,
    /// The load of the last update; `None` when it fell back to the cluster's.
    load: Option<PriorityLoadOverride>,
}

impl PreviousPriorities {
    /// `update_frequency` is at least 1 (lowering refuses 0).
    pub fn new(update_frequency: u32) -> Self {
        PreviousPriorities {
            update_frequency: update_frequency.max(1),
            attempted: Vec::new(),
            excluded: Vec::new(),
            load: None,
        }
    }

    /// An attempt went to a host of `priority`.
    pub fn on_host_attempted(&mut self, priority: usize) {
        self.attempted.push(priority);
    }

    /// The load for the next attempt given the levels' availability (`health` and `degraded`, percent, index =
    /// priority); `None` means the cluster's own.
    pub fn determine(&mut self, health: &[u32], degraded: &[u32]) -> Option<&PriorityLoadOverride> {
        let n = self.attempted.len() as u64;
        let freq = u64::from(self.update_frequency);
        if n < freq {
            return None;
        }
        if n.is_multiple_of(freq) {
            let levels = health.len().max(degraded.len());
            if self.excluded.len() < levels {
                self.excluded.resize(levels, false);
            }
            for &p in &self.attempted {
                if let Some(e) = self.excluded.get_mut(p) {
                    *e = true;
                }
            }
            self.load = self.adjust(health, degraded);
        }
        self.load.as_ref()
    }

    /// `adjustForAttemptedPriorities`.
    fn adjust(&mut self, health: &[u32], degraded: &[u32]) -> Option<PriorityLoadOverride> {
        let mut total = self.availability(health, degraded);
        if total == 0 {
            self.excluded.iter_mut().for_each(|e| *e = false);
            self.attempted.clear();
            total = self.availability(health, degraded);
        }
        if total == 0 {
            return None;
        }
        let level = |v: &[u32], i: usize| {
            if self.excluded.get(i).copied().unwrap_or(false) {
                0
            } else {
                v.get(i).copied().unwrap_or(0)
            }
        };
        let levels = health.len().max(degraded.len());
        let mut load = PriorityLoadOverride {
            healthy: vec![0; levels],
            degraded: vec![0; levels],
        };
        let mut left = 100u32;
        while left != 0 {
            for i in 0..levels {
                let delta = left.min(level(health, i) * 100 / total);
                load.healthy[i] += delta;
                left -= delta;
            }
            for i in 0..levels {
                let delta = left.min(level(degraded, i) * 100 / total);
                load.degraded[i] += delta;
                left -= delta;
            }
        }
        Some(load)
    }

    /// The availability of the levels not excluded, at most 100.
    fn availability(&self, health: &[u32], degraded: &[u32]) -> u32 {
        let mut total = 0;
        for i in 0..health.len().max(degraded.len()) {
            if !self.excluded.get(i).copied().unwrap_or(false) {
                total += health.get(i).copied().unwrap_or(0) + degraded.get(i).copied().unwrap_or(0);
            }
        }
        total.min(100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy(p: &mut PreviousPriorities, health: &[u32]) -> Option<Vec<u32>> {
        let degraded = vec![0; health.len()];
        p.determine(health, &degraded).map(|l| l.healthy.clone())
    }

    /// The example of `PreviousPrioritiesConfig`'s documentation: healths {100, 50, 50}; P0 excluded gives
    /// {0, 50, 50}.
    #[test]
    fn excluding_p0_spills_by_relative_health() {
        let mut p = PreviousPriorities::new(1);
        assert_eq!(healthy(&mut p, &[100, 50, 50]), None);
        p.on_host_attempted(0);
        assert_eq!(healthy(&mut p, &[100, 50, 50]), Some(vec![0, 50, 50]));
    }

    /// The documented sequence for healths {100, 0, 50} with update_frequency 1: P0, P2, P0 (reset), P2.
    #[test]
    fn attempted_priorities_reset_when_none_is_left() {
        let mut p = PreviousPriorities::new(1);
        let h = [100, 0, 50];
        assert_eq!(healthy(&mut p, &h), None); // attempt 1: the cluster's load, P0
        p.on_host_attempted(0);
        assert_eq!(healthy(&mut p, &h), Some(vec![0, 0, 100])); // attempt 2: P2
        p.on_host_attempted(2);
        assert_eq!(healthy(&mut p, &h), Some(vec![100, 0, 0])); // attempt 3: reset, P0 again
        p.on_host_attempted(0);
        assert_eq!(healthy(&mut p, &h), Some(vec![0, 0, 100])); // attempt 4: P2
    }

    #[test]
    fn update_frequency_holds_the_load_between_updates() {
        let mut p = PreviousPriorities::new(2);
        let h = [100, 100, 100];
        assert_eq!(healthy(&mut p, &h), None);
        p.on_host_attempted(0);
        assert_eq!(healthy(&mut p, &h), None);
        p.on_host_attempted(0);
        // Third attempt: P0 excluded; P1 can take it all.
        assert_eq!(healthy(&mut p, &h), Some(vec![0, 100, 0]));
        p.on_host_attempted(1);
        // Fourth: the same load until the next update.
        assert_eq!(healthy(&mut p, &h), Some(vec![0, 100, 0]));
        p.on_host_attempted(1);
        assert_eq!(healthy(&mut p, &h), Some(vec![0, 0, 100]));
    }

    #[test]
    fn degraded_levels_take_what_healthy_ones_leave_and_nothing_available_is_the_clusters_load() {
        let mut p = PreviousPriorities::new(1);
        p.on_host_attempted(0);
        let load = p.determine(&[100, 0], &[0, 70]).cloned();
        assert_eq!(
            load,
            Some(PriorityLoadOverride {
                healthy: vec![0, 0],
                degraded: vec![0, 100],
            })
        );
        let mut p = PreviousPriorities::new(1);
        p.on_host_attempted(0);
        assert_eq!(healthy(&mut p, &[0, 0]), None);
    }
}
