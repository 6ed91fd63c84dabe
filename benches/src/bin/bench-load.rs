//! `bench-load --target ADDR [options]`: closed- or open-loop HTTP load; prints `measure-start` and
//! `measure-end` as the measured window opens and closes, then one line of JSON (see `load::Report::to_json`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use remora_benches::args::Args;
use remora_benches::load::{run, LoadConfig, Phase, Proto};
use remora_benches::{outln, Result};

const USAGE: &str =
    "usage: bench-load --target 127.0.0.1:PORT [--proto h1|h2] [--connections 50] [--streams 1]
    [--duration 10s] [--warmup 1s] [--rate RPS (open loop; default closed loop)] [--path /] [--body BYTES]
    [--grpc] [--host HOST] [--timeout 5s] [--threads 1] [--hist]
    [--tls (TLS 1.3, no resumption, server not verified)] [--new-conn (a connection per request; h1, closed loop)]";

fn main() -> ExitCode {
    match main_inner() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-load: {e}\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}

fn main_inner() -> Result<()> {
    let mut args = Args::from_env();
    if args.flag("--help") || args.flag("-h") {
        outln!("{USAGE}")?;
        return Ok(());
    }
    let target: SocketAddr = args.parse("--target")?.ok_or("--target is required")?;
    if !target.ip().is_loopback() {
        return Err("--target must be a loopback address: this tool only loads 127.0.0.1".into());
    }
    let proto = match args.value("--proto")?.as_deref() {
        None | Some("h1") | Some("http1") => Proto::H1,
        Some("h2") | Some("h2c") | Some("http2") => Proto::H2,
        Some(p) => return Err(format!("unknown --proto {p:?}").into()),
    };
    let cfg = LoadConfig {
        target,
        authority: args.value("--host")?.unwrap_or_else(|| target.to_string()),
        proto,
        connections: args.parse("--connections")?.unwrap_or(50),
        streams: args.parse("--streams")?.unwrap_or(1),
        warmup: args.duration("--warmup")?.unwrap_or(Duration::from_secs(1)),
        duration: args.duration("--duration")?.unwrap_or(Duration::from_secs(10)),
        rate: args.parse("--rate")?,
        path: args.value("--path")?.unwrap_or_else(|| "/".to_owned()),
        body: args.parse("--body")?.unwrap_or(0),
        grpc: args.flag("--grpc"),
        timeout: args.duration("--timeout")?.unwrap_or(Duration::from_secs(5)),
        threads: args.parse("--threads")?.unwrap_or(1),
        tls: args.flag("--tls"),
        new_conn: args.flag("--new-conn"),
    };
    let hist = args.flag("--hist");
    args.finish()?;
    cfg.validate()?;

    // Bounded whatever happens: `run` returns shortly after the window, so this only fires on a bug.
    let limit = cfg.warmup + cfg.duration + Duration::from_secs(15);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("bench-load: still running {limit:?} after start; giving up");
        std::process::exit(3);
    });

    let report = run(&cfg, |phase| {
        let _ = match phase {
            Phase::MeasureStart => outln!("measure-start"),
            Phase::MeasureEnd => outln!("measure-end"),
        };
    })?;
    outln!("{}", report.to_json(hist))?;
    Ok(())
}
