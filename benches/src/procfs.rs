//! Reading a process group's CPU time and memory from `/proc`.
//!
//! CPU time is `utime` and `stime` (fields 14 and 15 of `/proc/<pid>/stat`, in clock ticks, covering every
//! thread of the process) summed over every process in the group, so a proxy that forks workers is measured
//! whole. Memory is `VmRSS` and `VmHWM` from `/proc/<pid>/status`, summed the same way.

use std::fs;
use std::io;

/// Accumulated CPU time of a process group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// User-space time, in clock ticks.
    pub user: u64,
    /// Kernel time on the processes' behalf, in clock ticks.
    pub system: u64,
}

impl CpuTicks {
    /// `self - earlier`, saturating.
    pub fn since(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// Resident memory of a process group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Current resident set, KiB.
    pub rss_kib: u64,
    /// Peak resident set ("high water mark"), KiB.
    pub hwm_kib: u64,
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// The fields after the command name in a `/proc/<pid>/stat` line (the name may hold spaces and parens).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().collect())
}

/// (process group, user ticks, system ticks) from a `/proc/<pid>/stat` line.
pub fn parse_stat(stat: &str) -> Option<(i32, CpuTicks)> {
    // After the name: state(3) ppid(4) pgrp(5) ... utime(14) stime(15); index 0 here is field 3.
    let f = stat_fields(stat)?;
    let pgrp = f.get(2)?.parse().ok()?;
    let user = f.get(11)?.parse().ok()?;
    let system = f.get(12)?.parse().ok()?;
    Some((pgrp, CpuTicks { user, system }))
}

/// (VmRSS, VmHWM) in KiB from a `/proc/<pid>/status` text.
pub fn parse_status(status: &str) -> Memory {
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    }
}

/// The live processes of group `pgid` (a group leader's pid is its group id).
pub fn group_members(pgid: i32) -> io::Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // Processes exit between read_dir and read: skip them.
        if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
            if parse_stat(&stat).is_some_and(|(g, _)| g == pgid) {
                pids.push(pid);
            }
        }
    }
    Ok(pids)
}

/// CPU time of every process in group `pgid`. Fails if the group has no live process.
pub fn group_cpu(pgid: i32) -> io::Result<CpuTicks> {
    let mut total = CpuTicks::default();
    let mut any = false;
    for pid in group_members(pgid)? {
        if let Some((_, t)) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat)
        {
            total.user += t.user;
            total.system += t.system;
            any = true;
        }
    }
    if any {
        Ok(total)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process group {pgid} has no process"),
        ))
    }
}

/// Resident memory of every process in group `pgid`.
pub fn group_memory(pgid: i32) -> io::Result<Memory> {
    let mut total = Memory::default();
    for pid in group_members(pgid)? {
        if let Ok(s) = fs::read_to_string(format!("/proc/{pid}/status")) {
            let m = parse_status(&s);
            total.rss_kib += m.rss_kib;
            total.hwm_kib += m.hwm_kib;
        }
    }
    Ok(total)
}

/// Ticks all CPUs spent running processes (user + nice + system, from the first line of `/proc/stat`;
/// interrupt time and steal excluded). Compared with the ticks of our own processes, this shows how much CPU
/// something else on the machine used during a measurement.
pub fn machine_busy() -> io::Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    parse_machine_busy(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/stat"))
}

fn parse_machine_busy(stat: &str) -> Option<u64> {
    let mut f = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|v| v.parse::<u64>().ok());
    let (user, nice, system) = (f.next()??, f.next()??, f.next()??);
    Some(user + nice + system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let line = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 1000 0 0 0 731 204 0 0 20 0 3 0 1 2 3";
        assert_eq!(
            parse_stat(line),
            Some((
                4242,
                CpuTicks {
                    user: 731,
                    system: 204
                }
            ))
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn parses_status() {
        let s = "Name:\tnginx\nVmHWM:\t   10240 kB\nVmRSS:\t    8192 kB\nThreads:\t1\n";
        assert_eq!(
            parse_status(s),
            Memory {
                rss_kib: 8192,
                hwm_kib: 10240
            }
        );
    }

    #[test]
    fn parses_proc_stat() {
        assert_eq!(
            parse_machine_busy("cpu  100 5 30 9000 1 2 3 0 0 0\ncpu0 1 2 3 4\n"),
            Some(135)
        );
        assert_eq!(parse_machine_busy("intr 1 2 3"), None);
        assert!(machine_busy().is_ok());
    }

    #[test]
    fn reads_our_own_group() {
        // SAFETY: getpgrp has no preconditions.
        let pgid = unsafe { libc::getpgrp() };
        assert!(group_members(pgid)
            .unwrap()
            .contains(&(std::process::id() as i32)));
        assert!(group_memory(pgid).unwrap().rss_kib > 0);
        group_cpu(pgid).unwrap();
    }
}
