//! Issue 15: the deployment manifests under `envoy/istio/` (docs/deploy.md).
//!
//! * Every Kubernetes manifest passes `kubernetes-validate` (the Kubernetes OpenAPI schemas it
//!   bundles, strict, for the oldest and newest Kubernetes we target), every Istio resource the
//!   schema the project wrote from Istio's API reference (`envoy/istio/schema/`), and every
//!   document the project's own rules (`scripts/check_manifests.py`).
//! * Every shipped `pluginConfig` is accepted by the plugin itself: its configuration parser,
//!   and the built module's `on_configure` on the wasmtime test host when the module is built.
//! * The pieces agree: the WasmPlugin's minter cluster is the name Istio gives the
//!   ServiceEntry's host and port, the DestinationRule selects the same workloads, the
//!   ServiceEntry reaches the minter's Service, the minter's config (read by the minter's own
//!   parser) matches its Deployment, and the policy is the one in `policies/`.
//! * The validators can fail: broken copies of the shipped manifests (an unknown
//!   `failStrategy`, a Deployment without `runAsNonRoot`, ...) are refused, each for its reason.
//!
//! Needs `.venv/bin/python` with `kubernetes-validate` (scripts/setup). Without it the tests are
//! skipped, or fail when `MANDATE_REQUIRE_ENVOY` is set (scripts/test, CI).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use mandate_e2e::{wasm_prerequisite, workspace_root, REQUIRE_ENV};
use serde_json::{json, Value};

/// `.venv/bin/python` when it can import kubernetes_validate; `None` (skip) otherwise, or a
/// panic when `MANDATE_REQUIRE_ENVOY` is set.
fn python(test: &str) -> Option<PathBuf> {
    let py = workspace_root().join(".venv/bin/python");
    let ok = py.is_file()
        && Command::new(&py)
            .args(["-c", "import kubernetes_validate, jsonschema, yaml"])
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        return Some(py);
    }
    let why = format!("{} cannot import kubernetes_validate (run scripts/setup)", py.display());
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty()) {
        panic!("{test}: {REQUIRE_ENV} is set but {why}");
    }
    eprintln!("SKIPPED {test}: {why}. Set {REQUIRE_ENV}=1 to make this a failure.");
    None
}

/// Runs scripts/check_manifests.py over `paths`: (exit code, documents).
fn check(py: &Path, paths: &[&Path], extra: &[&str]) -> (i32, Vec<Value>) {
    let root = workspace_root();
    let out = Command::new(py)
        .current_dir(&root)
        .arg(root.join("scripts/check_manifests.py"))
        .args(extra)
        .args(paths)
        .output()
        .expect("run scripts/check_manifests.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "check_manifests.py printed no JSON report ({e}); status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let code = out.status.code().expect("exit code");
    assert_eq!(report["ok"].as_bool(), Some(code == 0), "report and exit status disagree: {report:#}");
    (code, report["documents"].as_array().expect("documents").clone())
}

fn istio_dir() -> PathBuf {
    workspace_root().join("envoy/istio")
}

/// The shipped documents, parsed, with the checker's verdict; panics unless all passed.
fn shipped(py: &Path) -> Vec<Value> {
    let (code, docs) = check(py, &[&istio_dir()], &["--dump"]);
    let failures: Vec<String> = docs
        .iter()
        .filter(|d| !d["errors"].as_array().is_some_and(|e| e.is_empty()))
        .map(|d| format!("{} #{} {} {}: {}", d["file"], d["index"], d["kind"], d["name"], d["errors"]))
        .collect();
    assert!(failures.is_empty() && code == 0, "shipped manifests refused:\n{}", failures.join("\n"));
    docs
}

fn doc<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} in envoy/istio/");
    &found[0]["doc"]
}

