//! Tag extraction, as Envoy's `TagProducerImpl` does it (`config.metrics.v3.StatsConfig`: `stats_tags`,
//! `use_all_default_tags`, `allow_default_tag_overrides`).
//!
//! A stat keeps one flat dotted name (`cluster.backend.upstream_rq_503`); sinks that have labels (the admin's
//! Prometheus output) show it as a *tag-extracted name* (`cluster.upstream_rq`) and tags
//! (`envoy.cluster_name="backend"`, `envoy.response_code="503"`). Each extractor looks at the *original* name and
//! marks a range of it for removal; the ranges are removed together once every extractor has run, so
//! extractors do not disturb one another (`StatsConfig.stats_tags`: "the first capture group is not immediately
//! removed from the name").
//!
//! Four kinds of extractor, as in Envoy's `tag_extractor_impl.cc`:
//! - Envoy's default regexes (RE2): the first capture group is removed, the second (or else the first) is the
//!   value; a non-empty `substr` must occur in the name first, and a default may refuse one value (`admin` for
//!   `envoy.listener_address`);
//! - Envoy's default token patterns (`cluster.$.**`): `$` captures one dot-separated token, `*` matches one
//!   token, `**` any number; the captured token and one adjoining dot are removed;
//! - a `stats_tags` `regex`, which Envoy runs with `std::regex_search` (ECMAScript, look-ahead included): the
//!   first group is removed and the second (if the regex has one) or else the first is the value;
//! - a `stats_tags` `fixed_value`: the tag on every stat, nothing removed.
//!
//! Order matters for which extractor of a tag name wins and for the order of the labels: extractors whose regex
//! or pattern fixes the first token (`^cluster\.`, `cluster.$.**`) run only for names with that first token, and
//! after every extractor without one; within each group they run in the order they were added (the defaults,
//! regexes before token patterns, then `stats_tags` in config order). Once a tag name has a value, later
//! extractors of that name are skipped.
//!
//! The defaults are those of Envoy's `source/common/config/well_known_names.cc`; tag names introduced after it
//! (`envoy.rbac_prefix`, `envoy.connection_limit_prefix`, `envoy.proxy_protocol_*`, `envoy.scoped_rds_config`,
//! ...) are not among them: Remora has none of those stats.

use std::collections::HashMap;

/// One tag of a stat: Envoy's tag name (`envoy.cluster_name`), its Prometheus label (`envoy_cluster_name`)
/// and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag<'a> {
    pub name: &'a str,
    pub label: &'a str,
    pub value: String,
}

/// What one `stats_tags` entry (`config.metrics.v3.TagSpecifier`) gives for its `tag_value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagValue {
    /// Neither `regex` nor `fixed_value` (or an empty `regex`): Envoy's default extractors of that name.
    Default,
    Regex(String),
    Fixed(String),
}

/// One `stats_tags` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagSpecifier {
    pub tag_name: String,
    pub value: TagValue,
}

/// `stats_config` as far as tags go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagsConfig {
    pub stats_tags: Vec<TagSpecifier>,
    /// `use_all_default_tags` (true when unset).
    pub use_all_default_tags: bool,
    /// `allow_default_tag_overrides`: a `stats_tags` entry replaces the defaults of the same tag name instead of
    /// running after them.
    pub allow_default_tag_overrides: bool,
}

impl Default for TagsConfig {
    fn default() -> Self {
        TagsConfig {
            stats_tags: Vec::new(),
            use_all_default_tags: true,
            allow_default_tag_overrides: false,
        }
    }
}

/// A `stats_tags` entry Envoy would refuse: its index and Envoy's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecifierError {
    pub index: usize,
    /// The field the error is about (`tag_name` or `regex`).
    pub field: &'static str,
    pub message: String,
}

enum Matcher {
    /// One of Envoy's default regexes (RE2 `PartialMatch`).
    Default {
        re: regex::Regex,
        substr: &'static str,
        negative: &'static str,
    },
    Tokens {
        tokens: Vec<&'static str>,
        capture: usize,
    },
    /// A `stats_tags` regex (`std::regex_search`).
    Custom(fancy_regex::Regex),
    Fixed(String),
}

struct Extractor {
    name: String,
    label: String,
    matcher: Matcher,
}

/// The removal a match asks for: the range of the original name to drop, if any, and the value.
type Extracted = (Option<(usize, usize)>, String);

