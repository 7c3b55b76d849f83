#!/usr/bin/env python3
"""scripts/bench's driver (stdlib only): starts the minter and one Envoy per configuration side by
side on loopback, runs wrk against them in alternating rounds, runs minter-load against a minter
alone, prints the table and writes target/bench/{summary,results}.json.

Configurations (all: Envoy --concurrency 1 unless --concurrency says otherwise, direct-response route, the same request headers):
  a  no filter
  b  no-op Rust proxy-wasm filter (one header read + one header set)
  c  jwt_authn with jwt_cache_config
  d  jwt_authn without cache
  e  mandate, warm: the same token every request (identity, decision and credential caches hit;
     policy, header edits and the decision record are still done per request)
  f  mandate, cold identity: a fresh ES256 token every request from a pool larger than the
     plugin's caches; the credential stays cached (same subject, audience, scope, task), so (f)
     measures verification + policy, not the minter
  g  mandate, cold credential: minter.cache_size 0 and a fresh x-agent-task every request, so
     every request is one RFC 8693 exchange with the minter (the minter is in the loop)
  i  mandate, MCP header path: (e)'s config plus an MCP server with `mcp.body: when_needed`; a
     POST /mcp `tools/call` with the 2026-07-28 headers (Mcp-Method, Mcp-Name, Mcp-Param-Ticket)
     and a 1 KB JSON-RPC body that the filter does not read (the headers carry what it checks)
  j  mandate, MCP body path: the same request with `mcp.body: always`: the 1 KB body is buffered,
     parsed, checked against the headers and against the argument constraint
  (i) and (j) put Envoy's buffer filter after mandate, so the direct response waits for the body
  (otherwise Envoy answers a POST early and closes the connection: every request a new one).
  q  mandate warm, (i)'s request (POST, 1 KB body, the MCP headers, the buffer filter) to a plain
     resource of the same filter: the like-for-like baseline for (i) and (j)
  k  mandate warm, delegated: (e)'s request made by the last agent of a two-hop chain (the bench
     principal -> B -> D), with D's SVID and the Txn-Token the minter issued for D
  Diagnostic p: no mandate, the same POST and buffer filter: what the MCP request itself costs.

Called by scripts/bench after the builds; see docs/performance.md.
"""

import argparse
import ctypes
import hashlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LABELS = {
    "a": "no filter",
    "b": "no-op wasm filter",
    "c": "jwt_authn + cache",
    "d": "jwt_authn, no cache",
    "e": "mandate warm",
    "f": "mandate cold (fresh token)",
    "g": "mandate, minter in loop",
    "i": "mandate MCP, header path",
    "j": "mandate MCP, body path (1 KB)",
    # Diagnostic: no mandate, (i)'s POST with its 1 KB body and the buffer filter.
    "p": "no mandate, MCP POST + buffer",
    "k": "mandate warm, two-hop delegation",
    # (i)'s request (POST, body, headers, buffer filter) to a plain resource: (e) for that request.
    "q": "mandate warm, (i)'s POST, plain",
    # (e) with records.log: false: the record is set as filter state only (the bench configures no
    # access log, so nothing writes it): what the log line costs.
    "r": "mandate warm, records.log off",
    # Diagnostic (not in the default set): (e) with Envoy at --log-level warning, so Envoy drops
    # the decision-record log line (the filter still builds the record and makes the call).
    "x": "mandate warm, Envoy log off",
    # Diagnostic: the no-op filter plus an ES256 check of a fresh pool token per request through
    # Envoy's `verify_signature` foreign function (BoringSSL in the host): what (f)'s signature
    # check would cost if the host did it.
    "h": "probe: host ES256, fresh token",
    # Diagnostic: the no-op plus mandate's warm-path host calls (no computation): their floor.
    "m": "probe: mandate's host calls",
    # Diagnostic: (e) and (f) with another build of the filter (--alt-wasm), in the same run.
    "E": "mandate warm, alt build",
    "F": "mandate cold, alt build",
    "J": "MCP body path, alt build",
}
BASELINES = ["a", "b", "c", "d"]
TARGETS = {
    "warm_vs_noop_wasm": 0.90,
    "warm_vs_jwt_authn_cached": 0.80,
    "cold_vs_jwt_authn_uncached": 0.25,
    # 800 KB until issue 11 (feed client, bundle ageing, typed intents) added ~22 KB; 850 KB is
    # the budget the shipping issue sets for the default module.
    "wasm_bytes_max": 850 * 1000,
    "minter_exchanges_per_s_min": 5000,
    "minter_p99_ms_max": 5.0,
    # Issue 12: an MCP tools/call against the plain warm path (e), same run.
    "mcp_header_vs_warm": 0.95,
    "mcp_body_vs_warm": 0.75,
    # The same goals against (q): the plain warm path for the same request (POST, 1 KB body).
    "mcp_header_vs_warm_post": 0.95,
    "mcp_body_vs_warm_post": 0.75,
    # Issue 13: a call at the end of a two-hop delegation chain against the plain warm path (e).
    "delegation_vs_warm": 0.85,
    # Issue 14: RSS per worker VM over the no-op filter, same traffic, MB.
    "rss_delta_per_vm_mb_max": 25,
}

