//! `%START_TIME(...)%`: the strftime subset Envoy's `DateFormatter` accepts, compiled once per format string.
//!
//! Envoy substitutes its own specifiers (`%s` epoch seconds, `%f` and `%1f`..`%9f` fractional seconds, truncated,
//! not rounded) and hands the rest to `absl::FormatTime` in UTC. Remora implements the specifiers below and
//! refuses any other at config time, so a format never prints something other than what Envoy would:
//! - strftime: `%Y %C %y %m %d %e %j %H %I %M %S %p %a %A %b %h %B %u %w %z %Z %T %D %F %R %r %c %x %X %t %%`
//!   (C locale, UTC, so `%z` is `+0000` and `%Z` is `UTC`);
//! - Envoy: `%s`, `%f`, `%1f`..`%9f`;
//! - Abseil: `%E#S` (seconds with # fractional digits, `%E3S` is `09.123`), `%E*S` (all significant digits),
//!   `%E#f` (# fractional digits), `%Ez` (`+00:00`), `%E*z` (`+00:00:00`), `%E4Y`.
//!
//! `%n` (and its flagged forms) is refused with Envoy's own message: a log format string may be destined for a
//! header, where a newline is not allowed.
//!
//! Without a format, `%START_TIME%` is Envoy's `AccessLogDateTimeFormatter`: `2018-04-03T23:06:09.123Z`.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// A compiled time format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TimeFormat(Vec<Spec>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Spec {
    Lit(String),
    Year,
    Year4,
    Century,
    Year2,
    Month,
    Day,
    DaySpace,
    YearDay,
    Hour24,
    Hour12,
    Minute,
    Second,
    AmPm,
    WeekdayShort,
    WeekdayLong,
    MonthShort,
    MonthLong,
    WeekdayMon1,
    WeekdaySun0,
    /// `%z`: `+0000`.
    Offset,
    /// `%Ez`: `+00:00`.
    OffsetColon,
    /// `%E*z`: `+00:00:00`.
    OffsetColonSeconds,
    Zone,
    /// `%s`.
    Epoch,
    /// `%f` (9), `%3f`, `%E3f`: that many fractional digits, truncated.
    Frac(u8),
    /// `%E3S`: seconds, a dot, and that many fractional digits (`%E0S` is `%S`).
    SecondsFrac(u8),
    /// `%E*S`: seconds and every significant fractional digit.
    SecondsShortest,
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

impl TimeFormat {
    /// Envoy's default: `%Y-%m-%dT%H:%M:%E3SZ`.
    pub(crate) fn envoy_default() -> Self {
        TimeFormat(vec![
            Spec::Year,
            Spec::Lit("-".into()),
            Spec::Month,
            Spec::Lit("-".into()),
            Spec::Day,
            Spec::Lit("T".into()),
            Spec::Hour24,
            Spec::Lit(":".into()),
            Spec::Minute,
            Spec::Lit(":".into()),
            Spec::SecondsFrac(3),
            Spec::Lit("Z".into()),
        ])
    }

