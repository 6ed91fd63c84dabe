//! `bench-harness`: the whole-proxy comparison. Run it through `benches/run.sh`, which builds first; see
//! `benches/README.md`.

fn main() -> std::process::ExitCode {
    remora_benches::harness::main()
}
