"""Checks the cms Helm chart without a helm binary or a cluster (run by helm/check.sh).

For every scenario (the defaults, i.e. SQLite; cert-manager on; custody caller scopes;
PostgreSQL for every workload; PostgreSQL with autoscaling; the ServiceMonitor on; PostgreSQL
without the migration Job; and each helm/examples/*.yaml):
  1. helm lint --strict (Helm's own linter, through helm-python-sdk's libhelm_c; this also
     validates the values against values.schema.json) for the oldest supported Kubernetes,
  2. helm template (same library) into <out>/rendered-<scenario>.yaml,
  3. kubernetes-validate --strict against every minor version from 1.29 to 1.37 (cert-manager
     Certificates and the ServiceMonitor have no schema there; they are checked by 4),
  4. what the services and this project need, which no generic tool knows: every rendered
     TOML config uses only keys the services accept; every container runs non-root with a
     read-only root file system, no capabilities and the RuntimeDefault seccomp profile, and
     is probed on /livez and /readyz of its ops port; custody's gRPC port is reachable only
     from gateway pods; custody gives the gateway a caller scope and PIV PUK release to no
     one else; each Certificate carries exactly one URI SAN (the workload's SPIFFE ID), both
     server and client auth, and the DNS name the gateway dials; replicas (custody's "auto":
     2 active/standby on PostgreSQL, 1 on SQLite; never more than 1 pod on SQLite),
     autoscalers and the Deployments they own, rollout strategies (custody active/standby
     replaces all pods at once), checksum annotations and PodDisruptionBudgets; the migration
     hook Jobs (pre-install/pre-upgrade, delete policies, weights, their ConfigMap and
     ServiceAccount as earlier hooks, the workload's image, command, config and database
     Secret plus --migrate-only, no TLS key); the ServiceMonitor and its headless Services.
Then values that must be refused are checked to be refused, and which value changes roll
which pods (checksum/config, checksum/secrets).

Exit status: 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import yaml

HERE = Path(__file__).resolve().parent
CHART = HERE / "cms"
EXAMPLES = HERE / "examples"
RELEASE = "cms"
NAMESPACE = "cms"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) for `helm lint`, and every
# minor version from it to the newest kubernetes-validate knows, for the rendered objects.
KUBE_LINT_VERSION = "v1.29.0"
KUBE_VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]
WORKLOADS = ["template", "directory", "custody", "gateway"]
# Workloads with a database: the backends, and the gateway for its workflow state.
DB_WORKLOADS = ["template", "directory", "custody", "gateway"]
# The services behind the gateway.
BACKENDS = ["template", "directory", "custody"]
# Active/active workloads: autoscaled when asked, a PodDisruptionBudget with several pods.
SCALED_WORKLOADS = ["template", "directory", "gateway"]
# Kinds of CRDs that kubernetes-validate has no schema for: checked by this script instead.
CRD_KINDS = {"Certificate": "cert-manager.io/v1", "ServiceMonitor": "monitoring.coreos.com/v1"}
HOOK_EVENTS = {"pre-install", "pre-upgrade"}

# The config keys each service accepts (its serde structs deny unknown fields):
# services/kit/src/{server,tls,authz,db,telemetry,client}.rs, services/*/src/config.rs,
# gateway/src/config.rs. A key here that a service does not know would stop it at start.
SERVER_KEYS = {
    "listen", "ops_listen", "handshake_timeout_ms", "max_concurrent_handshakes",
    "shutdown_grace_ms", "max_concurrent_streams", "announce_file",
}
TLS_KEYS = {"ca", "cert", "key", "reload_interval_ms"}
ACCESS_KEYS = {"allow"}
DATABASE_KEYS = {"url", "max_connections"}
TELEMETRY_KEYS = {"log", "json", "otlp_endpoint", "export_delay_ms"}
UPSTREAM_KEYS = {"address", "identity", "connect_timeout_ms"}
AGENT_LINK_KEYS = {"hello_timeout_ms", "stale_after_ms"}
DB_SERVICE_KEYS = {
    "data_dir": None, "server": SERVER_KEYS, "tls": TLS_KEYS, "access": ACCESS_KEYS,
    "database": DATABASE_KEYS, "telemetry": TELEMETRY_KEYS,
}
# services/custody/src/config.rs CallerScope; a list means an array of tables.
CALLER_KEYS = {"identity", "key_references", "admin", "release_puk"}
CONFIG_KEYS = {
    "template": DB_SERVICE_KEYS,
    "directory": DB_SERVICE_KEYS,
    "custody": {**DB_SERVICE_KEYS, "callers": [CALLER_KEYS]},
    "gateway": {
        "data_dir": None, "database": DATABASE_KEYS,
        "server": SERVER_KEYS, "tls": TLS_KEYS, "access": ACCESS_KEYS,
        "backends": {"template": UPSTREAM_KEYS, "directory": UPSTREAM_KEYS,
                     "custody": UPSTREAM_KEYS | {"instances"}},
        "agent_link": AGENT_LINK_KEYS, "telemetry": TELEMETRY_KEYS,
    },
}
REQUIRED_CONFIG = {
    "template": ["data_dir", "server.listen", "server.ops_listen", "tls.ca", "tls.cert", "tls.key"],
    "gateway": ["data_dir", "server.listen", "server.ops_listen", "tls.ca", "tls.cert", "tls.key",
                "backends.template.address", "backends.template.identity",
                "backends.directory.address", "backends.directory.identity",
                "backends.custody.address", "backends.custody.identity"],
}
REQUIRED_CONFIG["directory"] = REQUIRED_CONFIG["template"]
REQUIRED_CONFIG["custody"] = REQUIRED_CONFIG["template"]

# cert-manager.io/v1 Certificate spec fields (kubernetes-validate has no CRD schemas).
CERTIFICATE_SPEC_KEYS = {
    "additionalOutputFormats", "commonName", "dnsNames", "duration", "emailAddresses",
    "encodeUsagesInRequest", "ipAddresses", "isCA", "issuerRef", "keystores", "literalSubject",
    "nameConstraints", "otherNames", "privateKey", "renewBefore", "renewBeforePercentage",
    "revisionHistoryLimit", "secretName", "secretTemplate", "signatureAlgorithm", "subject",
    "uris", "usages",
}
CERTIFICATE_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime",
    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
}

failures: list[str] = []


def fail(scenario: str, message: str) -> None:
    failures.append(f"{scenario}: {message}")
    print(f"  FAIL {message}")


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def lint(scenario: str, values: dict | None) -> None:
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE,
                       kube_version=KUBE_LINT_VERSION)
    bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    for m in report.get("messages", []):
        level = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m.get("severity"), "?")
        print(f"  lint {level} {m.get('path')}: {m.get('error')}")
    for e in report.get("errors", []) or []:
        fail(scenario, f"helm lint: {e}")
    for m in bad:
        fail(scenario, f"helm lint: {m.get('path')}: {m.get('error')}")
    if not bad and not report.get("errors"):
        print(f"  ok   helm lint --strict --kube-version {KUBE_LINT_VERSION} "
              f"({report.get('total_charts_linted')} chart)")


def render(values: dict | None) -> str:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    parts = []
    for path in sorted(manifests):
        if path.endswith("NOTES.txt") or not manifests[path].strip():
            continue
        parts.append(f"# Source: {path}\n{manifests[path].strip()}\n")
    return "---\n".join(parts)


def kube_validate(scenario: str, rendered: Path, docs: list[dict]) -> None:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    args = [str(exe), "--strict", "--quiet"]
    for version in KUBE_VERSIONS:
        args += ["-k", version]
    proc = subprocess.run(args + [str(rendered)], capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    crd_lines = [f"kind {kind} with api version {api}" for kind, api in CRD_KINDS.items()]
    unexpected = [line for line in out.splitlines()
                  if line.strip() and not any(c in line for c in crd_lines)]
    if proc.returncode != 0 or unexpected:
        fail(scenario, f"kubernetes-validate exited {proc.returncode}:\n"
                       + "\n".join(unexpected or out.splitlines()))
        return
    checked = [d for d in docs if d["kind"] not in CRD_KINDS]
    kinds = sorted({d["kind"] for d in checked})
    print(f"  ok   kubernetes-validate --strict -k {KUBE_VERSIONS[0]} .. -k {KUBE_VERSIONS[-1]} "
          f"({len(KUBE_VERSIONS)} versions): {len(checked)} objects ({', '.join(kinds)})")


def check_toml_keys(scenario: str, name: str, data: dict, allowed: dict, prefix: str = "") -> None:
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in allowed:
            fail(scenario, f"{name}.toml: unknown key {path}")
        elif isinstance(allowed[key], dict):
            if not isinstance(value, dict):
                fail(scenario, f"{name}.toml: {path} must be a table")
            else:
                check_toml_keys(scenario, name, value, allowed[key], path + ".")
        elif isinstance(allowed[key], set):
            if not isinstance(value, dict):
                fail(scenario, f"{name}.toml: {path} must be a table")
                continue
            for sub in value:
                if sub not in allowed[key]:
                    fail(scenario, f"{name}.toml: unknown key {path}.{sub}")
        elif isinstance(allowed[key], list):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                fail(scenario, f"{name}.toml: {path} must be an array of tables")
                continue
            for i, item in enumerate(value):
                for sub in item:
                    if sub not in allowed[key][0]:
                        fail(scenario, f"{name}.toml: unknown key {path}[{i}].{sub}")


def dig(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def check_pod_security(scenario: str, label: str, pod: dict) -> None:
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(scenario, f"{label}: pod securityContext must set runAsNonRoot and seccomp RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        fail(scenario, f"{label}: the service account token must not be mounted")
    main = pod["containers"][0]
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        if c is main or sc:
            ok = (sc.get("readOnlyRootFilesystem") is True
                  and sc.get("allowPrivilegeEscalation") is False
                  and "ALL" in sc.get("capabilities", {}).get("drop", [])
                  and sc.get("runAsNonRoot") is True)
            if not ok:
                fail(scenario, f"{label}/{c['name']}: container securityContext must be "
                               "non-root, read-only root, no privilege escalation, drop ALL")


def uses_postgres(values: dict, w: str) -> bool:
    return bool(values[w].get("database", {}).get("urlSecret", {}).get("name"))


def autoscaled(values: dict, w: str) -> bool:
    return bool(values[w].get("autoscaling", {}).get("enabled"))


def expected_replicas(values: dict, w: str) -> int:
    """The Deployment's replicas: custody's "auto" is 2 on PostgreSQL, 1 on SQLite."""
    replicas = values[w]["replicas"]
    if replicas == "auto":
        return 2 if uses_postgres(values, w) else 1
    return int(replicas)


def min_pods(values: dict, w: str) -> int:
    if autoscaled(values, w):
        return int(values[w]["autoscaling"]["minReplicas"])
    return expected_replicas(values, w)


def check_scaling(scenario: str, values: dict, by_kind: dict) -> None:
    """Replicas, autoscalers, rollout strategies, readiness and disruption budgets."""
    deployments = by_kind.get("Deployment", {})
    hpas = by_kind.get("HorizontalPodAutoscaler", {})
    pdbs = by_kind.get("PodDisruptionBudget", {})
    for w in WORKLOADS:
        name = f"{RELEASE}-{w}"
        dep = deployments.get(name)
        if dep is None:
            continue
        spec = dep["spec"]
        hpa = hpas.get(name)
        if autoscaled(values, w):
            a = values[w]["autoscaling"]
            if "replicas" in spec:
                fail(scenario, f"{w}: autoscaled, but the Deployment sets replicas "
                               "(every upgrade would reset the autoscaler's count)")
            if hpa is None:
                fail(scenario, f"{w}: autoscaling.enabled but no HorizontalPodAutoscaler")
            else:
                hs = hpa["spec"]
                target = hs.get("scaleTargetRef", {})
                if (hpa.get("apiVersion") != "autoscaling/v2" or target.get("kind") != "Deployment"
                        or target.get("name") != name or target.get("apiVersion") != "apps/v1"):
                    fail(scenario, f"{w}: the autoscaler does not scale Deployment {name} "
                                   "(autoscaling/v2)")
                if (hs.get("minReplicas"), hs.get("maxReplicas")) != (a["minReplicas"], a["maxReplicas"]):
                    fail(scenario, f"{w}: autoscaler min/max {hs.get('minReplicas')}/"
                                   f"{hs.get('maxReplicas')}")
                metrics = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"]
                           for m in hs.get("metrics", [])}
                wanted = {k: v for k, v in (("cpu", a["targetCPUUtilizationPercentage"]),
                                            ("memory", a["targetMemoryUtilizationPercentage"])) if v}
                if metrics != wanted:
                    fail(scenario, f"{w}: autoscaler metrics {metrics}, expected {wanted}")
                requests = values[w].get("resources", {}).get("requests", {})
                for resource in metrics:
                    if resource not in requests:
                        fail(scenario, f"{w}: autoscaled on {resource} without a request for it")
        else:
            if hpa is not None:
                fail(scenario, f"{w}: HorizontalPodAutoscaler rendered without autoscaling.enabled")
            if spec.get("replicas") != expected_replicas(values, w):
                fail(scenario, f"{w}: replicas {spec.get('replicas')}, expected "
                               f"{expected_replicas(values, w)}")
        most = int(values[w]["autoscaling"]["maxReplicas"]) if autoscaled(values, w) \
            else expected_replicas(values, w)
        if w in DB_WORKLOADS and not uses_postgres(values, w) and most > 1:
            fail(scenario, f"{w}: {most} pods on SQLite")
        strategy = spec.get("strategy", {})
        main = spec["template"]["spec"]["containers"][0]
        ready = main.get("readinessProbe", {})
        active_standby = w == "custody" and uses_postgres(values, w) and expected_replicas(values, w) > 1
        if active_standby:
            # Only the lease holder is Ready: a rollout that waits for new pods to become
            # available while an old one holds the lease never ends.
            if strategy != {"type": "RollingUpdate",
                            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "100%"}}:
                fail(scenario, f"custody: active/standby needs maxSurge 0 / maxUnavailable 100%, "
                               f"got {strategy}")
            if ready.get("periodSeconds", 10) > 2:
                fail(scenario, "custody: readiness probed too rarely for a fast failover")
        elif w in DB_WORKLOADS and not uses_postgres(values, w) and values[w]["persistence"]["enabled"]:
            if strategy.get("type") != "Recreate":
                fail(scenario, f"{w}: SQLite on a ReadWriteOnce volume needs the Recreate strategy")
        elif strategy.get("rollingUpdate", {}).get("maxUnavailable") != 0:
            fail(scenario, f"{w}: an active/active rollout must keep every pod until its "
                           f"replacement is ready, got {strategy}")
        annotations = spec["template"]["metadata"].get("annotations", {})
        for key in ("checksum/config", "checksum/secrets"):
            if len(str(annotations.get(key, ""))) != 64:
                fail(scenario, f"{w}: pod annotation {key} missing")
        want_pdb = (w in SCALED_WORKLOADS and values[w]["pdb"]["enabled"]
                    and min_pods(values, w) > 1)
        if want_pdb != (name in pdbs):
            fail(scenario, f"{w}: PodDisruptionBudget rendered={name in pdbs}, expected {want_pdb}")
        if name in pdbs and pdbs[name]["spec"]["selector"]["matchLabels"] != \
                spec["selector"]["matchLabels"]:
            fail(scenario, f"{w}: the PodDisruptionBudget selects other pods than the Deployment")
    extra = set(hpas) - {f"{RELEASE}-{w}" for w in SCALED_WORKLOADS}
    if extra:
        fail(scenario, f"unexpected autoscalers {sorted(extra)}")


def hook_of(obj: dict) -> tuple[set[str], int, set[str]] | None:
    annotations = obj["metadata"].get("annotations", {})
    if "helm.sh/hook" not in annotations:
        return None
    return (set(annotations["helm.sh/hook"].split(",")),
            int(annotations.get("helm.sh/hook-weight", "0")),
            set(annotations.get("helm.sh/hook-delete-policy", "").split(",")))


def check_migrations(scenario: str, values: dict, by_kind: dict) -> None:
    """The pre-install/pre-upgrade migration Jobs: one per workload on PostgreSQL, running the
    workload's own binary, config and database Secret with --migrate-only, before anything."""
    jobs = by_kind.get("Job", {})
    deployments = by_kind.get("Deployment", {})
    configmaps = by_kind.get("ConfigMap", {})
    enabled = values["migrations"]["job"]["enabled"]
    expected = {f"{RELEASE}-{w}-migrate" for w in BACKENDS + ["gateway"]
                if enabled and uses_postgres(values, w)}
    if set(jobs) != expected:
        fail(scenario, f"migration Jobs {sorted(jobs)}, expected {sorted(expected)}")
    hooks = [(d, hook_of(d)) for kind in by_kind.values() for d in kind.values()]
    hooks = [(d, h) for d, h in hooks if h is not None]
    for d, (events, weight, policy) in hooks:
        label = f"{d['kind']}/{d['metadata']['name']}"
        if events != HOOK_EVENTS:
            fail(scenario, f"{label}: hook on {sorted(events)}, expected {sorted(HOOK_EVENTS)}")
        if not {"before-hook-creation", "hook-succeeded"} <= policy:
            fail(scenario, f"{label}: hook-delete-policy {sorted(policy)} would leave it behind "
                           "or block the next upgrade")
        if d["kind"] != "Job" and weight >= 0:
            fail(scenario, f"{label}: must be created before the Jobs (weight {weight})")
    hook_names = {(d["kind"], d["metadata"]["name"]) for d, _ in hooks}
    for name in sorted(expected):
        job = jobs.get(name)
        if job is None:
            continue
        w = name[len(RELEASE) + 1:-len("-migrate")]
        if ("Job", name) not in hook_names:
            fail(scenario, f"{name}: not a Helm hook")
        pod = job["spec"]["template"]["spec"]
        check_pod_security(scenario, name, pod)
        if pod.get("restartPolicy") != "Never":
            fail(scenario, f"{name}: restartPolicy must be Never (the Job retries)")
        sa = pod.get("serviceAccountName")
        if ("ServiceAccount", sa) not in hook_names:
            fail(scenario, f"{name}: its ServiceAccount {sa} does not exist before the release's "
                           "objects (it must be a hook too)")
        dep = deployments.get(f"{RELEASE}-{w}")
        if dep is None:
            continue
        main = dep["spec"]["template"]["spec"]["containers"][0]
        job_main = pod["containers"][0]
        if job_main.get("image") != main.get("image"):
            fail(scenario, f"{name}: image {job_main.get('image')} is not the workload's")
        if job_main.get("command") != main.get("command"):
            fail(scenario, f"{name}: command {job_main.get('command')}")
        if job_main.get("args") != main.get("args", []) + ["--migrate-only"]:
            fail(scenario, f"{name}: args {job_main.get('args')}, expected the workload's + "
                           "--migrate-only")
        env_name = f"CMS_{w.upper()}__DATABASE__URL"
        job_env = {e["name"]: e for e in job_main.get("env", [])}
        main_env = {e["name"]: e for e in main.get("env", [])}
        if job_env.get(env_name) != main_env.get(env_name) or env_name not in job_env:
            fail(scenario, f"{name}: {env_name} is not the workload's Secret")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        cm_name = volumes.get("config", {}).get("configMap", {}).get("name")
        if ("ConfigMap", cm_name) not in hook_names:
            fail(scenario, f"{name}: its ConfigMap {cm_name} is not a hook")
        elif configmaps[cm_name]["data"] != configmaps[f"{RELEASE}-{w}"]["data"]:
            fail(scenario, f"{name}: its config differs from the workload's")
        mounts = {m["mountPath"]: m["name"] for m in job_main.get("volumeMounts", [])}
        if mounts.get("/etc/cms/config") != "config":
            fail(scenario, f"{name}: config not mounted at /etc/cms/config")
        if "/etc/cms/tls" in mounts:
            fail(scenario, f"{name}: a migration needs no TLS key")
        labels = job["spec"]["template"]["metadata"].get("labels", {})
        selector = dep["spec"]["selector"]["matchLabels"]
        if all(labels.get(k) == v for k, v in selector.items()):
            fail(scenario, f"{name}: its pod would count as a {w} pod (Service, budget)")


