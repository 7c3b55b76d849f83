#!/usr/bin/env python3
"""mandate: validate deployment manifests (envoy/istio/ and the like).

    .venv/bin/python scripts/check_manifests.py [options] PATH...

Every YAML document (or JSON file) under PATH is checked by kind:

- Kubernetes kinds (apiVersion v1, apps/v1, ...): against the Kubernetes OpenAPI schemas that
  the kubernetes-validate package bundles (offline), strictly (unknown fields refused), for
  every version given with --kubernetes-version (default: the oldest and the newest this
  project targets).
- Istio kinds (WasmPlugin, ServiceEntry, DestinationRule): against the JSON Schemas the
  project wrote from Istio's API reference, in envoy/istio/schema/.
- Any other kind is an error: nothing passes unchecked.

Then the project's own rules (see PROJECT RULES below): pods run as non-root with a read-only
root filesystem, limits and probes; images and Wasm modules are pinned by digest; the
WasmPlugin fails closed in phase AUTHN; no Secret carries key material in the repository.

Output: one JSON object on stdout, {"ok": bool, "documents": [{"file", "index", "apiVersion",
"kind", "name", "checked_by": [...], "errors": [...], "doc"?: {...}}]} ("doc" with --dump).
Exit status 0 when every document passed, 1 when one failed, 2 on a usage error.
"""

import argparse
import json
import os
import re
import sys

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_DIR = os.path.join(ROOT, "envoy", "istio", "schema")

# The Kubernetes versions the manifests target: the oldest and the newest (kubernetes-validate
# 1.37.0 bundles the schemas of 1.25 to 1.37).
DEFAULT_KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]

ISTIO_SCHEMAS = {
    ("extensions.istio.io", "WasmPlugin"): "wasmplugin.schema.json",
    ("networking.istio.io", "ServiceEntry"): "serviceentry.schema.json",
    ("networking.istio.io", "DestinationRule"): "destinationrule.schema.json",
}

# Kubernetes API groups whose kinds kubernetes-validate knows.
KUBERNETES_GROUPS = {
    "", "apps", "batch", "policy", "networking.k8s.io", "rbac.authorization.k8s.io",
    "autoscaling", "scheduling.k8s.io", "storage.k8s.io", "coordination.k8s.io",
}

POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

DIGEST_PLACEHOLDER = "<digest>"
DIGEST_RE = re.compile(r"@sha256:(?P<d>[a-f0-9]{64}|<digest>)$")


