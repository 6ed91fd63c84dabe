//! The connection manager's path normalization, applied to each request's path before routing, as Envoy's
//! `ConnectionManagerUtility::maybeNormalizePath` does, in its order:
//!
//! 1. `path_with_escaped_slashes_action` (default `KEEP_UNCHANGED`): unless kept, `%2F`/`%2f` become `/` and
//!    `%5C`/`%5c` become `\`; when the path had any, `REJECT_REQUEST` answers 400, `UNESCAPE_AND_REDIRECT` answers
//!    307 to the unescaped (and further normalized) path, `UNESCAPE_AND_FORWARD` goes on with it.
//! 2. `normalize_path` (default false): the path is canonicalized as Envoy does with Chromium's URL
//!    canonicalizer ([`canonicalize`]): RFC 3986 dot-segment removal (`.`, `..`, and their `%2E` spellings),
//!    `\` read as `/`, percent-escapes of unreserved characters decoded, characters that must be escaped
//!    escaped. A path with a NUL (raw or `%00`) is invalid: 400.
//! 3. `merge_slashes` (default false): runs of `/` become one ([`merge_slashes`]).
//!
//! Each step works on the path only; the query (from the first `?`) is kept as it is. Rejections count
//! `downstream_rq_failed_path_normalization` and redirects `downstream_rq_redirected_with_normalized_path`
//! (a gRPC request is rejected instead of redirected: gRPC clients do not follow redirects); both carry the
//! response code details `path_normalization_failed`.

/// `path_with_escaped_slashes_action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// `KEEP_UNCHANGED`, and `IMPLEMENTATION_SPECIFIC_DEFAULT` (Envoy's default is to keep them).
    #[default]
    Keep,
    Reject,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

/// The connection manager's path options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathNormalization {
    /// `normalize_path`.
    pub normalize: bool,
    /// `merge_slashes`.
    pub merge_slashes: bool,
    /// `path_with_escaped_slashes_action`.
    pub escaped_slashes: EscapedSlashes,
}

/// What to do with a request after its path was normalized.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Route it; with the new path and query when it changed.
    Continue(Option<String>),
    /// Answer 307 with this `location` (the normalized path and query).
    Redirect(String),
    /// Answer 400.
    Reject,
}

impl PathNormalization {
    /// Whether any option is on (else requests are left alone without looking at their path).
    pub fn enabled(&self) -> bool {
        self.normalize || self.merge_slashes || self.escaped_slashes != EscapedSlashes::Keep
    }

    /// Normalize a request's path and query (origin form, `/...`).
    pub fn apply(&self, path_and_query: &str) -> Outcome {
        let (path, query) = match path_and_query.find('?') {
            Some(i) => path_and_query.split_at(i),
            None => (path_and_query, ""),
        };
        let mut current: Option<String> = None;
        let mut redirect = false;
        if self.escaped_slashes != EscapedSlashes::Keep {
            if let Some(unescaped) = unescape_slashes(path) {
                match self.escaped_slashes {
                    EscapedSlashes::Reject => return Outcome::Reject,
                    EscapedSlashes::UnescapeAndRedirect => redirect = true,
                    EscapedSlashes::UnescapeAndForward | EscapedSlashes::Keep => {}
                }
                current = Some(unescaped);
            }
        }
        if self.normalize {
            let p = current.as_deref().unwrap_or(path);
            match canonicalize(p) {
                None => return Outcome::Reject,
                Some(c) if c != p => current = Some(c),
                Some(_) => {}
            }
        }
        if self.merge_slashes {
            let p = current.as_deref().unwrap_or(path);
            if let Some(m) = merge_slashes(p) {
                current = Some(m);
            }
        }
        let full = current.map(|mut p| {
            p.push_str(query);
            p
        });
        if redirect {
            Outcome::Redirect(full.unwrap_or_else(|| path_and_query.to_string()))
        } else {
            Outcome::Continue(full)
        }
    }
}

