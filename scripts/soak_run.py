#!/usr/bin/env python3
"""scripts/soak's driver (stdlib only): the minter, an echo upstream (a second Envoy) and the Envoy
under test (mandate with credential minting, registered tasks that churn, MCP and delegation
traffic); wrk drives N requests through it with scripts/soak_wrk.lua while this samples Envoy's
RSS (/proc), Envoy's heap (admin /memory) and each VM's linear memory (the filter's
`mandate.memory.linear_bytes.vm<N>` gauges). At the end: VM traps and failures (Envoy's wasm
stats and its log), the share of each decision, a table and a verdict; results in target/soak/.

Called by scripts/soak after the builds; see docs/reliability.md.
"""

import argparse
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_run as B  # noqa: E402  (Envoy, spawn, stop_all, render, start_minter, txn_chain)

ROOT = B.ROOT
# What a trap or a broken VM looks like in Envoy's log (V8 and proxy-wasm-cpp-host wording).
TRAP_PATTERNS = [r"Uncaught", r"RuntimeError", r"panicked", r"Wasm VM failed", r"Function: proxy_on_\w+ failed",
                 r"failed to load", r"VM .*(crash|fail)"]


def log(msg):
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


def post_json(url, body=None, timeout=5):
    data = json.dumps(body).encode() if body is not None else b"{}"
    r = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(r, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def stats(admin, pattern):
    """Envoy stats whose name matches `pattern`: {name: value} (counters and gauges)."""
    _, body = B.http_get(f"http://{admin}/stats?format=json&filter={urllib.request.quote(pattern)}", timeout=5)
    out = {}
    for s in json.loads(body).get("stats", []):
        if "value" in s:
            out[s["name"]] = s["value"]
    return out


class Tasks:
    """The task churn: every `period` seconds a new generation of tasks (one per group of 16
    agents), a fresh delegation chain for group 0's task, the task file rewritten, and the
    previous generation ended at the minter (its revocations reach the filter by the feed)."""

    def __init__(self, minter, fixture, fx, groups, path, period):
        self.minter, self.fixture, self.fx, self.groups, self.path, self.period = minter, fixture, fx, groups, path, period
        self.gen = 0
        self.cur, self.prev = [], []
        self.chain = None
        self.created = self.ended = self.chains = 0
        self.errors = []
        self.stop = threading.Event()
        self.root_token = None
        for line in (fixture / "tokens.txt").open():
            s, tok = line.split()
            if s == "0":
                self.root_token = tok
                break

    def _create(self):
        ids = []
        for g in range(self.groups):
            subjects = self.fx["subjects"][g * 16:(g + 1) * 16]
            t = post_json(f"http://{self.minter}/tasks", {"subjects": subjects, "intents": [self.fx["intent"], self.fx["mcp_intent"]],
                                                          "ttl_s": 3600, "label": f"soak-g{self.gen}-{g}"})
            ids.append(t["task"])
            self.created += 1
        return ids

    def _chain(self, task):
        dl = dict(self.fx["delegation"])
        token, _ = B.txn_chain(self.minter, self.fixture, dl, {"task": task, "intent": self.fx["intent"]}, self.root_token)
        self.chains += 1
        return token

    def _write(self):
        lines = [f"gen {self.gen}", f"chain {self.chain or '-'}"]
        for g, t in enumerate(self.cur):
            lines.append(f"task {g} {t} {self.prev[g] if g < len(self.prev) else '-'}")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.path)

    def step(self):
        """One generation: create, write, then end the one before."""
        new = self._create()
        try:
            chain = self._chain(new[0])
        except Exception as e:  # noqa: BLE001 - counted; delegation traffic keeps the last chain
            self.errors.append(f"gen {self.gen}: chain: {e}")
            chain = self.chain
        old = self.cur
        self.prev, self.cur, self.chain = old, new, chain
        self._write()
        for t in old:
            post_json(f"http://{self.minter}/tasks/{t}/end")
            self.ended += 1
        self.gen += 1

    def run(self):
        while not self.stop.wait(self.period):
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - report, keep churning
                self.errors.append(f"gen {self.gen}: {e}")


