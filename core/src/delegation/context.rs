//! `tctx`: the immutable transaction context a Txn-Token carries (task, intent, and the
//! grants that narrow them), read strictly: an unknown member is refused, because a
//! constraint the filter does not understand is a constraint it would not enforce.

use crate::policy::intent::{valid_intent, valid_task};
use crate::policy::mcp::{check_constraints, ArgConstraint, ArgContext, ArgOutcome, ArgumentConfig, McpCall};
use serde::Deserialize;
use serde_json::Value;

/// Longest `resources` / `tools` list read.
pub const MAX_NAMES: usize = 64;
/// Most `arguments` entries read.
pub const MAX_ARGUMENTS: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawContext {
    task: String,
    intent: String,
    #[serde(default, deserialize_with = "super::non_null")]
    resources: Option<Vec<String>>,
    #[serde(default, deserialize_with = "super::non_null")]
    tools: Option<Vec<String>>,
    #[serde(default, deserialize_with = "super::non_null")]
    arguments: Option<Vec<RawArgument>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArgument {
    #[serde(default, deserialize_with = "super::non_null")]
    tool: Option<String>,
    pointer: String,
    #[serde(default, deserialize_with = "super::non_null")]
    max: Option<Value>,
    #[serde(default, deserialize_with = "super::non_null")]
    min: Option<Value>,
    #[serde(default, deserialize_with = "super::non_null")]
    equals: Option<Value>,
}

/// One `tctx.arguments` entry: a constraint on a tool's arguments (on every tool's when
/// `tool` is absent).
#[derive(Debug, Clone, PartialEq)]
pub struct TxnArgument {
    pub tool: Option<String>,
    pub constraint: ArgConstraint,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TxnContext {
    pub task: String,
    pub intent: String,
    /// Resource names the token is good for; `None`: any the intent allows.
    pub resources: Option<Vec<String>>,
    /// MCP tools the token is good for; `None`: any the intent allows.
    pub tools: Option<Vec<String>>,
    pub arguments: Vec<TxnArgument>,
}

fn name_ok(n: &str) -> bool {
    (1..=128).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_graphic())
}

fn names(list: Option<Vec<String>>, what: &'static str) -> Result<Option<Vec<String>>, &'static str> {
    match list {
        None => Ok(None),
        Some(l) if l.len() > MAX_NAMES || !l.iter().all(|n| name_ok(n)) => Err(what),
        Some(l) => Ok(Some(l)),
    }
}

fn number(v: Option<Value>) -> Result<Option<f64>, &'static str> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().filter(|x| x.is_finite()).map(Some).ok_or("tctx_arguments"),
        Some(_) => Err("tctx_arguments"),
    }
}

impl TxnContext {
    pub(crate) fn from_raw(r: RawContext) -> Result<TxnContext, &'static str> {
        if !valid_task(r.task.as_bytes()) {
            return Err("tctx_task");
        }
        if !valid_intent(r.intent.as_bytes()) {
            return Err("tctx_intent");
        }
        let resources = names(r.resources, "tctx_resources")?;
        let tools = names(r.tools, "tctx_tools")?;
        let raw_args = r.arguments.unwrap_or_default();
        if raw_args.len() > MAX_ARGUMENTS {
            return Err("tctx_arguments");
        }
        let mut arguments = Vec::with_capacity(raw_args.len());
        for a in raw_args {
            if a.tool.as_deref().is_some_and(|t| !name_ok(t)) {
                return Err("tctx_arguments");
            }
            // `equals` takes a string, number or boolean only.
            if a.equals.as_ref().is_some_and(|v| !(v.is_string() || v.is_number() || v.is_boolean())) {
                return Err("tctx_arguments");
            }
            let cfg = ArgumentConfig {
                pointer: a.pointer,
                equals: a.equals,
                pattern: None,
                prefix: None,
                min: number(a.min)?,
                max: number(a.max)?,
                equals_context: None,
                required: None,
                sensitive: false,
            };
            // The policy's own compiler: exactly one check, a well-formed pointer.
            let constraint = ArgConstraint::compile(&cfg, "tctx.arguments").map_err(|_| "tctx_arguments")?;
            arguments.push(TxnArgument { tool: a.tool, constraint });
        }
        Ok(TxnContext { task: r.task, intent: r.intent, resources, tools, arguments })
    }

    /// Whether the token is good for this resource.
    pub fn resource_ok(&self, resource: Option<&str>) -> bool {
        match &self.resources {
            None => true,
            Some(list) => resource.is_some_and(|r| list.iter().any(|x| x == r)),
        }
    }

    /// Whether the token is good for this MCP call's tool (calls other than `tools/call` name
    /// no tool and are not constrained here).
    pub fn tool_ok(&self, call: &McpCall) -> bool {
        match (&self.tools, call.tool()) {
            (Some(list), Some(t)) => list.iter().any(|x| x == t),
            _ => true,
        }
    }

    /// The argument constraints for a `tools/call` of this call's tool.
    pub fn check_arguments(&self, call: &McpCall, ctx: &ArgContext<'_>) -> ArgOutcome {
        let Some(tool) = call.tool() else { return ArgOutcome::Pass(Vec::new()) };
        let mut applicable = self.arguments.iter().filter(|a| a.tool.as_deref().is_none_or(|t| t == tool)).map(|a| &a.constraint);
        check_constraints(&mut applicable, call, ctx)
    }
}
