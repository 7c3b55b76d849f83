#!/usr/bin/env python3
"""Writes the committed seed corpus (fuzz/corpus/<target>/) from the shipped policies and
case files and hand-written attack shapes. Rerun after changing an input layout; libFuzzer
finds the rest. Layouts: see each check in fuzz/src/."""
import base64, json, os, struct, glob, shutil

ROOT = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(ROOT, "corpus")
NOW = 1_800_000_000


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def tok(header, claims, sig=b"\x01" * 64):
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(sig)]).encode()


def write(target, seeds):
    d = os.path.join(CORPUS, target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for i, s in enumerate(seeds):
        if isinstance(s, str):
            s = s.encode()
        with open(os.path.join(d, "seed-%02d" % i), "wb") as f:
            f.write(s)


svid = {"sub": "spiffe://example.org/agent/a", "aud": "spiffe://example.org/gateway", "exp": NOW + 300, "iat": NOW - 10}
write("jws_parse", [
    tok({"alg": "ES256", "kid": "k1", "typ": "JWT"}, svid),
    tok({"alg": "ES256", "kid": "k1"}, svid),
    tok({"alg": "RS256", "kid": "k1", "typ": "JOSE"}, dict(svid, aud=["x", "y"])),
    tok({"alg": "ES256", "kid": "k1", "typ": "intent+jwt"}, {"intents": ["a"], "task": "t", "exp": NOW}),
    tok({"alg": "ES256", "kid": "k1", "typ": "application/txntoken+jwt"}, {"txn": "x"}),
    tok({"alg": "none", "kid": "k1"}, svid, b""),
    tok({"alg": "ES256", "kid": "k1", "crit": ["exp"]}, svid),
    tok({"alg": "HS256", "kid": ""}, svid),
    b"a.b.c", b"..", b"eyJ.eyJ.x.y",
])

# jwt_forgery: selector, path NUL, exp offset (u16), extra claim NUL, [typ NUL], edits.
def forgery(sel, path, off, extra, typ=b"", edits=b""):
    return bytes([sel]) + path + b"\0" + struct.pack("<H", off) + extra + b"\0" + (typ + b"\0" if (sel >> 4) & 3 == 3 else b"") + edits
write("jwt_forgery", [
    forgery(0, b"agent/a", 500, b""),
    forgery(0, b"ns/prod/sa/x", 500, b"hello", edits=b"\x10\x00\x03\x05"),
    forgery(1, b"a", 500, b"", edits=b"\xff\xff\x00\x01"),
    forgery(2, b"/x/../y", 500, b""),
    forgery(3, b"spiffe://other.org/a", 500, b""),
    forgery(0, b"agent", 10, b""),
    forgery(0x0c, b"agent", 500, b"", edits=b"\x00\x00\x04\x00"),
    forgery(0x30, b"agent", 500, b"", b"intent+jwt"),
    forgery(0x10, b"agent", 500, b"", edits=b"\x40\x00\x02\x00\x41\x00\x01\x41"),
    forgery(0, b"agent", 500, b"", edits=b"\x00\x01\x05\x20"),
])

write("spiffe_id", [
    "spiffe://example.org/ns/prod/sa/agent-1", "spiffe://td_1-x.y", "spiffe://a/B.c_d-E/...x",
    "SPIFFE://example.org/x", "spiffe://example.org:8443/x", "spiffe://user@example.org/x", "spiffe://exa%6dple.org/x",
    "spiffe://example.org/", "spiffe://example.org//a", "spiffe://example.org/./a", "spiffe://example.org/a/..",
    "spiffe://example.org/a%2Fb", "spiffe://example.org/caf\u00e9", "ns/prod/sa/x", "..", "a/./b",
])

write("path", [
    "/tickets/42", "/", "/a/b/", "/search?q=a/../b&x=%2F", "/a/../admin", "/../../etc/passwd", "/a/%2e%2e/admin",
    "/a/%2F/b", "/a%5cb", "/%00", "/%C0%AE%C0%AE/", "/a;x/..;y/b", "/a//b///c", "/%7euser/%41", "/caf%C3%A9",
    "/a?b?c", "/a#frag", "x", "/%zz", "/a/./b/.", "/..;/admin",
    # authorities
    "Example.ORG:8443", "[::1]:80", "host.", "a:b", "[fe80::1]",
])

def wasm_map(pairs):
    out = struct.pack("<I", len(pairs))
    for k, v in pairs:
        out += struct.pack("<II", len(k), len(v))
    for k, v in pairs:
        out += k + b"\0" + v + b"\0"
    return out
write("headers", [
    wasm_map([(b":method", b"GET"), (b":path", b"/x"), (b"x-agent-intent", b"ticket.read")]),
    wasm_map([(b"x-agent-task", b"tsk_1"), (b"X-Agent-Task", b"tsk_2")]),
    wasm_map([]),
    b"\x02\x00\x00\x00\xff\xff\xff\xff\x01\x00\x00\x00",
    b"x-agent-intent: ticket.read\nx-agent-task: tsk_7Qm2xL9pV4cR8nB1sK3wJd\n",
    b"mcp-protocol-version: 2026-07-28\nmcp-method: tools/call\nmcp-name: refund\nmcp-param-amount: 20\nmcp-param-note: =?base64?aGVsbG8=?=\n",
    b"mcp-param-a: 1\nMcp-Param-A: 2\n",
    b"x-mandate-decision-id: forged\nX-MANDATE-credential: x\n",
    b"x-agent-intent: A B\nx-agent-intent: b\n",
])

def intent(sel, principal, claims, edits=b""):
    return bytes([sel]) + principal.encode() + b"\0" + json.dumps(claims).encode() + b"\0" + edits
ic = {"iss": "https://intents.example", "sub": "spiffe://example.org/agent/a", "aud": "gw", "exp": NOW + 300, "iat": NOW - 10, "intents": ["ticket.read"], "task": "tsk_1"}
write("intent_token", [
    intent(0, ic["sub"], ic),
    intent(0, ic["sub"], dict(ic, aud=["x", "gw"], intents=["a", "b.c"])),
    intent(1, ic["sub"], ic),
    intent(0, "spiffe://example.org/agent/b", ic),
    intent(0, ic["sub"], dict(ic, intents=[]), b"\x05\x00\x00\x01"),
    intent(0, ic["sub"], dict(ic, task="bad task")),
    intent(0, ic["sub"], dict(ic, exp=NOW - 100)),
    intent(0, ic["sub"], ic, b"\x30\x00\x03\x07"),
])

# config and policy: from the shipped policies and their cases.
configs, policy_seeds = [], []
for pf in sorted(glob.glob(os.path.join(ROOT, "..", "policies", "*.policy.json"))):
    policy = json.load(open(pf))
    cases_file = pf.replace(".policy.json", ".cases.json")
    cases = json.load(open(cases_file)) if os.path.exists(cases_file) else {"cases": []}
    cfg = {
        "identity": {"audiences": ["gw"], "trust_domains": [{"name": "acme.example", "bundle": {"inline": {"keys": ["@JWK"]}}}]},
        "minter": {"cluster": "minter"},
        "policy": policy,
    }
    if "delegation_rules" in policy:
        cfg["delegation"] = {"issuer": "https://minter.example", "audience": "acme.example", "keys": {"inline": {"keys": ["@JWK"]}}}
    raw = json.dumps(cfg, separators=(",", ":")).encode()
    for c in cases["cases"][:3]:
        r = c["request"]
        lines = ["@sub: " + r.get("principal", ""), ":method: " + r.get("method", "GET"), ":authority: " + r.get("authority", ""), ":path: " + r.get("path", "/")]
        if r.get("intent"):
            lines.append("x-agent-intent: " + r["intent"])
        if r.get("task"):
            lines.append("x-agent-task: " + r["task"])
        body = b""
        m = r.get("mcp")
        if m:
            msg = {"jsonrpc": "2.0", "id": m.get("id", 1), "method": m["method"], "params": {}}
            if "name" in m:
                msg["params"]["name"] = m["name"]
            if "arguments" in m:
                msg["params"]["arguments"] = m["arguments"]
            body = json.dumps(msg).encode()
            lines.append("content-type: application/json")
        answer = struct.pack("<H", 201) + json.dumps({"access_token": "x.y.z", "token_type": "Bearer", "expires_in": 120, "issued_token_type": "urn:ietf:params:oauth:token-type:jwt"}).encode()
        configs.append(raw + b"\0" + "\n".join(lines).encode() + b"\0" + body + b"\0" + answer)
        sel = 0
        policy_seeds.append(bytes([sel]) + struct.pack("<H", 0) + b"\0".join(x.encode() for x in [
            r.get("principal", ""), r.get("intent", "") or "", r.get("task", "") or "", r.get("method", "GET"),
            r.get("authority", ""), r.get("path", "/"), r.get("environment", "") or "", r.get("intent", "") or ""]) + b"\0" + body)
configs.append(b"")
configs.append(b'{"identity": {"header": "x-token", "scheme": ""}}\0x-token: abc\0')
write("config", configs)
# The policy target picks the policy by the selector byte: spread the seeds over all of them.
write("policy", [bytes([i % 7]) + s[1:] for i, s in enumerate(policy_seeds)])

ec = {"kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": "k1", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
rsa_n = b64(b"\xc3" + b"\x11" * 255)
write("bundle", [
    json.dumps({"keys": [ec], "spiffe_sequence": 3, "spiffe_refresh_hint": 60}),
    json.dumps({"keys": [dict(ec, use=None)]}),
    json.dumps({"keys": [{"kty": "RSA", "kid": "r1", "n": rsa_n, "e": "AQAB"}]}),
    json.dumps({"keys": [dict(ec, crv="P-521")]}),
    json.dumps({"keys": [dict(ec, use="x509-svid")]}),
    json.dumps({"keys": [ec, ec]}),
    json.dumps({"keys": []}),
    json.dumps({"keys": [dict(ec, x="AAAA")]}),
])

page = {"epoch": "e1", "cursor": 3, "reset": False, "more": False, "revocations": [
    {"kind": "task", "value": "tsk_1"}, {"kind": "task", "value": "tsk_2", "subject": "spiffe://example.org/a"},
    {"kind": "jti", "value": "j1"}, {"kind": "subject", "value": "spiffe://example.org/b"}, {"kind": "future", "value": "x"}]}
write("revocation_feed", [
    struct.pack("<H", 1) + json.dumps(page).encode() + b"\0" + json.dumps(dict(page, epoch="e2", reset=True, cursor=1, revocations=[])).encode(),
    struct.pack("<H", 1) + json.dumps(dict(page, more=True)).encode(),
    struct.pack("<H", 1) + json.dumps({"cursor": 0, "revocations": [{"kind": "jti"}]}).encode(),
    struct.pack("<H", 400) + json.dumps({"error": "invalid_grant", "mandate_reason": "task_revoked"}).encode(),
    struct.pack("<H", 1) + json.dumps({"access_token": "a.b.c", "token_type": "Bearer", "expires_in": 120}).encode(),
    struct.pack("<H", 1) + json.dumps(dict(page, epoch="bad epoch")).encode(),
])

write("mcp_jsonrpc", [
    json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "refund", "arguments": {"amount": 20}}}),
    json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    json.dumps({"jsonrpc": "2.0", "id": None, "method": "resources/read", "params": {"uri": "tickets://1"}}),
    '{"jsonrpc": "2.0", "id": 1, "method": "a", "method": "b"}',
    '{"jsonrpc": "1.0", "id": 1, "method": "a", "params": []}',
    json.dumps({"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "ab"}, {"name": "abc"}, {"title": "x"}]}}),
    "event: message\ndata: " + json.dumps({"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "ab"}, {"name": "abc"}]}}) + "\n\n",
    "[" * 200, "not json",
])

A, B, C = "spiffe://example.org/agent/a", "spiffe://example.org/sub/b", "spiffe://example.org/sub/c"
txn = {"iss": "https://minter.example", "aud": "example.org", "iat": NOW - 10, "exp": NOW + 300, "jti": "jti-1", "txn": "txn-1", "sub": A,
       "scope": "cases:write", "req_wl": A, "tctx": {"task": "tsk_1", "intent": "case.resolve"}}
write("txn_token", [
    b"\0" + json.dumps(txn).encode(),
    b"\x01" + json.dumps(dict(txn, act={"sub": B}, req_wl=B)).encode(),
    b"\0" + json.dumps(dict(txn, act={"sub": C, "act": {"sub": B}}, req_wl=C, may_act={"sub": A})).encode(),
    b"\0" + json.dumps(dict(txn, tctx={"task": "tsk_1", "intent": "case.resolve", "resources": ["cases"], "tools": ["refund"], "arguments": [{"tool": "refund", "pointer": "/amount", "max": 50}]})).encode(),
    b"\0" + json.dumps(dict(txn, req_wl=B)).encode() + b"\0\x05\x00\x00",
    b"\0" + json.dumps(dict(txn, exp=NOW - 100)).encode(),
    b"\0" + json.dumps(txn).encode() + b"\0\x30\x00\x01",
])

def form(pairs):
    from urllib.parse import urlencode
    return urlencode(pairs).replace("%40SVID", "@SVID").replace("%40ACTOR", "@ACTOR")
TE, JWT, TXN = "urn:ietf:params:oauth:grant-type:token-exchange", "urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:txn_token"
write("minter_form", [
    form([("grant_type", TE), ("subject_token", "@SVID"), ("subject_token_type", JWT), ("audience", "payments-api"), ("scope", "payments:read"), ("task", "t-1"), ("intent", "pay-invoice")]),
    form([("grant_type", TE), ("subject_token", "@SVID"), ("subject_token_type", JWT), ("audience", "crm")]),
    form([("grant_type", TE), ("subject_token", "@SVID"), ("subject_token_type", JWT), ("requested_token_type", TXN), ("audience", "example.org"), ("scope", "payments:read"), ("task", "t-1"), ("intent", "pay-invoice")]),
    form([("grant_type", TE), ("subject_token", "@SVID"), ("subject_token_type", JWT), ("actor_token", "@ACTOR"), ("actor_token_type", JWT), ("audience", "payments-api")]),
    form([("grant_type", TE), ("subject_token", "@SVID"), ("subject_token_type", JWT), ("audience", "legacy-crm"), ("audience", "crm")]),
    form([("grant_type", "client_credentials")]), "a=%zz&&=", "",
])

write("minter_json", [
    json.dumps({"subjects": [A, B], "intents": ["pay-invoice"], "ttl_s": 600, "label": "case 1"}),
    json.dumps({"subjects": []}),
    json.dumps({"task": "tsk_1", "subject": A}),
    json.dumps({"jti": "j-1"}),
    "task=tsk_1&subject=" + A, "subject=x&jti=y",
    json.dumps({"iss": "https://minter.fuzz", "aud": "example.org", "iat": NOW, "exp": NOW + 60, "jti": "j", "txn": "t", "sub": A, "scope": "a b",
                "req_wl": B, "tctx": {"task": "t", "intent": "i"}, "act": {"sub": B}}),
    json.dumps({"subjects": [A, A], "ttl_s": 0}),
])
