#!/usr/bin/env python3
"""A support-desk MCP server for the end-to-end tests and the demo (official MCP Python SDK).

    server.py RECORD_FILE [--port-file FILE] [--port N]

Serves MCP over Streamable HTTP at http://127.0.0.1:<port>/mcp (port 0 by default: the kernel
picks one). Once it listens it prints `{"port": N}` on one line on stdout (and writes the port to
--port-file when given). Both the 2026-07-28 per-request protocol and the older initialize
handshake are served, stateless, JSON answers.

Tools: get_ticket(ticket_id), add_comment(ticket_id, text), refund(ticket_id, amount),
delete_customer(customer_id). `refund` marks `ticket_id` and `amount` with `x-mcp-header`, so a
2026-07-28 client mirrors them into `Mcp-Param-ticket_id` / `Mcp-Param-amount`. The header names
are the argument keys on purpose: a proxy maps `Mcp-Param-{Name}` to the top-level argument of
that name (case-insensitively), so a differently named header would only force the body path.
The SDK allows the annotation on integer/string/boolean properties only (`number` is forbidden):
`amount` is an integer, in whole currency units.

RECORD_FILE gets one JSON object per line:
  {"kind": "http", "method": "POST", "path": "/mcp", "headers": {...}, "body": <JSON or text>}
      for every HTTP request that reached the server (before the SDK looks at it);
  {"kind": "tool", "tool": NAME, "arguments": {...}, "headers": {...}}
      for every tool that actually ran, with the request headers the SDK handed the tool.
Header names are lowercase.
"""

import argparse
import json
import socket
import sys
import threading
from typing import Annotated, Any

import uvicorn
from pydantic import Field

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

_LOCK = threading.Lock()
_RECORD_FILE = ""


def record(entry: dict[str, Any]) -> None:
    line = json.dumps(entry, sort_keys=True)
    with _LOCK, open(_RECORD_FILE, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()


def _headers(ctx: Context | None) -> dict[str, str]:
    try:
        h = ctx.headers if ctx is not None else None
    except Exception:  # noqa: BLE001 - a transport without headers
        h = None
    return {str(k).lower(): str(v) for k, v in (h or {}).items()}


def _ran(tool: str, arguments: dict[str, Any], ctx: Context | None) -> None:
    record({"kind": "tool", "tool": tool, "arguments": arguments, "headers": _headers(ctx)})


TICKETS = {
    "T-1001": {"customer_id": "C-77", "subject": "Charged twice for order 5512", "status": "open"},
    "T-1002": {"customer_id": "C-78", "subject": "Password reset loop", "status": "open"},
}

mcp = MCPServer(name="support-desk", instructions="Tickets, comments and refunds for the support team.")


@mcp.tool()
def get_ticket(ticket_id: str, ctx: Context) -> dict[str, Any]:
    """Read a support ticket."""
    _ran("get_ticket", {"ticket_id": ticket_id}, ctx)
    ticket = TICKETS.get(ticket_id, {"customer_id": "C-0", "subject": "(unknown ticket)", "status": "unknown"})
    return {"ticket_id": ticket_id, **ticket}


@mcp.tool()
def add_comment(ticket_id: str, text: str, ctx: Context) -> dict[str, Any]:
    """Add a comment to a ticket."""
    _ran("add_comment", {"ticket_id": ticket_id, "text": text}, ctx)
    return {"ticket_id": ticket_id, "comment": text, "status": "added"}


@mcp.tool()
def refund(
    ticket_id: Annotated[str, Field(json_schema_extra={"x-mcp-header": "ticket_id"})],
    amount: Annotated[int, Field(json_schema_extra={"x-mcp-header": "amount"})],
    ctx: Context,
) -> dict[str, Any]:
    """Refund the customer of a ticket (amount in whole currency units)."""
    _ran("refund", {"ticket_id": ticket_id, "amount": amount}, ctx)
    return {"ticket_id": ticket_id, "refunded": amount, "status": "refunded"}


@mcp.tool()
def delete_customer(customer_id: str, ctx: Context) -> dict[str, Any]:
    """Delete a customer and everything about them."""
    _ran("delete_customer", {"customer_id": customer_id}, ctx)
    return {"customer_id": customer_id, "status": "deleted"}


class Recorder:
    """ASGI middleware: records every HTTP request before the SDK sees it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            shown: Any = json.loads(body) if body else None
        except ValueError:
            shown = body.decode("utf-8", "replace")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        record({"kind": "http", "method": scope.get("method"), "path": path, "headers": headers, "body": shown})
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def main() -> None:
    global _RECORD_FILE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record_file")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file")
    args = parser.parse_args()
    _RECORD_FILE = args.record_file
    open(_RECORD_FILE, "a", encoding="utf-8").close()

    app = mcp.streamable_http_app(
        json_response=True,
        stateless_http=True,
        # Envoy forwards the client's Host (e.g. mcp.acme.internal): the proxy is the boundary.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(Recorder(app), log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)

    # Announce only once uvicorn has started (lifespan done): poll its `started` flag.
    def announce() -> None:
        import time

        while not server.started:
            time.sleep(0.01)
        if args.port_file:
            with open(args.port_file + ".tmp", "w") as f:
                f.write(str(port))
            import os

            os.replace(args.port_file + ".tmp", args.port_file)
        print(json.dumps({"port": port}), flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
