#!/usr/bin/env python3
"""Helpers for scripts/demo (standard library only).

  demo_tool.py echo PORT_FILE SEEN_FILE      run the sample service on 127.0.0.1:0
  demo_tool.py render TEMPLATE OUT NAME=VALUE...   fill {{NAME}} placeholders (strings quoted;
                                                   NAME@=FILE inserts FILE's YAML block as is)
  demo_tool.py wait-envoy ADMIN_FILE TIMEOUT_S     print the mandate listener port once ready
  demo_tool.py request TITLE [METHOD ]URL SEEN_FILE [HEADER: VALUE]...   send one request, tell the story
  demo_tool.py post URL [JSON]                  POST an empty form (or a JSON body), print status and body
  demo_tool.py decisions ENVOY_LOG              print the decision records, one line each
"""
import http.server
import json
import re
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
        keep = {k: claims[k] for k in ("sub", "aud", "scope", "intent", "task", "exp") if k in claims}
        return "\n                 claims " + json.dumps(keep)
    except (IndexError, ValueError):
        return ""


def post(url, json_body=None):
    if json_body is None:
        req = urllib.request.Request(url, data=b"", method="POST")
    else:
        req = urllib.request.Request(url, data=json_body.encode(), method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            print(f"  minter  <- {r.status} {r.read().decode()}")
    except urllib.error.HTTPError as e:
        print(f"  minter  <- {e.code} {e.read().decode()}")


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
              f"intent={r.get('intent') or '-':<16} task={r.get('task') or '-':<7} {r.get('method') or ''} "
              f"{r.get('authority') or ''}{r.get('path') or ''}" + (f"  credential jti={cred}" if cred else ""))


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
        post(args[0], args[1] if len(args) > 1 else None)
    elif cmd == "decisions":
        decisions(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
