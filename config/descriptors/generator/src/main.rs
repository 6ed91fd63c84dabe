//! Compiles Envoy's v3 API protos (as shipped in the `envoy-types` crate) into one `FileDescriptorSet` without
//! source info, written to `config/descriptors/envoy.binpb`.
//!
//! protox resolves a relative type name against every package it has loaded, where protoc only looks at packages
//! of files imported directly. So each file is compiled by a compiler of its own (which loads only that file's
//! imports), and the one Envoy file that still depends on protoc's rule (`common.dynamic_forward_proxy.v3.X` from
//! inside `envoy.extensions.clusters`, which has a `common` package through a transitive import) is served by
//! [`Fixups`] with the name written out in full; nothing else is changed.

use prost::Message;
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver, IncludeFileResolver};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

const INCLUDES: &[&str] = &[
    "data-plane-api",
    "xds",
    "googleapis",
    "protoc-gen-validate",
    "cel-spec/proto",
    "opentelemetry-proto",
    "client_model",
    "ratelimit/api",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let proto_root = envoy_types_dir(&here)?.join("proto");
    let api = proto_root.join("data-plane-api");
    let mut files = Vec::new();
    walk(&api.join("envoy"), &mut files)?;
    files.sort();
    let includes: Vec<PathBuf> = INCLUDES.iter().map(|i| proto_root.join(i)).collect();

    // One compiler per file, so each file sees only what it imports (as protoc would); the results are merged.
    let mut by_name = BTreeMap::new();
    for file in &files {
        let mut chain = ChainFileResolver::new();
        for include in &includes {
            chain.add(IncludeFileResolver::new(include.clone()));
        }
        chain.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(Fixups { inner: chain });
        compiler.include_imports(true).include_source_info(false);
        compiler.open_file(file.strip_prefix(&api)?)?;
        for fd in compiler.file_descriptor_set().file {
            by_name.entry(fd.name().to_string()).or_insert(fd);
        }
    }
    // Only what Remora reads, and what it imports: the core API, and the extensions Remora implements (an
    // extension it does not know is refused by type URL). Decoded, the full API costs about 16 MB of memory,
    // most of it extensions no sidecar of ours uses. Dependencies come before dependants, as
    // DescriptorPool::decode wants them.
    let mut ordered = Vec::new();
    let mut seen = HashSet::new();
    for name in by_name.keys() {
        if is_root(name) {
            visit(name, &by_name, &mut seen, &mut ordered);
        }
    }
    let set = prost_types::FileDescriptorSet { file: ordered };
    let bytes = set.encode_to_vec();
    let pool = prost_reflect::DescriptorPool::decode(bytes.as_slice())?;
    let out = here.join("../envoy.binpb");
    std::fs::write(&out, &bytes)?;
    eprintln!(
        "wrote {} ({} files, {} messages, {} bytes)",
        out.display(),
        set.file.len(),
        pool.all_messages().count(),
        bytes.len()
    );
    Ok(())
}

/// Extension folders (under `envoy/extensions/`) Remora implements or is about to.
const EXTENSIONS: &[&str] = &[
    "access_loggers/file/",
    "access_loggers/stream/",
    "clusters/aggregate/",
    "clusters/dynamic_forward_proxy/",
    "common/dynamic_forward_proxy/",
    "filters/http/adaptive_concurrency/",
    "filters/http/admission_control/",
    "filters/http/dynamic_forward_proxy/",
    "filters/http/health_check/",
    "filters/http/local_ratelimit/",
    "filters/http/router/",
    "filters/listener/original_dst/",
    "filters/listener/tls_inspector/",
    "filters/network/http_connection_manager/",
    "filters/network/tcp_proxy/",
    "load_balancing_policies/",
    "network/dns_resolver/",
    "retry/host/previous_hosts/",
    "resource_monitors/downstream_connections/",
    "retry/priority/previous_priorities/",
    "transport_sockets/tls/",
    "upstreams/http/",
];

/// Whether a file is kept with its imports.
fn is_root(name: &str) -> bool {
    if let Some(ext) = name.strip_prefix("envoy/extensions/") {
        return EXTENSIONS.iter().any(|e| ext.starts_with(e));
    }
    if let Some(svc) = name.strip_prefix("envoy/service/") {
        return svc.starts_with("discovery/") || svc.starts_with("secret/") || svc.starts_with("runtime/");
    }
    if name.starts_with("envoy/admin/") || name.starts_with("envoy/data/") || name.starts_with("envoy/watchdog/") {
        return false;
    }
    name.starts_with("envoy/config/") || name.starts_with("envoy/type/") || name.starts_with("envoy/annotations/")
        || name.starts_with("xds/type/") || name.starts_with("udpa/type/") || name.starts_with("google/rpc/")
}

/// (file, text as written, text with the name in full)
const FIXUPS: &[(&str, &str, &str)] = &[(
    "envoy/extensions/clusters/dynamic_forward_proxy/v3/cluster.proto",
    " common.dynamic_forward_proxy.v3.DnsCacheConfig ",
    " .envoy.extensions.common.dynamic_forward_proxy.v3.DnsCacheConfig ",
)];

struct Fixups {
    inner: ChainFileResolver,
}

impl FileResolver for Fixups {
    fn resolve_path(&self, path: &Path) -> Option<String> {
        self.inner.resolve_path(path)
    }

    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        let file = self.inner.open_file(name)?;
        let mut fixed: Option<String> = None;
        for (target, from, to) in FIXUPS {
            if *target == name {
                let source = fixed.take().or_else(|| file.source().map(str::to_string)).unwrap_or_default();
                assert!(source.contains(from), "{name} no longer contains {from:?}: drop the fixup");
                fixed = Some(source.replace(from, to));
            }
        }
        match fixed {
            Some(source) => File::from_source(name, &source),
            None => Ok(file),
        }
    }
}

fn visit(
    name: &str,
    by_name: &BTreeMap<String, prost_types::FileDescriptorProto>,
    seen: &mut HashSet<String>,
    out: &mut Vec<prost_types::FileDescriptorProto>,
) {
    if !seen.insert(name.to_string()) {
        return;
    }
    let fd = &by_name[name];
    for dep in &fd.dependency {
        visit(dep, by_name, seen, out);
    }
    out.push(fd.clone());
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

/// Where cargo unpacked envoy-types, from `cargo metadata` on this crate.
fn envoy_types_dir(here: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(here.join("Cargo.toml"))
        .output()?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let packages = meta["packages"].as_array().ok_or("cargo metadata: no packages")?;
    for p in packages {
        if p["name"] == "envoy-types" {
            let manifest = p["manifest_path"].as_str().ok_or("no manifest_path")?;
            return Ok(Path::new(manifest).parent().ok_or("bad manifest_path")?.to_path_buf());
        }
    }
    Err("envoy-types not found in cargo metadata".into())
}