def check_service_monitor(scenario: str, values: dict, by_kind: dict) -> None:
    """metrics.serviceMonitor: one ServiceMonitor over a headless ops Service per workload."""
    monitors = by_kind.get("ServiceMonitor", {})
    services = by_kind.get("Service", {})
    sm_values = values["metrics"]["serviceMonitor"]
    if not sm_values["enabled"]:
        if monitors or any(n.endswith("-metrics") for n in services):
            fail(scenario, "ServiceMonitor or metrics Services rendered while disabled")
        return
    if list(monitors) != [RELEASE]:
        fail(scenario, f"ServiceMonitors {sorted(monitors)}, expected [{RELEASE}]")
        return
    sm = monitors[RELEASE]
    if sm.get("apiVersion") != CRD_KINDS["ServiceMonitor"]:
        fail(scenario, f"ServiceMonitor apiVersion {sm.get('apiVersion')}")
    unknown = set(sm["spec"]) - {"selector", "namespaceSelector", "endpoints", "targetLabels",
                                  "podTargetLabels", "jobLabel", "sampleLimit"}
    if unknown:
        fail(scenario, f"ServiceMonitor: unknown spec fields {sorted(unknown)}")
    for k, v in sm_values.get("labels", {}).items():
        if sm["metadata"]["labels"].get(k) != v:
            fail(scenario, f"ServiceMonitor lacks label {k}={v}")
    endpoints = sm["spec"].get("endpoints", [])
    if [(e.get("port"), e.get("path"), e.get("scheme")) for e in endpoints] != \
            [("ops", "/metrics", "http")]:
        fail(scenario, f"ServiceMonitor endpoints {endpoints}")
    selector = sm["spec"]["selector"]["matchLabels"]
    if sm["spec"].get("namespaceSelector", {}).get("matchNames") != [NAMESPACE]:
        fail(scenario, "ServiceMonitor must watch the release's namespace")
    selected = {n for n, svc in services.items()
                if all(svc["metadata"]["labels"].get(k) == v for k, v in selector.items())}
    wanted = {f"{RELEASE}-{w}-metrics" for w in WORKLOADS}
    if selected != wanted:
        fail(scenario, f"ServiceMonitor selects Services {sorted(selected)}, expected "
                       f"{sorted(wanted)}")
    for w in WORKLOADS:
        svc = services.get(f"{RELEASE}-{w}-metrics")
        if svc is None:
            continue
        spec = svc["spec"]
        if spec.get("clusterIP") != "None" or spec.get("publishNotReadyAddresses") is not True:
            fail(scenario, f"{w}: the metrics Service must be headless and list not-ready pods "
                           "(custody's standbys)")
        if [(p["name"], p["port"], p["targetPort"]) for p in spec["ports"]] != \
                [("ops", values[w]["opsPort"], "ops")]:
            fail(scenario, f"{w}: the metrics Service must expose the ops port only")
        dep = by_kind.get("Deployment", {}).get(f"{RELEASE}-{w}")
        if dep and spec.get("selector") != dep["spec"]["selector"]["matchLabels"]:
            fail(scenario, f"{w}: the metrics Service selects other pods than the Deployment")


