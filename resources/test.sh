#!/usr/bin/env bash
# The whole test suite: unit tests, the kvm-unit-tests-style guest suite, and the integration
# tests (real kernel boot included). Usage: resources/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash resources/install-deps.sh
bash resources/fetch-kernel.sh >/dev/null
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
