#!/usr/bin/env bash
# Validates deploy/ offline (no cluster, no Docker engine, no network):
#   1. hadolint on deploy/Dockerfile (any finding, down to style level, fails);
#   2. renders every kustomization under deploy/k8s (base and overlays; components through the
#      overlays, and prepull + each mesh component combined) with `kubectl kustomize`;
#   3. validates every rendered object against the Kubernetes OpenAPI schemas bundled in
#      kubernetes-validate (strict: unknown fields fail) for KUBE_VERSION; Istio's DestinationRule
#      (a CRD, not in those schemas) against a subset schema of the fields used here;
#   4. checks the invariants the manifests rely on (probes, drain vs grace period, ports, volumes,
#      selectors, security context, image references).
# Tools come from the test virtualenv (scripts/test-env.sh, pins in scripts/requirements-test.txt).
#
#   scripts/validate-deploy.sh                      # uses .venv
#   VENV=/tmp/venv scripts/validate-deploy.sh       # another virtualenv with the same pins
#   KUBE_VERSION=1.33.0 scripts/validate-deploy.sh  # another schema version (1.25 .. 1.37)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
# The oldest Kubernetes these manifests target: native gRPC probes (GA 1.27) and the HPA's
# ContainerResource metric (GA 1.30).
KUBE_VERSION=${KUBE_VERSION:-1.30.0}

for tool in kubectl hadolint python; do
  if [ ! -x "$VENV/bin/$tool" ]; then
    echo "validate-deploy: $VENV/bin/$tool missing; run scripts/test-env.sh (or set VENV)" >&2
    exit 2
  fi
done
"$VENV/bin/python" -c 'import kubernetes_validate' 2>/dev/null || {
  echo "validate-deploy: kubernetes-validate missing in $VENV; run scripts/test-env.sh" >&2
  exit 2
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== hadolint $("$VENV/bin/hadolint" --version | sed 's/.* //'): deploy/Dockerfile"
# An explicit empty config and no HADOLINT_* variables: no user or repository setting can relax
# the rules. Findings at every level (down to style) fail; the only exceptions are inline
# `# hadolint ignore=` pragmas in the Dockerfile, each with its reason.
for v in $(compgen -e); do
  case $v in HADOLINT_*) unset "$v" ;; esac
done
printf 'ignored: []\n' > "$tmp/hadolint.yaml"
"$VENV/bin/hadolint" --config "$tmp/hadolint.yaml" --no-color --failure-threshold style deploy/Dockerfile
echo "ok   deploy/Dockerfile: no findings"

echo "== kubectl kustomize ($("$VENV/bin/kubectl" version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p'))"
rendered=()
render() { # kustomization-dir label
  local out
  out="$tmp/$(echo "$2" | tr '/+' '__').yaml"
  if ! "$VENV/bin/kubectl" kustomize "$1" > "$out"; then
    echo "FAIL $2: kubectl kustomize failed" >&2
    exit 1
  fi
  echo "ok   $2: $(grep -c '^kind: ' "$out") objects"
  rendered+=("$2=$out")
}

while IFS= read -r k; do
  dir=$(dirname "$k")
  if grep -q '^kind: Component' "$k"; then
    continue # rendered through the overlays and the combinations below
  fi
  render "$dir" "${dir#deploy/k8s/}"
done < <(find deploy/k8s -name kustomization.yaml | sort)

# Components must compose: prepull next to each mesh, as deploy/README.md suggests. Rendered
# from a copy, since kustomize refuses absolute paths and this must not write into deploy/.
mkdir -p "$tmp/tree"
cp -r deploy/k8s "$tmp/tree/k8s"
for mesh in istio linkerd; do
  combo="$tmp/tree/k8s/overlays/prepull-$mesh"
  mkdir -p "$combo"
  printf 'resources: [../../base]\ncomponents: [../../components/prepull, ../../components/%s]\n' \
    "$mesh" > "$combo/kustomization.yaml"
  render "$combo" "components/prepull+$mesh"
done

echo "== schemas (Kubernetes $KUBE_VERSION, kubernetes-validate $("$VENV/bin/python" -c \
  'import kubernetes_validate; print(kubernetes_validate.__version__)'), strict) and invariants"
"$VENV/bin/python" - "$KUBE_VERSION" "${rendered[@]}" <<'PY'
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

version = sys.argv[1]
failures = 0


def fail(label, msg):
    global failures
    failures += 1
    print(f"FAIL {label}: {msg}")


# --- CRDs: subset schemas -------------------------------------------------------------------
# kubernetes-validate ships only the built-in API. The DestinationRule is checked against the
# fields of networking.istio.io/v1 that these manifests may use (names, types and enums as in
# Istio's CRD); anything else is an error, so a typo cannot slip through as "unknown".
DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms|us|ns))+$"}
INT = {"type": "integer", "minimum": 0}


