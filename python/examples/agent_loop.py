"""An agent loop that asks mandate before each tool call.

The agent's plan is a list of MCP tool calls; before running one it asks the component,
configured with the support team's policy (policies/mcp-support.policy.json), and runs the tool
only on "allow". A denial is fed back to the agent as the tool's result, with its reason code.

    .venv/bin/python python/examples/agent_loop.py
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mandate import Decider, Identity  # noqa: E402

ROOT = HERE.parent.parent
NOW = 1_795_600_800  # 2026-11-25T10:00:00Z: inside the policy's windows
TASK = "tsk_7Qm2xL9pV4cR8nB1sK3wJd"

# The tools, stubbed: what a real agent would call over MCP once mandate allows it.
TOOLS = {
    "get_ticket": lambda a: {"ticket": a["ticket_id"], "status": "open", "summary": "double charge"},
    "add_comment": lambda a: {"ok": True},
    "refund": lambda a: {"refunded": a["amount"]},
}

# What the model planned: triage, then a refund within the limit, then one far above it.
PLAN = [
    ("ticket.triage", "get_ticket", {"ticket_id": TASK}),
    ("ticket.triage", "add_comment", {"ticket_id": TASK, "text": "Refunding the double charge."}),
    ("refund.small", "refund", {"ticket_id": TASK, "amount": 42.5}),
    ("refund.small", "refund", {"ticket_id": TASK, "amount": 5000}),
]


def main() -> int:
    policy = json.loads((ROOT / "policies/mcp-support.policy.json").read_text())
    decider = Decider({"policy": policy.get("policy", policy), "minter": {"cluster": "minter"}})
    # The runtime verified the agent's JWT-SVID (or pass the raw token: the component verifies it).
    agent = Identity("spiffe://acme.example/agent/support/a1", "acme.example", NOW - 10, NOW + 290)
    transcript = []
    for intent, tool, args in PLAN:
        d = decider.decide(agent, method="POST", authority="mcp.acme.internal", path="/mcp",
                           intent=intent, task=TASK, now=NOW,
                           mcp={"method": "tools/call", "name": tool, "arguments": args})
        if d.allowed:
            result = TOOLS[tool](args)
            print(f"ALLOW {tool} {json.dumps(args)} -> {json.dumps(result)} (rule {d.rule_id}, scopes {d.scopes})")
        else:
            result = {"error": f"refused by policy: {d.reason}", "decision_id": d.decision_id}
            print(f"DENY  {tool} ({d.reason}) decision {d.decision_id}")
        transcript.append({"tool": tool, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
