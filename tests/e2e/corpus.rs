//! The Envoy corpus (`../shared/envoy-corpus/configs/`) through `remora --mode validate`.
//!
//! Each bootstrap is validated by the real binary; each discovery-response file (`resources:`, the files that
//! `dynamic-config-fs_envoy.yaml`'s `path_config_source` names) is parsed and lowered in-process with
//! [`remora::config::load::resources_from_text`] and [`remora::config::validate_resources`]. The result is held
//! against a golden file per corpus file, `tests/corpus/<file>.expected`: `OK`, or the exact error lines (path
//! and message, one a line, without the file name). The test also writes `tests/corpus/COMPATIBILITY.md`, the
//! table the README links to, and checks it is current.
//!
//! When Remora learns a feature (or the corpus grows), regenerate the goldens and the table, then review the
//! diff:
//!
//! ```text
//! REMORA_BLESS=1 cargo test -p remora --test e2e corpus
//! ```
//!
//! The corpus is found at `<repo>/../shared/envoy-corpus` (where CI clones it), else in `shared/envoy-corpus`
//! beside any ancestor of the repo, else at `$REMORA_ENVOY_CORPUS`. A missing corpus fails the test.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use remora::config::load::{self, Format};

const REMORA: &str = env!("CARGO_BIN_EXE_remora");

/// The repository's root (`proxy/` is the package this test belongs to).
fn repo_root() -> PathBuf {
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    package
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent dir", package.display()))
        .to_path_buf()
}

pub(crate) fn corpus_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REMORA_ENVOY_CORPUS") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("configs").is_dir(),
            "REMORA_ENVOY_CORPUS={} has no configs/ folder",
            dir.display()
        );
        return dir;
    }
    let root = repo_root();
    for ancestor in root.ancestors().skip(1) {
        let dir = ancestor.join("shared").join("envoy-corpus");
        if dir.join("configs").is_dir() {
            return dir;
        }
    }
    panic!(
        "the Envoy corpus is missing: expected {} (the shared/ folder beside the repository, as CI clones it), \
         or a shared/envoy-corpus beside an ancestor of the repository, or $REMORA_ENVOY_CORPUS",
        root.join("../shared/envoy-corpus/configs").display()
    );
}

fn golden_dir() -> PathBuf {
    repo_root().join("tests").join("corpus")
}

fn blessing() -> bool {
    std::env::var_os("REMORA_BLESS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// What Remora says about one corpus file.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// The error lines, `path: message`.
    Refused(Vec<String>),
}

impl Outcome {
    fn golden_text(&self) -> String {
        match self {
            Outcome::Ok => "OK\n".to_string(),
            Outcome::Refused(lines) => lines.iter().map(|l| format!("{l}\n")).collect(),
        }
    }

    fn from_golden(text: &str) -> Outcome {
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines == ["OK"] {
            Outcome::Ok
        } else {
            Outcome::Refused(lines)
        }
    }
}

/// A discovery-response file rather than a bootstrap: its top level is a `resources:` list.
fn is_resources_file(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("resources:"))
        || serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v.get("resources").is_some())
}

/// `remora --mode validate -c FILE`.
fn validate_bootstrap(file: &Path) -> Outcome {
    let output = Command::new(REMORA)
        .args(["--mode", "validate", "-c"])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {REMORA}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let prefix = format!("error: {}: ", file.display());
    let errors: Vec<String> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .collect();
    match output.status.code() {
        Some(0) => {
            assert!(
                errors.is_empty() && stdout.contains("OK"),
                "{}: exit 0 but\nstdout:\n{stdout}\nstderr:\n{stderr}",
                file.display()
            );
            Outcome::Ok
        }
        Some(1) => {
            assert!(
                !errors.is_empty() && stderr.contains(&format!("is invalid: {} error(s)", errors.len())),
                "{}: exit 1 but the errors do not add up\nstderr:\n{stderr}",
                file.display()
            );
            Outcome::Refused(errors)
        }
        _ => panic!(
            "{}: validate ended with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            file.display(),
            output.status
        ),
    }
}