def semantic_checks(scenario: str, values: dict, docs: list[dict]) -> None:
    errors_before = len(failures)
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
        if d["metadata"].get("namespace") not in (None, NAMESPACE):
            fail(scenario, f"{d['kind']}/{d['metadata']['name']} in namespace "
                           f"{d['metadata'].get('namespace')}")
    fullname = RELEASE
    td = values["trustDomain"]
    deployments = by_kind.get("Deployment", {})
    if sorted(deployments) != sorted(f"{fullname}-{w}" for w in WORKLOADS):
        fail(scenario, f"Deployments are {sorted(deployments)}")

    configs: dict[str, dict] = {}
    for w in WORKLOADS:
        cm = by_kind.get("ConfigMap", {}).get(f"{fullname}-{w}")
        if cm is None:
            fail(scenario, f"no ConfigMap for {w}")
            continue
        try:
            cfg = tomllib.loads(cm["data"][f"{w}.toml"])
        except (KeyError, tomllib.TOMLDecodeError) as e:
            fail(scenario, f"{w}.toml does not parse: {e}")
            continue
        configs[w] = cfg
        check_toml_keys(scenario, w, cfg, CONFIG_KEYS[w])
        for key in REQUIRED_CONFIG[w]:
            if dig(cfg, key) is None:
                fail(scenario, f"{w}.toml lacks {key}")

    for w in WORKLOADS:
        dep = deployments.get(f"{fullname}-{w}")
        if dep is None:
            continue
        pod = dep["spec"]["template"]["spec"]
        check_pod_security(scenario, w, pod)
        main = pod["containers"][0]
        if main.get("command") != [f"/usr/local/bin/cms-{w}"]:
            fail(scenario, f"{w}: command is {main.get('command')}")
        if main.get("args") != ["--config", f"/etc/cms/config/{w}.toml"]:
            fail(scenario, f"{w}: args are {main.get('args')}")
        ports = {p["name"]: p["containerPort"] for p in main.get("ports", [])}
        cfg = configs.get(w, {})
        if cfg:
            if not str(dig(cfg, "server.listen")).endswith(f":{ports.get('grpc')}"):
                fail(scenario, f"{w}: server.listen does not match the grpc container port")
            if not str(dig(cfg, "server.ops_listen")).endswith(f":{ports.get('ops')}"):
                fail(scenario, f"{w}: server.ops_listen does not match the ops container port")
        for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz"),
                            ("startupProbe", "/livez")):
            get = main.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or get.get("port") != "ops":
                fail(scenario, f"{w}: {probe} must GET {path} on the ops port")
        annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
        if values["metrics"]["prometheusAnnotations"] and annotations.get("prometheus.io/port") != str(ports.get("ops")):
            fail(scenario, f"{w}: prometheus.io/port must be the ops port")
        env = {e["name"]: e for e in main.get("env", [])}
        url_secret = values[w].get("database", {}).get("urlSecret", {}).get("name")
        env_name = f"CMS_{w.upper()}__DATABASE__URL"
        if url_secret and env.get(env_name, {}).get("valueFrom", {}).get("secretKeyRef", {}).get("name") != url_secret:
            fail(scenario, f"{w}: {env_name} must come from Secret {url_secret}")
        if not url_secret and env_name in env:
            fail(scenario, f"{w}: {env_name} set without a Secret")
        mounts = {m["mountPath"] for m in main.get("volumeMounts", [])}
        if values["tls"]["mountSecret"] and "/etc/cms/tls" not in mounts:
            fail(scenario, f"{w}: /etc/cms/tls is not mounted")
        if w in DB_WORKLOADS and "/var/lib/cms" not in mounts:
            fail(scenario, f"{w}: data_dir /var/lib/cms is not mounted")

    # Allow-lists: backends allow the gateway, the gateway allows operators, agents, services.
    for w in BACKENDS:
        allow = dig(configs.get(w, {}), "access.allow") or []
        if f"spiffe://{td}/cms/gateway" not in allow:
            fail(scenario, f"{w}: the gateway is not on the allow-list")
    # Custody's caller scopes: the gateway has one, and only it may release PIV PUKs.
    callers = configs.get("custody", {}).get("callers", [])
    gateway_id = f"spiffe://{td}/cms/gateway"
    if not any(c.get("identity") == gateway_id for c in callers):
        fail(scenario, "custody: the gateway has no [[callers]] scope")
    for c in callers:
        if c.get("release_puk") and c.get("identity") != gateway_id:
            fail(scenario, f"custody: {c.get('identity')} may release PIV PUKs (gateway only)")
    gw_allow = set(dig(configs.get("gateway", {}), "access.allow") or [])
    for pattern in ("operator/*", "agent", "agent/*", "service/*"):
        if f"spiffe://{td}/cms/{pattern}" not in gw_allow:
            fail(scenario, f"gateway: spiffe://{td}/cms/{pattern} is not on the allow-list")

    # Gateway -> backends: the address must be a Service of this release, on its port.
    services = by_kind.get("Service", {})
    if f"{fullname}-agent" in services or f"{fullname}-agent" in deployments:
        fail(scenario, "agents run on desktops: the chart must not deploy one")
    for b in BACKENDS:
        up = dig(configs.get("gateway", {}), f"backends.{b}") or {}
        host, _, port = str(up.get("address", "")).rpartition(":")
        svc = services.get(f"{fullname}-{b}")
        if svc is None or host != f"{fullname}-{b}.{NAMESPACE}.svc":
            fail(scenario, f"gateway: backends.{b}.address {up.get('address')} is not the {b} Service")
        elif int(port) != svc["spec"]["ports"][0]["port"]:
            fail(scenario, f"gateway: backends.{b}.address port is not the Service port")
        if up.get("identity") != f"spiffe://{td}/cms/{b}":
            fail(scenario, f"gateway: backends.{b}.identity is {up.get('identity')}")
    # Custody active/standby: shares and Seal reach every pod, through a headless Service
    # that lists the not-ready standbys too.
    instances = dig(configs.get("gateway", {}), "backends.custody.instances") or []
    headless = services.get(f"{fullname}-custody-instances")
    if (headless is not None) != bool(instances):
        fail(scenario, "gateway: backends.custody.instances and the custody-instances Service "
                       "must come together")
    elif headless is not None:
        spec = headless["spec"]
        if instances != [f"{fullname}-custody-instances.{NAMESPACE}.svc:"
                         f"{spec['ports'][0]['port']}"]:
            fail(scenario, f"gateway: backends.custody.instances is {instances}")
        if spec.get("clusterIP") != "None" or spec.get("publishNotReadyAddresses") is not True:
            fail(scenario, "custody-instances must be headless and list not-ready pods")

    # Network policies: custody (and the other backends) only from gateway pods on gRPC.
    if values["networkPolicy"]["enabled"]:
        policies = by_kind.get("NetworkPolicy", {})
        for w in BACKENDS:
            pol = policies.get(f"{fullname}-{w}")
            if pol is None:
                fail(scenario, f"no NetworkPolicy for {w}")
                continue
            grpc_port = values[w]["port"]
            rules = [r for r in pol["spec"].get("ingress", [])
                     if any(p.get("port") == grpc_port for p in r.get("ports", []))]
            gateway_only = {"app.kubernetes.io/component": "gateway",
                            "app.kubernetes.io/instance": RELEASE}
            for r in rules:
                peers = r.get("from")
                if not peers:
                    fail(scenario, f"{w}: gRPC port open to everyone")
                    continue
                first = peers[0].get("podSelector", {}).get("matchLabels", {})
                if any(first.get(k) != v for k, v in gateway_only.items()):
                    fail(scenario, f"{w}: first gRPC peer is not the gateway pods")
                if len(peers) != 1 + len(values[w]["networkPolicy"]["extraFrom"]):
                    fail(scenario, f"{w}: unexpected extra gRPC peers")
            if not rules:
                fail(scenario, f"{w}: no ingress rule for the gRPC port")
        if "NetworkPolicy" in by_kind and len(policies) != len(WORKLOADS):
            fail(scenario, f"expected {len(WORKLOADS)} NetworkPolicies, got {len(policies)}")

    check_scaling(scenario, values, by_kind)
    check_migrations(scenario, values, by_kind)
    check_service_monitor(scenario, values, by_kind)

    # Certificates (cert-manager): identity, EKUs, and the names clients dial.
    certs = by_kind.get("Certificate", {})
    if values["certManager"]["enabled"]:
        for w in WORKLOADS:
            cert = certs.get(f"{fullname}-{w}")
            if cert is None:
                fail(scenario, f"no Certificate for {w}")
                continue
            spec = cert["spec"]
            if cert.get("apiVersion") != "cert-manager.io/v1":
                fail(scenario, f"{w}: Certificate apiVersion {cert.get('apiVersion')}")
            unknown = set(spec) - CERTIFICATE_SPEC_KEYS
            if unknown:
                fail(scenario, f"{w}: unknown Certificate spec fields {sorted(unknown)}")
            if spec.get("uris") != [f"spiffe://{td}/cms/{w}"]:
                fail(scenario, f"{w}: Certificate uris must be exactly [spiffe://{td}/cms/{w}]")
            usages = spec.get("usages", [])
            if not {"server auth", "client auth"} <= set(usages) or set(usages) - CERTIFICATE_USAGES:
                fail(scenario, f"{w}: Certificate usages {usages}")
            if not spec.get("issuerRef", {}).get("name"):
                fail(scenario, f"{w}: Certificate has no issuerRef.name")
            expected_secret = values[w]["tlsSecretName"] or f"{fullname}-{w}-tls"
            if spec.get("secretName") != expected_secret:
                fail(scenario, f"{w}: Certificate secretName {spec.get('secretName')}")
            dns = spec.get("dnsNames", [])
            if f"{fullname}-{w}.{NAMESPACE}.svc" not in dns:
                fail(scenario, f"{w}: Certificate lacks the DNS SAN the gateway dials")
            for extra in values[w]["extraDnsNames"]:
                if extra not in dns:
                    fail(scenario, f"{w}: Certificate lacks extra DNS SAN {extra}")
            if len(dns) != len(set(dns)):
                fail(scenario, f"{w}: duplicate DNS SANs")
        for w in WORKLOADS:
            dep = deployments.get(f"{fullname}-{w}")
            if dep is None or not values["tls"]["mountSecret"]:
                continue
            vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
            secret = vols.get("tls", {}).get("secret", {}).get("secretName")
            if secret != certs.get(f"{fullname}-{w}", {}).get("spec", {}).get("secretName"):
                fail(scenario, f"{w}: mounts Secret {secret}, not its Certificate's")
    elif certs:
        fail(scenario, "Certificates rendered with certManager.enabled=false")

    if len(failures) == errors_before:
        print(f"  ok   service configs, security contexts, probes, allow-lists, network "
              f"policies, replicas and rollouts, budgets"
              f"{', autoscalers' if by_kind.get('HorizontalPodAutoscaler') else ''}"
              f"{', migration hooks' if by_kind.get('Job') else ''}"
              f"{', ServiceMonitor' if by_kind.get('ServiceMonitor') else ''}"
              f"{', certificates' if certs else ''}")


