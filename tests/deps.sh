#!/usr/bin/env bash
# The Debian packages the build and the suite need that a fresh Debian machine lacks; only
# what is missing is installed. tests/run.sh (README's test command) and .ci/run call it
# first: the build itself needs the PC/SC headers (the pcsc crate), clippy included.
set -euo pipefail

step() { printf '\n==> %s\n' "$*"; }

# Tools the suite needs, as "command-or-file:debian-package" pairs (the list grows with the agent,
# PostgreSQL and HSM issues). Only what is missing is installed.
need() {
    local missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || [ -e "${pair%%:*}" ] || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
        exit 1
    fi
    step "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
}
need pkg-config:pkg-config node:nodejs npm:npm /usr/lib/postgresql/15/bin/initdb:postgresql-15 /usr/sbin/slapd:slapd ldapadd:ldap-utils softhsm2-util:softhsm2
# Cards: pcsc-lite with vsmartcard's vpcd driver, the PC/SC headers (the pcsc crate), and the
# independent clients the virtual card is tested with. Card tests start and stop their own
# pcscd (as root, in the foreground, in a private mount namespace: tests/src/pcsc.rs), so no
# system pcscd is needed or disturbed.
need /usr/sbin/pcscd:pcscd vpcd-config:vsmartcard-vpcd /usr/include/PCSC/winscard.h:libpcsclite-dev \
    opensc-tool:opensc yubico-piv-tool:yubico-piv-tool unshare:util-linux
# The console's browser test (tests/tests/console_browser.rs): Debian's Chromium, driven by
# playwright-core from tests/browser (npm ci in tests/run.sh; Playwright downloads no browser).
need chromium:chromium