def load_documents(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                # The schemas are not manifests.
                dirnames[:] = sorted(d for d in dirnames if d != "schema")
                for name in sorted(filenames):
                    if name.endswith((".yaml", ".yml", ".json")):
                        files.append(os.path.join(dirpath, name))
        else:
            files.append(p)
    docs = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            text = fh.read()
        try:
            items = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            docs.append({"file": f, "index": 0, "doc": None, "load_error": f"not YAML: {e}"})
            continue
        for i, d in enumerate(items):
            docs.append({"file": f, "index": i, "doc": d, "load_error": None})
    return docs


def istio_validators():
    registry = Registry()
    schemas = {}
    for name in sorted(os.listdir(SCHEMA_DIR)):
        if not name.endswith(".schema.json"):
            continue
        with open(os.path.join(SCHEMA_DIR, name), encoding="utf-8") as fh:
            schema = json.load(fh)
        jsonschema.Draft202012Validator.check_schema(schema)
        registry = registry.with_resource(schema["$id"], Resource.from_contents(schema))
        schemas[name] = schema
    return {
        key: jsonschema.Draft202012Validator(schemas[file], registry=registry)
        for key, file in ISTIO_SCHEMAS.items()
    }


def path_of(error):
    return "/" + "/".join(str(p) for p in error.absolute_path)


def check_istio(doc, validator):
    errors = []
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        errors.append(f"schema: {path_of(e)}: {e.message}")
    return errors


def check_kubernetes(doc, versions):
    errors = []
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"kubernetes {v}: {path_of(e)}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"kubernetes {v}: {e.message}")
        except kubernetes_validate.VersionNotSupportedError as e:
            errors.append(f"kubernetes {v}: {e.message}")
    return errors


# PROJECT RULES ----------------------------------------------------------------------------

def pinned(ref, release):
    """A digest-pinned reference: @sha256:<64 hex>, or the <digest> placeholder (not in
    --release mode, which also refuses the REGISTRY placeholder)."""
    m = DIGEST_RE.search(ref)
    if not m:
        return "is not pinned by digest (@sha256:...): a tag can change under running proxies"
    if release and (m.group("d") == DIGEST_PLACEHOLDER or "REGISTRY" in ref):
        return "still holds a placeholder (REGISTRY or <digest>)"
    return None


def rules_wasmplugin(doc, release):
    errors = []
    spec = doc.get("spec") or {}
    if spec.get("failStrategy") != "FAIL_CLOSE":
        errors.append("project: spec.failStrategy must be FAIL_CLOSE, set explicitly: "
                      "a policy filter that fails open serves requests unjudged")
    if spec.get("phase") != "AUTHN":
        errors.append("project: spec.phase must be AUTHN: mandate must judge a request before "
                      "Istio's authentication and authorization filters and other plugins")
    url = spec.get("url", "")
    if not str(url).startswith("oci://"):
        errors.append("project: spec.url must be an oci:// image (scripts/package)")
    else:
        why = pinned(url, release)
        if why:
            errors.append(f"project: spec.url {why}")
    if not isinstance(spec.get("pluginConfig"), dict):
        errors.append("project: spec.pluginConfig is missing: without it the filter denies every request")
    if "selector" not in spec and "targetRefs" not in spec:
        errors.append("project: spec.selector or spec.targetRefs must say which workloads run mandate")
    return errors


def rules_pod(spec, where, release):
    errors = []
    pod_sc = spec.get("securityContext") or {}
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        errors.append(f"project: {where}: host namespaces are not allowed")
    containers = [("containers", c) for c in spec.get("containers") or []]
    containers += [("initContainers", c) for c in spec.get("initContainers") or []]
    for group, c in containers:
        name = f"{where}.{group}[{c.get('name', '?')}]"
        sc = c.get("securityContext") or {}
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            errors.append(f"project: {name}: runAsNonRoot must be true (container or pod securityContext)")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if uid == 0:
            errors.append(f"project: {name}: runAsUser 0 is root")
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"project: {name}: securityContext.readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"project: {name}: securityContext.allowPrivilegeEscalation must be false")
        if sc.get("privileged"):
            errors.append(f"project: {name}: privileged containers are not allowed")
        drop = ((sc.get("capabilities") or {}).get("drop")) or []
        if "ALL" not in drop:
            errors.append(f"project: {name}: securityContext.capabilities.drop must hold ALL")
        res = c.get("resources") or {}
        limits = res.get("limits") or {}
        for r in ("cpu", "memory"):
            if r not in limits:
                errors.append(f"project: {name}: resources.limits.{r} is missing")
        if "memory" not in (res.get("requests") or {}):
            errors.append(f"project: {name}: resources.requests.memory is missing")
        if group == "containers":
            for probe in ("livenessProbe", "readinessProbe"):
                if not c.get(probe):
                    errors.append(f"project: {name}: {probe} is missing")
        why = pinned(str(c.get("image", "")), release)
        if why:
            errors.append(f"project: {name}: image {why}")
    return errors


def project_rules(doc, release):
    kind = doc.get("kind")
    if kind == "WasmPlugin":
        return rules_wasmplugin(doc, release)
    if kind in POD_TEMPLATE_KINDS:
        template = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
        return rules_pod(template, f"{kind}/{(doc.get('metadata') or {}).get('name')}", release)
    if kind == "Pod":
        return rules_pod(doc.get("spec") or {}, f"Pod/{(doc.get('metadata') or {}).get('name')}", release)
    if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
        return ["project: a Secret with data: key material is never committed; create it in the "
                "cluster (docs/deploy.md) and reference it by name"]
    return []


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="manifest files or directories")
    ap.add_argument("--kubernetes-version", action="append", dest="versions",
                    help="Kubernetes version to validate against (repeatable); default "
                         + ", ".join(DEFAULT_KUBERNETES_VERSIONS))
    ap.add_argument("--release", action="store_true",
                    help="also refuse the REGISTRY and <digest> placeholders")
    ap.add_argument("--dump", action="store_true", help="include each parsed document")
    args = ap.parse_args()
    versions = args.versions or DEFAULT_KUBERNETES_VERSIONS

    validators = istio_validators()
    out = []
    for d in load_documents(args.paths):
        doc = d["doc"]
        entry = {"file": os.path.relpath(d["file"], ROOT) if os.path.isabs(d["file"]) else d["file"],
                 "index": d["index"], "apiVersion": None, "kind": None, "name": None,
                 "checked_by": [], "errors": []}
        if d["load_error"]:
            entry["errors"].append(d["load_error"])
        elif not isinstance(doc, dict) or not isinstance(doc.get("apiVersion"), str) \
                or not isinstance(doc.get("kind"), str):
            entry["errors"].append("not a Kubernetes object (apiVersion and kind are required)")
        else:
            api, kind = doc["apiVersion"], doc["kind"]
            entry.update(apiVersion=api, kind=kind, name=(doc.get("metadata") or {}).get("name"))
            group = api.rsplit("/", 1)[0] if "/" in api else ""
            if (group, kind) in validators:
                entry["checked_by"].append("istio-schema")
                entry["errors"] += check_istio(doc, validators[(group, kind)])
            elif group in KUBERNETES_GROUPS:
                entry["checked_by"].append("kubernetes-validate " + " ".join(versions))
                entry["errors"] += check_kubernetes(doc, versions)
            else:
                entry["errors"].append(f"no schema for {api} {kind}: the project checks only "
                                       "Kubernetes kinds and the Istio kinds in envoy/istio/schema/")
            entry["checked_by"].append("project-rules")
            entry["errors"] += project_rules(doc, args.release)
        if args.dump:
            entry["doc"] = doc
        out.append(entry)

    ok = bool(out) and all(not e["errors"] for e in out)
    json.dump({"ok": ok, "documents": out}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