class Sampler:
    def __init__(self, envoy, period):
        self.envoy, self.period = envoy, period
        self.samples = []
        self.stop = threading.Event()
        self.t0 = time.time()

    def sample(self):
        m = self.envoy.memory()
        try:
            st = stats(self.envoy.admin, r"^(http\.soak\.downstream_rq_completed|wasmcustom\.mandate\.memory\..*)$")
        except (OSError, ValueError):
            st = {}
        linear = {k.rsplit(".", 1)[1]: v for k, v in st.items() if ".memory.linear_bytes." in k}
        s = {"t_s": round(time.time() - self.t0, 2), "requests": st.get("http.soak.downstream_rq_completed"),
             "rss_bytes": m["rss_bytes"], "rss_peak_bytes": m["rss_peak_bytes"],
             "allocated_bytes": m["allocated_bytes"], "heap_bytes": m["heap_bytes"], "linear_bytes": linear,
             "loadavg_1m": os.getloadavg()[0]}
        self.samples.append(s)
        return s

    def run(self):
        while not self.stop.wait(self.period):
            self.sample()


def sanity(port, fx, fixture, tasks):
    """One request of each kind before the run: each must get the answer its share expects."""
    svid_d = (fixture / fx["delegation"]["svid_d"]).read_text().strip()
    bad = (fixture / "bad.jwt").read_text().strip()
    tok, task, prev = tasks.root_token, tasks.cur[0], tasks.prev[0] if tasks.prev else None
    mcp_h = {"accept": "application/json, text/event-stream", "content-type": "application/json",
             "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "x-agent-intent": fx["mcp_intent"],
             "x-agent-task": task, "mcp-param-ticket": task, "authorization": f"Bearer {tok}"}

    def mcp_body(name):
        return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": {"ticket": task}}})

    def get(headers):
        return B.request_once(port, {"Host": fx["host"], **headers}, "/tickets/1")

    checks = [
        ("GET as the agent, current task", 200, lambda: get({"authorization": f"Bearer {tok}", "x-agent-intent": fx["intent"], "x-agent-task": task})),
        ("MCP tools/call, header path", 200, lambda: B.request_once(port, {"Host": fx["mcp_host"], **mcp_h, "mcp-name": fx["tool"]}, fx["mcp_path"], "POST", mcp_body(fx["tool"]))),
        ("MCP tools/call, body path", 200, lambda: B.request_once(port, {"Host": fx["mcp_body_host"], **mcp_h, "mcp-name": fx["tool"]}, fx["mcp_path"], "POST", mcp_body(fx["tool"]))),
        ("MCP tools/call, a tool outside the intent", 403, lambda: B.request_once(port, {"Host": fx["mcp_host"], **mcp_h, "mcp-name": fx["denied_tool"]}, fx["mcp_path"], "POST", mcp_body(fx["denied_tool"]))),
        ("delegated: agent D with the Txn-Token", 200, lambda: get({"authorization": f"Bearer {svid_d}", "txn-token": tasks.chain or "", "x-agent-intent": fx["intent"], "x-agent-task": task})),
        ("an intent that does not cover the route", 403, lambda: get({"authorization": f"Bearer {tok}", "x-agent-intent": fx["wrong_intent"], "x-agent-task": task})),
        ("an expired SVID", 401, lambda: get({"authorization": f"Bearer {bad}", "x-agent-intent": fx["intent"], "x-agent-task": task})),
    ]
    if prev:
        checks.append(("the previous (ended) task", 403, lambda: get({"authorization": f"Bearer {tok}", "x-agent-intent": fx["intent"], "x-agent-task": prev})))
    failures = []
    for name, want, fn in checks:
        status, headers, body = fn()
        if status != want:
            failures.append(f"{name}: {status} (want {want}) {body[:200]!r}")
        if status == 200:
            echoed = {k.lower(): v for k, v in headers.items()}.get("x-echo-authorization", "")
            # The service gets a minted credential, never the caller's SVID.
            if not echoed.startswith("Bearer ") or tok in echoed or svid_d in echoed:
                failures.append(f"{name}: the upstream did not get a minted credential ({echoed[:40]!r})")
    return failures


