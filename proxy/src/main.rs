//! The `remora` binary: Envoy's command line.

// The binary answers --help, --version and --mode validate on stdout, as Envoy does.
#![allow(clippy::print_stdout)]

use remora::cli::{self, Command, Mode};
use remora::config;

fn main() {
    remora::util::limit_malloc_arenas();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // Envoy's image runs `envoy "$@"` when the first argument is a flag, else "$@": a pod spec's
    // `args: ["envoy", "-c", ...]` reaches this image's `envoy` entrypoint as `envoy envoy -c ...`. Envoy takes no
    // positional argument, so a leading `envoy` can only mean that.
    if args.first().map(String::as_str) == Some("envoy") {
        args.remove(0);
    }
    // Remora's own subcommands (Envoy has none, so a first argument cannot be mistaken for one of its flags).
    if args.first().map(String::as_str) == Some("template") {
        std::process::exit(template(&args[1..]));
    }
    if args.first().map(String::as_str) == Some("inject") {
        std::process::exit(inject(&args[1..]));
    }
    let opts = match cli::parse(&args) {
        Ok(Command::Run(o)) => *o,
        Ok(Command::Help) => {
            print!("{}", cli::HELP);
            return;
        }
        Ok(Command::Version) => {
            println!("\nremora  version: {}\n", remora::admin::version_string());
            return;
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = remora::logging::init(&opts.log_level, opts.log_path.as_deref()) {
        eprintln!("error: --log-path: {e}");
        std::process::exit(1);
    }
    match opts.mode {
        Mode::Validate => {
            let label = opts.config_path.clone().unwrap_or_default();
            match config::load_bootstrap(&opts) {
                Ok(_) => {
                    println!("configuration '{label}' OK");
                }
                Err(errs) => {
                    for e in &errs.0 {
                        eprintln!("error: {e}");
                    }
                    eprintln!("configuration '{label}' is invalid: {} error(s)", errs.0.len());
                    std::process::exit(1);
                }
            }
        }
        Mode::Serve => {
            let bootstrap = match config::load_bootstrap(&opts) {
                Ok(b) => b,
                Err(errs) => {
                    for e in &errs.0 {
                        eprintln!("error: {e}");
                    }
                    std::process::exit(1);
                }
            };
            // A static configuration needs no descriptor from here on (a dynamic one decodes them again).
            remora::config::descriptors::release();
            remora::util::release_freed_memory();
            let code = remora::server::run(opts, bootstrap);
            std::process::exit(code);
        }
    }
}

/// `remora template SERVICE.yaml`: the bootstrap on stdout.
fn template(args: &[String]) -> i32 {
    let [path] = args else {
        eprintln!("usage: remora template SERVICE.yaml  (renders the sidecar bootstrap on stdout)");
        return 2;
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {path}: {e}");
            return 1;
        }
    };
    match remora::sidecar::template::render(path, &text) {
        Ok(yaml) => {
            print!("{yaml}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `remora inject [FILE|-] [options]`: the Deployments with the sidecar on stdout.
fn inject(args: &[String]) -> i32 {
    use remora::sidecar::inject;
    use std::io::Read;
    let (opts, file) = match inject::parse_args(args) {
        Ok(x) => x,
        Err(_) if args.iter().any(|a| a == "-h" || a == "--help") => {
            print!("{}", inject::USAGE);
            return 0;
        }
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let mut text = String::new();
    let read = match &file {
        Some(path) => std::fs::read_to_string(path).map(|t| text = t),
        None => std::io::stdin().read_to_string(&mut text).map(|_| ()),
    };
    if let Err(e) = read {
        eprintln!("error: {}: {e}", file.as_deref().unwrap_or("stdin"));
        return 1;
    }
    match inject::inject(&text, &opts) {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(e) => {
            eprintln!("error: {}: {e}", file.as_deref().unwrap_or("stdin"));
            1
        }
    }
}
