#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need when it is missing, then checks
# formatting and lints and runs every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
# Packages the end-to-end tests use (each test skips with a reason where one cannot run).
for tool in curl; do
  command -v "$tool" >/dev/null 2>&1 || need_pkgs+=("$tool")
done
# The transparent-interception test (tests/e2e/passthrough.rs) redirects with iptables in a network namespace.
command -v iptables >/dev/null 2>&1 || need_pkgs+=(iptables)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
# Prometheus and promtool (tests/e2e/observability.rs), both from Debian's `prometheus`.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  need_pkgs+=(prometheus)
fi
# The sidecar image (tests/e2e/container.rs): built with buildah, run with podman on runc.
for tool in buildah podman runc; do
  command -v "$tool" >/dev/null 2>&1 || need_pkgs+=("$tool")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# Every Kubernetes manifest shipped or generated passes `kubernetes-validate --strict` (tests/e2e/kubernetes.rs).
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "installing: kubernetes-validate (pip)"
  python3 -m pip install -q kubernetes-validate >/dev/null 2>&1 || echo "kubernetes-validate: pip install failed; that check will skip"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  # Doc tests first: nextest's summary must be the last thing printed.
  cargo test --workspace --doc --quiet
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