def obj(props, required=()):
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": False}


DESTINATION_RULE = obj({
    "apiVersion": {"const": "networking.istio.io/v1"},
    "kind": {"const": "DestinationRule"},
    "metadata": {"type": "object", "required": ["name"],
                 "properties": {"name": {"type": "string", "minLength": 1}}},
    "spec": obj({
        "host": {"type": "string", "minLength": 1},
        "exportTo": {"type": "array", "items": {"type": "string"}},
        "trafficPolicy": obj({
            "loadBalancer": obj({"simple": {"enum": [
                "UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN",
                "LEAST_REQUEST"]}}),
            "connectionPool": obj({
                "http": obj({
                    "h2UpgradePolicy": {"enum": ["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"]},
                    "http1MaxPendingRequests": INT, "http2MaxRequests": INT,
                    "maxRequestsPerConnection": INT, "maxRetries": INT,
                    "maxConcurrentStreams": INT, "idleTimeout": DURATION,
                    "useClientProtocol": {"type": "boolean"},
                }),
                "tcp": obj({"maxConnections": INT, "connectTimeout": DURATION,
                            "idleTimeout": DURATION, "maxConnectionDuration": DURATION}),
            }),
            "outlierDetection": obj({
                "consecutive5xxErrors": INT, "consecutiveGatewayErrors": INT,
                "consecutiveLocalOriginFailures": INT,
                "splitExternalLocalOriginErrors": {"type": "boolean"},
                "interval": DURATION, "baseEjectionTime": DURATION,
                "maxEjectionPercent": {"type": "integer", "minimum": 0, "maximum": 100},
                "minHealthPercent": {"type": "integer", "minimum": 0, "maximum": 100},
            }),
        }),
    }, required=["host"]),
}, required=["apiVersion", "kind", "metadata", "spec"])
CRD_SCHEMAS = {("networking.istio.io/v1", "DestinationRule"): DESTINATION_RULE}


def builtin(api_version):
    group = api_version.split("/")[0] if "/" in api_version else ""
    return "." not in group or group.endswith(".k8s.io")