#[test]
fn shipped_manifests_pass_kubernetes_istio_and_project_checks() {
    let Some(py) = python("shipped_manifests_pass_kubernetes_istio_and_project_checks") else { return };
    let docs = shipped(&py);

    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    let want: BTreeSet<&str> = [
        "WasmPlugin",
        "ServiceEntry",
        "DestinationRule",
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "ServiceAccount",
        "Deployment",
        "Service",
        "NetworkPolicy",
    ]
    .into_iter()
    .collect();
    assert_eq!(kinds, want, "the kinds shipped in envoy/istio/");

    // Each document went through a real validator for its kind, not only the project rules.
    for d in &docs {
        let by: Vec<&str> = d["checked_by"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        let istio = matches!(d["kind"].as_str(), Some("WasmPlugin" | "ServiceEntry" | "DestinationRule"));
        let expected = if istio { "istio-schema" } else { "kubernetes-validate 1.30.0 1.37.0" };
        assert!(by.contains(&expected) && by.contains(&"project-rules"), "{} {}: checked by {by:?}", d["file"], d["kind"]);
    }
}

#[test]
fn shipped_plugin_config_is_accepted_by_the_plugin_and_agrees_with_the_mesh() {
    let Some(py) = python("shipped_plugin_config_is_accepted_by_the_plugin_and_agrees_with_the_mesh") else { return };
    let docs = shipped(&py);
    let wasm_plugin = doc(&docs, "WasmPlugin");
    let se = doc(&docs, "ServiceEntry");
    let dr = doc(&docs, "DestinationRule");
    let svc = doc(&docs, "Service");
    let deploy = doc(&docs, "Deployment");
    let cm = doc(&docs, "ConfigMap");

    // Every shipped pluginConfig, as Istio hands it over (JSON): the plugin's own parser accepts
    // it, and the built module configures with it (on_configure returns true) when it is built.
    let wasm = wasm_prerequisite("shipped_plugin_config_is_accepted_by_the_plugin_and_agrees_with_the_mesh");
    let host = wasm.as_ref().map(|w| mandate_host_test::Host::from_file(w).expect("load the filter"));
    for d in docs.iter().filter(|d| d["kind"] == "WasmPlugin") {
        let raw = serde_json::to_vec(&d["doc"]["spec"]["pluginConfig"]).unwrap();
        if let Err(e) = mandate_core::config::parse(&raw) {
            panic!("the plugin refuses the pluginConfig of {}: {e}", d["file"]);
        }
        if let Some(host) = &host {
            if let Err(e) = host.new_vm(b"", &raw) {
                panic!("the wasm module refuses the pluginConfig of {}: {e:#}", d["file"]);
            }
        }
    }
    let config = &wasm_plugin["spec"]["pluginConfig"];

    // The policy is policies/support-agent.policy.json, unchanged.
    let policy_file = workspace_root().join("policies/support-agent.policy.json");
    let policy: Value = serde_json::from_slice(&std::fs::read(&policy_file).unwrap()).unwrap();
    assert_eq!(config["policy"], policy, "pluginConfig.policy drifted from {}", policy_file.display());

    // The minter cluster is Istio's name for the ServiceEntry's host and port.
    let host = se["spec"]["hosts"][0].as_str().unwrap();
    let port = se["spec"]["ports"][0]["number"].as_u64().unwrap();
    assert_eq!(se["spec"]["hosts"].as_array().unwrap().len(), 1);
    assert_eq!(
        config["minter"]["cluster"].as_str(),
        Some(format!("outbound|{port}||{host}").as_str()),
        "minter.cluster must be Istio's outbound|PORT||HOST for the ServiceEntry"
    );
    assert_eq!(config["minter"]["authority"].as_str(), Some(host));

    // Mutual TLS to that host, for the same workloads as the plugin, in the same namespace.
    assert_eq!(dr["spec"]["host"].as_str(), Some(host));
    let tls = &dr["spec"]["trafficPolicy"]["tls"];
    assert_eq!(tls["mode"], "MUTUAL");
    assert!(tls["credentialName"].is_string(), "the proxies need a client certificate");
    assert_eq!(tls["subjectAltNames"], json!([host]), "the minter's certificate must be checked for its name");
    assert_eq!(
        dr["spec"]["workloadSelector"], wasm_plugin["spec"]["selector"],
        "credentialName applies at sidecars only with a workloadSelector: the plugin's workloads"
    );
    let ns = &wasm_plugin["metadata"]["namespace"];
    assert_eq!(&se["metadata"]["namespace"], ns);
    assert_eq!(&dr["metadata"]["namespace"], ns);
    assert_eq!(se["spec"]["location"], "MESH_EXTERNAL", "the minter terminates its own TLS");

    // The ServiceEntry reaches the minter's Service, on its port.
    let svc_fqdn = format!(
        "{}.{}.svc.cluster.local",
        svc["metadata"]["name"].as_str().unwrap(),
        svc["metadata"]["namespace"].as_str().unwrap()
    );
    let endpoint = &se["spec"]["endpoints"][0];
    assert_eq!(endpoint["address"].as_str(), Some(svc_fqdn.as_str()));
    let port_name = se["spec"]["ports"][0]["name"].as_str().unwrap();
    let svc_port = &svc["spec"]["ports"][0];
    assert_eq!(endpoint["ports"][port_name], svc_port["port"]);
    assert_eq!(svc["spec"]["selector"], deploy["spec"]["selector"]["matchLabels"]);

    // The minter's configuration: its own parser accepts it, and it fits the Deployment.
    let minter_json: Value = serde_json::from_str(cm["data"]["minter.json"].as_str().unwrap()).unwrap();
    if let Err(e) = mandate_minter::config::MinterConfig::from_json(minter_json.clone()) {
        panic!("the minter refuses envoy/istio/minter/config.yaml: {e:#}");
    }
    let pod = &deploy["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let named_port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == svc_port["targetPort"])
        .expect("the Service's targetPort names a container port");
    let listen = minter_json["listen"].as_str().unwrap();
    assert_eq!(listen, format!("0.0.0.0:{}", named_port["containerPort"]), "minter listen vs containerPort");
    assert_eq!(minter_json["client_auth"]["mode"], "mtls");
    let mounts: BTreeMap<&str, &Value> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap(), m))
        .collect();
    let volumes: BTreeMap<&str, &Value> =
        pod["volumes"].as_array().unwrap().iter().map(|v| (v["name"].as_str().unwrap(), v)).collect();
    let volume_of = |path: &str| -> (&Value, &Value) {
        let (mount_path, m) = mounts
            .iter()
            .filter(|(mp, _)| path == **mp || path.starts_with(&format!("{mp}/")))
            .max_by_key(|(mp, _)| mp.len())
            .unwrap_or_else(|| panic!("{path} is on no volume of the Deployment"));
        let v = volumes[m["name"].as_str().unwrap()];
        let _ = mount_path;
        (*m, v)
    };
    for key in ["cert", "key", "client_ca"] {
        let path = minter_json["tls"][key].as_str().unwrap();
        let (m, v) = volume_of(path);
        assert_eq!(m["readOnly"], true, "{path}: key material mounted read-only");
        assert!(v["secret"].is_object(), "{path}: from a Secret");
    }
    let (state_mount, state_volume) = volume_of(minter_json["state_dir"].as_str().unwrap());
    assert!(state_mount["readOnly"].is_null() || state_mount["readOnly"] == false);
    assert!(
        state_volume["persistentVolumeClaim"].is_object(),
        "state_dir (SQLite, signing keys) must outlive the pod"
    );
    assert_eq!(deploy["spec"]["replicas"], 1, "one writer of the SQLite state");
    assert_eq!(deploy["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(
        pod["containers"][0]["args"],
        json!(["--config", "/etc/mandate-minter/minter.json"]),
        "the minter reads the mounted config"
    );
    let (cfg_mount, cfg_volume) = volume_of("/etc/mandate-minter/minter.json");
    assert_eq!(cfg_mount["subPath"], "minter.json");
    assert_eq!(cfg_volume["configMap"]["name"], cm["metadata"]["name"]);
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], "/healthz", "{probe}");
        assert_eq!(get["scheme"], "HTTPS", "{probe}: the minter serves TLS only");
        assert_eq!(get["port"], named_port["name"], "{probe}");
    }

    // The minter lets the trust domain reach every audience the policy can mint for.
    let trust_domain = config["identity"]["trust_domains"][0]["name"].as_str().unwrap();
    let allowed: BTreeSet<&str> = minter_json["audiences"][trust_domain]
        .as_array()
        .unwrap_or_else(|| panic!("minter audiences for {trust_domain}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for r in policy["resources"].as_array().unwrap() {
        let aud = r["audience"].as_str().or(r["name"].as_str()).unwrap();
        assert!(allowed.contains(aud), "the minter would refuse audience {aud} (resource {})", r["name"]);
    }
}