/// Parse and lower a `resources:` file. Listeners may name the clusters of the other resource files of the
/// corpus, as the bootstrap that points at both would have them.
fn validate_resources(file: &Path, text: &str, clusters: &HashSet<String>) -> Outcome {
    let format = Format::detect(file.to_str(), text);
    let result = load::resources_from_text(text, format)
        .and_then(|resources| remora::config::validate_resources(&resources, clusters));
    match result {
        Ok(()) => Outcome::Ok,
        Err(errs) => Outcome::Refused(errs.0.iter().map(ToString::to_string).collect()),
    }
}

/// The names of the clusters in the corpus's `resources:` files.
fn resource_clusters(files: &[(String, PathBuf, String)]) -> HashSet<String> {
    let mut names = HashSet::new();
    for (_, path, text) in files.iter().filter(|(_, _, t)| is_resources_file(t)) {
        let Ok(resources) = load::resources_from_text(text, Format::detect(path.to_str(), text)) else {
            continue;
        };
        for r in resources {
            if prost_reflect::ReflectMessage::descriptor(&r).full_name() == "envoy.config.cluster.v3.Cluster"
            {
                if let Some(name) = r
                    .get_field_by_name("name")
                    .and_then(|v| v.as_str().map(str::to_string))
                {
                    names.insert(name);
                }
            }
        }
    }
    names
}

/// A distinct unsupported feature, from one error line: the field (list indexes and map keys dropped) and,
/// when the message names a value that is refused (`STRICT_DNS`, an HTTP filter), that value.
fn feature(line: &str) -> String {
    let (path, message) = line.split_once(": ").unwrap_or(("", line));
    let mut field = String::new();
    let mut depth = 0;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ if depth == 0 => field.push(c),
            _ => {}
        }
    }
    let field = field.rsplit('.').next().unwrap_or_default().to_string();
    let message = message
        .trim_end_matches(" yet")
        .trim_end_matches(" by Remora")
        .trim_end_matches(" is not supported");
    if message == "not supported" {
        return field;
    }
    // A quoted value (a host name, a header name) is the config's, not the feature's.
    let mut generic = String::new();
    let mut quoted = false;
    for c in message.chars() {
        match c {
            '"' if !quoted => {
                quoted = true;
                generic.push('…');
            }
            '"' => quoted = false,
            _ if !quoted => generic.push(c),
            _ => {}
        }
    }
    format!("{field}: {generic}")
}

fn compatibility_table(results: &[(String, Outcome)]) -> String {
    let ok = results.iter().filter(|(_, o)| *o == Outcome::Ok).count();
    let mut out = format!(
        "# Envoy corpus compatibility\n\n\
         Generated by `tests/e2e/corpus.rs` from `../shared/envoy-corpus/configs/` (regenerate with \
         `REMORA_BLESS=1 cargo test -p remora --test e2e corpus`; do not edit by hand). A file is either accepted \
         (OK) or refused with the path of every field Remora does not support; the exact lines are in \
         `tests/corpus/<file>.expected`.\n\n\
         **{ok} of {} files accepted.**\n\n\
         | file | result | unsupported features |\n|---|---|---|\n",
        results.len()
    );
    let mut by_feature: BTreeMap<String, usize> = BTreeMap::new();
    for (name, outcome) in results {
        match outcome {
            Outcome::Ok => out.push_str(&format!("| `{name}` | OK | |\n")),
            Outcome::Refused(lines) => {
                let mut seen = Vec::new();
                for l in lines {
                    let f = feature(l);
                    if !seen.contains(&f) {
                        seen.push(f);
                    }
                }
                for f in &seen {
                    *by_feature.entry(f.clone()).or_default() += 1;
                }
                let list: Vec<String> = seen.iter().map(|f| format!("`{f}`")).collect();
                out.push_str(&format!(
                    "| `{name}` | {} unsupported path{} | {} |\n",
                    lines.len(),
                    if lines.len() == 1 { "" } else { "s" },
                    list.join(", ").replace('|', "\\|")
                ));
            }
        }
    }
    let mut ranked: Vec<(String, usize)> = by_feature.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out.push_str("\n## What would unlock the most files\n\n| feature | files |\n|---|---|\n");
    for (f, n) in ranked {
        out.push_str(&format!("| `{}` | {n} |\n", f.replace('|', "\\|")));
    }
    out
}

