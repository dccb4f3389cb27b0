#!/usr/bin/env bash
# Lints, renders and validates the Helm chart in helm/cms without a helm binary or a cluster.
#
# Tools (installed from PyPI only, into a virtualenv reused across runs):
#   helm-python-sdk     Helm's own Go SDK (v4) as a shared library with Python bindings:
#                       `helm lint --strict` and `helm template`, values.schema.json included
#   kubernetes-validate the Kubernetes OpenAPI schemas of many versions, checked --strict
#                       (here every minor version from 1.29 to 1.37)
# helm/check.py drives them over several value sets (SQLite, PostgreSQL, autoscaling,
# ServiceMonitor, the examples) and adds the checks specific to this project (service config
# keys, security contexts, network policies, certificate SANs, replicas and rollouts,
# migration hooks); read its docstring for the list. Exits non-zero on any failure.
#
# Environment: CMS_HELM_VENV (default ${TMPDIR:-/tmp}/cms-helm-venv) and CMS_HELM_OUT (where
# the rendered manifests go; default ${TMPDIR:-/tmp}/cms-helm-rendered).
set -euo pipefail
cd "$(dirname "$0")"

venv="${CMS_HELM_VENV:-${TMPDIR:-/tmp}/cms-helm-venv}"
out="${CMS_HELM_OUT:-${TMPDIR:-/tmp}/cms-helm-rendered}"
requirements=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)
stamp="$venv/.cms-requirements"

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "helm/check.sh: needs Python 3.11 or later (tomllib) as \$PYTHON or python3" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${requirements[*]}" ]; then
    echo "==> installing ${requirements[*]} into $venv (PyPI)"
    rm -rf "$venv"
    if ! "$python" -m venv "$venv"; then
        echo "helm/check.sh: cannot create a virtualenv (on Debian: apt-get install python3-venv)" >&2
        exit 1
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
    echo "${requirements[*]}" > "$stamp"
else
    echo "==> using $venv (${requirements[*]})"
fi

rm -rf "$out"
mkdir -p "$out"
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" check.py "$out"