/// `%2F`, `%2f` to `/` and `%5C`, `%5c` to `\` (Envoy's `PathUtil::unescapeSlashes`); `None` when the path has
/// none of them.
pub fn unescape_slashes(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let is_escaped_slash = |i: usize| {
        b[i] == b'%'
            && i + 2 < b.len()
            && matches!((b[i + 1], b[i + 2]), (b'2', b'F' | b'f') | (b'5', b'C' | b'c'))
    };
    if !(0..b.len()).any(is_escaped_slash) {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if is_escaped_slash(i) {
            out.push(if b[i + 1] == b'2' { '/' } else { '\\' });
            i += 3;
        } else {
            // Copy up to the next '%' (or the end) at once; '%' is ASCII so the split is on a char boundary.
            let next = path[i + 1..].find('%').map_or(b.len(), |n| i + 1 + n);
            out.push_str(&path[i..next]);
            i = next;
        }
    }
    Some(out)
}

/// Merge runs of `/` (Envoy's `PathUtil::mergeSlashes`: the path split on `/` without empty segments, joined
/// with `/`, keeping a leading and a trailing `/`); `None` when there is no `//`.
pub fn merge_slashes(path: &str) -> Option<String> {
    if !path.contains("//") {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    if path.starts_with('/') {
        out.push('/');
    }
    let mut first = true;
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if !first {
            out.push('/');
        }
        out.push_str(seg);
        first = false;
    }
    if path.ends_with('/') {
        out.push('/');
    }
    Some(out)
}

// How Chromium's path canonicalizer treats each byte (`url_canon_path.cc`, `kPathCharLookup`), which Envoy
// uses for `normalize_path`.
/// Copied as it is, escaped or not.
const PASS: u8 = 0;
/// Needs a closer look (dots, `%`, `\`).
const SPECIAL: u8 = 1;
/// Escaped in the output.
const ESCAPE: u8 = 2 | SPECIAL;
/// Decoded when found escaped.
const UNESCAPE: u8 = 4;
/// Not allowed (NUL): the path is invalid.
const INVALID: u8 = 8 | SPECIAL;

const fn path_char_table() -> [u8; 256] {
    let mut t = [ESCAPE; 256];
    t[0] = INVALID;
    let mut c = b'0';
    while c <= b'9' {
        t[c as usize] = UNESCAPE;
        c += 1;
    }
    let mut c = b'A';
    while c <= b'Z' {
        t[c as usize] = UNESCAPE;
        t[(c + 32) as usize] = UNESCAPE;
        c += 1;
    }
    let pass = b"!$&'()*+,/:;=@[]";
    let mut i = 0;
    while i < pass.len() {
        t[pass[i] as usize] = PASS;
        i += 1;
    }
    t[b'-' as usize] = UNESCAPE;
    t[b'_' as usize] = UNESCAPE;
    t[b'~' as usize] = UNESCAPE;
    t[b'.' as usize] = SPECIAL;
    t
}

static PATH_CHARS: [u8; 256] = path_char_table();

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The byte `%XY` at `i` stands for, if it is a valid escape.
fn decode_escaped(b: &[u8], i: usize) -> Option<u8> {
    if i + 2 >= b.len() {
        return None;
    }
    Some(hex_value(b[i + 1])? << 4 | hex_value(b[i + 2])?)
}

/// The length of a dot at `i`: 1 for `.`, 3 for `%2e`/`%2E`, else 0.
fn dot_len(b: &[u8], i: usize) -> usize {
    if b[i] == b'.' {
        1
    } else if b[i] == b'%' && i + 2 < b.len() && b[i + 1] == b'2' && matches!(b[i + 2], b'e' | b'E') {
        3
    } else {
        0
    }
}

fn is_slash(c: u8) -> bool {
    c == b'/' || c == b'\\'
}

fn push_escaped(out: &mut Vec<u8>, c: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[b'%', HEX[(c >> 4) as usize], HEX[(c & 15) as usize]]);
}

/// Truncate `out` (which ends with `/`) after the slash before its last segment, never above `out[0]`.
fn back_up_to_previous_slash(out: &mut Vec<u8>) {
    let mut i = out.len() - 1;
    if i == 0 {
        return;
    }
    i -= 1;
    while out[i] != b'/' && i > 0 {
        i -= 1;
    }
    out.truncate(i + 1);
}

