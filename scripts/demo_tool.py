#!/usr/bin/env python3
"""Helpers for scripts/demo (standard library only).

  demo_tool.py echo PORT_FILE SEEN_FILE      run the sample service on 127.0.0.1:0
  demo_tool.py render TEMPLATE OUT NAME=VALUE...   fill {{NAME}} placeholders (strings quoted;
                                                   NAME@=FILE inserts FILE's YAML block as is)
  demo_tool.py wait-envoy ADMIN_FILE TIMEOUT_S     print the mandate listener port once ready
  demo_tool.py request TITLE [METHOD ]URL SEEN_FILE [HEADER: VALUE]...   send one request, tell the story
  demo_tool.py post URL [--json B|--form B] [--tls PKI NAME] [--save FIELD FILE]   POST to the minter
  demo_tool.py decisions ENVOY_LOG              print the decision records, one line each
  demo_tool.py mcp-session URL RECORD_FILE SCRIPT [HEADER: VALUE]...   the MCP SDK's client works
                                                   a script of tool calls; tell each step's story
"""
import http.server
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request


class Echo(http.server.BaseHTTPRequestHandler):
    """The sample service: answers with what it received and appends it to SEEN_FILE."""

    seen_file = None

    def _handle(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
        }
        with open(self.seen_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(seen) + "\n")
        out = json.dumps({"service": "sample", "message": "hello from the service", "you_sent": seen}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def log_message(self, fmt, *args):  # quiet
        pass


def echo(port_file, seen_file):
    Echo.seen_file = seen_file
    open(seen_file, "w").close()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    with open(port_file, "w") as f:
        f.write(str(srv.server_address[1]))
    srv.serve_forever()


def render(template, out, assignments):
    values = {}
    blocks = {}
    for a in assignments:
        name, _, value = a.partition("=")
        if name.endswith("@"):
            blocks[name[:-1]] = open(value, encoding="utf-8").read().rstrip("\n")
            values[name[:-1]] = "block"
            continue
        # Numbers stay as they are; everything else becomes a YAML (JSON) string.
        values[name] = value if re.fullmatch(r"[0-9]+", value) else json.dumps(value)
    values.setdefault("EXTRA_LISTENERS", "")
    values.setdefault("EXTRA_CLUSTERS", "")
    values.setdefault("HTTP_FILTERS_AFTER_MANDATE", "")
    lines = []
    for line in open(template, encoding="utf-8").read().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            lines.append(line)
            continue
        m = re.fullmatch(r"\{\{([A-Z0-9_]+)\}\}", stripped)
        if m and values.get(m.group(1)) == "":
            continue
        if m and m.group(1) in blocks:
            indent = line[: len(line) - len(line.lstrip())]
            lines.extend(indent + b for b in blocks[m.group(1)].splitlines())
            continue
        def sub(mm):
            if mm.group(1) not in values:
                sys.exit(f"render: no value for {{{{{mm.group(1)}}}}}")
            return values[mm.group(1)]
        lines.append(re.sub(r"\{\{([A-Z0-9_]+)\}\}", sub, line))
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def wait_envoy(admin_file, timeout):
    deadline = time.time() + float(timeout)
    while time.time() < deadline:
        try:
            admin = open(admin_file).read().strip()
            if admin:
                with urllib.request.urlopen(f"http://{admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=1) as l:
                            for st in json.load(l).get("listener_statuses", []):
                                port = st["local_address"]["socket_address"].get("port_value", 0)
                                if st["name"] == "mandate" and port:
                                    print(port)
                                    return
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    sys.exit("wait-envoy: Envoy not ready in time")


def short(value, keep=48):
    return value if len(value) <= keep else value[:keep] + f"... ({len(value)} bytes)"


def request(title, url, seen_file, headers):
    method = "GET"
    if " " in url:
        method, url = url.split(" ", 1)
    hdrs = {}
    for h in headers:
        k, _, v = h.partition(":")
        hdrs[k.strip()] = v.strip()
    before = sum(1 for _ in open(seen_file))
    print(f"\n--- {title} ---")
    print(f"  client  -> {method} {url}")
    for k, v in hdrs.items():
        print(f"             {k}: {short(v)}")
    if not hdrs:
        print("             (no credentials)")
    req = urllib.request.Request(url, headers=hdrs, method=method, data=b"{}" if method in ("POST", "PUT") else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, rh, body = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, rh, body = e.code, e.headers, e.read()
    print(f"  envoy   <- {status}")
    for k in ("content-type", "www-authenticate", "x-mandate-decision-id"):
        if rh.get(k):
            print(f"             {k}: {rh.get(k)}")
    try:
        parsed = json.loads(body)
        if "you_sent" in parsed:
            parsed = {k: v for k, v in parsed.items() if k != "you_sent"}
        shown = json.dumps(parsed, indent=2).replace("\n", "\n             ")
    except ValueError:
        shown = body.decode("utf-8", "replace")
    print(f"  body:      {shown}")
    time.sleep(0.05)
    seen = [json.loads(l) for l in open(seen_file)][before:]
    if not seen:
        print("  service:   saw nothing: the request never left Envoy")
    for s in seen:
        print(f"  service:   received {s['method']} {s['path']} with")
        for k, v in sorted(s["headers"].items()):
            mark = "   <- added by mandate" if k.startswith("x-mandate-") else ""
            if k == "authorization":
                mark = "   <- minted for this task by the minter (not the agent's SVID)"
                v = short(v) + "  " + describe_jwt(v)
            print(f"               {k}: {v}{mark}")
        for k in hdrs:
            if k.lower() not in s["headers"]:
                print(f"               ({k.lower()} from the client: not forwarded)")


def describe_jwt(value):
    """The claims of a bearer JWT, for the story (the demo's own short-lived token)."""
    import base64
    try:
        payload = value.split(" ", 1)[1].split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        keep = {k: claims[k] for k in ("sub", "act", "aud", "scope", "intent", "task", "tool", "txn", "exp") if k in claims}
        return "\n                 claims " + json.dumps(keep)
    except (IndexError, ValueError):
        return ""


def post(args):
    """POST to the minter: `post URL [--json BODY | --form BODY] [--tls DIR NAME] [--save FIELD FILE]`.

    With --tls, the minter is verified against DIR/ca.pem and NAME.pem/NAME.key is the client
    certificate. --save writes one field of a JSON answer to FILE.
    """
    import ssl
    url, rest = args[0], args[1:]
    data, ctype, ctx, save = b"", "application/x-www-form-urlencoded", None, None
    while rest:
        flag = rest.pop(0)
        if flag == "--json":
            data, ctype = rest.pop(0).encode(), "application/json"
        elif flag == "--form":
            data = rest.pop(0).encode()
        elif flag == "--tls":
            pki, name = rest.pop(0), rest.pop(0)
            ctx = ssl.create_default_context(cafile=f"{pki}/ca.pem")
            ctx.load_cert_chain(f"{pki}/{name}.pem", f"{pki}/{name}.key")
        elif flag == "--save":
            save = (rest.pop(0), rest.pop(0))
        else:
            sys.exit(f"post: unknown flag {flag}")
    req = urllib.request.Request(url, data=data, method="POST", headers={"content-type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            status, body = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read().decode()
    except urllib.error.URLError as e:
        status, body = 0, f"connection refused by the minter: {e.reason}"
    shown = body
    try:
        answer = json.loads(body)
        if isinstance(answer, dict) and isinstance(answer.get("access_token"), str):
            # Enough to tell tokens apart; the whole token adds nothing to the story.
            answer["access_token"] = short(answer["access_token"], 40)
            shown = json.dumps(answer)
    except ValueError:
        pass
    print(f"  minter  <- {status} {shown}")
    if save:
        field, out = save
        try:
            value = json.loads(body)[field]
        except (ValueError, KeyError, TypeError):
            sys.exit(f"post: no `{field}` in the answer")
        with open(out, "w") as f:
            f.write(str(value))


def mcp_session(url, record_file, script, headers):
    """Runs tests/mcp/client.py (the official MCP SDK's client) with SCRIPT, a JSON list of steps
    each with a "title", and tells what the agent sent, what Envoy answered and what the MCP
    server (tests/mcp/server.py, recording to RECORD_FILE) ran, with which credential."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    steps = json.loads(script)
    before = sum(1 for _ in open(record_file))
    cmd = [os.path.join(root, ".venv/bin/python"), os.path.join(root, "tests/mcp/client.py"), url, "--mode", "modern",
           "--script", json.dumps(steps)]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    try:
        report = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        sys.exit(f"mcp-session: the client failed: {out.stderr[-2000:]}")
    time.sleep(0.05)
    ran = [r for r in (json.loads(l) for l in list(open(record_file))[before:]) if r.get("kind") == "tool"]
    print(f"  agent:     the official MCP Python SDK's client, {url}, protocol {report.get('protocol_version')}")
    for h in headers:
        k, _, v = h.partition(":")
        print(f"             {k.strip()}: {short(v.strip())}")
    if not report.get("connect", {}).get("ok"):
        print(f"  could not connect: {report.get('connect')}")
        return
    for step, res in zip(steps, report.get("steps", [])):
        print(f"\n--- {step.get('title', step.get('op'))} ---")
        if step["op"] == "list_tools":
            print("  agent   -> tools/list")
        else:
            print(f"  agent   -> tools/call {step['name']} {json.dumps(step.get('arguments', {}))}")
        call = next((e for e in res.get("http", []) if e.get("rpc") in ("tools/call", "tools/list")), {})
        mirrored = [f"Mcp-Method: {call['mcp_method']}"] if call.get("mcp_method") else []
        if call.get("mcp_name"):
            mirrored.append(f"Mcp-Name: {call['mcp_name']}")
        mirrored += [f"Mcp-Param-{k[len('mcp-param-'):]}: {v}" for k, v in sorted(call.get("mcp_params", {}).items())]
        if mirrored:
            print(f"             ({', '.join(mirrored)})")
        print(f"  envoy   <- {call.get('status', '?')}")
        if res.get("ok"):
            result = res.get("result", {})
            if step["op"] == "list_tools":
                print(f"  tools:     {', '.join(result.get('tools', []))}")
                continue
            print(f"  result:    {json.dumps(result.get('structured'))}")
            r = ran.pop(0) if ran else None
            if r is None:
                print("  service:   (no record)")
                continue
            auth = r["headers"].get("authorization", "")
            print(f"  service:   ran {r['tool']} {json.dumps(r['arguments'])} with")
            print(f"               authorization: {short(auth)}   <- minted for this tool and task (not the agent's SVID)"
                  + describe_jwt(auth))
        else:
            err = res.get("error", {})
            data = err.get("data") or {}
            print(f"  refused:   JSON-RPC error {err.get('code')} {err.get('message', '')!r}")
            print(f"             reason {data.get('reason')}, decision {data.get('decision_id')}")
            if call.get("www_authenticate"):
                print(f"             www-authenticate: {call['www_authenticate']}")
            print("  service:   saw nothing: the call never left Envoy")


def delegation_keys(plugin_json, url, pki, name):
    """Fetches the minter's JWKS (over mutual TLS) into PLUGIN_JSON's `delegation.keys`: the
    filter verifies Txn-Tokens with the minter's published keys."""
    import ssl
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.pem")
    ctx.load_cert_chain(f"{pki}/{name}.pem", f"{pki}/{name}.key")
    with urllib.request.urlopen(url, timeout=10, context=ctx) as r:
        jwks = json.loads(r.read())
    cfg = json.load(open(plugin_json))
    cfg["delegation"]["keys"] = {"inline": jwks}
    with open(plugin_json, "w") as f:
        json.dump(cfg, f)


def decisions(log_file):
    for line in open(log_file, encoding="utf-8", errors="replace"):
        i = line.find("mandate.decision ")
        if i < 0:
            continue
        try:
            r = json.loads(line[i + len("mandate.decision "):].strip())
        except ValueError:
            continue
        cred = (r.get("credential") or {}).get("jti")
        print(f"  {r['decision_id']}  {r['effect']:<6} {r['reason']:<24} rule={r.get('rule_id') or '-':<22} "
              f"intent={r.get('intent') or '-':<16} task={(r.get('task') or '-'):<27} {r.get('method') or ''} "
              f"{r.get('authority') or ''}{r.get('path') or ''}"
              + (f" {r['mcp'].get('method')} {r['mcp'].get('tool') or ''}" if isinstance(r.get("mcp"), dict) else "")
              + (f"  credential jti={cred}" if cred else "")
              + (("  chain=" + " -> ".join(h.get("principal", "?").rsplit("/", 1)[-1] for h in r["delegation"].get("chain", [])))
                 if isinstance(r.get("delegation"), dict) else ""))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "echo":
        echo(*args)
    elif cmd == "render":
        render(args[0], args[1], args[2:])
    elif cmd == "wait-envoy":
        wait_envoy(*args)
    elif cmd == "request":
        request(args[0], args[1], args[2], args[3:])
    elif cmd == "post":
        post(args)
    elif cmd == "delegation-keys":
        delegation_keys(*args)
    elif cmd == "decisions":
        decisions(args[0])
    elif cmd == "mcp-session":
        mcp_session(args[0], args[1], args[2], args[3:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