impl Extractor {
    fn new(name: &str, matcher: Matcher) -> Self {
        Extractor {
            name: name.to_string(),
            label: prometheus_label(name),
            matcher,
        }
    }

    fn extract<'n>(&self, name: &'n str, tokens: &mut Option<Vec<&'n str>>) -> Option<Extracted> {
        match &self.matcher {
            Matcher::Default { re, substr, negative } => {
                if !substr.is_empty() && !name.contains(substr) {
                    return None;
                }
                let caps = re.captures(name)?;
                let remove = caps.get(1).filter(|m| !m.is_empty())?;
                let value = caps.get(2).filter(|m| !m.is_empty()).unwrap_or(remove);
                if !negative.is_empty() && value.as_str() == *negative {
                    return None;
                }
                Some((Some((remove.start(), remove.end())), value.as_str().to_string()))
            }
            Matcher::Tokens {
                tokens: pattern,
                capture,
            } => {
                let input = tokens.get_or_insert_with(|| name.split('.').collect());
                let mut found = None;
                if !search_tokens(pattern, *capture, input, 0, 0, 0, &mut found) {
                    return None;
                }
                let (mut start, index) = found?;
                let value = input[index];
                let mut end = start + value.len();
                // The dot after the token, or for the last token the dot before it.
                if index + 1 < input.len() {
                    end += 1;
                } else {
                    start = start.saturating_sub(1);
                }
                Some((Some((start, end)), value.to_string()))
            }
            Matcher::Custom(re) => {
                // A regex that gives up (fancy-regex's backtrack limit) is a miss, as a failed search would be.
                let caps = re.captures(name).ok()??;
                if re.captures_len() < 2 {
                    return None;
                }
                let remove = caps.get(1);
                let value = if re.captures_len() > 2 {
                    caps.get(2)
                } else {
                    remove
                };
                Some((
                    remove.map(|m| (m.start(), m.end())),
                    value.map(|m| m.as_str().to_string()).unwrap_or_default(),
                ))
            }
            Matcher::Fixed(v) => Some((None, v.clone())),
        }
    }
}

/// Whether `pattern` (from `pattern_index`) matches `input` (from `input_index`, which starts at byte
/// `char_index` of the name); the byte offset and index of the token `$` captured go to `found`.
fn search_tokens(
    pattern: &[&str],
    capture: usize,
    input: &[&str],
    mut input_index: usize,
    mut pattern_index: usize,
    mut char_index: usize,
    found: &mut Option<(usize, usize)>,
) -> bool {
    while input_index < input.len() && pattern_index < pattern.len() {
        if pattern_index == capture {
            *found = Some((char_index, input_index));
        } else if pattern[pattern_index] == "**" {
            if pattern_index + 1 == pattern.len() {
                // A trailing `**` takes every remaining token (at least one: the loop ran).
                return true;
            }
            // Anywhere else, the rest of the pattern must match from some later token.
            for i in input_index..input.len() {
                if search_tokens(pattern, capture, input, i, pattern_index + 1, char_index, found) {
                    return true;
                }
                char_index += input[i].len() + 1;
            }
            return false;
        } else if pattern[pattern_index] != "*" && pattern[pattern_index] != input[input_index] {
            return false;
        }
        char_index += input[input_index].len() + 1;
        input_index += 1;
        pattern_index += 1;
    }
    pattern_index == pattern.len() && input_index == input.len()
}

/// The first token a regex pins (`^cluster\.` gives `cluster`), as Envoy's `extractRegexPrefix` finds it: the
/// word characters after `^`, followed by `\.`, `(?=\.)`, or `$` as the regex's last character.
fn regex_prefix(regex: &str) -> &str {
    let Some(rest) = regex.strip_prefix('^') else {
        return "";
    };
    let end = rest
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .unwrap_or(rest.len());
    if end == 0 || end == rest.len() {
        return "";
    }
    let after = &rest[end..];
    if after == "$" || (after.len() > 1 && (after.starts_with("\\.") || after.starts_with("(?=\\."))) {
        &rest[..end]
    } else {
        ""
    }
}

