#!/usr/bin/env bash
# The whole test suite: unit tests, the kvm-unit-tests-style guest suite, the integration
# tests (real kernel boot included), and the upstream kvm-unit-tests x86 suite through its own
# runner against guest-tests/kvm-unit-tests.expect, and hopvm driven by Debian's libvirt with virsh
# (resources/libvirt-test.sh; HOPVM_SKIP_LIBVIRT=1 leaves it out).
# Usage: resources/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash resources/install-deps.sh
bash resources/fetch-kernel.sh >/dev/null
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
# The migration engine's unit tests once more as optimised code: what the compiler may fold
# away (an atomic `or 0` that must fault a page in) only shows there.
cargo test --release -p migration --lib "$@"
bash resources/kvm-unit-tests.sh
[ "${HOPVM_SKIP_LIBVIRT:-0}" = 1 ] || bash resources/libvirt-test.sh