PROCS = []  # every child we started, stopped by pid on exit


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _die_with_parent():
    # Children die with this driver (SIGKILL on parent death), so nothing outlives an interrupted run.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(cmd, **kw):
    p = subprocess.Popen(cmd, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL, **kw)
    PROCS.append(p)
    return p


def stop_all():
    for p in PROCS:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 5
    for p in PROCS:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def quote(s):
    return json.dumps(s)  # JSON string syntax is a valid YAML double-quoted scalar


def render(template, values):
    """{{NAME}} placeholders; one alone on its line takes multi-line YAML indented to its column
    (empty: the line is dropped)."""
    out = []
    for line in Path(template).read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        if stripped.startswith("{{") and stripped.endswith("}}") and stripped.count("{{") == 1:
            name = stripped[2:-2]
            indent = line[: len(line) - len(line.lstrip())]
            for sub in values[name].splitlines():
                out.append(indent + sub if sub else "")
            continue
        for name, value in values.items():
            token = "{{" + name + "}}"
            if token in line:
                if "\n" in value:
                    raise ValueError(f"{name} is multi-line but used inline in {template}")
                line = line.replace(token, value)
        if "{{" in line:
            raise ValueError(f"unfilled placeholder in {template}: {line.strip()}")
        out.append(line)
    return "\n".join(out) + "\n"


def http_get(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


class Envoy:
    def __init__(self, key, work, envoy_bin, base_id, http_filters, clusters, cpu, log_level="info", concurrency=1,
                 template=None, values=None, listener="bench"):
        self.key = key
        self.dir = work / f"envoy-{key}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "envoy.yaml"
        self.listener = listener
        self.config.write_text(render(template or ROOT / "envoy/bench/bench.yaml", values if values is not None else {
            "ADMIN_PORT": "0", "LISTENER_PORT": "0",
            "HTTP_FILTERS": http_filters, "CLUSTERS": clusters or "[]",
        }))
        self.log_path = self.dir / "envoy.log"
        self.admin_path = self.dir / "admin.address"
        self.base_id = base_id
        cmd = [str(envoy_bin), "-c", str(self.config), "--base-id", str(base_id), "--disable-hot-restart",
               "--concurrency", str(concurrency), "--log-level", log_level, "--log-path", str(self.log_path),
               "--admin-address-path", str(self.admin_path), "--file-flush-interval-msec", "1000"]
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu)] + cmd
        out = open(self.dir / "envoy.stdout", "wb")
        self.proc = spawn(cmd, stdout=out, stderr=subprocess.STDOUT)
        self.admin = None
        self.port = None

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Envoy ({self.key}) exited: {self.proc.returncode}\n{self.tail()}")
            if self.admin is None and self.admin_path.exists():
                addr = self.admin_path.read_text().strip()
                if addr:
                    self.admin = addr
            if self.admin:
                try:
                    status, _ = http_get(f"http://{self.admin}/ready")
                    if status == 200:
                        _, body = http_get(f"http://{self.admin}/listeners?format=json")
                        for l in json.loads(body).get("listener_statuses", []):
                            port = l["local_address"]["socket_address"].get("port_value", 0)
                            if l.get("name") == self.listener and port:
                                self.port = int(port)
                                return
                except (OSError, ValueError, KeyError):
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"Envoy ({self.key}) not ready after {timeout}s\n{self.tail()}")

    def tail(self, n=40):
        text = ""
        for p in (self.log_path, self.dir / "envoy.stdout"):
            if p.exists():
                text += "".join(p.read_text(errors="replace").splitlines(True)[-n:])
        return text

    def memory(self):
        rss = hwm = None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
        except OSError:
            pass
        allocated = heap = None
        try:
            _, body = http_get(f"http://{self.admin}/memory")
            m = json.loads(body)
            allocated, heap = int(m.get("allocated", 0)), int(m.get("heap_size", 0))
        except (OSError, ValueError):
            pass
        return {"rss_bytes": rss, "rss_peak_bytes": hwm, "allocated_bytes": allocated, "heap_bytes": heap}

    def truncate_log(self):
        try:
            os.truncate(self.log_path, 0)
        except OSError:
            pass


def request_once(port, headers, path, method="GET", body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        body = r.read()
        return r.status, dict(r.getheaders()), body
    finally:
        c.close()


def run_wrk(port, env, duration, cpu, connections, timeout_s=5):
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", f"--timeout", f"{timeout_s}s",
           "-s", str(ROOT / "scripts/bench_wrk.lua"), f"http://127.0.0.1:{port}/"]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    full_env = dict(os.environ)
    full_env.update(env)
    out = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=duration + 60,
                         preexec_fn=_die_with_parent)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")


def start_minter(binary, config, cpu=None):
    cmd = [str(binary), "--config", str(config)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    err = open(Path(config).parent / "minter.stderr", "wb")
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=err)
    line = p.stdout.readline().decode()
    try:
        addr = json.loads(line)["listening"]
    except (ValueError, KeyError):
        raise RuntimeError(f"minter did not start: {line!r}; see {Path(config).parent / 'minter.stderr'}")
    return p, addr


TXN_TOKEN = "urn:ietf:params:oauth:token-type:txn_token"
JWT_TOKEN = "urn:ietf:params:oauth:token-type:jwt"


