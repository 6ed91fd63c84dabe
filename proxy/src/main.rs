//! The `remora` binary: Envoy's command line.

// The binary answers --help, --version and --mode validate on stdout, as Envoy does.
#![allow(clippy::print_stdout)]

use remora::cli::{self, Command, Mode};
use remora::config;

fn main() {
    remora::util::limit_malloc_arenas();
    let args: Vec<String> = std::env::args().skip(1).collect();
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
            remora::util::release_freed_memory();
            let code = remora::server::run(opts, bootstrap);
            std::process::exit(code);
        }
    }
}
