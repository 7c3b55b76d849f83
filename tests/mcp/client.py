#!/usr/bin/env python3
"""A JSON-in, JSON-out command line around the official MCP Python SDK's client.

    client.py URL [-H 'name: value']... [--mode modern|legacy|auto] [--script JSON | --script-file F]

Connects to the Streamable-HTTP endpoint URL with `mcp.Client` and the given extra headers on
every HTTP request (say `authorization: Bearer <svid>`, `x-agent-intent: ...`,
`x-agent-task: ...`), runs the steps of the script (a JSON list, from --script, --script-file, or
stdin) in order, and prints one JSON object on stdout:

    {"protocol_version": "2026-07-28", "connect": {"ok": true} | {"ok": false, "error": {...}},
     "steps": [{"op": "call_tool", "name": ..., "ok": true, "result": {...},
                "http": [{"method": "POST", "status": 200, "mcp_method": "tools/call", ...}]}, ...]}

Steps:
    {"op": "list_tools"}                                  -> result: {"tools": [names]}
    {"op": "call_tool", "name": N, "arguments": {...}}    -> result: {"is_error", "structured", "text"}
    {"op": "call_tool", "name": N, "arguments": {...}, "until_error_s": S}
                                                          -> the same call every 100 ms until it fails
                                                             or S seconds pass ("attempts": calls made)
    {"op": "wait_for_file", "path": P, "timeout_s": S}    -> waits until P exists (a test acts meanwhile)
    {"op": "ping"}

A step that fails has "ok": false and "error": {"code", "message", "data"} (the JSON-RPC error
the SDK raised, e.g. the proxy's refusal) or {"exception": "..."} for anything else. Each step
lists the HTTP exchanges it caused ("http": method, status, the request's MCP headers), so a
refusal's HTTP status is visible even though the SDK turns it into a JSON-RPC error.

--mode: `modern` pins the 2026-07-28 revision (per-request `_meta`, `Mcp-Method`/`Mcp-Name`/
`Mcp-Param-*` headers; no discovery round trip); `legacy` forces the initialize handshake of the
older revisions (no MCP headers: a proxy has to read the body); `auto` lets the SDK probe.
The exit status is 0 when the script ran (whatever each step answered), 2 on bad usage.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import httpx2

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

MODERN = MODERN_PROTOCOL_VERSIONS[-1]


def parse_headers(values: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for h in values:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"client.py: bad header {h!r} (want 'name: value')")
        headers[name.strip()] = value.strip()
    return headers


class Exchanges:
    """Records each HTTP exchange of the SDK's httpx client (event hooks)."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []

    async def on_response(self, response: httpx2.Response) -> None:
        req = response.request
        entry: dict[str, Any] = {"method": req.method, "status": response.status_code}
        try:
            entry["rpc"] = json.loads(req.content)["method"]
        except (ValueError, KeyError, TypeError, httpx2.RequestNotRead):
            pass
        for name in ("mcp-protocol-version", "mcp-method", "mcp-name"):
            if name in req.headers:
                entry[name.replace("-", "_")] = req.headers[name]
        params = {k.lower(): v for k, v in req.headers.items() if k.lower().startswith("mcp-param-")}
        if params:
            entry["mcp_params"] = params
        if response.status_code >= 400:
            entry["www_authenticate"] = response.headers.get("www-authenticate")
            entry["decision_id"] = response.headers.get("x-mandate-decision-id")
        self.log.append(entry)


def error_of(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, MCPError):
        return {"code": exc.code, "message": exc.message, "data": exc.data}
    if isinstance(exc, BaseExceptionGroup):
        inner = [error_of(e) for e in exc.exceptions]
        return inner[0] if len(inner) == 1 else {"exception": repr(exc), "inner": inner}
    return {"exception": f"{type(exc).__name__}: {exc}"}