def txn_chain(minter_addr, fixture, dl, req, token):
    """(k)'s chain from the minter itself (development mode on loopback): the bench principal's
    root Txn-Token naming B, B's replacement naming D, D's replacement. Returns D's token and
    the minter's JWKS."""
    import urllib.error
    import urllib.parse

    def post(params):
        data = urllib.parse.urlencode({"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                                       "requested_token_type": TXN_TOKEN, **params}).encode()
        r = urllib.request.Request(f"http://{minter_addr}/token", data=data,
                                   headers={"content-type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(r, timeout=5) as resp:
                return json.loads(resp.read())["access_token"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"(k): the minter refused a Txn-Token exchange: {e.code} {e.read()[:300]!r}")

    svid_b = (fixture / dl["svid_b"]).read_text().strip()
    svid_d = (fixture / dl["svid_d"]).read_text().strip()
    root = post({"subject_token": token, "subject_token_type": JWT_TOKEN, "task": req["task"], "intent": req["intent"],
                 "scope": "tickets:read", "delegate": dl["b"]})
    to_b = post({"subject_token": root, "subject_token_type": TXN_TOKEN, "actor_token": svid_b,
                 "actor_token_type": JWT_TOKEN, "delegate": dl["d"]})
    to_d = post({"subject_token": to_b, "subject_token_type": TXN_TOKEN, "actor_token": svid_d,
                 "actor_token_type": JWT_TOKEN})
    with urllib.request.urlopen(f"http://{minter_addr}/.well-known/jwks.json", timeout=5) as resp:
        jwks = json.loads(resp.read())
    return to_d, jwks


def linear_memory(admin):
    """Each VM's linear memory (the filter's `mandate.memory.linear_bytes.vm<N>` gauges), bytes."""
    try:
        _, body = http_get(f"http://{admin}/stats?format=json&filter=mandate%5C.memory%5C.linear_bytes", timeout=5)
        return {s["name"].rsplit(".", 1)[1]: s["value"] for s in json.loads(body).get("stats", []) if "value" in s}
    except (OSError, ValueError, KeyError):
        return {}


def settled_rss(envoy, n=5, gap=0.5):
    """Median VmRSS over `n` reads `gap` s apart, once the traffic has stopped."""
    xs = []
    for _ in range(n):
        time.sleep(gap)
        m = envoy.memory()
        if m["rss_bytes"]:
            xs.append(m["rss_bytes"])
    return statistics.median(xs) if xs else None


def measure_memory(a, workers, warm_cfg, minter_cluster, env_pool, env_warm, base):
    """Memory per VM: for each worker count N, the no-op filter and mandate (the warm
    configuration) in Envoys with --concurrency N, warmed with the same traffic (the token pool,
    which fills every worker's identity and decision caches, then the warm request), then RSS
    read at rest. delta(N) = RSS(mandate) - RSS(no-op); the cost of one more worker VM is the
    slope of delta over N (least squares), the rest is the fixed part (the main thread's VM,
    the compiled module, configuration)."""
    rows = []
    for i, n in enumerate(workers):
        pair = {}
        for j, (kind, name, wasm, cfg, clusters) in enumerate((("noop", "noop", a.noop_wasm, "", ""),
                                                                ("mandate", "mandate", a.plugin_wasm, warm_cfg, minter_cluster))):
            filt = render(ROOT / "envoy/bench/filter-wasm.yaml", {"NAME": quote(name), "WASM": quote(str(wasm)), "CONFIG": quote(cfg)})
            pair[kind] = Envoy(f"mem-{kind}-{n}", a.work, a.envoy, base + 2 * i + j, filt, clusters, None, concurrency=n)
        for e in pair.values():
            e.wait_ready()
        row = {"workers": n}
        for kind, e in pair.items():
            # The same traffic for both: enough connections that every worker gets its share.
            # (The kernel spreads connections over the workers' sockets unevenly: many of them.)
            conns = max(2 * a.connections, 16 * n)
            run_wrk(e.port, env_pool, a.memory_warmup, None, conns)
            run_wrk(e.port, env_warm, max(1, a.memory_warmup // 2), None, conns)
            e.truncate_log()
            row[f"{kind}_rss_bytes"] = settled_rss(e)
            if kind == "mandate":
                lin = linear_memory(e.admin)
                row["mandate_vms"] = len(lin)
                row["mandate_linear_bytes"] = lin
        for e in pair.values():
            e.proc.terminate()
            try:
                e.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                e.proc.kill()
        if row["noop_rss_bytes"] and row["mandate_rss_bytes"]:
            row["delta_bytes"] = row["mandate_rss_bytes"] - row["noop_rss_bytes"]
        rows.append(row)
        log(f"memory, --concurrency {n}: no-op {row['noop_rss_bytes'] / 2**20:.1f} MB, mandate {row['mandate_rss_bytes'] / 2**20:.1f} MB, "
            f"{row.get('mandate_vms')} VMs, linear " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(row.get("mandate_linear_bytes", {}).items())))
    pts = [(r["workers"], r["delta_bytes"]) for r in rows if r.get("delta_bytes") is not None]
    slope = fixed = None
    if len({x for x, _ in pts}) >= 2:
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        fixed = my - slope * mx
    return {"rows": rows, "per_worker_vm_bytes": slope, "fixed_bytes": fixed}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--fixture", required=True, type=Path)
    ap.add_argument("--out", default=ROOT / "target/bench", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--configs", default="abcdefgijr")
    ap.add_argument("--pin", action="store_true", help="Envoy on CPU 0, wrk on CPU 1")
    ap.add_argument("--concurrency", type=int, default=1, help="Envoy worker threads")
    ap.add_argument("--minter-requests", type=int, default=30000)
    ap.add_argument("--plugin-wasm", type=Path, default=ROOT / "target/wasm32-wasip1/release/mandate_plugin.wasm")
    ap.add_argument("--noop-wasm", type=Path, required=True)
    ap.add_argument("--alt-wasm", type=Path, help="another build of the filter, for (E) and (F)")
    ap.add_argument("--calls-wasm", type=Path, help="bench lib built with --features host-calls, for (m)")
    ap.add_argument("--probe-wasm", type=Path, help="bench lib built with --features host-es256, for (h)")
    ap.add_argument("--bin-dir", type=Path, default=ROOT / "target/release-native")
    ap.add_argument("--envoy", type=Path, default=Path(os.environ.get("MANDATE_ENVOY", ROOT / ".venv/bin/envoy")))
    ap.add_argument("--mode", default="custom")
    ap.add_argument("--memory-workers", default="1,2",
                    help="worker counts for the memory-per-VM measurement (comma-separated; empty: skip)")
    ap.add_argument("--memory-warmup", type=int, default=6, help="seconds of pool traffic before reading RSS")
    a = ap.parse_args()

    t_start = time.time()
    load_start = os.getloadavg()
    fx = json.loads((a.fixture / "fixture.json").read_text())
    req = fx["request"]
    token = (a.fixture / "token.jwt").read_text().strip()
    jwks = (a.fixture / "jwks.json").read_text()
    envoy_cpu = 0 if a.pin else None
    wrk_cpu = 1 if a.pin else None
    configs = [k for k in a.configs if k in LABELS]
    needs_minter = any(k in "efgijkqxrEFJ" for k in configs) or bool(a.memory_workers.strip())
    mcp = fx.get("mcp")
    if any(k in "ijpqJ" for k in configs) and not mcp:
        raise RuntimeError("configurations (i) and (j) need a filter with MCP support: bench-fixture could not "
                           "write plugin-mcp-*.json (see its message above); run without i and j (--configs)")
    if any(k in "EFJ" for k in configs) and not a.alt_wasm:
        raise RuntimeError("configurations (E), (F) and (J) need --alt-wasm")
    if "h" in configs and not a.probe_wasm:
        raise RuntimeError("configuration (h) needs --probe-wasm")

    minter_addr = None
    if needs_minter:
        _, minter_addr = start_minter(a.bin_dir / "mandate-minter", a.fixture / "minter.json")
        log(f"minter on {minter_addr}")
    minter_cluster = render(ROOT / "envoy/bench/cluster-minter.yaml", {"MINTER_PORT": minter_addr.rsplit(":", 1)[1]}) if minter_addr else ""

    def wasm_filter(name, wasm, config):
        return render(ROOT / "envoy/bench/filter-wasm.yaml", {"NAME": quote(name), "WASM": quote(str(wasm)), "CONFIG": quote(config)})

    def jwt_filter(cache):
        return render(ROOT / "envoy/bench/filter-jwt-authn.yaml", {
            "AUDIENCE": quote(fx["audience"]), "JWKS": quote(jwks),
            "JWT_CACHE": "jwt_cache_config: { jwt_cache_size: 100 }" if cache else ""})

    warm_cfg = (a.fixture / "plugin-warm.json").read_text()
    records_cfg = json.loads(warm_cfg)
    records_cfg["records"] = {"log": False}
    records_cfg = json.dumps(records_cfg)
    mint_cold_cfg = (a.fixture / "plugin-mint-cold.json").read_text()
    buffer_filter = render(ROOT / "envoy/bench/filter-buffer.yaml", {})
    mcp_header_cfg = (a.fixture / "plugin-mcp-header.json").read_text() if mcp else ""
    mcp_body_cfg = (a.fixture / "plugin-mcp-body.json").read_text() if mcp else ""
    # (k): the minter chains the bench principal's task to B, then D; the filter trusts the
    # minter's keys for Txn-Tokens and lets agents hand tasks to agents.
    delegation_cfg, chain_token, chain_svid = "", "", ""
    if "k" in configs:
        dl = fx["delegation"]
        # (Not `jwks`: that name is the bench trust domain's JWKS, which (c) and (d) still need.)
        chain_token, minter_jwks = txn_chain(minter_addr, a.fixture, dl, req, token)
        chain_svid = (a.fixture / dl["svid_d"]).read_text().strip()
        cfg = json.loads(warm_cfg)
        cfg["delegation"] = {"issuer": json.loads((a.fixture / "minter.json").read_text())["issuer"],
                             "audience": dl["trust_domain"], "keys": {"inline": minter_jwks}}
        cfg["policy"]["delegation_rules"] = [{"id": "bench-agents-hand-off", "intents": [req["intent"]],
                                              "from": ["agent"], "to": ["agent"]}]
        delegation_cfg = json.dumps(cfg)
    setups = {
        "a": ("", ""),
        "b": (wasm_filter("noop", a.noop_wasm, ""), ""),
        "c": (jwt_filter(True), ""),
        "d": (jwt_filter(False), ""),
        "e": (wasm_filter("mandate", a.plugin_wasm, warm_cfg), minter_cluster),
        "f": (wasm_filter("mandate", a.plugin_wasm, warm_cfg), minter_cluster),
        "g": (wasm_filter("mandate", a.plugin_wasm, mint_cold_cfg), minter_cluster),
        "i": (wasm_filter("mandate", a.plugin_wasm, mcp_header_cfg) + buffer_filter, minter_cluster),
        "j": (wasm_filter("mandate", a.plugin_wasm, mcp_body_cfg) + buffer_filter, minter_cluster),
        "p": (buffer_filter, ""),
        "k": (wasm_filter("mandate", a.plugin_wasm, delegation_cfg), minter_cluster),
        "q": (wasm_filter("mandate", a.plugin_wasm, mcp_header_cfg) + buffer_filter, minter_cluster),
        "x": (wasm_filter("mandate", a.plugin_wasm, warm_cfg), minter_cluster),
        "r": (wasm_filter("mandate", a.plugin_wasm, records_cfg), minter_cluster),
        "m": (wasm_filter("calls", a.calls_wasm, ""), "") if "m" in configs else None,
        "E": (wasm_filter("mandate", a.alt_wasm, warm_cfg), minter_cluster),
        "F": (wasm_filter("mandate", a.alt_wasm, warm_cfg), minter_cluster),
        "J": (wasm_filter("mandate", a.alt_wasm, mcp_body_cfg) + buffer_filter, minter_cluster),
        "h": (wasm_filter("probe", a.probe_wasm, (a.fixture / "spki.hex").read_text().strip()), "") if "h" in configs else None,
    }
    base = (os.getpid() % 10000) * 10 + 20000
    envoys = {}
    for i, k in enumerate(configs):
        filters, clusters = setups[k]
        envoys[k] = Envoy(k, a.work, a.envoy, base + i, filters, clusters, envoy_cpu,
                          log_level="warning" if k == "x" else "info", concurrency=a.concurrency)
    for k in configs:
        envoys[k].wait_ready()
    log("envoys ready: " + ", ".join(f"{k}=:{envoys[k].port} (base-id {envoys[k].base_id})" for k in configs))

    # Every configuration sends the same request; only (f)'s token and (g)'s task vary.
    common = {"BENCH_HOST": req["host"], "BENCH_PATH": req["path"], "BENCH_TOKEN": token,
              "BENCH_HEADERS": f"x-agent-intent: {req['intent']}\nx-agent-task: {req['task']}"}
    envs = {k: dict(common) for k in configs}
    for k in "fhF":
        if k in envs:
            envs[k].pop("BENCH_TOKEN")
            envs[k]["BENCH_TOKEN_FILE"] = str(a.fixture / "tokens.txt")
    if "g" in envs:
        envs["g"]["BENCH_HEADERS"] = f"x-agent-intent: {req['intent']}"
        envs["g"]["BENCH_FRESH_TASK"] = "1"
    if "k" in envs:
        envs["k"]["BENCH_TOKEN"] = chain_svid
        envs["k"]["BENCH_HEADERS"] += f"\ntxn-token: {chain_token}"
    # (i) and (j) send the same MCP request: only the filter's `mcp.body` differs.
    mcp_headers = {}
    mcp_body = b""
    if mcp:
        mcp_headers = {"x-agent-intent": mcp["intent"], "x-agent-task": mcp["task"], **{k: v for k, v in mcp["headers"]}}
        mcp_body = (a.fixture / mcp["body_file"]).read_bytes()
    for k in "ijpqJ":
        if k in envs:
            envs[k].update({"BENCH_HOST": mcp["plain_host"] if k == "q" else mcp["host"], "BENCH_PATH": mcp["path"], "BENCH_METHOD": "POST",
                            "BENCH_BODY_FILE": str(a.fixture / mcp["body_file"]),
                            "BENCH_HEADERS": "\n".join(f"{n}: {v}" for n, v in mcp_headers.items())})

    # Sanity: every configuration answers 200 (a denial is fast, and would make the bench a lie).
    first_pool_token = (a.fixture / "tokens.txt").open().readline().strip()
    for k in configs:
        h = {"Host": req["host"], "authorization": f"Bearer {first_pool_token if k in 'fhF' else token}",
             "x-agent-intent": req["intent"], "x-agent-task": "T-sanity" if k == "g" else req["task"]}
        try:
            if k == "k":
                h.update({"authorization": f"Bearer {chain_svid}", "txn-token": chain_token})
            if k in "ijpqJ":
                h = {"Host": mcp["plain_host"] if k == "q" else mcp["host"], "authorization": f"Bearer {token}", **mcp_headers}
                status, headers, body = request_once(envoys[k].port, h, mcp["path"], "POST", mcp_body)
            else:
                status, headers, body = request_once(envoys[k].port, h, req["path"])
        except OSError as e:
            raise RuntimeError(f"({k}) {LABELS[k]}: sanity request failed: {e}\n{envoys[k].tail()}")
        if status != 200:
            raise RuntimeError(f"({k}) {LABELS[k]}: sanity request got {status} {headers} {body[:200]!r}\n{envoys[k].tail()}")
        if k in "efgijkqEF":  # (x) logs nothing, by design
            deadline = time.time() + 3
            while "mandate.decision" not in envoys[k].log_path.read_text(errors="replace") and time.time() < deadline:
                time.sleep(0.1)
            if "mandate.decision" not in envoys[k].log_path.read_text(errors="replace"):
                raise RuntimeError(f"({k}): no decision record in Envoy's log")
            if k == "k" and '"depth":2' not in envoys[k].log_path.read_text(errors="replace").replace(" ", ""):
                raise RuntimeError(f"(k) {LABELS[k]}: the decision record does not show the two-hop chain\n{envoys[k].tail()}")
            if k in "ijq":
                # The configuration measures what it says: the record names the path that decided
                # ((q) is not an MCP call at all).
                text = envoys[k].log_path.read_text(errors="replace").replace(" ", "")
                want = {"i": '"path":"header"', "j": '"path":"body"', "q": '"resource":"tickets-post"'}[k]
                if want not in text:
                    raise RuntimeError(f"({k}) {LABELS[k]}: the decision record does not say {want}\n{envoys[k].tail()}")
    log("sanity: every configuration answers 200" + (" and mandate logs its decision records" if needs_minter else ""))

    results = {k: [] for k in configs}
    for r in range(a.rounds):
        # Alternate: each round starts one configuration later, so drift in the machine's load
        # does not always land on the same configuration.
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for k in order:
            if r == 0 and a.warmup > 0:
                run_wrk(envoys[k].port, envs[k], a.warmup, wrk_cpu, a.connections)
            res = run_wrk(envoys[k].port, envs[k], a.duration, wrk_cpu, a.connections)
            res["round"] = r + 1
            res["loadavg_1m"] = os.getloadavg()[0]
            results[k].append(res)
            errs = sum(res["errors"].values())
            log(f"round {r + 1}/{a.rounds} ({k}) {LABELS[k]:<28} {res['rps']:>9.0f} req/s  p50 {res['p50_us'] / 1000:.2f} ms"
                f"  p99 {res['p99_us'] / 1000:.2f} ms" + (f"  ERRORS {res['errors']}" if errs else ""))
            envoys[k].truncate_log()

    memory = {k: envoys[k].memory() for k in configs}
    stats = {}
    for k in configs:
        rs = results[k]
        stats[k] = {
            "label": LABELS[k],
            "rps": median([x["rps"] for x in rs]),
            "rps_min": min(x["rps"] for x in rs),
            "rps_max": max(x["rps"] for x in rs),
            "p50_ms": median([x["p50_us"] / 1000 for x in rs]),
            "p99_ms": median([x["p99_us"] / 1000 for x in rs]),
            "requests": sum(x["requests"] for x in rs),
            "errors": sum(sum(x["errors"].values()) for x in rs),
            "rounds": rs,
            **memory[k],
        }

    def ratio(k, base):
        if k in stats and base in stats and stats[base]["rps"]:
            return stats[k]["rps"] / stats[base]["rps"]
        return None

    # Memory per VM: the no-op and mandate side by side at each worker count.
    memory_per_vm = None
    mem_workers = [int(x) for x in a.memory_workers.split(",") if x.strip()]
    if mem_workers and minter_addr:
        mem_common = {"BENCH_HOST": req["host"], "BENCH_PATH": req["path"],
                      "BENCH_HEADERS": f"x-agent-intent: {req['intent']}\nx-agent-task: {req['task']}"}
        memory_per_vm = measure_memory(a, mem_workers, warm_cfg, minter_cluster,
                                       {**mem_common, "BENCH_TOKEN_FILE": str(a.fixture / "tokens.txt")},
                                       {**mem_common, "BENCH_TOKEN": token}, base + len(configs) + 10)

    # minter-load against a minter alone: one worker, pinned, load generator on the other core.
    mload = None
    mload_dir = a.work / "minter-load"
    fx_out = subprocess.run([str(a.bin_dir / "minter-load"), "fixture", "--dir", str(mload_dir)],
                            capture_output=True, text=True, check=True)
    mcfg_path = mload_dir / "minter.json"
    mcfg = json.loads(mcfg_path.read_text())
    mcfg["workers"] = 1
    mcfg_path.write_text(json.dumps(mcfg, indent=2))
    mp, maddr = start_minter(a.bin_dir / "mandate-minter", mcfg_path, cpu=0)
    fx_info = json.loads(fx_out.stdout.strip().splitlines()[-1])
    cmd = [str(a.bin_dir / "minter-load"), "--url", f"http://{maddr}", "--subject-token-file", str(fx_info["subject_token_file"]),
           "--audience", fx_info.get("audience", "payments-api"), "--scope", fx_info.get("scope", "payments:read"),
           "-n", str(a.minter_requests), "-c", "8"]
    out = subprocess.run(["taskset", "-c", "1"] + cmd, capture_output=True, text=True, timeout=300)
    mp.send_signal(signal.SIGTERM)
    try:
        mp.wait(timeout=10)
    except subprocess.TimeoutExpired:
        mp.kill()
    try:
        mload = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"minter-load gave no result:\n{out.stdout}\n{out.stderr}")
    log(f"minter-load: {mload.get('exchanges_per_s', 0):.0f} exchanges/s, p99 {mload.get('p99_ms')} ms, errors {mload.get('errors')}")

    wasm_bytes = a.plugin_wasm.stat().st_size
    wasm_sha256 = hashlib.sha256(a.plugin_wasm.read_bytes()).hexdigest()
    noop_bytes = a.noop_wasm.stat().st_size

    # ------------------------------------------------------------------ report
    lines = []
    p = lines.append
    p("")
    p(f"mandate bench ({a.mode}): {a.rounds} round(s) x {a.duration} s per configuration, wrk -t1 -c{a.connections}, "
      f"Envoy --concurrency {a.concurrency}{', pinned (Envoy CPU 0, wrk CPU 1)' if a.pin else ''}")
    p(f"machine: {os.cpu_count()} CPUs, load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end (shared: figures are noisy)")
    p("")
    hdr = f"{'':3}{'configuration':<29}{'req/s':>9}{'spread':>8}{'p50 ms':>8}{'p99 ms':>8}  {'/(a)':>5} {'/(b)':>5} {'/(c)':>5} {'/(d)':>5}{'RSS MB':>8}{'alloc MB':>9}"
    p(hdr)
    p("-" * len(hdr))
    for k in configs:
        s = stats[k]
        spread = (s["rps_max"] - s["rps_min"]) / s["rps"] * 100 if s["rps"] and len(s["rounds"]) > 1 else 0.0
        flag = "  !errors" if s["errors"] else ""
        rss = f"{s['rss_bytes'] / 2**20:.0f}" if s["rss_bytes"] else "-"
        alloc = f"{s['allocated_bytes'] / 2**20:.0f}" if s["allocated_bytes"] else "-"
        p(f"{k + ')':<3}{s['label']:<29}{s['rps']:>9.0f}{spread:>7.0f}%{s['p50_ms']:>8.2f}{s['p99_ms']:>8.2f}  "
          f"{fmt_ratio(ratio(k, 'a')):>5} {fmt_ratio(ratio(k, 'b')):>5} {fmt_ratio(ratio(k, 'c')):>5} {fmt_ratio(ratio(k, 'd')):>5}"
          f"{rss:>8}{alloc:>9}{flag}")
    p("(req/s, p50, p99: median over rounds; spread: (max-min)/median req/s; ratios: req/s against the same run's baselines;")
    p(" RSS: VmRSS after the run; alloc: Envoy admin /memory `allocated`)")
    p("")
    p(f"wasm: {a.plugin_wasm.name} {wasm_bytes} bytes ({wasm_bytes / 1000:.0f} KB, sha256 {wasm_sha256[:12]}); no-op baseline {noop_bytes} bytes")
    if mload:
        p(f"minter alone (1 worker on CPU 0, minter-load -c 8 on CPU 1, same SVID): {mload['exchanges_per_s']:.0f} exchanges/s, "
          f"p50 {mload.get('p50_ms')} ms, p99 {mload.get('p99_ms')} ms, errors {mload.get('errors')}")
    if memory_per_vm:
        p("memory per VM (RSS at rest after the same traffic: the 10k-token pool, then the warm request):")
        p(f"  {'workers':>7}{'no-op MB':>10}{'mandate MB':>12}{'delta MB':>10}{'VMs':>5}  linear memory per VM, MB")
        for r in memory_per_vm["rows"]:
            d = r.get("delta_bytes")
            p(f"  {r['workers']:>7}{(r['noop_rss_bytes'] or 0) / 2**20:>10.1f}{(r['mandate_rss_bytes'] or 0) / 2**20:>12.1f}"
              f"{(d / 2**20 if d is not None else float('nan')):>10.1f}{r.get('mandate_vms') or 0:>5}  "
              + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(r.get("mandate_linear_bytes", {}).items())))
        if memory_per_vm["per_worker_vm_bytes"] is not None:
            p(f"  per worker VM (slope of delta over workers): {memory_per_vm['per_worker_vm_bytes'] / 2**20:.1f} MB; "
              f"fixed part (main-thread VM, module, configuration): {memory_per_vm['fixed_bytes'] / 2**20:.1f} MB")
    p("")

    def target_line(name, value, want, op):
        if value is None:
            return f"  {name:<34} n/a"
        ok = value >= want if op == ">=" else value <= want if op == "<=" else value < want
        shown = f"{value:.2f}" if isinstance(value, float) else f"{value}"
        return f"  {name:<34} {shown:>10}   target {op} {want:<8} {'met' if ok else 'NOT MET'}"

    summary = {
        "warm_vs_noop_wasm": ratio("e", "b"),
        "warm_vs_jwt_authn_cached": ratio("e", "c"),
        "cold_vs_jwt_authn_uncached": ratio("f", "d"),
        "cold_rps": stats["f"]["rps"] if "f" in stats else None,
        "wasm_bytes": wasm_bytes,
        "minter_exchanges_per_s": mload.get("exchanges_per_s") if mload else None,
        "minter_p99_ms": mload.get("p99_ms") if mload else None,
        "warm_records_log_off_vs_noop_wasm": ratio("r", "b"),
        "mcp_header_vs_warm": ratio("i", "e"),
        "mcp_body_vs_warm": ratio("j", "e"),
        "mcp_header_vs_warm_post": ratio("i", "q"),
        "mcp_body_vs_warm_post": ratio("j", "q"),
        "delegation_vs_warm": ratio("k", "e"),
        # Memory per worker VM against the no-op filter (slope over --memory-workers), MB.
        "rss_delta_per_vm_mb": round(memory_per_vm["per_worker_vm_bytes"] / 2**20, 1)
        if memory_per_vm and memory_per_vm["per_worker_vm_bytes"] is not None else None,
    }
    p("targets:")
    p(target_line("warm / no-op wasm  (e)/(b)", summary["warm_vs_noop_wasm"], TARGETS["warm_vs_noop_wasm"], ">="))
    p(target_line("warm / jwt_authn cached  (e)/(c)", summary["warm_vs_jwt_authn_cached"], TARGETS["warm_vs_jwt_authn_cached"], ">="))
    p(target_line("cold / jwt_authn uncached  (f)/(d)", summary["cold_vs_jwt_authn_uncached"], TARGETS["cold_vs_jwt_authn_uncached"], ">="))
    p(target_line("wasm bytes", wasm_bytes, TARGETS["wasm_bytes_max"], "<="))
    p(target_line("minter exchanges/s", summary["minter_exchanges_per_s"], TARGETS["minter_exchanges_per_s_min"], ">="))
    p(target_line("minter p99 ms", summary["minter_p99_ms"], TARGETS["minter_p99_ms_max"], "<"))
    p(target_line("MCP header path / warm  (i)/(e)", summary["mcp_header_vs_warm"], TARGETS["mcp_header_vs_warm"], ">="))
    p(target_line("MCP body path / warm  (j)/(e)", summary["mcp_body_vs_warm"], TARGETS["mcp_body_vs_warm"], ">="))
    p(target_line("MCP header / warm POST  (i)/(q)", summary["mcp_header_vs_warm_post"], TARGETS["mcp_header_vs_warm_post"], ">="))
    p(target_line("MCP body / warm POST  (j)/(q)", summary["mcp_body_vs_warm_post"], TARGETS["mcp_body_vs_warm_post"], ">="))
    if ratio("q", "e") is not None:
        # What (i)/(e) and (j)/(e) could reach if reading the call cost nothing: the same filter
        # and the same POST to a plain resource, against (e)'s GET.
        p(f"  {'  ceiling of (i)/(e): (q)/(e)':<34} {ratio('q', 'e'):>10.2f}   (the request, not the filter: POST + 1 KB body + buffer filter)")
    p(target_line("two-hop delegation / warm  (k)/(e)", summary["delegation_vs_warm"], TARGETS["delegation_vs_warm"], ">="))
    p(target_line("RSS per worker VM over no-op, MB", summary["rss_delta_per_vm_mb"], TARGETS["rss_delta_per_vm_mb_max"], "<="))
    print("\n".join(lines), flush=True)

    summary.update({
        # extras
        "mode": a.mode,
        "rounds": a.rounds,
        "duration_s": a.duration,
        "connections": a.connections,
        "pinned": a.pin,
        "concurrency": a.concurrency,
        "cpus": os.cpu_count(),
        "loadavg_start": load_start[0],
        "loadavg_end": os.getloadavg()[0],
        "rps": {k: stats[k]["rps"] for k in configs},
        "p50_ms": {k: stats[k]["p50_ms"] for k in configs},
        "p99_ms": {k: stats[k]["p99_ms"] for k in configs},
        "rss_bytes": {k: stats[k]["rss_bytes"] for k in configs},
        "errors": {k: stats[k]["errors"] for k in configs},
        "ratios": {k: {b: ratio(k, b) for b in BASELINES if b in stats} for k in configs},
        "g_vs_jwt_authn_uncached": ratio("g", "d"),
        # Diagnostic (p): the MCP request (POST, 1 KB body, buffer filter) with no mandate, against (a).
        "mcp_request_no_filter_vs_no_filter": ratio("p", "a"),
        # The ceiling of (i)/(e) and (j)/(e): (i)'s POST to a plain resource, no MCP work.
        "mcp_post_vs_warm_get": ratio("q", "e"),
        "memory_per_vm": memory_per_vm,
        "rss_delta_fixed_mb": round(memory_per_vm["fixed_bytes"] / 2**20, 1)
        if memory_per_vm and memory_per_vm["fixed_bytes"] is not None else None,
        "noop_wasm_bytes": noop_bytes,
        "wasm_sha256": wasm_sha256,
        "wasm_path": str(a.plugin_wasm),
        "git_head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "minter_p50_ms": mload.get("p50_ms") if mload else None,
        "targets": TARGETS,
        "elapsed_s": round(time.time() - t_start, 1),
    })
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (a.out / "results.json").write_text(json.dumps({"configs": stats, "minter_load": mload, "fixture": fx}, indent=2) + "\n")
    (a.out / "report.txt").write_text("\n".join(lines) + "\n")
    log(f"wrote {a.out / 'summary.json'}, results.json, report.txt")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report and stop every child
        log(f"error: {e}")
        stop_all()
        sys.exit(1)
    stop_all()