#[test]
fn corpus_validates_as_the_goldens_say() {
    let configs = corpus_dir().join("configs");
    let mut files: Vec<(String, PathBuf, String)> = std::fs::read_dir(&configs)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", configs.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
            (name, p, text)
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!files.is_empty(), "{} is empty", configs.display());

    let clusters = resource_clusters(&files);
    let results: Vec<(String, Outcome)> = files
        .iter()
        .map(|(name, path, text)| {
            let outcome = if is_resources_file(text) {
                validate_resources(path, text, &clusters)
            } else {
                validate_bootstrap(path)
            };
            (name.clone(), outcome)
        })
        .collect();

    let goldens = golden_dir();
    let table = compatibility_table(&results);
    let table_path = goldens.join("COMPATIBILITY.md");
    if blessing() {
        std::fs::create_dir_all(&goldens).expect("create tests/corpus");
        // Goldens of files no longer in the corpus go.
        let names: HashSet<String> = results.iter().map(|(n, _)| format!("{n}.expected")).collect();
        for entry in std::fs::read_dir(&goldens).expect("list tests/corpus") {
            let p = entry.expect("a dir entry").path();
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".expected") && !names.contains(&name) {
                std::fs::remove_file(&p).expect("remove a stale golden");
            }
        }
        for (name, outcome) in &results {
            std::fs::write(goldens.join(format!("{name}.expected")), outcome.golden_text())
                .expect("write a golden");
        }
        std::fs::write(&table_path, &table).expect("write COMPATIBILITY.md");
        return;
    }

    let mut failures = Vec::new();
    for (name, outcome) in &results {
        let golden = goldens.join(format!("{name}.expected"));
        let Ok(text) = std::fs::read_to_string(&golden) else {
            failures.push(format!("{name}: no golden at {}", golden.display()));
            continue;
        };
        let expected = Outcome::from_golden(&text);
        if expected != *outcome {
            failures.push(format!(
                "{name}:\n--- expected ({})\n{}--- got\n{}",
                golden.display(),
                expected.golden_text(),
                outcome.golden_text()
            ));
        }
    }
    let in_corpus: HashSet<String> = results.iter().map(|(n, _)| format!("{n}.expected")).collect();
    if let Ok(entries) = std::fs::read_dir(&goldens) {
        for entry in entries {
            let name = entry
                .expect("a dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name.ends_with(".expected") && !in_corpus.contains(&name) {
                failures.push(format!("{name}: a golden for a file that is not in the corpus"));
            }
        }
    }
    if std::fs::read_to_string(&table_path).ok().as_deref() != Some(table.as_str()) {
        failures.push(format!("{} is not current", table_path.display()));
    }
    assert!(
        failures.is_empty(),
        "{} corpus mismatch(es); if the change is intended, run \
         `REMORA_BLESS=1 cargo test -p remora --test e2e corpus` and review the diff:\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn features_name_the_field_and_the_refused_value() {
    assert_eq!(
        feature("static_resources.clusters[0].type: STRICT_DNS is not supported by Remora"),
        "type: STRICT_DNS"
    );
    assert_eq!(
        feature("layered_runtime: not supported by Remora"),
        "layered_runtime"
    );
    assert_eq!(
        feature("a.routes[0].route.idle_timeout: not supported by Remora yet"),
        "idle_timeout"
    );
    assert_eq!(
        feature(
            "x.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: \"svc\" is not an IP address"
        ),
        "address: … is not an IP address"
    );
    assert_eq!(
        feature(
            "c[1].typed_extension_protocol_options[\"a.b\"].explicit_http_config.x: not supported by Remora"
        ),
        "x"
    );
}
