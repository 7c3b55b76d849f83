//! The real-MCP part of the rig: the official MCP Python SDK's server and client, driven from
//! Rust tests.
//!
//! * [`McpServer`]: `tests/mcp/server.py` (the SDK's `MCPServer`, Streamable HTTP on
//!   `127.0.0.1:0`, tools `get_ticket`, `add_comment`, `refund`, `delete_customer`). It records
//!   every HTTP request it receives and every tool that ran in a JSON-lines file: see
//!   [`McpServer::http_requests`] and [`McpServer::tool_calls`]. Killed on drop.
//! * [`McpClient`]: `tests/mcp/client.py`, a JSON-in/JSON-out command line around the SDK's
//!   `mcp.Client`: extra headers on every request (SVID, intent, task), a script of steps
//!   (`list_tools`, `call_tool`, ...), the protocol revision to speak. Its output lists, per
//!   step, the result or the JSON-RPC error the SDK raised, and the HTTP exchanges (status,
//!   MCP headers) the step caused.
//! * [`mcp_prerequisite`]: skip (or, with `MANDATE_REQUIRE_ENVOY` set, fail) when the `mcp`
//!   package is not installed in the project's `.venv` (scripts/setup installs it).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::{workspace_root, REQUIRE_ENV};

/// The Python with the MCP SDK: `$MANDATE_PYTHON` or `.venv/bin/python`.
pub fn python() -> PathBuf {
    match std::env::var_os("MANDATE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join(".venv/bin/python"),
    }
}

/// `tests/mcp/`: the server and client scripts.
pub fn scripts_dir() -> PathBuf {
    workspace_root().join("tests/mcp")
}

/// Whether the MCP SDK is importable by [`python`]. When it is not: with
/// `MANDATE_REQUIRE_ENVOY` set this panics; otherwise it prints why the test is skipped and
/// returns false. Use after [`crate::prerequisites`].
pub fn mcp_prerequisite(test: &str) -> bool {
    let py = python();
    let ok = Command::new(&py)
        .args(["-c", "import mcp.client.streamable_http, mcp.server.mcpserver"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    let why = format!(
        "the MCP Python SDK is not importable by {} (run scripts/setup, which installs mcp==2.3.0 into .venv, or set MANDATE_PYTHON)",
        py.display()
    );
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty()) {
        panic!("{test}: {REQUIRE_ENV} is set but {why}");
    }
    eprintln!("SKIPPED {test}: {why}. Set {REQUIRE_ENV}=1 to make this a failure.");
    false
}

/// A running `tests/mcp/server.py`.
pub struct McpServer {
    child: Child,
    port: u16,
    record: PathBuf,
    _dir: tempfile::TempDir,
}

impl McpServer {
    /// Starts the server on an ephemeral loopback port and waits until it listens.
    pub fn start() -> Result<McpServer> {
        let dir = tempfile::tempdir()?;
        let record = dir.path().join("received.jsonl");
        let stderr = std::fs::File::create(dir.path().join("server.err"))?;
        let mut child = Command::new(python())
            .arg(scripts_dir().join("server.py"))
            .arg(&record)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {} tests/mcp/server.py", python().display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        // The first line is `{"port": N}` once uvicorn has started; read it on a thread so a
        // server that never prints cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the MCP server did not start within 30 s: {}", read_lossy(&dir.path().join("server.err")));
            }
        };
        let port = serde_json::from_str::<Value>(line.trim())
            .ok()
            .and_then(|v| v["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the MCP server printed {line:?}: {}", read_lossy(&dir.path().join("server.err")));
        };
        Ok(McpServer { child, port, record, _dir: dir })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Everything recorded so far, in order.
    pub fn records(&self) -> Vec<Value> {
        read_lossy(&self.record).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The HTTP requests that reached the server (`{"method", "path", "headers", "body"}`).
    pub fn http_requests(&self) -> Vec<Value> {
        self.records().into_iter().filter(|r| r["kind"] == "http").collect()
    }

    /// The tools that ran (`{"tool", "arguments", "headers"}`).
    pub fn tool_calls(&self) -> Vec<Value> {
        self.records().into_iter().filter(|r| r["kind"] == "tool").collect()
    }

    /// The server's stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self._dir.path().join("server.err"))
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let err = self.stderr();
            if !err.trim().is_empty() {
                eprintln!("---- MCP server stderr ----\n{}", crate::tail(&err, 60));
            }
        }
    }
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// Which MCP revision the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// 2026-07-28: per-request `_meta`, `Mcp-Method` / `Mcp-Name` / `Mcp-Param-*` headers.
    Modern,
    /// The initialize handshake of the older revisions (2025-11-25): no MCP headers but the
    /// version, so a proxy must read the body.
    Legacy,
    /// Let the SDK probe (`server/discover`, falling back to initialize).
    Auto,
}

impl Protocol {
    fn arg(self) -> &'static str {
        match self {
            Protocol::Modern => "modern",
            Protocol::Legacy => "legacy",
            Protocol::Auto => "auto",
        }
    }
}

/// The SDK's client, through `tests/mcp/client.py`.
#[derive(Debug, Clone)]
pub struct McpClient {
    url: String,
    headers: Vec<(String, String)>,
    protocol: Protocol,
}