/// Sets (or, with `None`, removes) the member at a JSON pointer.
fn edit(doc: &Value, pointer: &str, value: Option<Value>) -> Value {
    let mut d = doc.clone();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let p = d.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent}"));
    match (p, value) {
        (Value::Object(m), Some(v)) => {
            m.insert(key.to_string(), v);
        }
        (Value::Object(m), None) => {
            assert!(m.remove(key).is_some(), "no {pointer} to remove");
        }
        (Value::Array(a), Some(v)) => a[key.parse::<usize>().unwrap()] = v,
        (other, _) => panic!("{parent} is {other}"),
    }
    d
}

#[test]
fn validators_refuse_broken_manifests() {
    let Some(py) = python("validators_refuse_broken_manifests") else { return };
    let docs = shipped(&py);
    let wp = doc(&docs, "WasmPlugin");
    let se = doc(&docs, "ServiceEntry");
    let dr = doc(&docs, "DestinationRule");
    let deploy = doc(&docs, "Deployment");
    let svc = doc(&docs, "Service");
    let c0 = "/spec/template/spec/containers/0";

    // (case, document, what the refusal must say). The shipped documents, unchanged, come
    // first: they must pass here too, so each refusal below is the mutation's doing.
    let cases: Vec<(&str, Value, &str)> = vec![
        ("wasmplugin-unchanged", wp.clone(), ""),
        ("serviceentry-unchanged", se.clone(), ""),
        ("destinationrule-unchanged", dr.clone(), ""),
        ("deployment-unchanged", deploy.clone(), ""),
        ("service-unchanged", svc.clone(), ""),
        // Istio schemas: enums, required fields, closed objects.
        (
            "wasmplugin-fail-sometimes",
            edit(wp, "/spec/failStrategy", Some(json!("FAIL_SOMETIMES"))),
            "schema: /spec/failStrategy: 'FAIL_SOMETIMES' is not one of",
        ),
        ("wasmplugin-phase", edit(wp, "/spec/phase", Some(json!("AUTHENTICATION"))), "schema: /spec/phase:"),
        ("wasmplugin-no-url", edit(wp, "/spec/url", None), "'url' is a required property"),
        (
            "wasmplugin-typo",
            edit(wp, "/spec/failstrategy", Some(json!("FAIL_CLOSE"))),
            "Additional properties are not allowed ('failstrategy'",
        ),
        ("wasmplugin-match-mode", edit(wp, "/spec/match/0/mode", Some(json!("INBOUND"))), "schema: /spec/match/0/mode:"),
        ("wasmplugin-priority-type", edit(wp, "/spec/priority", Some(json!("high"))), "schema: /spec/priority:"),
        ("wasmplugin-url-scheme", edit(wp, "/spec/url", Some(json!("ftp://r/x@sha256:<digest>"))), "schema: /spec/url:"),
        (
            "wasmplugin-selector-and-targetrefs",
            edit(wp, "/spec/targetRefs", Some(json!([{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}]))),
            "schema: /spec:",
        ),
        (
            "destinationrule-tls-mode",
            edit(dr, "/spec/trafficPolicy/tls/mode", Some(json!("MTLS"))),
            "schema: /spec/trafficPolicy/tls/mode: 'MTLS' is not one of",
        ),
        (
            "destinationrule-mutual-without-certificate",
            edit(dr, "/spec/trafficPolicy/tls/credentialName", None),
            "schema: /spec/trafficPolicy/tls:",
        ),
        ("destinationrule-no-host", edit(dr, "/spec/host", None), "'host' is a required property"),
        (
            "serviceentry-resolution",
            edit(se, "/spec/resolution", Some(json!("DNS_ONLY"))),
            "schema: /spec/resolution: 'DNS_ONLY' is not one of",
        ),
        ("serviceentry-location", edit(se, "/spec/location", Some(json!("EXTERNAL"))), "schema: /spec/location:"),
        ("serviceentry-port-without-name", edit(se, "/spec/ports/0/name", None), "'name' is a required property"),
        ("serviceentry-no-hosts", edit(se, "/spec/hosts", None), "'hosts' is a required property"),
        // Project rules on a schema-valid WasmPlugin.
        (
            "wasmplugin-fail-open",
            edit(wp, "/spec/failStrategy", Some(json!("FAIL_OPEN"))),
            "project: spec.failStrategy must be FAIL_CLOSE",
        ),
        ("wasmplugin-no-fail-strategy", edit(wp, "/spec/failStrategy", None), "project: spec.failStrategy must be FAIL_CLOSE"),
        (
            "wasmplugin-tag",
            edit(wp, "/spec/url", Some(json!("oci://registry.example.com/mandate/plugin:0.1.0"))),
            "project: spec.url is not pinned by digest",
        ),
        ("wasmplugin-phase-stats", edit(wp, "/spec/phase", Some(json!("STATS"))), "project: spec.phase must be AUTHN"),
        // Project rules on a schema-valid Deployment.
        (
            "deployment-no-run-as-non-root",
            edit(&edit(deploy, &format!("{c0}/securityContext/runAsNonRoot"), None), "/spec/template/spec/securityContext/runAsNonRoot", None),
            "runAsNonRoot must be true",
        ),
        (
            "deployment-writable-root",
            edit(deploy, &format!("{c0}/securityContext/readOnlyRootFilesystem"), Some(json!(false))),
            "readOnlyRootFilesystem must be true",
        ),
        ("deployment-no-limits", edit(deploy, &format!("{c0}/resources/limits"), None), "resources.limits.memory is missing"),
        ("deployment-no-readiness", edit(deploy, &format!("{c0}/readinessProbe"), None), "readinessProbe is missing"),
        ("deployment-no-liveness", edit(deploy, &format!("{c0}/livenessProbe"), None), "livenessProbe is missing"),
        (
            "deployment-escalation",
            edit(deploy, &format!("{c0}/securityContext/allowPrivilegeEscalation"), Some(json!(true))),
            "allowPrivilegeEscalation must be false",
        ),
        ("deployment-image-tag", edit(deploy, &format!("{c0}/image"), Some(json!("mandate/minter:latest"))), "image is not pinned by digest"),
        // Kubernetes schemas (kubernetes-validate, strict).
        ("deployment-replicas-type", edit(deploy, "/spec/replicas", Some(json!("one"))), "/spec/replicas: 'one' is not of type"),
        (
            "deployment-unknown-field",
            edit(deploy, &format!("{c0}/imagePullPolicyy"), Some(json!("Always"))),
            "imagePullPolicyy",
        ),
        ("deployment-no-selector", edit(deploy, "/spec/selector", None), "'selector' is a required property"),
        ("service-port-type", edit(svc, "/spec/ports/0/port", Some(json!("https"))), "/spec/ports/0/port: 'https' is not of type"),
        // Kinds no validator knows are refused, not skipped.
        (
            "unknown-kind",
            json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}),
            "no schema for example.com/v1 Widget",
        ),
        (
            "secret-with-data",
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "k"}, "type": "kubernetes.io/tls",
                   "data": {"tls.crt": "LS0t", "tls.key": "LS0t"}}),
            "project: a Secret with data",
        ),
    ];

    let dir = tempfile::tempdir().unwrap();
    for (i, (name, d, _)) in cases.iter().enumerate() {
        // JSON is YAML: the checker reads these files as it reads the shipped ones.
        std::fs::write(dir.path().join(format!("{i:02}-{name}.json")), serde_json::to_vec_pretty(d).unwrap()).unwrap();
    }
    let (code, results) = check(&py, &[dir.path()], &[]);
    assert_eq!(code, 1, "the checker must exit 1 when a document fails");
    assert_eq!(results.len(), cases.len());
    let mut wrong = Vec::new();
    for (i, (name, _, want)) in cases.iter().enumerate() {
        let r = results
            .iter()
            .find(|r| r["file"].as_str().is_some_and(|f| f.ends_with(&format!("{i:02}-{name}.json"))))
            .unwrap_or_else(|| panic!("no result for {name}"));
        let errors: Vec<&str> = r["errors"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        let good = if want.is_empty() { errors.is_empty() } else { errors.iter().any(|e| e.contains(want)) };
        if !good {
            wrong.push(format!("{name}: want {want:?}, got {errors:#?}"));
        }
    }
    assert!(wrong.is_empty(), "validators did not answer as expected:\n{}", wrong.join("\n"));

    // --release refuses the placeholders the shipped manifests carry until scripts/package
    // and the image build fill them in.
    let (code, results) = check(&py, &[&istio_dir()], &["--release"]);
    assert_eq!(code, 1);
    let placeholders: Vec<String> = results
        .iter()
        .filter(|r| r["errors"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().contains("placeholder")))
        .map(|r| r["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(placeholders, ["WasmPlugin", "Deployment"], "--release: {results:#?}");
}

#[test]
fn plugin_refuses_broken_plugin_configs_naming_the_field() {
    let Some(py) = python("plugin_refuses_broken_plugin_configs_naming_the_field") else { return };
    let docs = shipped(&py);
    let config = &doc(&docs, "WasmPlugin")["spec"]["pluginConfig"];
    let cases = [
        (edit(config, "/policy/rules/1/intents/0", Some(json!("ticket.raed"))), "policy.rules[1].intents[0]"),
        (edit(config, "/minter/timeout", Some(json!(500))), "minter"),
        (edit(config, "/identity/audiences", Some(json!([]))), "identity"),
        (edit(config, "/minter/revocations/max_stale_s", Some(json!(1))), "minter.revocations"),
    ];
    let wasm = wasm_prerequisite("plugin_refuses_broken_plugin_configs_naming_the_field");
    let host = wasm.as_ref().map(|w| mandate_host_test::Host::from_file(w).expect("load the filter"));
    for (broken, field) in cases {
        let raw = serde_json::to_vec(&broken).unwrap();
        match mandate_core::config::parse(&raw) {
            Ok(_) => panic!("the plugin accepted a broken pluginConfig (expected a refusal at {field})"),
            Err(e) => assert!(e.to_string().contains(field), "refusal {e} should name {field}"),
        }
        if let Some(host) = &host {
            assert!(host.new_vm(b"", &raw).is_err(), "the wasm module accepted a broken pluginConfig ({field})");
        }
    }
}