def mb(x):
    return None if x is None else round(x / 2**20, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--fixture", required=True, type=Path)
    ap.add_argument("--out", default=ROOT / "target/soak", type=Path)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads (one VM each)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--churn-s", type=float, default=5.0, help="seconds between task generations")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--warmup-share", type=float, default=0.4, help="share of the requests that is warm-up")
    ap.add_argument("--flat-rss-mb", type=float, default=8.0, help="most RSS growth after warm-up for `flat`")
    ap.add_argument("--flat-linear-mb", type=float, default=1.0, help="most linear-memory growth per VM after warm-up")
    ap.add_argument("--plugin-wasm", type=Path, required=True)
    ap.add_argument("--bin-dir", type=Path, default=ROOT / "target/release-native")
    ap.add_argument("--envoy", type=Path, default=Path(os.environ.get("MANDATE_ENVOY", ROOT / ".venv/bin/envoy")))
    a = ap.parse_args()

    t_start = time.time()
    load_start = os.getloadavg()[0]
    fx = json.loads((a.fixture / "fixture.json").read_text())
    groups = (len(fx["subjects"]) + 15) // 16

    _, minter = B.start_minter(a.bin_dir / "mandate-minter", a.fixture / "minter.json")
    log(f"minter on {minter}")
    with urllib.request.urlopen(f"http://{minter}/.well-known/jwks.json", timeout=5) as r:
        minter_jwks = json.loads(r.read())
    cfg = json.loads((a.fixture / "plugin.json").read_text())
    cfg["delegation"] = {"issuer": json.loads((a.fixture / "minter.json").read_text())["issuer"],
                         "audience": fx["trust_domain"], "keys": {"inline": minter_jwks}}
    cfg["policy"]["delegation_rules"] = [{"id": "soak-agents-hand-off", "intents": [fx["intent"]], "from": ["agent"], "to": ["agent"]}]

    base = (os.getpid() % 10000) * 10 + 150000
    upstream = B.Envoy("upstream", a.work, a.envoy, base, "", "", None, log_level="warning",
                       template=ROOT / "envoy/soak/upstream.yaml", values={}, listener="soak")
    upstream.wait_ready()
    filt = B.render(ROOT / "envoy/bench/filter-wasm.yaml", {"NAME": B.quote("mandate"), "WASM": B.quote(str(a.plugin_wasm)),
                                                            "CONFIG": B.quote(json.dumps(cfg))})
    envoy = B.Envoy("mandate", a.work, a.envoy, base + 1, None, None, None, concurrency=a.concurrency,
                    template=ROOT / "envoy/soak/front.yaml", listener="soak",
                    values={"HTTP_FILTERS": filt, "UPSTREAM_PORT": str(upstream.port), "MINTER_PORT": minter.rsplit(":", 1)[1]})
    envoy.wait_ready()
    log(f"Envoy under test on :{envoy.port} (--concurrency {a.concurrency}), echo upstream on :{upstream.port}")

    tasks_file = a.work / "tasks.txt"
    tasks = Tasks(minter, a.fixture, fx, groups, tasks_file, a.churn_s)
    tasks.step()
    time.sleep(1.5)  # the first poll of the revocation feed
    tasks.step()  # a previous generation exists (ended) from the start
    time.sleep(1.5)
    failures = sanity(envoy.port, fx, a.fixture, tasks)
    if failures:
        raise RuntimeError("sanity requests failed:\n  " + "\n  ".join(failures) + "\n" + envoy.tail())
    log(f"sanity: every kind of request gets its expected answer ({groups} task groups, churn every {a.churn_s:g} s)")

    sampler = Sampler(envoy, a.sample_s)
    first = sampler.sample()
    log(f"before the run: RSS {mb(first['rss_bytes'])} MB, linear memory {', '.join(f'{k} {mb(v)} MB' for k, v in sorted(first['linear_bytes'].items()))}")
    th_s = threading.Thread(target=sampler.run, daemon=True)
    th_t = threading.Thread(target=tasks.run, daemon=True)
    th_s.start()
    th_t.start()

    per_thread = -(-a.requests // a.threads)
    env = dict(os.environ)
    env.update({
        "SOAK_TOKENS": str(a.fixture / "tokens.txt"), "SOAK_TASKS": str(tasks_file), "SOAK_LIMIT": str(per_thread),
        "SOAK_HOST": fx["host"], "SOAK_MCP_HOST": fx["mcp_host"], "SOAK_MCP_BODY_HOST": fx["mcp_body_host"],
        "SOAK_MCP_PATH": fx["mcp_path"], "SOAK_INTENT": fx["intent"], "SOAK_MCP_INTENT": fx["mcp_intent"],
        "SOAK_WRONG_INTENT": fx["wrong_intent"], "SOAK_TOOL": fx["tool"], "SOAK_DENIED_TOOL": fx["denied_tool"],
        "SOAK_SVID_D": (a.fixture / fx["delegation"]["svid_d"]).read_text().strip(),
        "SOAK_BAD": (a.fixture / "bad.jwt").read_text().strip(),
    })
    cmd = ["wrk", f"-t{a.threads}", f"-c{a.connections}", "-d3600s", "--timeout", "10s", "-s", str(ROOT / "scripts/soak_wrk.lua"),
           f"http://127.0.0.1:{envoy.port}/"]
    log(f"wrk: {a.requests} requests ({a.threads} threads x {per_thread}), {a.connections} connections")
    t_run = time.time()
    # wrk's threads stop after their share of answers (soak_wrk.lua), but wrk itself sleeps for
    # -d: once Envoy has answered them all (or nothing moves for 10 s), SIGINT makes it report.
    wrk_out, wrk_err = open(a.work / "wrk.stdout", "w+"), open(a.work / "wrk.stderr", "w+")
    proc = B.spawn(cmd, env=env, stdout=wrk_out, stderr=wrk_err, text=True)
    done_at = (first["requests"] or 0) + a.requests
    seen, still = None, time.time()
    while proc.poll() is None:
        time.sleep(0.5)
        if envoy.proc.poll() is not None:
            proc.send_signal(B.signal.SIGINT)
            proc.wait(timeout=60)
            raise RuntimeError(f"the Envoy under test exited during the run ({envoy.proc.returncode}): a crash counts as a failure\n{envoy.tail()}")
        try:
            n = stats(envoy.admin, r"^http\.soak\.downstream_rq_completed$").get("http.soak.downstream_rq_completed", 0)
        except (OSError, ValueError):
            continue
        if n != seen:
            seen, still = n, time.time()
        if n >= done_at or time.time() - still > 10:
            time.sleep(0.5)
            proc.send_signal(B.signal.SIGINT)
            break
    proc.wait(timeout=60)
    run_s = time.time() - t_run
    wrk_out.seek(0)
    wrk_err.seek(0)

    class _Out:
        stdout, stderr, returncode = wrk_out.read(), wrk_err.read(), proc.returncode
    out = _Out
    tasks.stop.set()
    sampler.stop.set()
    th_t.join(timeout=30)
    th_s.join(timeout=10)
    wrk = None
    for line in out.stdout.splitlines():
        if line.startswith("SOAK_JSON "):
            wrk = json.loads(line[len("SOAK_JSON "):])
    if wrk is None:
        raise RuntimeError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
    time.sleep(max(2.5, a.sample_s))  # batched counters flush (records.flush_ms) and one more tick
    last = sampler.sample()

    # ------------------------------------------------------------------ traps, decisions
    wasm_stats = {k: v for k, v in stats(envoy.admin, r"wasm").items() if not k.startswith("wasmcustom.")}
    mandate_stats = stats(envoy.admin, r"^wasmcustom\.mandate\.")
    http_stats = stats(envoy.admin, r"^http\.soak\.downstream_rq_(total|[1-5]xx)$")
    log_text = envoy.log_path.read_text(errors="replace") if envoy.log_path.exists() else ""
    trap_lines = [l for l in log_text.splitlines() if "mandate.decision" not in l and any(re.search(p, l) for p in TRAP_PATTERNS)]
    failed_stats = {k: v for k, v in wasm_stats.items() if re.search(r"fail|crash|trap|error", k) and v}
    # The filter's own warnings and errors (minter or feed trouble; never a trap by themselves).
    wasm_warnings = [l for l in log_text.splitlines() if re.search(r"\]\[(warning|error|critical)\]\[wasm\]", l)]
    traps = len(trap_lines) + sum(failed_stats.values())
    decisions = {}
    for k, v in mandate_stats.items():
        m = re.match(r"wasmcustom\.mandate\.decisions\.(allow|deny|dry_run_deny)(?:\.(\w+))?$", k)
        if m and m.group(2):
            decisions[f"{m.group(1)}.{m.group(2)}"] = v
    total_decisions = sum(decisions.values()) or 1

    # ------------------------------------------------------------------ flatness
    samples = [s for s in sampler.samples if s["requests"] is not None]
    n_done = last["requests"] or 0
    warm_at = (first["requests"] or 0) + a.warmup_share * (n_done - (first["requests"] or 0))
    after = [s for s in samples if s["requests"] >= warm_at]
    flat_base = after[0] if after else last
    vms = sorted({k for s in samples for k in s["linear_bytes"]}, key=lambda x: int(x[2:]) if x[2:].isdigit() else 0)
    rss_growth = (last["rss_bytes"] - flat_base["rss_bytes"]) if flat_base["rss_bytes"] and last["rss_bytes"] else None
    rss_after = [s["rss_bytes"] for s in after if s["rss_bytes"]]
    linear_growth = {vm: last["linear_bytes"].get(vm, 0) - flat_base["linear_bytes"].get(vm, 0) for vm in vms}
    flat_rss = rss_growth is not None and rss_growth <= a.flat_rss_mb * 2**20
    flat_linear = all(g <= a.flat_linear_mb * 2**20 for g in linear_growth.values()) and bool(vms)
    # wrk counts answers >= 400 as `status` errors: those are the denials, not socket errors.
    errors = sum(v for k, v in wrk["errors"].items() if k != "status")
    status_5xx = sum(v for k, v in wrk["statuses"].items() if k.startswith("5"))
    verdict = {
        "flat_rss": flat_rss, "flat_linear_memory": flat_linear, "zero_traps": traps == 0,
        "no_socket_errors": errors == 0, "tasks_churned": tasks.ended > 0 and not tasks.errors,
    }
    ok = all(verdict.values())

    # ------------------------------------------------------------------ report
    lines = []
    p = lines.append
    p("")
    p(f"mandate soak: {wrk['requests']} requests in {run_s:.0f} s ({wrk['rps']:.0f} req/s), {fx['tokens']} distinct SVIDs of "
      f"{len(fx['subjects'])} agents, Envoy --concurrency {a.concurrency}, wrk -t{a.threads} -c{a.connections}")
    p(f"tasks: {tasks.created} created, {tasks.ended} ended ({tasks.gen} generations of {groups}, every {a.churn_s:g} s); "
      f"{tasks.chains} delegation chains issued" + (f"; churn errors: {len(tasks.errors)}" if tasks.errors else ""))
    p(f"machine: {os.cpu_count()} CPUs, load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    p("")
    hdr = f"{'t s':>7}{'requests':>11}{'RSS MB':>8}{'heap MB':>9}{'alloc MB':>9}" + "".join(f"{'lin ' + vm + ' MB':>14}" for vm in vms)
    p(hdr)
    p("-" * len(hdr))
    step = max(1, len(samples) // 24)
    shown = [s for i, s in enumerate(samples) if i % step == 0 or s is flat_base or i == len(samples) - 1]
    for s in shown:
        mark = " *" if s is flat_base else ""
        p(f"{s['t_s']:>7.0f}{s['requests']:>11}{mb(s['rss_bytes']):>8}{mb(s['heap_bytes']):>9}{mb(s['allocated_bytes']):>9}"
          + "".join(f"{mb(s['linear_bytes'].get(vm)):>14}" for vm in vms) + mark)
    p(f"({len(shown)} of {len(samples)} samples, taken every {a.sample_s:g} s; * = first sample after warm-up, "
      f"the first {a.warmup_share:.0%} of the requests)")
    p("")
    p(f"after warm-up: RSS {mb(flat_base['rss_bytes'])} -> {mb(last['rss_bytes'])} MB (growth {mb(rss_growth)} MB, "
      f"min {mb(min(rss_after)) if rss_after else '-'}, max {mb(max(rss_after)) if rss_after else '-'}); peak RSS {mb(last['rss_peak_bytes'])} MB")
    p("linear memory growth after warm-up: " + (", ".join(f"{vm} {mb(g)} MB" for vm, g in linear_growth.items()) or "no gauges"))
    p(f"VM traps / failures: {traps} ({len(trap_lines)} log lines, wasm failure stats {failed_stats or 'none'})")
    p(f"Envoy wasm stats: " + ", ".join(f"{k.replace('wasm.envoy.wasm.runtime.', '')} {v}" for k, v in sorted(wasm_stats.items())
                                       if k.startswith("wasm.envoy.wasm.runtime.") or k == "wasm.wasm_vm_count")
      + f"; the filter's warnings/errors in the log: {len(wasm_warnings)}")
    p(f"socket errors: {errors}; answers by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(wrk["statuses"].items()))
      + (f" (5xx: {status_5xx})" if status_5xx else ""))
    p("")
    p("decisions (the filter's counters, all VMs):")
    for k, v in sorted(decisions.items(), key=lambda kv: -kv[1]):
        p(f"  {k:<44}{v:>10}  {v / total_decisions:7.2%}")
    mcp = {k.split("mandate.mcp.", 1)[1]: v for k, v in mandate_stats.items() if ".mandate.mcp." in k}
    if mcp:
        p("MCP calls: " + ", ".join(f"{k} {v}" for k, v in sorted(mcp.items())))
    hits = {k.split("mandate.cache.", 1)[1]: v for k, v in mandate_stats.items() if ".mandate.cache." in k}
    if hits:
        p("caches: " + ", ".join(f"{k} {v}" for k, v in sorted(hits.items())))
    p(f"minter: {mandate_stats.get('wasmcustom.mandate.minter.calls', 0)} exchanges, {mandate_stats.get('wasmcustom.mandate.minter.failures', 0)} failures, "
      f"{mandate_stats.get('wasmcustom.mandate.minter.refusals', 0)} refusals; revocations received {mandate_stats.get('wasmcustom.mandate.revocations.received', 0)}, "
      f"polls {mandate_stats.get('wasmcustom.mandate.revocations.polls', 0)}, poll failures {mandate_stats.get('wasmcustom.mandate.revocations.poll_failures', 0)}")
    p("")
    p("verdict: " + ("PASS" if ok else "FAIL") + " (" + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in verdict.items()) + ")")
    p(f"  flat: RSS growth over the last {1 - a.warmup_share:.0%} of the requests <= {a.flat_rss_mb:g} MB, and every VM's "
      f"linear memory growth <= {a.flat_linear_mb:g} MB")
    print("\n".join(lines), flush=True)

    summary = {
        "requests": wrk["requests"], "duration_s": round(run_s, 1), "rps": wrk["rps"], "tokens": fx["tokens"],
        "subjects": len(fx["subjects"]), "concurrency": a.concurrency, "wrk_threads": a.threads, "connections": a.connections,
        "tasks_created": tasks.created, "tasks_ended": tasks.ended, "task_generations": tasks.gen, "delegation_chains": tasks.chains,
        "churn_errors": tasks.errors[:20], "warmup_share": a.warmup_share,
        "rss_mb": {"before": mb(first["rss_bytes"]), "after_warmup": mb(flat_base["rss_bytes"]), "end": mb(last["rss_bytes"]),
                   "growth_after_warmup": mb(rss_growth), "min_after_warmup": mb(min(rss_after)) if rss_after else None,
                   "max_after_warmup": mb(max(rss_after)) if rss_after else None, "peak": mb(last["rss_peak_bytes"])},
        "linear_memory_mb": {vm: {"before": mb(first["linear_bytes"].get(vm)), "after_warmup": mb(flat_base["linear_bytes"].get(vm)),
                                  "end": mb(last["linear_bytes"].get(vm)), "growth_after_warmup": mb(linear_growth[vm])} for vm in vms},
        "envoy_heap_mb": {"before": mb(first["heap_bytes"]), "end": mb(last["heap_bytes"])},
        "envoy_allocated_mb": {"before": mb(first["allocated_bytes"]), "end": mb(last["allocated_bytes"])},
        "traps": traps, "trap_log_lines": trap_lines[:20], "wasm_stats": wasm_stats,
        "filter_warnings": len(wasm_warnings), "filter_warning_lines": wasm_warnings[:20],
        "socket_errors": wrk["errors"], "statuses": wrk["statuses"], "http_stats": http_stats,
        "decisions": decisions, "decision_shares": {k: round(v / total_decisions, 4) for k, v in decisions.items()},
        "mandate_stats": mandate_stats,
        "latency_us": {"p50": wrk["p50_us"], "p99": wrk["p99_us"], "max": wrk["max_us"]},
        "verdict": verdict, "pass": ok, "flat_rss_mb": a.flat_rss_mb, "flat_linear_mb": a.flat_linear_mb,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
        "wasm_bytes": a.plugin_wasm.stat().st_size,
        "git_head": B.subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "elapsed_s": round(time.time() - t_start, 1),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (a.out / "samples.json").write_text(json.dumps(sampler.samples, indent=1) + "\n")
    (a.out / "report.txt").write_text("\n".join(lines) + "\n")
    log(f"wrote {a.out / 'summary.json'}, samples.json, report.txt")
    return 0 if ok else 3


if __name__ == "__main__":
    rc = 1
    try:
        rc = main()
    except Exception as e:  # noqa: BLE001 - report and stop every child
        log(f"error: {e}")
    finally:
        B.stop_all()
    sys.exit(rc)