def tool_result(result: Any) -> dict[str, Any]:
    text = [c.text for c in (result.content or []) if getattr(c, "type", None) == "text"]
    return {"is_error": bool(result.is_error), "structured": result.structured_content, "text": text}


async def run_step(client: Client, step: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    op = step.get("op")
    if op == "list_tools":
        listed = await client.list_tools(cache_mode="refresh")
        return {"tools": [t.name for t in listed.tools]}
    if op == "call_tool":
        until = step.get("until_error_s")
        if until is None:
            return tool_result(await client.call_tool(step["name"], step.get("arguments") or {}))
        # Call again every 100 ms until a call fails (raised) or `until` seconds pass.
        deadline = time.monotonic() + float(until)
        entry["attempts"] = 0
        while True:
            entry["attempts"] += 1
            result = tool_result(await client.call_tool(step["name"], step.get("arguments") or {}))
            if time.monotonic() > deadline:
                return result
            await asyncio.sleep(0.1)
    if op == "ping":
        await client.send_ping()
        return {}
    if op == "wait_for_file":
        deadline = time.monotonic() + float(step.get("timeout_s", 10))
        while not os.path.exists(step["path"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{step['path']} did not appear")
            await asyncio.sleep(0.02)
        return {}
    raise ValueError(f"unknown op {op!r}")


async def main_async(args: argparse.Namespace, script: list[dict[str, Any]]) -> dict[str, Any]:
    exchanges = Exchanges()
    http = create_mcp_http_client(headers=parse_headers(args.header), timeout=httpx2.Timeout(args.timeout))
    http.event_hooks["response"] = [exchanges.on_response]
    mode = {"modern": MODERN, "legacy": "legacy", "auto": "auto"}[args.mode]
    out: dict[str, Any] = {"mode": args.mode, "steps": []}
    async with http:
        client = Client(
            streamable_http_client(args.url, http_client=http, terminate_on_close=False),
            mode=mode,
            cache=None,
            read_timeout_seconds=args.timeout,
        )
        try:
            await client.__aenter__()
        except BaseException as exc:  # noqa: BLE001 - reported, not raised
            out["connect"] = {"ok": False, "error": error_of(exc), "http": exchanges.log}
            return out
        out["connect"] = {"ok": True, "http": exchanges.log}
        try:
            out["protocol_version"] = client.protocol_version
            for step in script:
                exchanges.log = []
                entry: dict[str, Any] = {"op": step.get("op")}
                if "name" in step:
                    entry["name"] = step["name"]
                dead = False
                try:
                    entry["result"] = await run_step(client, step, entry)
                    entry["ok"] = True
                except Exception as exc:  # noqa: BLE001 - every failure is data for the test
                    entry["ok"] = False
                    entry["error"] = error_of(exc)
                except asyncio.CancelledError as exc:
                    # The SDK's transport task died (say, a proxy that never answers): report
                    # what we have instead of crashing; later steps cannot run.
                    entry["ok"] = False
                    entry["error"] = {"exception": f"transport closed: {exc!r}"}
                    dead = True
                entry["http"] = exchanges.log
                out["steps"].append(entry)
                if dead:
                    break
        finally:
            try:
                await client.__aexit__(None, None, None)
            except BaseException:  # noqa: BLE001 - closing is best effort
                pass
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("-H", "--header", action="append", default=[])
    parser.add_argument("--mode", choices=["modern", "legacy", "auto"], default="modern")
    parser.add_argument("--script")
    parser.add_argument("--script-file")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    if args.script is not None:
        raw = args.script
    elif args.script_file is not None:
        with open(args.script_file, encoding="utf-8") as f:
            raw = f.read()
    else:
        raw = sys.stdin.read()
    try:
        script = json.loads(raw)
        if not isinstance(script, list):
            raise ValueError("the script is not a JSON list")
    except ValueError as e:
        print(f"client.py: bad script: {e}", file=sys.stderr)
        return 2
    out = asyncio.run(main_async(args, script))
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
