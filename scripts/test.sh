#!/usr/bin/env bash
# The whole test suite, as CI runs it: format, lints, then every test, including the
# network-namespace end-to-end tests (these need root and fail, loudly, without it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "== cargo fmt --check" >&2
cargo fmt --all --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build" >&2
# The end-to-end tests start the daemons as processes: every binary of the workspace must exist,
# not only those of the package under test.
cargo build --workspace --bins --locked
echo "== tests" >&2
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-targets --locked --no-fail-fast
else
  echo "cargo-nextest not found; using cargo test" >&2
  cargo test --workspace --all-targets --locked --no-fail-fast
fi