    /// Compile a format; the error names the offending specifier.
    pub(crate) fn parse(fmt: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        let mut lit = String::new();
        let mut chars = fmt.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                lit.push(c);
                continue;
            }
            let Some(d) = chars.next() else {
                return Err(format!("START_TIME format {fmt:?} ends with a lone '%'"));
            };
            let spec = match d {
                '%' => {
                    lit.push('%');
                    continue;
                }
                't' => {
                    lit.push('\t');
                    continue;
                }
                'n' => return Err(newline()),
                'Y' => Spec::Year,
                'C' => Spec::Century,
                'y' => Spec::Year2,
                'm' => Spec::Month,
                'd' => Spec::Day,
                'e' => Spec::DaySpace,
                'j' => Spec::YearDay,
                'H' => Spec::Hour24,
                'I' => Spec::Hour12,
                'M' => Spec::Minute,
                'S' => Spec::Second,
                'p' => Spec::AmPm,
                'a' => Spec::WeekdayShort,
                'A' => Spec::WeekdayLong,
                'b' | 'h' => Spec::MonthShort,
                'B' => Spec::MonthLong,
                'u' => Spec::WeekdayMon1,
                'w' => Spec::WeekdaySun0,
                'z' => Spec::Offset,
                'Z' => Spec::Zone,
                's' => Spec::Epoch,
                'f' => Spec::Frac(9),
                '1'..='9' => match chars.next() {
                    Some('f') => Spec::Frac(d as u8 - b'0'),
                    Some('n') => return Err(newline()),
                    other => return Err(unsupported(&format!("%{d}{}", opt(other)))),
                },
                'E' => match (chars.next(), chars.peek().copied()) {
                    (Some('z'), _) => Spec::OffsetColon,
                    (Some('n'), _) => return Err(newline()),
                    (Some('*'), Some('z')) => {
                        chars.next();
                        Spec::OffsetColonSeconds
                    }
                    (Some('*'), Some('S')) => {
                        chars.next();
                        Spec::SecondsShortest
                    }
                    (Some('4'), Some('Y')) => {
                        chars.next();
                        Spec::Year4
                    }
                    (Some(n @ '0'..='9'), Some('S')) => {
                        chars.next();
                        Spec::SecondsFrac(n as u8 - b'0')
                    }
                    (Some(n @ '0'..='9'), Some('f')) => {
                        chars.next();
                        Spec::Frac(n as u8 - b'0')
                    }
                    (a, b) => return Err(unsupported(&format!("%E{}{}", opt(a), opt(b)))),
                },
                'O' if chars.peek() == Some(&'n') => return Err(newline()),
                // Composites, expanded now so formatting is a flat walk.
                'T' | 'D' | 'F' | 'R' | 'r' | 'c' | 'x' | 'X' => {
                    let expansion = match d {
                        'T' | 'X' => "%H:%M:%S",
                        'D' | 'x' => "%m/%d/%y",
                        'F' => "%Y-%m-%d",
                        'R' => "%H:%M",
                        'r' => "%I:%M:%S %p",
                        _ => "%a %b %e %H:%M:%S %Y",
                    };
                    if !lit.is_empty() {
                        out.push(Spec::Lit(std::mem::take(&mut lit)));
                    }
                    out.extend(TimeFormat::parse(expansion)?.0);
                    continue;
                }
                other => return Err(unsupported(&format!("%{other}"))),
            };
            if !lit.is_empty() {
                out.push(Spec::Lit(std::mem::take(&mut lit)));
            }
            out.push(spec);
        }
        if !lit.is_empty() {
            out.push(Spec::Lit(lit));
        }
        Ok(TimeFormat(out))
    }

    /// Append `t` formatted in UTC.
    pub(crate) fn write(&self, t: SystemTime, out: &mut Vec<u8>) {
        let (secs, nanos) = split(t);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        let (hour, minute, second) = (sod / 3600, sod / 60 % 60, sod % 60);
        // Writes into a Vec cannot fail.
        for s in &self.0 {
            let _ = match s {
                Spec::Lit(l) => out.write_all(l.as_bytes()),
                Spec::Year => write!(out, "{year}"),
                Spec::Year4 => {
                    if year < 0 {
                        write!(out, "-{:03}", -year)
                    } else {
                        write!(out, "{year:04}")
                    }
                }
                Spec::Century => write!(out, "{:02}", year.div_euclid(100)),
                Spec::Year2 => write!(out, "{:02}", year.rem_euclid(100)),
                Spec::Month => write!(out, "{month:02}"),
                Spec::Day => write!(out, "{day:02}"),
                Spec::DaySpace => write!(out, "{day:2}"),
                Spec::YearDay => write!(out, "{:03}", year_day(year, month, day)),
                Spec::Hour24 => write!(out, "{hour:02}"),
                Spec::Hour12 => write!(out, "{:02}", (hour + 11) % 12 + 1),
                Spec::Minute => write!(out, "{minute:02}"),
                Spec::Second => write!(out, "{second:02}"),
                Spec::AmPm => out.write_all(if hour < 12 { b"AM" } else { b"PM" }),
                Spec::WeekdayShort => out.write_all(&WEEKDAYS[weekday(days)].as_bytes()[..3]),
                Spec::WeekdayLong => out.write_all(WEEKDAYS[weekday(days)].as_bytes()),
                Spec::MonthShort => out.write_all(&MONTHS[month as usize - 1].as_bytes()[..3]),
                Spec::MonthLong => out.write_all(MONTHS[month as usize - 1].as_bytes()),
                Spec::WeekdayMon1 => write!(out, "{}", (weekday(days) + 6) % 7 + 1),
                Spec::WeekdaySun0 => write!(out, "{}", weekday(days)),
                Spec::Offset => out.write_all(b"+0000"),
                Spec::OffsetColon => out.write_all(b"+00:00"),
                Spec::OffsetColonSeconds => out.write_all(b"+00:00:00"),
                Spec::Zone => out.write_all(b"UTC"),
                Spec::Epoch => write!(out, "{secs}"),
                Spec::Frac(n) => write_frac(out, nanos, *n),
                Spec::SecondsFrac(n) => {
                    let _ = write!(out, "{second:02}");
                    if *n > 0 {
                        out.push(b'.');
                        write_frac(out, nanos, *n)
                    } else {
                        Ok(())
                    }
                }
                Spec::SecondsShortest => {
                    let _ = write!(out, "{second:02}");
                    if nanos > 0 {
                        let mut digits = 9;
                        let mut n = nanos;
                        while n % 10 == 0 {
                            n /= 10;
                            digits -= 1;
                        }
                        out.push(b'.');
                        write!(out, "{n:0digits$}")
                    } else {
                        Ok(())
                    }
                }
            };
        }
    }
}

