#!/usr/bin/env bash
# The whole test suite: README's second command, and what CI runs (.ci/run).
# Installs what it needs that a fresh Debian machine lacks, builds every binary the
# end-to-end tests start, runs all Rust tests, then checks the proto contracts and the chart.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

bash tests/deps.sh

step "browser test dependencies (tests/browser: playwright-core, axe-core) and the console's checksum code"
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/browser --no-audit --no-fund
node --test tests/browser/code.test.mjs

step "building every workspace binary (the end-to-end tests start them)"
cargo build --workspace --bins --locked

step "cargo test --workspace"
cargo test --workspace --locked

step "proto contracts: buf lint, format and breaking"
bash tests/proto-check.sh

if [ -x helm/check.sh ]; then
    step "Helm chart: lint, render, validate"
    bash helm/check.sh
fi

step "all checks passed"
