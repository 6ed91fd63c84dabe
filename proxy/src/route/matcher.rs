//! `envoy.type.matcher.v3.StringMatcher`, `envoy.config.route.v3.HeaderMatcher` and `QueryParameterMatcher`.

use http::header::HeaderName;
use http::HeaderMap;
use regex::Regex;

/// `StringMatcher`: one of exact, prefix, suffix, contains, safe_regex; `ignore_case` for all but the regex.
#[derive(Clone, Debug)]
pub enum StringMatcher {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    /// Matches the whole value (anchored when compiled).
    Regex(Regex),
}

impl StringMatcher {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatcher::Exact(s, false) => v == s,
            StringMatcher::Exact(s, true) => v.eq_ignore_ascii_case(s),
            StringMatcher::Prefix(s, false) => v.starts_with(s.as_str()),
            StringMatcher::Prefix(s, true) => {
                v.len() >= s.len() && v.as_bytes()[..s.len()].eq_ignore_ascii_case(s.as_bytes())
            }
            StringMatcher::Suffix(s, false) => v.ends_with(s.as_str()),
            StringMatcher::Suffix(s, true) => {
                v.len() >= s.len() && v.as_bytes()[v.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
            StringMatcher::Contains(s, false) => v.contains(s.as_str()),
            StringMatcher::Contains(s, true) => v.to_ascii_lowercase().contains(&s.to_ascii_lowercase()),
            StringMatcher::Regex(re) => re.is_match(v),
        }
    }
}

#[derive(Clone, Debug)]
pub enum HeaderMatch {
    /// `present_match`: true matches when the header is present, false when it is absent.
    Present(bool),
    String(StringMatcher),
    /// `range_match`: the value parses as an integer in `[start, end)`.
    Range(i64, i64),
}

/// `HeaderMatcher`: a request header condition.
#[derive(Clone, Debug)]
pub struct HeaderMatcher {
    pub name: HeaderName,
    pub kind: HeaderMatch,
    pub invert: bool,
    pub treat_missing_as_empty: bool,
}

impl HeaderMatcher {
    /// Several values of one header are matched as one value joined with `,`, as Envoy does.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        let first = values.next();
        let result = match (&self.kind, first) {
            (HeaderMatch::Present(want), v) => v.is_some() == *want,
            (_, None) if !self.treat_missing_as_empty => return false,
            (kind, v) => {
                let joined;
                let value: &str = match v {
                    None => "",
                    Some(first) => {
                        let rest: Vec<&[u8]> = values.map(|v| v.as_bytes()).collect();
                        if rest.is_empty() {
                            match first.to_str() {
                                Ok(s) => s,
                                Err(_) => return self.invert,
                            }
                        } else {
                            let mut all = vec![first.as_bytes()];
                            all.extend(rest);
                            joined = String::from_utf8_lossy(&all.join(&b","[..])).into_owned();
                            &joined
                        }
                    }
                };
                match kind {
                    HeaderMatch::String(m) => m.matches(value),
                    HeaderMatch::Range(lo, hi) => value.parse::<i64>().is_ok_and(|n| *lo <= n && n < *hi),
                    HeaderMatch::Present(_) => unreachable_present(),
                }
            }
        };
        result != self.invert
    }
}

impl HeaderMatcher {
    /// Match one value (`None`: absent) that is not in a header map, such as a pseudo-header.
    pub fn matches_value(&self, value: Option<&str>) -> bool {
        let result = match (&self.kind, value) {
            (HeaderMatch::Present(want), v) => v.is_some() == *want,
            (_, None) if !self.treat_missing_as_empty => return false,
            (HeaderMatch::String(m), v) => m.matches(v.unwrap_or("")),
            (HeaderMatch::Range(lo, hi), v) => {
                v.unwrap_or("").parse::<i64>().is_ok_and(|n| *lo <= n && n < *hi)
            }
        };
        result != self.invert
    }
}

fn unreachable_present() -> bool {
    // Present is handled above; kept total without a panic.
    false
}

/// `QueryParameterMatcher`: a query parameter by name, with a string matcher or presence.
#[derive(Clone, Debug)]
pub struct QueryMatcher {
    pub name: String,
    /// `None` means `present_match: true`.
    pub value: Option<StringMatcher>,
}

impl QueryMatcher {
    pub fn matches(&self, query: &str) -> bool {
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == self.name {
                return match &self.value {
                    None => true,
                    Some(m) => m.matches(v),
                };
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn header_matchers() {
        let m = |kind, invert| HeaderMatcher {
            name: HeaderName::from_static("x-sandbox"),
            kind,
            invert,
            treat_missing_as_empty: false,
        };
        let exact = m(
            HeaderMatch::String(StringMatcher::Exact("alice".into(), false)),
            false,
        );
        assert!(exact.matches(&hm(&[("x-sandbox", "alice")])));
        assert!(!exact.matches(&hm(&[("x-sandbox", "bob")])));
        assert!(!exact.matches(&hm(&[])));
        let inverted = m(
            HeaderMatch::String(StringMatcher::Exact("alice".into(), false)),
            true,
        );
        assert!(inverted.matches(&hm(&[("x-sandbox", "bob")])));
        // A missing header never matches, even inverted (Envoy's rule), unless treated as empty.
        assert!(!inverted.matches(&hm(&[])));
        let joined = m(
            HeaderMatch::String(StringMatcher::Exact("a,b".into(), false)),
            false,
        );
        assert!(joined.matches(&hm(&[("x-sandbox", "a"), ("x-sandbox", "b")])));
        let absent = m(HeaderMatch::Present(false), false);
        assert!(absent.matches(&hm(&[])));
        let range = m(HeaderMatch::Range(10, 20), false);
        assert!(range.matches(&hm(&[("x-sandbox", "10")])));
        assert!(!range.matches(&hm(&[("x-sandbox", "20")])));
        let ci = m(
            HeaderMatch::String(StringMatcher::Suffix("ICE".into(), true)),
            false,
        );
        assert!(ci.matches(&hm(&[("x-sandbox", "alice")])));
    }

    #[test]
    fn query_matchers() {
        let q = QueryMatcher {
            name: "debug".into(),
            value: Some(StringMatcher::Exact("1".into(), false)),
        };
        assert!(q.matches("a=b&debug=1"));
        assert!(!q.matches("debug=2"));
        assert!(!q.matches(""));
        let p = QueryMatcher {
            name: "flag".into(),
            value: None,
        };
        assert!(p.matches("flag"));
        assert!(p.matches("x=1&flag=yes"));
    }
}