def seconds(text):
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([0-9.]+)(ms|us|ns|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def flag(args, name):
    if name in args and args.index(name) + 1 < len(args):
        return args[args.index(name) + 1]
    return None


# --- invariants of the lmx Deployment and its companions --------------------------------------
def check_set(label, objs):
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    dep = by_kind.get("Deployment", {}).get("lmx")
    if dep is None:
        return fail(label, "no Deployment lmx")
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"].get("labels", {})
    sel = dep["spec"]["selector"]["matchLabels"]
    checks = []

    def expect(cond, what):
        checks.append(what)
        if not cond:
            fail(label, what)

    expect(all(labels.get(k) == v for k, v in sel.items()), "selector matches the pod labels")
    containers = {c["name"]: c for c in spec["containers"]}
    inits = {c["name"]: c for c in spec.get("initContainers", [])}
    lmx = containers.get("lmx")
    if lmx is None:
        return fail(label, "no container lmx")
    args = lmx.get("args", [])
    expect(args[:1] == ["serve"], "lmx runs `serve`")
    for name, value in [("--listen", "0.0.0.0:50051"), ("--metrics-listen", "0.0.0.0:9090"),
                        ("--cache-dir", "/models"), ("--log-format", "json")]:
        expect(flag(args, name) == value, f"serve {name} {value}")
    token = flag(args, "--admin-token-file") or ""
    mounts = {m["mountPath"]: m for m in lmx.get("volumeMounts", [])}
    expect(any(token.startswith(p + "/") for p in mounts), "--admin-token-file is on a mount")
    drain = seconds(flag(args, "--drain-timeout") or "30s")
    pre = lmx.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_s = float(pre[-1]) if pre and pre[0].endswith("sleep") else 0.0
    grace = spec.get("terminationGracePeriodSeconds", 30)
    expect(grace > pre_s + drain,
           f"terminationGracePeriodSeconds {grace} > preStop {pre_s:g}s + drain {drain:g}s")

    ports = {p["name"]: p["containerPort"] for p in lmx.get("ports", [])}
    expect(ports == {"grpc": 50051, "metrics": 9090}, "container ports grpc 50051, metrics 9090")
    for kind, svc in [("startupProbe", ""), ("livenessProbe", ""),
                      ("readinessProbe", "lmx.v1.Inference")]:
        g = lmx.get(kind, {}).get("grpc", {})
        expect(g.get("port") == 50051 and g.get("service") == svc,
               f"{kind}: grpc port 50051 service {svc!r}")
    ann = pod["metadata"].get("annotations", {})
    expect(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "9090"
           and ann.get("prometheus.io/path") == "/metrics", "prometheus scrape annotations")

    psc = spec.get("securityContext", {})
    expect(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001
           and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
           "pod: non-root uid 10001, seccomp RuntimeDefault")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in list(containers.values()) + list(inits.values()):
        sc = c.get("securityContext", {})
        expect(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
               and sc.get("capabilities", {}).get("drop") == ["ALL"],
               f"{c['name']}: read-only root, no privilege escalation, drop ALL")
        expect(all(m["name"] in volumes for m in c.get("volumeMounts", [])),
               f"{c['name']}: every volumeMount names a volume")
        image = c.get("image", "")
        expect("/" in image and ":" in image.rsplit("/", 1)[-1],
               f"{c['name']}: image resolved to registry/name:tag ({image})")
    for path, vol in [("/models", "persistentVolumeClaim"), ("/tmp", "emptyDir")]:
        m = mounts.get(path)
        expect(m is not None and vol in volumes.get(m["name"], {}), f"{path} is a {vol}")
    claim = volumes.get("models", {}).get("persistentVolumeClaim", {}).get("claimName")
    expect(claim in by_kind.get("PersistentVolumeClaim", {}), f"PVC {claim} is rendered")
    if "prepull" in inits:
        pa = inits["prepull"].get("args", [])
        expect(pa[:2] == ["pull", "--local"] and flag(pa, "--cache-dir") == "/models",
               "prepull: lmx pull --local <repo> --cache-dir /models")
        expect(inits["prepull"]["image"] == lmx["image"], "prepull runs the server's image")

    for name, svc in by_kind.get("Service", {}).items():
        s = svc["spec"]
        expect(all(labels.get(k) == v for k, v in s.get("selector", {}).items()),
               f"Service {name} selects the lmx pods")
        for p in s["ports"]:
            expect(p.get("targetPort") in ports, f"Service {name} port {p['name']} -> container port")
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        ref = hpa["spec"]["scaleTargetRef"]
        expect(ref["kind"] == "Deployment" and ref["name"] == "lmx", f"HPA {name} scales lmx")
        for m in hpa["spec"].get("metrics", []):
            if m["type"] == "ContainerResource":
                expect(m["containerResource"]["container"] in containers,
                       f"HPA {name} container metric names a container")
    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        ml = pdb["spec"]["selector"]["matchLabels"]
        expect(all(labels.get(k) == v for k, v in ml.items()), f"PDB {name} selects the lmx pods")
    for name, dr in by_kind.get("DestinationRule", {}).items():
        expect(dr["spec"]["host"] in by_kind.get("Service", {}), f"DestinationRule {name} host is a Service")
        cfg = yaml.safe_load(ann.get("proxy.istio.io/config", "") or "{}")
        td = seconds(cfg.get("terminationDrainDuration", "5s"))
        expect(pre_s + drain <= td < grace,
               f"Istio terminationDrainDuration {td:g}s covers preStop + drain, under the grace period")
    wait = ann.get("config.alpha.linkerd.io/proxy-wait-before-exit-seconds")
    if wait is not None:
        expect(pre_s <= float(wait) < grace, "Linkerd proxy-wait-before-exit between preStop and grace")
    return checks


for item in sys.argv[2:]:
    label, path = item.split("=", 1)
    with open(path) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    before = failures
    core, crds = [], []
    for o in objs:
        what = f"{o.get('kind')}/{o.get('metadata', {}).get('name')}"
        api = o.get("apiVersion", "")
        if builtin(api):
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path_ = ".".join(str(p) for p in e.path)
                fail(label, f"{what}: {path_}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(label, f"{what}: {e.message}")
            else:
                core.append(what)
        elif (api, o.get("kind")) in CRD_SCHEMAS:
            errors = sorted(jsonschema.Draft202012Validator(CRD_SCHEMAS[(api, o["kind"])])
                            .iter_errors(o), key=lambda e: list(e.path))
            for e in errors:
                fail(label, f"{what}: {'.'.join(str(p) for p in e.path)}: {e.message}")
            if not errors:
                crds.append(f"{what} ({api})")
        else:
            fail(label, f"{what} ({api}): a CRD without a schema here; add one to this script")
    checks = check_set(label, objs) or []
    if failures == before:
        print(f"ok   {label}: Kubernetes {version} schemas: {', '.join(core)}")
        if crds:
            print(f"ok   {label}: CRD, subset schema (not in the Kubernetes schemas): {', '.join(crds)}")
        print(f"ok   {label}: {len(checks)} invariants hold")

if failures:
    print(f"validate-deploy: {failures} failure(s)")
    sys.exit(1)
PY
echo "validate-deploy: all checks passed"