fn opt(c: Option<char>) -> String {
    c.map(String::from).unwrap_or_default()
}

fn newline() -> String {
    // Envoy's message for a time format that would put a newline in the output.
    "Invalid header configuration. Format string contains newline.".to_string()
}

fn unsupported(spec: &str) -> String {
    format!("START_TIME specifier {spec} is not supported by Remora")
}

/// The first `digits` digits of the nanoseconds: truncated, as Envoy does.
fn write_frac(out: &mut Vec<u8>, nanos: u32, digits: u8) -> std::io::Result<()> {
    let digits = u32::from(digits.clamp(1, 9));
    let v = nanos / 10u32.pow(9 - digits);
    write!(out, "{v:0width$}", width = digits as usize)
}

/// Seconds since the epoch (negative before it) and the nanoseconds within that second.
fn split(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - n)
            }
        }
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn year_day(year: i64, month: u32, day: u32) -> u32 {
    const BEFORE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    BEFORE[month as usize - 1] + day + u32::from(month > 2 && is_leap(year))
}

/// 0 = Sunday; 1970-01-01 was a Thursday.
fn weekday(days: i64) -> usize {
    (days + 4).rem_euclid(7) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fmt(f: &str, t: SystemTime) -> String {
        let mut out = Vec::new();
        TimeFormat::parse(f).unwrap().write(t, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn at_ms(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn default_matches_envoys_access_log_date_time_formatter() {
        // Envoy's test/common/common/utility_test.cc (AccessLogDateTimeFormatter, fromTime).
        for (ms, want) in [
            (1_522_796_769_000, "2018-04-03T23:06:09.000Z"),
            (1_522_796_769_123, "2018-04-03T23:06:09.123Z"),
            (1_522_796_769_999, "2018-04-03T23:06:09.999Z"),
            (1_522_796_768_999, "2018-04-03T23:06:08.999Z"),
        ] {
            let mut out = Vec::new();
            TimeFormat::envoy_default().write(at_ms(ms), &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), want);
            assert_eq!(fmt("%Y-%m-%dT%H:%M:%E3SZ", at_ms(ms)), want);
        }
    }

    #[test]
    fn envoy_specifiers_truncate_fractions() {
        // The docs' example: %START_TIME(%s.%3f)% gives 1527590590.528.
        let t = UNIX_EPOCH + Duration::new(1_527_590_590, 528_999_999);
        assert_eq!(fmt("%s.%3f", t), "1527590590.528");
        assert_eq!(fmt("%s.%6f", t), "1527590590.528999");
        assert_eq!(fmt("%s.%9f", t), "1527590590.528999999");
        assert_eq!(fmt("%f", t), "528999999");
        assert_eq!(fmt("%1f|%E2f", t), "5|52");
        assert_eq!(fmt("%E*S", t), "10.528999999");
        assert_eq!(fmt("%E*S", UNIX_EPOCH + Duration::new(5, 500_000_000)), "05.5");
        assert_eq!(fmt("%E*S", UNIX_EPOCH + Duration::from_secs(5)), "05");
        assert_eq!(fmt("%E0S", UNIX_EPOCH + Duration::new(5, 1)), "05");
    }

    #[test]
    fn strftime_subset() {
        // Envoy's formatter test: %START_TIME(%Y/%m/%d)% at 1522280158 is 2018/03/28.
        let t = UNIX_EPOCH + Duration::from_secs(1_522_280_158);
        assert_eq!(fmt("%Y/%m/%d", t), "2018/03/28");
        assert_eq!(
            fmt("%Y/%m/%dT%H:%M:%S%z %s", t),
            "2018/03/28T23:35:58+0000 1522280158"
        );
        assert_eq!(
            fmt("%a %A %b %h %B %j %u %w", t),
            "Wed Wednesday Mar Mar March 087 3 3"
        );
        assert_eq!(
            fmt("%T|%D|%F|%R|%r", t),
            "23:35:58|03/28/18|2018-03-28|23:35|11:35:58 PM"
        );
        assert_eq!(fmt("%c", t), "Wed Mar 28 23:35:58 2018");
        assert_eq!(
            fmt("%C %y %e %I %p %Z %Ez %E*z %%", t),
            "20 18 28 11 PM UTC +00:00 +00:00:00 %"
        );
        assert_eq!(fmt("%E4Y|%t|", UNIX_EPOCH), "1970|\t|");
        // A leap day, a year end, and a time before the epoch.
        assert_eq!(fmt("%F %j", at_ms(951_782_400_000)), "2000-02-29 060");
        assert_eq!(fmt("%F %j %a", at_ms(1_703_980_800_000)), "2023-12-31 365 Sun");
        let before = UNIX_EPOCH - Duration::from_millis(1);
        assert_eq!(fmt("%F %T.%3f %s", before), "1969-12-31 23:59:59.999 -1");
        // Midnight and noon on the 12-hour clock.
        assert_eq!(fmt("%I %p", UNIX_EPOCH), "12 AM");
        assert_eq!(fmt("%I %p", UNIX_EPOCH + Duration::from_secs(12 * 3600)), "12 PM");
    }

    #[test]
    fn refuses_what_it_does_not_implement() {
        for f in ["%n", "%3n", "%En", "%On"] {
            assert_eq!(TimeFormat::parse(f).unwrap_err(), newline(), "{f}");
        }
        for (f, spec) in [("%G", "%G"), ("%Eq", "%Eq"), ("%3x", "%3x"), ("%", "")] {
            let e = TimeFormat::parse(f).unwrap_err();
            assert!(e.contains(spec) || e.contains("lone"), "{f}: {e}");
        }
    }
}