impl McpClient {
    /// A client for the Streamable-HTTP endpoint `url`, speaking 2026-07-28.
    pub fn new(url: &str) -> McpClient {
        McpClient { url: url.to_string(), headers: Vec::new(), protocol: Protocol::Modern }
    }

    /// An extra header on every HTTP request.
    pub fn header(mut self, name: &str, value: &str) -> McpClient {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn protocol(mut self, protocol: Protocol) -> McpClient {
        self.protocol = protocol;
        self
    }

    fn command(&self, script: &Value) -> Command {
        let mut cmd = Command::new(python());
        cmd.arg(scripts_dir().join("client.py"))
            .arg(&self.url)
            .args(["--mode", self.protocol.arg()])
            .args(["--script", &script.to_string()]);
        for (n, v) in &self.headers {
            cmd.arg("-H").arg(format!("{n}: {v}"));
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `script` (a JSON list of steps) and returns the client's JSON report.
    pub fn run(&self, script: &Value) -> Result<ClientReport> {
        let out = self.command(script).output().context("running tests/mcp/client.py")?;
        parse_report(&out.stdout, &out.stderr, out.status.success())
    }

    /// Starts `script` in the background (for scripts that wait on the test, see
    /// [`step_wait_for_file`]); finish with [`RunningClient::finish`].
    pub fn spawn(&self, script: &Value) -> Result<RunningClient> {
        let child = self
            .command(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tests/mcp/client.py")?;
        Ok(RunningClient { child: Some(child) })
    }
}

/// A client started with [`McpClient::spawn`]; killed on drop if not finished.
pub struct RunningClient {
    child: Option<Child>,
}

impl RunningClient {
    /// Waits for the client (at most `timeout`) and returns its report.
    pub fn finish(mut self, timeout: Duration) -> Result<ClientReport> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("already finished"))?;
        let t0 = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!("the MCP client did not finish within {timeout:?}; stderr: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output()?;
        parse_report(&out.stdout, &out.stderr, out.status.success())
    }
}

impl Drop for RunningClient {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn parse_report(stdout: &[u8], stderr: &[u8], success: bool) -> Result<ClientReport> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or_default();
    match serde_json::from_str::<Value>(line) {
        Ok(v) if success => Ok(ClientReport { raw: v, stderr: String::from_utf8_lossy(stderr).into_owned() }),
        _ => bail!(
            "tests/mcp/client.py failed (success={success}); stdout: {text}; stderr: {}",
            crate::tail(&String::from_utf8_lossy(stderr), 40)
        ),
    }
}

/// What [`McpClient`] reports: `{"protocol_version", "connect": {...}, "steps": [...]}`.
#[derive(Debug, Clone)]
pub struct ClientReport {
    pub raw: Value,
    /// The client's stderr (the SDK's warnings).
    pub stderr: String,
}

impl ClientReport {
    /// Whether the connection (discovery or initialize handshake) succeeded.
    pub fn connected(&self) -> bool {
        self.raw["connect"]["ok"] == true
    }

    /// Step `i` (`{"op", "ok", "result" | "error", "http": [...]}`); `Null` if absent.
    pub fn step(&self, i: usize) -> &Value {
        self.raw["steps"].get(i).unwrap_or(&Value::Null)
    }

    /// The steps.
    pub fn steps(&self) -> Vec<Value> {
        self.raw["steps"].as_array().cloned().unwrap_or_default()
    }

    /// The protocol version the client settled on.
    pub fn protocol_version(&self) -> Option<&str> {
        self.raw["protocol_version"].as_str()
    }
}

impl std::fmt::Display for ClientReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", serde_json::to_string_pretty(&self.raw).unwrap_or_default())
    }
}

/// Script step: `tools/list`.
pub fn step_list_tools() -> Value {
    json!({"op": "list_tools"})
}

/// Script step: `tools/call` of `name` with `arguments`.
pub fn step_call(name: &str, arguments: Value) -> Value {
    json!({"op": "call_tool", "name": name, "arguments": arguments})
}

/// Script step: call `name` every 100 ms until it fails or `seconds` pass; the step reports the
/// first failure (or the last success) and how many calls it took (`attempts`).
pub fn step_call_until_error(name: &str, arguments: Value, seconds: f64) -> Value {
    json!({"op": "call_tool", "name": name, "arguments": arguments, "until_error_s": seconds})
}

/// Script step: wait (at most `seconds`) until `path` exists; lets a test act mid-session.
pub fn step_wait_for_file(path: &Path, seconds: f64) -> Value {
    json!({"op": "wait_for_file", "path": path, "timeout_s": seconds})
}

/// The reason code in a step's JSON-RPC error (`error.data.reason`), or "".
pub fn step_reason(step: &Value) -> &str {
    step["error"]["data"]["reason"].as_str().unwrap_or_default()
}

/// The HTTP status of a step's last exchange (0 if it made none).
pub fn step_status(step: &Value) -> u64 {
    step["http"].as_array().and_then(|h| h.last()).and_then(|e| e["status"].as_u64()).unwrap_or(0)
}

/// The HTTP exchange of a step whose JSON-RPC method is `method`.
pub fn step_exchange<'a>(step: &'a Value, method: &str) -> Option<&'a Value> {
    step["http"].as_array()?.iter().find(|e| e["rpc"] == method)
}
