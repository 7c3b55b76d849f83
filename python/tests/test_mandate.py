"""mandate.py over the component: the policy library's cases give the answers they expect (the
ones the native engine gives: `mandate policy test`), tokens are verified as the filter does,
and bad input is refused with its reason."""
import base64
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from mandate import ConfigError, Decider, Identity, Refused

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_795_564_800 + 10 * 3600  # Wednesday 2026-11-25 10:00 UTC
AUD = "spiffe://example.org/gw"
SUB = "spiffe://example.org/agent/a1"


def case_files():
    return sorted((ROOT / "policies").glob("*.cases.json"))


def case_config(doc: dict, minter: bool) -> dict:
    """As cases::case_config (core/src/policy/cases.rs)."""
    is_config = "policy" in doc and ("identity" in doc or len(doc) <= 3)
    cfg = dict(doc) if is_config else {"policy": doc}
    if minter:
        cfg.setdefault("minter", {"cluster": "minter"})
    else:
        cfg.pop("minter", None)
    if '"txn_token"' in json.dumps(doc) and "delegation" not in cfg:
        cfg["delegation"] = {"issuer": "https://minter.case", "audience": "case", "keys": {"inline": {"keys": []}}}
    return cfg


def parse_time(s: str) -> int:
    if s.isdigit():
        return int(s)
    return int(datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())


def decide_case(d: Decider, r: dict):
    now = parse_time(r["time"])
    if r.get("exp") is not None:
        iat, exp = r.get("iat"), r["exp"]
    else:
        iat = now - 10
        exp = iat + r.get("token_lifetime_s", 300)
    return d.decide(
        Identity(r["principal"], None, iat, exp),
        method=r.get("method", "GET"),
        authority=r["authority"],
        path=r["path"],
        intent=r.get("intent"),
        task=r.get("task"),
        signed_intent=r.get("signed_intent"),
        mcp=r.get("mcp"),
        delegation=r.get("delegation"),
        now=now,
        environment=r.get("environment"),
        standing_secret=r.get("standing_secret", False),
    )


@pytest.mark.parametrize("path", case_files(), ids=lambda p: p.name)
def test_policy_cases_give_the_expected_answers(path):
    file = json.loads(path.read_text())
    doc = json.loads((path.parent / file["policy"]).read_text())
    deciders = {m: Decider(case_config(doc, m)) for m in (False, True)}
    failures = []
    for case in file["cases"]:
        r = case["request"]
        minter = r.get("minter", file.get("minter", False))
        out = decide_case(deciders[minter], r)
        want = case["expect"]
        rule = out.dry_run_rule_id or out.rule_id if out.effect == "dry_run_deny" else out.rule_id
        ok = out.effect == want["effect"]
        ok &= want.get("reason") in (None, out.reason)
        ok &= want.get("rule") in (None, rule)
        ok &= want.get("scopes") in (None, out.scopes)
        ok &= out.record["decision_id"] == out.decision_id and out.record["reason"] == out.reason
        if not ok:
            failures.append(f"{case['name']}: got {out.effect} {out.reason} rule={rule} scopes={out.scopes}, want {want}")
    assert not failures, "\n".join(failures)
    assert len(file["cases"]) > 0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Key:
    """An ES256 key, its SPIFFE bundle entry and JWT-SVIDs signed with it."""

    def __init__(self, kid: str):
        self.kid = kid
        self.sk = ec.generate_private_key(ec.SECP256R1())

    def jwk(self) -> dict:
        n = self.sk.public_key().public_numbers()
        return {"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "jwt-svid",
                "x": b64(n.x.to_bytes(32, "big")), "y": b64(n.y.to_bytes(32, "big"))}

    def sign(self, claims: dict) -> str:
        head = b64(json.dumps({"alg": "ES256", "kid": self.kid, "typ": "JWT"}).encode())
        body = b64(json.dumps(claims).encode())
        der = self.sk.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{head}.{body}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def token_config(key: Key) -> dict:
    return {
        "identity": {"audiences": [AUD], "trust_domains": [{"name": "example.org", "bundle": {"inline": {"keys": [key.jwk()]}}}]},
        "policy": {
            "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": True}],
            "resources": [{"name": "mcp", "hosts": ["mcp.internal"], "paths": ["/mcp"], "mcp": {}}],
            "intents": [{"name": "support.refund", "operations": [{"resource": "mcp", "tools": ["refund"],
                         "arguments": [{"pointer": "/amount", "max": 100}]}], "scopes": ["refunds:write"]}],
            "rules": [{"id": "agents", "effect": "allow", "classes": ["agent"], "intents": ["support.refund"]}],
        },
    }


def refund(d: Decider, caller, amount, now=NOW):
    return d.decide(caller, method="POST", authority="mcp.internal", path="/mcp", intent="support.refund",
                    mcp={"method": "tools/call", "name": "refund", "arguments": {"amount": amount}}, now=now)


def test_token_is_verified_then_decided():
    key = Key("k1")
    d = Decider(token_config(key))
    token = key.sign({"sub": SUB, "aud": [AUD], "iat": NOW - 10, "exp": NOW + 300})
    who = d.verify(token, NOW)
    assert who.principal == SUB and who.trust_domain == "example.org"
    out = refund(d, token, 42)
    assert (out.effect, out.reason, out.scopes) == ("allow", "allowed", ["refunds:write"])
    assert token not in json.dumps(out.record), "the record never holds the token"
    assert refund(d, who, 420).reason == "argument_not_allowed"


def test_forged_signature_under_a_known_kid_is_refused():
    key, forger = Key("k1"), Key("k1")
    d = Decider(token_config(key))
    forged = forger.sign({"sub": SUB, "aud": [AUD], "iat": NOW - 10, "exp": NOW + 300})
    with pytest.raises(Refused) as e:
        d.verify(forged, NOW)
    assert e.value.reason == "signature_invalid"
    out = refund(d, forged, 1)
    assert (out.effect, out.reason) == ("deny", "signature_invalid")


def test_expired_token_replayed_later_is_refused():
    key = Key("k1")
    d = Decider(token_config(key))
    token = key.sign({"sub": SUB, "aud": [AUD], "iat": NOW - 10, "exp": NOW + 300})
    with pytest.raises(Refused) as e:
        d.verify(token, NOW + 3600)
    assert e.value.reason == "token_expired"


def test_invalid_config_is_refused_naming_the_field():
    with pytest.raises(ConfigError) as e:
        Decider({"policy": {"rules": [{"id": "r", "effect": "maybe"}]}})
    assert e.value.field == "policy.rules[0].effect"


def test_refused_reconfigure_keeps_the_previous_configuration():
    key = Key("k1")
    d = Decider(token_config(key))
    with pytest.raises(ConfigError):
        d.configure("{not json")
    token = key.sign({"sub": SUB, "aud": [AUD], "iat": NOW - 10, "exp": NOW + 300})
    assert refund(d, token, 42).allowed


def test_agent_loop_example_runs_and_stops_the_refund_above_the_limit():
    out = subprocess.run([sys.executable, str(ROOT / "python/examples/agent_loop.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ALLOW get_ticket" in out.stdout
    assert "DENY  refund (argument_not_allowed)" in out.stdout
