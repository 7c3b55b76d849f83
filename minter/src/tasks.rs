//! Registered tasks: an orchestrator creates a task (`POST /tasks`) with the
//! subjects it is bound to, the intents it allows and an expiry; `/token`
//! then mints for it only while it is active, for those subjects and intents,
//! and never past its expiry. Task ids (`tsk_` + 128 random bits) are issued
//! by the minter, so an agent cannot invent a fresh one after its task ends.

use crate::config::TasksConfig;
use crate::error::OAuthError;
use crate::server::AppState;
use crate::store::{Task, TaskState};
use crate::values;
use serde::Deserialize;

/// Most subjects a task may be bound to.
pub const MAX_SUBJECTS: usize = 16;
/// Most intents a task may list.
pub const MAX_INTENTS: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    subjects: Vec<String>,
    #[serde(default)]
    intents: Vec<String>,
    #[serde(default)]
    ttl_s: Option<u64>,
    #[serde(default)]
    label: Option<String>,
}

/// A validated `POST /tasks` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub subjects: Vec<String>,
    pub intents: Vec<String>,
    pub ttl_s: u64,
    pub label: Option<String>,
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(v.len());
    for s in v {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

pub fn parse_create(body: &[u8], cfg: &TasksConfig) -> Result<NewTask, OAuthError> {
    let b: CreateBody = serde_json::from_slice(body)
        .map_err(|_| OAuthError::invalid_request("body must be a JSON object {subjects, intents?, ttl_s?, label?}"))?;
    let subjects = dedup(b.subjects);
    if subjects.is_empty() || subjects.len() > MAX_SUBJECTS {
        return Err(OAuthError::invalid_request(format!("`subjects` must list 1-{MAX_SUBJECTS} principals")));
    }
    for s in &subjects {
        values::subject(s).map_err(|e| OAuthError::invalid_request(e.0))?;
    }
    let intents = dedup(b.intents);
    if intents.len() > MAX_INTENTS {
        return Err(OAuthError::invalid_request(format!("`intents` may list at most {MAX_INTENTS} intents")));
    }
    for i in &intents {
        values::intent(i).map_err(|e| OAuthError::invalid_request(e.0))?;
    }
    let ttl_s = match b.ttl_s {
        None => cfg.default_ttl_s,
        Some(t) if (1..=cfg.max_ttl_s).contains(&t) => t,
        Some(_) => return Err(OAuthError::invalid_request(format!("`ttl_s` must be 1-{}", cfg.max_ttl_s))),
    };
    if let Some(l) = &b.label {
        values::label(l).map_err(|e| OAuthError::invalid_request(e.0))?;
    }
    Ok(NewTask { subjects, intents, ttl_s, label: b.label })
}

/// A fresh task id: `tsk_` + 22 base64url characters (128 random bits).
pub fn new_id() -> String {
    format!("{}{}", values::TASK_ID_PREFIX, crate::exchange::random_id())
}

pub fn build(new: NewTask, client_id: &str, now: u64) -> Task {
    Task {
        id: new_id(),
        subjects: new.subjects,
        intents: new.intents,
        label: new.label,
        created_at: now,
        expires_at: now.saturating_add(new.ttl_s),
        ended_at: None,
        client_id: client_id.to_string(),
    }
}

/// The `/token` check for `task`, once the subject is verified. Returns the
/// expiry that caps the issued token (registered tasks), or None (ad-hoc).
pub fn check_for_token(st: &AppState, task: &str, subject: &str, intent: Option<&str>, now: u64) -> Result<Option<u64>, OAuthError> {
    match st.store.task(task) {
        Some(t) => {
            // Binding first: a subject the task is not bound to learns nothing about it.
            if !t.subjects.iter().any(|s| s == subject) {
                return Err(OAuthError::refused("task_not_bound", "task not bound to this subject"));
            }
            match t.state(now) {
                TaskState::Ended => return Err(OAuthError::refused("task_ended", "task ended")),
                TaskState::Expired => return Err(OAuthError::refused("task_expired", "task expired")),
                TaskState::Active => {}
            }
            if st.store.task_revoked_for(task, subject) {
                return Err(OAuthError::refused("task_ended", "task ended"));
            }
            if !t.intents.is_empty() && !intent.is_some_and(|i| t.intents.iter().any(|x| x == i)) {
                return Err(OAuthError::refused("intent_not_in_task", "intent not in task"));
            }
            Ok(Some(t.expires_at))
        }
        None => {
            // Ids of the minter's shape are never ad-hoc names: an unknown (or
            // purged) issued id stays unknown whatever the configuration.
            if st.config.tasks.require_registered || task.starts_with(values::TASK_ID_PREFIX) {
                return Err(OAuthError::refused("task_unknown", "task unknown"));
            }
            if st.store.task_revoked_for(task, subject) {
                return Err(OAuthError::refused("task_ended", "task ended"));
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TasksConfig {
        TasksConfig::default()
    }

    #[test]
    fn create_body_is_validated() {
        let ok = parse_create(br#"{"subjects":["spiffe://td/agent/a1","spiffe://td/agent/a1"],"intents":["ticket.read"],"ttl_s":600,"label":"CASE-7"}"#, &cfg());
        assert_eq!(
            ok.ok(),
            Some(NewTask {
                subjects: vec!["spiffe://td/agent/a1".into()],
                intents: vec!["ticket.read".into()],
                ttl_s: 600,
                label: Some("CASE-7".into())
            })
        );
        let dflt = parse_create(br#"{"subjects":["spiffe://td/a"]}"#, &cfg()).ok().map(|t| (t.ttl_s, t.intents.len()));
        assert_eq!(dflt, Some((3600, 0)));
        for bad in [
            &br#"{"subjects":[]}"#[..],
            br#"{"intents":["x"]}"#,
            br#"{"subjects":["spiffe://td/a"],"ttl_s":0}"#,
            br#"{"subjects":["spiffe://td/a"],"ttl_s":86401}"#,
            br#"{"subjects":["spiffe://td/a"],"label":"two words"}"#,
            br#"{"subjects":["spiffe://td/a"],"intents":["a\nb"]}"#,
            br#"{"subjects":["spiffe://td/a\u0000"]}"#,
            br#"{"subjects":["spiffe://td/a"],"id":"tsk_chosen_by_caller"}"#,
            br#"[1]"#,
        ] {
            assert!(parse_create(bad, &cfg()).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let many: Vec<String> = (0..17).map(|i| format!("spiffe://td/a{i}")).collect();
        let body = serde_json::json!({"subjects": many}).to_string();
        assert!(parse_create(body.as_bytes(), &cfg()).is_err());
        let many: Vec<String> = (0..33).map(|i| format!("i{i}")).collect();
        let body = serde_json::json!({"subjects": ["spiffe://td/a"], "intents": many}).to_string();
        assert!(parse_create(body.as_bytes(), &cfg()).is_err());
    }

    #[test]
    fn ids_are_issued_shape_and_unique() {
        let a = new_id();
        assert!(values::is_issued_task_id(&a), "{a}");
        assert_ne!(a, new_id());
    }
}
