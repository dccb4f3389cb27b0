#!/usr/bin/env bash
# buf lint, buf format and (once v1 has a previous commit) buf breaking for proto/.
# buf comes from the npm registry, pinned, installed under target/tools.
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0
tools=target/tools/buf-$BUF_VERSION
buf=$tools/node_modules/.bin/buf
if [ ! -x "$buf" ]; then
    mkdir -p "$tools"
    npm install --prefix "$tools" --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION"
fi
"$buf" --version

"$buf" lint proto
echo "buf lint: clean"
"$buf" format --diff --exit-code proto
echo "buf format: clean"

# Breaking changes against the previous commit of main, when it has the contracts.
if git rev-parse --verify -q HEAD~1 >/dev/null && git cat-file -e HEAD~1:proto/buf.yaml 2>/dev/null; then
    "$buf" breaking proto --against ".git#ref=HEAD~1,subdir=proto"
    echo "buf breaking against HEAD~1: no breaking change"
else
    echo "buf breaking: skipped (no previous commit with proto/buf.yaml)"
fi
