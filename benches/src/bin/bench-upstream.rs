//! `bench-upstream --listen 127.0.0.1:0 [--threads N] [--multi-thread]`
//!
//! Prints `listening on ADDR` once it accepts connections, then serves until killed. By default it runs one
//! current_thread runtime per `--threads` (each accepting on the shared socket); `--multi-thread` runs one
//! multi-threaded runtime with `--threads` workers instead.

use std::net::SocketAddr;
use std::process::ExitCode;

use remora_benches::args::Args;
use remora_benches::upstream::{bind, Upstream};
use remora_benches::{outln, Result};

const USAGE: &str = "usage: bench-upstream [--listen 127.0.0.1:0] [--threads 1] [--multi-thread]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-upstream: {e}\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = Args::from_env();
    if args.flag("--help") || args.flag("-h") {
        outln!("{USAGE}")?;
        return Ok(());
    }
    let listen: SocketAddr = args
        .parse("--listen")?
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let threads: usize = args.parse("--threads")?.unwrap_or(1).max(1);
    let multi = args.flag("--multi-thread");
    args.finish()?;

    let listener = bind(listen)?;
    let addr = listener.local_addr()?;
    let upstream = Upstream::new();
    if multi {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener)?;
            outln!("listening on {addr}")?;
            upstream.serve(l).await;
            Ok(())
        })
    } else {
        let mut handles = Vec::new();
        for i in 0..threads {
            let l = listener.try_clone()?;
            let up = upstream.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(
                std::thread::Builder::new()
                    .name(format!("upstream-{i}"))
                    .spawn(move || {
                        rt.block_on(async move {
                            match tokio::net::TcpListener::from_std(l) {
                                Ok(l) => up.serve(l).await,
                                Err(e) => eprintln!("bench-upstream: registering the listener: {e}"),
                            }
                        })
                    })?,
            );
        }
        outln!("listening on {addr}")?;
        for h in handles {
            h.join().map_err(|_| "an upstream thread panicked")?;
        }
        Ok(())
    }
}