def run_scenario(scenario: str, overrides: dict | None, defaults: dict, out: Path) -> None:
    print(f"\n== {scenario}: helm lint, helm template, kubernetes-validate, project checks")
    values = deep_merge(defaults, overrides or {})
    lint(scenario, overrides)
    try:
        text = render(overrides)
    except helm.HelmError as e:
        fail(scenario, f"helm template: {e}")
        return
    rendered = out / f"rendered-{scenario}.yaml"
    rendered.write_text(text)
    docs = [d for d in yaml.safe_load_all(text) if d]
    print(f"  ok   helm template -> {rendered} ({len(docs)} objects)")
    kube_validate(scenario, rendered, docs)
    semantic_checks(scenario, values, docs)


def pod_checksums(overrides: dict | None) -> dict[str, dict[str, str]]:
    docs = [d for d in yaml.safe_load_all(render(overrides)) if d]
    return {d["metadata"]["name"][len(RELEASE) + 1:]:
            {k: v for k, v in d["spec"]["template"]["metadata"]["annotations"].items()
             if k.startswith("checksum/")}
            for d in docs if d["kind"] == "Deployment"}


def check_rollouts() -> int:
    """Pods roll (their template changes) exactly when their config or Secrets change."""
    print("\n== rollouts: which changes roll which pods (checksum annotations)")
    base = pod_checksums(None)
    cases = [
        ("telemetry.log for everyone", {"telemetry": {"log": "debug"}},
         "checksum/config", set(WORKLOADS)),
        ("a custody caller scope", {"custody": {
            "access": {"extraAllow": ["spiffe://cms.local/cms/service/r"]},
            "extraCallers": [{"identity": "spiffe://cms.local/cms/service/r"}]}},
         "checksum/config", {"custody"}),
        ("the directory's TLS Secret", {"directory": {"tlsSecretName": "other-tls"}},
         "checksum/secrets", {"directory"}),
        ("custody's database Secret", {"custody": {"database": {"urlSecret": {"name": "db"}}}},
         "checksum/secrets", {"custody"}),
    ]
    failed = 0
    for name, overrides, key, rolled in cases:
        changed = pod_checksums(overrides)
        moved = {w for w in WORKLOADS if changed[w][key] != base[w][key]}
        if moved != rolled:
            fail("rollouts", f"{name}: {key} changed for {sorted(moved)}, expected {sorted(rolled)}")
            failed += 1
        else:
            print(f"  ok   {name}: rolls {', '.join(sorted(rolled))}")
    return len(cases)


