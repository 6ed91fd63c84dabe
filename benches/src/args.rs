//! A small command-line parser: `--name value`, `--name=value` and bare `--flag`, nothing else.
//!
//! The harness binaries take a handful of options each; a parser crate would cost more compile time than the
//! forty lines here. Every option is consumed by name and [`Args::finish`] rejects whatever is left, so a
//! misspelt option is an error rather than silently ignored.

use std::str::FromStr;
use std::time::Duration;

use crate::Result;

/// The arguments not yet consumed.
#[derive(Debug)]
pub struct Args {
    rest: Vec<String>,
}

impl Args {
    /// The process's arguments, without the program name.
    pub fn from_env() -> Self {
        Self::new(std::env::args().skip(1))
    }

    /// Arguments from any list (for tests).
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(args: I) -> Self {
        Self {
            rest: args.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether the bare flag `name` was given (consumes every occurrence).
    pub fn flag(&mut self, name: &str) -> bool {
        let before = self.rest.len();
        self.rest.retain(|a| a != name);
        before != self.rest.len()
    }

    /// The value of `--name value` or `--name=value`; the last occurrence wins.
    pub fn value(&mut self, name: &str) -> Result<Option<String>> {
        let mut found = None;
        let mut i = 0;
        while i < self.rest.len() {
            if self.rest[i] == name {
                if i + 1 >= self.rest.len() {
                    return Err(format!("{name} needs a value").into());
                }
                found = Some(self.rest.remove(i + 1));
                self.rest.remove(i);
            } else if let Some(v) = self.rest[i].strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                found = Some(v.to_owned());
                self.rest.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    /// The value of `name` parsed as `T`.
    pub fn parse<T: FromStr>(&mut self, name: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        match self.value(name)? {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e| format!("{name} {v:?}: {e}").into()),
        }
    }

    /// The value of `name` parsed with [`parse_duration`].
    pub fn duration(&mut self, name: &str) -> Result<Option<Duration>> {
        match self.value(name)? {
            None => Ok(None),
            Some(v) => parse_duration(&v)
                .map(Some)
                .map_err(|e| format!("{name}: {e}").into()),
        }
    }

    /// Fails if any argument was not consumed.
    pub fn finish(self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("unknown arguments: {}", self.rest.join(" ")).into())
        }
    }
}

/// `250ms`, `5s`, `1.5s`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("bad duration {s:?}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("bad duration {s:?}").into());
    }
    Ok(Duration::from_secs_f64(v * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_flags_and_leftovers() {
        let mut a = Args::new(["--quick", "--reps", "5", "--out=/tmp/x", "--bogus"]);
        assert!(a.flag("--quick"));
        assert!(!a.flag("--strace"));
        assert_eq!(a.parse::<u32>("--reps").unwrap(), Some(5));
        assert_eq!(a.value("--out").unwrap().as_deref(), Some("/tmp/x"));
        assert_eq!(a.value("--missing").unwrap(), None);
        assert!(a.finish().is_err());
        assert!(Args::new(["--reps"]).value("--reps").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
