"""mandate's decision core from Python: the WebAssembly component (wit/mandate.wit, world
`decider`) on the `wasmtime` package's component support.

    from mandate import Decider
    d = Decider(config)                        # the filter's own configuration (dict or JSON)
    who = d.verify(token, now)                 # Identity, or raises Refused
    out = d.decide(caller=token, intent="support.refund", method="POST",
                   authority="mcp.acme.internal", path="/mcp",
                   mcp={"method": "tools/call", "name": "refund", "arguments": {"amount": 42}},
                   now=now)
    if out.effect != "allow": ...              # out.reason is the stable reason code

The component reads no clock: every call takes `now` (Unix seconds, default: time.time()).
Every failure inside a decision is a denial with its reason (fail closed); a component that
traps raises `wasmtime.WasmtimeError`, never an allow.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import wasmtime
import wasmtime.component as wc

__all__ = ["Decider", "Decision", "Identity", "ConfigError", "Refused", "default_component_path"]


def default_component_path() -> Path:
    """`$MANDATE_COMPONENT`, else the repository's build (scripts/build-component)."""
    env = os.environ.get("MANDATE_COMPONENT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "target/wasm32-wasip2/component/mandate_component.wasm"


class ConfigError(ValueError):
    """The configuration was refused; `field` names it (`policy.rules[0].effect`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Refused(Exception):
    """`verify` refused the token; `reason` is the stable reason code (`token_expired`)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    principal: str
    trust_domain: Optional[str]
    issued_at: Optional[int]
    expires_at: int
    token_hash: str = ""


@dataclass(frozen=True)
class Decision:
    effect: str  # "allow", "deny" or "dry_run_deny"
    reason: str  # stable reason code, as in decision records ("intent_mismatch")
    rule_id: Optional[str]
    dry_run_rule_id: Optional[str]
    scopes: list = field(default_factory=list)
    ttl_s: Optional[int] = None
    decision_id: str = ""
    record: dict = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"


def _code(wit_name: str) -> str:
    return wit_name.replace("-", "_")


def _record(**fields: Any) -> wc.Record:
    """A WIT record: its fields carry the WIT (kebab-case) names."""
    r = wc.Record()
    for k, v in fields.items():
        setattr(r, k.replace("_", "-"), v)
    return r


def _json(v: Any) -> Optional[str]:
    return None if v is None else json.dumps(v)


_Engine = wasmtime.Engine()
_Components: dict = {}


def _component(path: Path) -> wc.Component:
    key = str(path)
    if key not in _Components:
        _Components[key] = wc.Component.from_file(_Engine, key)
    return _Components[key]


class Decider:
    """One component instance holding one configuration."""

    def __init__(self, config: Union[dict, str], component: Optional[Union[str, Path]] = None):
        comp = _component(Path(component) if component else default_component_path())
        linker = wc.Linker(_Engine)
        # std's WASI adapter: the component calls only wasi:random/insecure-seed, with no
        # preopens, environment or inherited stdio.
        linker.add_wasip2()
        self._store = wasmtime.Store(_Engine)
        self._store.set_wasi(wasmtime.WasiConfig())
        instance = linker.instantiate(self._store, comp)
        self._configure = instance.get_func(self._store, "configure")
        self._verify = instance.get_func(self._store, "verify")
        self._decide = instance.get_func(self._store, "decide")
        if not (self._configure and self._verify and self._decide):
            raise wasmtime.WasmtimeError("the component does not export configure, verify and decide")
        self.configure(config)

    def configure(self, config: Union[dict, str]) -> None:
        """Replaces the configuration; a refused one raises ConfigError and changes nothing."""
        text = config if isinstance(config, str) else json.dumps(config)
        err = self._configure(self._store, text)
        if err is not None:
            raise ConfigError(err.field, err.message)

    def verify(self, token: str, now: Optional[int] = None) -> Identity:
        res = self._verify(self._store, token, int(time.time()) if now is None else now)
        if not isinstance(res, wc.Variant):
            raise TypeError(f"unexpected verify result {res!r}")
        if res.tag == "err":
            raise Refused(_code(res.payload.reason))
        return _identity(res.payload)

    def decide(
        self,
        caller: Union[str, Identity],
        *,
        method: str = "GET",
        authority: str,
        path: str,
        intent: Optional[str] = None,
        task: Optional[str] = None,
        intent_token: Optional[str] = None,
        signed_intent: Optional[dict] = None,
        mcp: Optional[dict] = None,
        delegation: Optional[dict] = None,
        now: Optional[int] = None,
        environment: Optional[str] = None,
        standing_secret: bool = False,
    ) -> Decision:
        """Decides one request. `caller` is a raw token (verified here) or an Identity the
        host verified. `signed_intent` ({"intents": [...], "task": ...}) is a signed intent the
        host verified; `intent_token` a raw one checked against the policy's intent issuers.
        `mcp`: {"method", "name", "uri", "arguments"}; `delegation`: {"chain", "intent",
        "task", "scope", "resources", "tools", "arguments", "may_act"} (a verified Txn-Token)."""
        if isinstance(caller, Identity):
            wit_caller: Any = _record(
                principal=caller.principal,
                trust_domain=caller.trust_domain,
                issued_at=caller.issued_at,
                expires_at=caller.expires_at,
                token_hash=caller.token_hash,
            )
        else:
            wit_caller = str(caller)
        if signed_intent is not None and intent_token is not None:
            raise ValueError("give signed_intent or intent_token, not both")
        proof: Any = None
        if signed_intent is not None:
            proof = _record(intents=list(signed_intent.get("intents", [])), task=signed_intent.get("task"))
        elif intent_token is not None:
            proof = intent_token
        wit_mcp = None
        if mcp is not None:
            wit_mcp = _record(method=mcp["method"], name=mcp.get("name"), uri=mcp.get("uri"), arguments=_json(mcp.get("arguments")))
        wit_del = None
        if delegation is not None:
            wit_del = _record(
                chain=list(delegation["chain"]),
                intent=delegation.get("intent"),
                task=delegation.get("task"),
                scope=delegation.get("scope"),
                resources=delegation.get("resources"),
                tools=delegation.get("tools"),
                arguments=_json(delegation.get("arguments")),
                may_act=delegation.get("may_act"),
            )
        req = _record(
            caller=wit_caller,
            intent=intent,
            task=task,
            intent_proof=proof,
            method=method,
            authority=authority,
            path=path,
            mcp=wit_mcp,
            delegation=wit_del,
            now=int(time.time()) if now is None else now,
            environment=environment,
            standing_secret=standing_secret,
        )
        out = self._decide(self._store, req)
        record = getattr(out, "record")
        return Decision(
            effect=_code(out.effect),
            reason=_code(out.reason),
            rule_id=getattr(out, "rule-id"),
            dry_run_rule_id=getattr(out, "dry-run-rule-id"),
            scopes=list(out.scopes),
            ttl_s=getattr(out, "ttl-s"),
            decision_id=getattr(out, "decision-id"),
            record=json.loads(record) if record else {},
        )


def _identity(r: Any) -> Identity:
    return Identity(
        principal=r.principal,
        trust_domain=getattr(r, "trust-domain"),
        issued_at=getattr(r, "issued-at"),
        expires_at=getattr(r, "expires-at"),
        token_hash=getattr(r, "token-hash"),
    )