def pg_url(workload: str) -> dict:
    """`<workload>.database` values for PostgreSQL."""
    return {"urlSecret": {"name": f"cms-{workload}-db"}}


def must_refuse(name: str, overrides: dict, needle: str) -> None:
    """The chart must refuse these values (schema or template `fail`) with a useful message."""
    try:
        render(overrides)
    except helm.HelmError as e:
        if needle.lower() in str(e).lower():
            print(f"  ok   refused: {name}")
            return
        fail("refusals", f"{name}: refused, but the message does not mention {needle!r}: {e}")
        return
    fail("refusals", f"{name}: rendered although it must be refused")


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("TMPDIR", "/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"chart {CHART} with Helm SDK {helm.helm_sdk_version()} "
          f"(helm-python-sdk, libhelm_c {helm.helm_c_version()})")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    scenarios: list[tuple[str, dict | None]] = [
        ("default", None),
        ("cert-manager", {"certManager": {"enabled": True,
                                          "issuerRef": {"name": "cms-ca", "kind": "ClusterIssuer"}}}),
    ]
    scenarios.append(("custody-callers", {"custody": {
        "access": {"extraAllow": ["spiffe://cms.local/cms/service/reports"]},
        "extraCallers": [{"identity": "spiffe://cms.local/cms/service/reports",
                          "keyReferences": ["mk-reports"]}],
    }}))
    postgres = {w: {"database": pg_url(w)} for w in DB_WORKLOADS}
    scenarios.append(("postgres", postgres))
    scaled = deep_merge(postgres, {
        w: {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8}}
        for w in SCALED_WORKLOADS})
    scaled["gateway"]["autoscaling"]["targetMemoryUtilizationPercentage"] = 80
    scaled["directory"]["autoscaling"]["behavior"] = {
        "scaleDown": {"stabilizationWindowSeconds": 600}}
    scenarios.append(("postgres-autoscaling", scaled))
    scenarios.append(("service-monitor", {"metrics": {"serviceMonitor": {
        "enabled": True, "labels": {"release": "prometheus"}}}}))
    scenarios.append(("postgres-no-migration-job", deep_merge(postgres, {
        "migrations": {"job": {"enabled": False}}, "custody": {"replicas": 3}})))
    for example in sorted(EXAMPLES.glob("*.yaml")):
        scenarios.append((f"example-{example.stem}", yaml.safe_load(example.read_text()) or {}))
    for scenario, overrides in scenarios:
        run_scenario(scenario, overrides, defaults, out)

    print("\n== refusals: values the chart must reject")
    refusals = [
        ("unknown top-level key", {"replicaCount": 2}, "replicaCount"),
        ("unknown workload key", {"custody": {"replica": 2}}, "replica"),
        ("custody with 2 replicas on SQLite", {"custody": {"replicas": 2}},
         "needs a PostgreSQL database"),
        ("custody replicas neither a number nor auto", {"custody": {"replicas": "two"}},
         "replicas"),
        ("custody autoscaled", {"custody": {"autoscaling": {"enabled": True}}}, "autoscaling"),
        ("directory autoscaled on SQLite", {"directory": {"autoscaling": {"enabled": True}}},
         "needs a PostgreSQL database"),
        ("template with 2 replicas on SQLite", {"template": {"replicas": 2}},
         "needs a PostgreSQL database"),
        ("gateway with 2 replicas on SQLite", {"gateway": {"replicas": 2}},
         "needs a PostgreSQL database"),
        ("autoscaler minReplicas above maxReplicas",
         {"gateway": {"database": pg_url("gateway"),
                      "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}},
         "minReplicas"),
        ("autoscaler without a metric",
         {"gateway": {"database": pg_url("gateway"),
                      "autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0}}},
         "targetCPUUtilizationPercentage"),
        ("CPU autoscaling without a CPU request",
         {"gateway": {"database": pg_url("gateway"), "autoscaling": {"enabled": True},
                      "resources": {"requests": {"cpu": None}}}},
         "resources.requests.cpu"),
        ("unknown migrations key", {"migrations": {"job": {"enable": True}}}, "enable"),
        ("unknown serviceMonitor key",
         {"metrics": {"serviceMonitor": {"enabled": True, "port": "ops"}}}, "port"),
        ("cert-manager without an issuer", {"certManager": {"enabled": True}}, "issuerRef.name"),
        ("allow-list entry that is not a SPIFFE ID",
         {"gateway": {"access": {"extraAllow": ["https://example.com"]}}}, "extraAllow"),
        ("PIV PUK release for a caller other than the gateway",
         {"custody": {"extraCallers": [{"identity": "spiffe://cms.local/cms/service/x",
                                        "releasePuk": True}]}}, "releasePuk"),
        ("caller scopes on a workload other than custody",
         {"directory": {"extraCallers": []}}, "extraCallers"),
    ]
    for name, overrides, needle in refusals:
        must_refuse(name, overrides, needle)

    rollout_cases = check_rollouts()

    per_case = ("refusals:", "rollouts:")
    failed_checks = {f.split(":", 1)[0] for f in failures if not f.startswith(per_case)}
    failed_checks |= {f for f in failures if f.startswith(per_case)}
    total = len(scenarios) + len(refusals) + rollout_cases
    print()
    if failures:
        print(f"helm chart check failed ({len(failures)} problem(s)):")
        for f in failures:
            print(f"  - {f}")
    print(f"helm: {total - len(failed_checks)} passed, {len(failed_checks)} failed")
    return 1 if failures else 0

if __name__ == "__main__":
    sys.exit(main())