/// A Prometheus label for a tag name: every character outside `[a-zA-Z0-9_]` becomes `_`, and a leading digit
/// gets a `_` in front (Envoy's `PrometheusStatsFormatter::sanitizeName`).
pub fn prometheus_label(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// How one of Envoy's defaults matches.
enum DefaultKind {
    /// A regex with its required substring and its refused value.
    Re2(&'static str, &'static str, &'static str),
    Tokens(&'static str),
}

/// `<ADDRESS>` in Envoy's default regexes: an IPv4 address or a bracketed IPv6 address with `_`s, then the port.
const ADDRESS: &str = r"(?:(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[a-fA-F_\d]+\])_\d+)";
/// `<TAG_VALUE>`: a name without dots.
const TAG_VALUE: &str = r"[^\.]+";
/// `<CIPHER>`.
const CIPHER: &str = r"[\w-]+";
/// `<LISTENER_OR_CLUSTER_WITH_NAME>`.
const LISTENER_OR_CLUSTER: &str = r"(?:listener|cluster)\..*?";

/// Envoy's default extractors in its order: the regexes, then the token patterns.
fn defaults() -> Vec<(&'static str, DefaultKind)> {
    use DefaultKind::{Re2, Tokens};
    vec![
        ("envoy.response_code", Re2(r"_rq(_(\d{3}))$", "_rq_", "")),
        ("envoy.response_code_class", Re2(r"_rq_((\d))xx$", "_rq_", "")),
        (
            "envoy.dynamo_partition_id",
            Re2(
                r"^http\.<TAG_VALUE>\.dynamodb\.table\.<TAG_VALUE>\.capacity\.<TAG_VALUE>(\.__partition_id=(\w{7}))$",
                ".dynamodb.table.",
                "",
            ),
        ),
        (
            "envoy.dynamo_operation",
            Re2(
                r"^http\.<TAG_VALUE>\.dynamodb.(?:operation|table\.<TAG_VALUE>\.capacity)(\.(<TAG_VALUE>))(?:\.|$)",
                ".dynamodb.",
                "",
            ),
        ),
        (
            "envoy.dynamo_table",
            Re2(
                r"^http\.<TAG_VALUE>\.dynamodb.(?:table|error)\.((<TAG_VALUE>)\.)",
                ".dynamodb.",
                "",
            ),
        ),
        (
            "envoy.ssl_cipher",
            Re2(
                r"^listener\..*?\.ssl\.ciphers(\.(<CIPHER>))$",
                ".ssl.ciphers.",
                "",
            ),
        ),
        (
            "envoy.ssl_curve",
            Re2(
                r"^<LISTENER_OR_CLUSTER>\.ssl\.curves(\.(<CIPHER>))$",
                ".ssl.curves.",
                "",
            ),
        ),
        (
            "envoy.ssl_sigalg",
            Re2(
                r"^<LISTENER_OR_CLUSTER>\.ssl\.sigalgs(\.(<CIPHER>))$",
                ".ssl.sigalgs.",
                "",
            ),
        ),
        (
            "envoy.ssl_version",
            Re2(
                r"^<LISTENER_OR_CLUSTER>\.ssl\.versions(\.(TLSv\d\.\d))$",
                ".ssl.versions.",
                "",
            ),
        ),
        (
            // The certificate expiry gauges (`<scope>.ssl.certificate.<name>.expiration_unix_time_seconds`), which
            // public Envoy dashboards chart by `envoy_tls_certificate`. A certificate's name may hold dots (SDS
            // secret names, SPIFFE IDs), so it runs to the fixed suffix.
            "envoy.tls_certificate",
            Re2(
                r"^<LISTENER_OR_CLUSTER>\.ssl\.certificate(\.(.*?))\.expiration_unix_time_seconds$",
                ".ssl.certificate.",
                "",
            ),
        ),
        (
            "cipher_suite",
            Re2(
                r"^cluster\.<TAG_VALUE>\.ssl\.ciphers(\.(<CIPHER>))$",
                ".ssl.ciphers.",
                "",
            ),
        ),
        (
            "envoy.http_conn_manager_prefix",
            Re2(r"^listener\..*?\.http\.((<TAG_VALUE>)\.)", ".http.", ""),
        ),
        (
            "envoy.worker_id",
            Re2(
                r"^(?:listener\.(?:<ADDRESS>|<TAG_VALUE>)\.|server\.|listener_manager\.)worker_((\d+)\.)",
                "",
                "",
            ),
        ),
        (
            "envoy.listener_address",
            Re2(r"^listener\.((<ADDRESS>|<TAG_VALUE>)\.)", "", "admin"),
        ),
        (
            "envoy.rds_route_config",
            // Route config names may hold dots and slashes (`agg/route_config.1-23`): up to the last token.
            Re2(r"^http\.<TAG_VALUE>\.rds\.((.*?)\.)\w+?$", ".rds.", ""),
        ),
        (
            "envoy.mongo_callsite",
            Tokens("mongo.*.collection.*.callsite.$.query.**"),
        ),
        (
            "envoy.mongo_collection",
            Tokens("mongo.*.collection.$.**.query.*"),
        ),
        ("envoy.mongo_cmd", Tokens("mongo.*.cmd.$.**")),
        ("envoy.grpc_bridge_method", Tokens("cluster.*.grpc.*.$.**")),
        ("envoy.http_user_agent", Tokens("http.*.user_agent.$.**")),
        ("envoy.virtual_cluster", Tokens("vhost.*.vcluster.$.**")),
        ("envoy.fault_downstream_cluster", Tokens("http.*.fault.$.**")),
        ("envoy.grpc_bridge_service", Tokens("cluster.*.grpc.$.**")),
        ("envoy.tcp_prefix", Tokens("tcp.$.**")),
        ("envoy.udp_prefix", Tokens("udp.$.**")),
        ("envoy.clientssl_prefix", Tokens("auth.clientssl.$.**")),
        ("envoy.ratelimit_prefix", Tokens("ratelimit.$.**")),
        ("envoy.cluster_name", Tokens("cluster.$.**")),
        ("envoy.ext_authz_prefix", Tokens("cluster.*.ext_authz.$.**")),
        ("envoy.ext_authz_prefix", Tokens("http.*.ext_authz.$.**")),
        ("envoy.http_conn_manager_prefix", Tokens("http.$.**")),
        ("envoy.virtual_host", Tokens("vhost.$.**")),
        ("envoy.mongo_prefix", Tokens("mongo.$.**")),
        ("envoy.route", Tokens("vhost.*.route.$.**")),
        ("envoy.thrift_prefix", Tokens("thrift.$.**")),
        ("envoy.redis_prefix", Tokens("redis.$.**")),
        (
            "envoy.local_http_ratelimit_prefix",
            Tokens("$.http_local_rate_limit.**"),
        ),
        (
            "envoy.local_network_ratelimit_prefix",
            Tokens("local_rate_limit.$.**"),
        ),
        (
            "envoy.local_listener_ratelimit_prefix",
            Tokens("listener_local_ratelimit.$.**"),
        ),
        ("envoy.dns_filter_prefix", Tokens("dns_filter.$.**")),
    ]
}

/// A default extractor and the token it is filed under.
fn default_extractor(name: &'static str, kind: &DefaultKind) -> Option<(Extractor, String)> {
    match *kind {
        DefaultKind::Re2(regex, substr, negative) => {
            let expanded = regex
                .replace("<ADDRESS>", ADDRESS)
                .replace("<TAG_VALUE>", TAG_VALUE)
                .replace("<CIPHER>", CIPHER)
                .replace("<LISTENER_OR_CLUSTER>", LISTENER_OR_CLUSTER)
                // RE2's `\d` and `\w` are ASCII; Rust's are Unicode, and the Unicode `\w` alone costs each regex
                // hundreds of kilobytes of compiled program.
                .replace(r"\d", "[0-9]")
                .replace(r"\w", "[0-9A-Za-z_]");
            let prefix = regex_prefix(&expanded).to_string();
            let re = regex::Regex::new(&expanded).ok()?;
            Some((
                Extractor::new(name, Matcher::Default { re, substr, negative }),
                prefix,
            ))
        }
        DefaultKind::Tokens(pattern) => {
            let tokens: Vec<&'static str> = pattern.split('.').collect();
            let capture = tokens.iter().position(|t| *t == "$")?;
            let prefix = match tokens[0] {
                "$" | "*" | "**" => String::new(),
                t => t.to_string(),
            };
            Some((Extractor::new(name, Matcher::Tokens { tokens, capture }), prefix))
        }
    }
}

/// Turns stat names into tag-extracted names and tags.
pub struct TagProducer {
    without_prefix: Vec<Extractor>,
    by_prefix: HashMap<String, Vec<Extractor>>,
}

impl std::fmt::Debug for TagProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.without_prefix.len() + self.by_prefix.values().map(Vec::len).sum::<usize>();
        write!(f, "TagProducer({n} extractors)")
    }
}

impl Default for TagProducer {
    /// Envoy's defaults: what an unset `stats_config` gives.
    fn default() -> Self {
        match TagProducer::new(&TagsConfig::default()) {
            Ok(p) => p,
            // Unreachable: the defaults are fixed (and a unit test builds them).
            Err(_) => TagProducer {
                without_prefix: Vec::new(),
                by_prefix: HashMap::new(),
            },
        }
    }
}

impl TagProducer {
    /// Build the extractors of a `stats_config`, refusing what Envoy refuses with Envoy's message.
    pub fn new(cfg: &TagsConfig) -> Result<Self, SpecifierError> {
        let mut p = TagProducer {
            without_prefix: Vec::new(),
            by_prefix: HashMap::new(),
        };
        if cfg.use_all_default_tags {
            let overridden = |name: &str| {
                cfg.allow_default_tag_overrides && cfg.stats_tags.iter().any(|s| s.tag_name == name)
            };
            for (name, kind) in defaults() {
                if overridden(name) {
                    continue;
                }
                if let Some((x, prefix)) = default_extractor(name, &kind) {
                    p.add(x, prefix);
                }
            }
        }
        for (index, spec) in cfg.stats_tags.iter().enumerate() {
            let err = |field, message: String| SpecifierError {
                index,
                field,
                message,
            };
            let name = spec.tag_name.as_str();
            if name.is_empty() {
                return Err(err("tag_name", "tag_name cannot be empty".into()));
            }
            match &spec.value {
                TagValue::Regex(regex) if !regex.is_empty() => {
                    let re = fancy_regex::Regex::new(regex)
                        .map_err(|e| err("regex", format!("Invalid regex '{regex}': {e}")))?;
                    let prefix = regex_prefix(regex).to_string();
                    p.add(Extractor::new(name, Matcher::Custom(re)), prefix);
                }
                TagValue::Fixed(v) => {
                    // Envoy files a fixed tag under the prefix its value would have as a regex (nearly always
                    // none).
                    let prefix = regex_prefix(v).to_string();
                    p.add(Extractor::new(name, Matcher::Fixed(v.clone())), prefix);
                }
                TagValue::Regex(_) | TagValue::Default => {
                    let mut found = 0;
                    for (dname, kind) in defaults() {
                        if dname == name {
                            if let Some((x, prefix)) = default_extractor(dname, &kind) {
                                p.add(x, prefix);
                                found += 1;
                            }
                        }
                    }
                    if found == 0 {
                        return Err(err(
                            "tag_name",
                            format!("No regex specified for tag specifier and no default regex for name: '{name}'"),
                        ));
                    }
                }
            }
        }
        Ok(p)
    }

    fn add(&mut self, x: Extractor, prefix: String) {
        if prefix.is_empty() {
            self.without_prefix.push(x);
        } else {
            self.by_prefix.entry(prefix).or_default().push(x);
        }
    }

    /// The tag-extracted name of `name` and its tags, in extraction order.
    pub fn produce(&self, name: &str) -> (String, Vec<Tag<'_>>) {
        let mut tags: Vec<Tag<'_>> = Vec::new();
        let mut remove: Vec<(usize, usize)> = Vec::new();
        let mut tokens = None;
        let first = name.find('.').map(|dot| &name[..dot]);
        let pinned = first.and_then(|t| self.by_prefix.get(t)).into_iter().flatten();
        for x in self.without_prefix.iter().chain(pinned) {
            if tags.iter().any(|t| t.name == x.name) {
                continue;
            }
            if let Some((range, value)) = x.extract(name, &mut tokens) {
                tags.push(Tag {
                    name: &x.name,
                    label: &x.label,
                    value,
                });
                remove.extend(range.filter(|(s, e)| s < e));
            }
        }
        (remove_ranges(name, remove), tags)
    }
}

/// `name` without the union of `ranges`.
fn remove_ranges(name: &str, mut ranges: Vec<(usize, usize)>) -> String {
    if ranges.is_empty() {
        return name.to_string();
    }
    ranges.sort_unstable();
    let mut out = String::with_capacity(name.len());
    let mut pos = 0;
    for (start, end) in ranges {
        if start > pos {
            out.push_str(&name[pos..start]);
        }
        pos = pos.max(end);
    }
    out.push_str(&name[pos.min(name.len())..]);
    out
}

#[cfg(test)]
mod tests;