/// After decoding a byte within two output bytes of an earlier `%` that began no valid escape, make sure the
/// output does not now spell a valid escape there (`%%300` must not become `%00`): if it does, that `%` is
/// written `%25`.
fn check_nested_escapes(b: &[u8], next: usize, last_invalid_percent: usize, out: &mut Vec<u8>) {
    let len = out.len();
    let last = out[len - 1];
    let append_next = last_invalid_percent + 2 == len;
    if append_next {
        if next == b.len() || b[next] >= 0x80 {
            return;
        }
        out.push(b[next]);
    }
    if decode_escaped(out, last_invalid_percent).is_some() {
        if !append_next {
            out.push(out[last_invalid_percent + 1]);
        }
        out[last_invalid_percent + 1] = b'2';
        out[last_invalid_percent + 2] = b'5';
        out.push(last);
    } else if append_next {
        out.truncate(len);
    }
}

/// Canonicalize a path as Envoy's `normalize_path` does (Chromium's `CanonicalizePath`); `None` when the path is
/// invalid (it holds a NUL, raw or escaped).
pub fn canonicalize(path: &str) -> Option<String> {
    let b = path.as_bytes();
    // Most paths have nothing to change: no dot, no escape, nothing to escape, and a leading slash.
    if b.first() == Some(&b'/') && b.iter().all(|&c| PATH_CHARS[c as usize] & SPECIAL == 0) {
        return Some(path.to_string());
    }
    let mut out: Vec<u8> = Vec::with_capacity(b.len() + 1);
    if b.is_empty() || !is_slash(b[0]) {
        out.push(b'/');
    }
    let mut ok = true;
    let mut last_invalid_percent: Option<usize> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let flags = PATH_CHARS[c as usize];
        if flags & SPECIAL == 0 {
            out.push(c);
            i += 1;
            continue;
        }
        let dot = dot_len(b, i);
        if dot > 0 {
            if out.last() == Some(&b'/') {
                // Classify what follows the dot: "." or "./" is this directory, ".." or "../" the parent.
                let after = i + dot;
                if after == b.len() {
                    i = after;
                } else if is_slash(b[after]) {
                    i = after + 1;
                } else {
                    let second = dot_len(b, after);
                    let after_second = after + second;
                    if second > 0 && after_second == b.len() {
                        back_up_to_previous_slash(&mut out);
                        i = after_second;
                    } else if second > 0 && is_slash(b[after_second]) {
                        back_up_to_previous_slash(&mut out);
                        i = after_second + 1;
                    } else {
                        out.push(b'.');
                        i += dot;
                    }
                }
            } else {
                out.push(b'.');
                i += dot;
            }
        } else if c == b'\\' {
            out.push(b'/');
            i += 1;
        } else if c == b'%' {
            match decode_escaped(b, i) {
                Some(v) => {
                    let vflags = PATH_CHARS[v as usize];
                    if vflags & UNESCAPE != 0 {
                        out.push(v);
                        if let Some(p) = last_invalid_percent.filter(|&p| p + 3 >= out.len()) {
                            check_nested_escapes(b, i + 3, p, &mut out);
                        }
                    } else {
                        // Kept escaped exactly as written (the hex digits' case too).
                        out.extend_from_slice(&b[i..i + 3]);
                        if vflags & INVALID == INVALID {
                            ok = false;
                        }
                    }
                    i += 3;
                }
                None => {
                    last_invalid_percent = Some(out.len());
                    out.push(b'%');
                    i += 1;
                }
            }
        } else if flags == INVALID {
            push_escaped(&mut out, c);
            ok = false;
            i += 1;
        } else {
            push_escaped(&mut out, c);
            i += 1;
        }
    }
    if !ok {
        return None;
    }
    // Only ASCII is written: decoded bytes are unreserved ASCII, anything else is escaped.
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalize_as_envoys_path_utility() {
        // Envoy's `PathUtilityTest` cases.
        for p in ["/xyz", "/x/y/z", "/A/B/C"] {
            assert_eq!(canonicalize(p).as_deref(), Some(p));
        }
        for (from, to) in [
            ("/a/b/../c", "/a/c"),
            ("/a/b/./c", "/a/b/c"),
            ("a/b/../c", "/a/c"),
            ("/a/b/../../../../c", "/c"),
            ("/a/..\\c", "/c"),
            ("/%c0%af", "/%c0%af"),
            ("/%5c%25", "/%5c%25"),
            ("/a/b/%2E%2E/c", "/a/c"),
            ("/a/b/%2e%2e/c", "/a/c"),
            ("/a/b/%2E./c", "/a/c"),
            ("/a/b/%2E/c", "/a/b/c"),
            ("..", "/"),
            ("/../a/b", "/a/b"),
            ("/./a/b", "/a/b"),
            ("/a/%2F%2f/c", "/a/%2F%2f/c"),
        ] {
            assert_eq!(canonicalize(from).as_deref(), Some(to), "{from}");
        }
        for bad in ["/xyz/.%00../abc", "/xyz/%00.%00./abc", "/xyz/AAAAA%%0000/abc"] {
            assert_eq!(canonicalize(bad), None, "{bad}");
        }
        // Unreserved characters are decoded, others escaped; dots inside names stay.
        assert_eq!(
            canonicalize("/%41%7e%2D/a b/x.y/..z").as_deref(),
            Some("/A~-/a%20b/x.y/..z")
        );
        assert_eq!(canonicalize("/a/b/..").as_deref(), Some("/a/"));
        assert_eq!(canonicalize("").as_deref(), Some("/"));
        // A `%` that begins no escape stays; one that would make a new escape once decoded becomes `%25`.
        assert_eq!(canonicalize("/a%zz").as_deref(), Some("/a%zz"));
        assert_eq!(canonicalize("/%%30%30").as_deref(), Some("/%2500"));
    }

    #[test]
    fn merge_slashes_as_envoys_path_utility() {
        for (from, to) in [
            ("a//b/c", "a/b/c"),
            ("/a//b/c/", "/a/b/c/"),
            ("a//b/c/", "a/b/c/"),
            ("//a/b/c", "/a/b/c"),
            ("/a//b/c", "/a/b/c"),
            ("/a/b/c//", "/a/b/c/"),
            ("/a///b/c", "/a/b/c"),
            ("/a////b/c", "/a/b/c"),
        ] {
            assert_eq!(merge_slashes(from).as_deref(), Some(to), "{from}");
        }
        assert_eq!(merge_slashes("/a"), None);
        // The query is not the path's: through `apply`, slashes there stay.
        let merge = PathNormalization {
            merge_slashes: true,
            ..Default::default()
        };
        assert_eq!(
            merge.apply("/a//b?a=///c"),
            Outcome::Continue(Some("/a/b?a=///c".into()))
        );
        assert_eq!(merge.apply("//a/?b"), Outcome::Continue(Some("/a/?b".into())));
        assert_eq!(merge.apply("/a/b?x=//"), Outcome::Continue(None));
    }

    #[test]
    fn escaped_slashes_actions_in_envoys_order() {
        let with = |escaped_slashes, normalize, merge_slashes| PathNormalization {
            normalize,
            merge_slashes,
            escaped_slashes,
        };
        let keep = with(EscapedSlashes::Keep, false, false);
        assert!(!keep.enabled());
        assert_eq!(
            unescape_slashes("/a%2Fb%2fc%5Cd%5ce%41"),
            Some("/a/b/c\\d\\e%41".into())
        );
        assert_eq!(unescape_slashes("/a%2"), None);
        assert_eq!(unescape_slashes("/plain"), None);

        let reject = with(EscapedSlashes::Reject, true, true);
        assert_eq!(reject.apply("/a%2Fb"), Outcome::Reject);
        assert_eq!(
            reject.apply("/a/./b?q=%2F"),
            Outcome::Continue(Some("/a/b?q=%2F".into()))
        );

        // Redirect to the path after every step: unescaped, canonicalized (`\` is `/`), slashes merged.
        let redirect = with(EscapedSlashes::UnescapeAndRedirect, true, true);
        assert_eq!(
            redirect.apply("/a%2F%2Fb/../c%5Cd?x=1"),
            Outcome::Redirect("/a/c/d?x=1".into())
        );
        assert_eq!(redirect.apply("/a//b"), Outcome::Continue(Some("/a/b".into())));
        assert_eq!(redirect.apply("/a/b"), Outcome::Continue(None));

        let forward = with(EscapedSlashes::UnescapeAndForward, false, false);
        assert_eq!(forward.apply("/a%2fb"), Outcome::Continue(Some("/a/b".into())));
        // Kept: escaped slashes are not slashes, even for normalize_path.
        let normalize = with(EscapedSlashes::Keep, true, false);
        assert_eq!(normalize.apply("/a%2F..%2Fb"), Outcome::Continue(None));
        assert_eq!(normalize.apply("/a/%00"), Outcome::Reject);
    }
}
