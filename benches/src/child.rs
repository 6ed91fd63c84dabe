//! Child processes that cannot outlive the harness.
//!
//! Each child leads its own process group (so a proxy's forked workers go with it, and a terminal's Ctrl-C
//! reaches only the harness, which then cleans up), asks the kernel for SIGKILL should the harness die
//! (`PR_SET_PDEATHSIG`, kept across `taskset`'s exec), and is killed with its group when its guard drops,
//! which covers errors, panics and the harness's own Ctrl-C/SIGTERM handling.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, ChildStdout, Command};

use crate::Result;

/// A running child process group, killed when dropped.
#[derive(Debug)]
pub struct Guard {
    name: String,
    child: Child,
    pid: i32,
    reaped: bool,
}

/// A command that runs `program args` pinned to `core` with `taskset` when given one.
pub fn pinned(core: Option<usize>, program: impl AsRef<Path>, args: &[String]) -> Command {
    match core {
        Some(core) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(core.to_string()).arg(program.as_ref()).args(args);
            c
        }
        None => {
            let mut c = Command::new(program.as_ref());
            c.args(args);
            c
        }
    }
}

/// Whether `program` is an executable file on `PATH` (or a path to one).
pub fn on_path(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let exec = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = Path::new(program);
        return exec(p).then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| exec(p))
}

impl Guard {
    /// Spawns `cmd` as the leader of a new process group. Stdin is closed; stdout and stderr are as set on
    /// `cmd` (the caller should send them to files or read them, never leave an unread pipe).
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null()).process_group(0).kill_on_drop(false);
        // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("starting {name}: {e}"))?;
        let pid = child.id().ok_or_else(|| format!("{name} exited at once"))? as i32;
        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
            reaped: false,
        })
    }

    /// The child's pid, which is also its process group id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes the child's stdout, if it was piped.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// The exit status if the child has exited (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(s)) => {
                self.reaped = true;
                Some(s)
            }
            _ => None,
        }
    }

    /// Waits up to `limit` for the child to exit by itself.
    pub async fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let s = tokio::time::timeout(limit, self.child.wait()).await.ok()?.ok()?;
        self.reaped = true;
        Some(s)
    }

    /// Sends `signal` to the whole group.
    pub fn signal(&self, signal: i32) {
        if !self.reaped {
            // SAFETY: kill has no memory-safety preconditions; a negative pid addresses our child's group.
            unsafe {
                libc::kill(-self.pid, signal);
            }
        }
    }

    /// SIGTERM to the group, then SIGKILL after `grace`; waits for the leader.
    pub async fn stop(mut self, grace: Duration) {
        self.signal(libc::SIGTERM);
        if self.wait_for(grace).await.is_none() {
            self.signal(libc::SIGKILL);
            self.wait_for(Duration::from_secs(5)).await;
        }
        // Workers left behind by a leader that exited first.
        // SAFETY: as in `signal`.
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: as in `signal`. The group id stays reserved while any member lives, and once the leader is
        // reaped and the group empty, kill(-pid) fails with ESRCH rather than hitting a stranger, unless the
        // pid was reused as a new group leader in between, which a just-reaped pid is not.
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
        }
        let _ = self.child.start_kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drop_kills_the_group() {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("sleep 30 & sleep 30");
        let g = Guard::spawn("sleeper", cmd).unwrap();
        let pgid = g.pid();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(crate::procfs::group_members(pgid).unwrap().len() >= 2);
        drop(g);
        for _ in 0..100 {
            let live = crate::procfs::group_members(pgid).unwrap();
            // Killed children linger as zombies until reaped; count only the living.
            let running = live
                .iter()
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/stat"))
                        .map(|s| !s.contains(") Z "))
                        .unwrap_or(false)
                })
                .count();
            if running == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("group {pgid} survived");
    }

    #[test]
    fn finds_programs() {
        assert!(on_path("sh").is_some());
        assert!(on_path("no-such-program-here").is_none());
    }
}
