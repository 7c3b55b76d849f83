//! Open connections: the cap (`limits.max_connections`), what happens at it, the counters
//! `/healthz` reports, and giving memory back after a flood of connections.
//!
//! A connection is *pending* from accept until its first request head is in; then it is
//! *started*. At the cap, a new connection closes the oldest pending one (a client that has
//! not managed to send one request head is the cheapest to lose, and a slow-loris flood
//! only ever evicts its own kind), so a well-behaved client still gets in while slow clients
//! hold every slot. When every open connection is started, the new one is closed at once.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Connections that closed since the last trim, past which freed memory is handed back.
const TRIM_AFTER_CLOSED: u64 = 256;

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// Pending connections, oldest first: id → its eviction signal.
    pending: BTreeMap<u64, Arc<Notify>>,
    started: HashSet<u64>,
}

impl Inner {
    fn open(&self) -> usize {
        self.pending.len() + self.started.len()
    }
}

pub struct Conns {
    pub max: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_body_bytes: usize,
    inner: Mutex<Inner>,
    accepted: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    header_timeouts: AtomicU64,
    body_timeouts: AtomicU64,
    closed: AtomicU64,
    closed_at_last_trim: AtomicU64,
}

/// One admitted connection; dropping it frees its place.
pub struct Slot {
    conns: Arc<Conns>,
    id: u64,
    evict: Arc<Notify>,
}

impl Slot {
    /// Completes when this connection is evicted to make room for a new one.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }

    /// The first request head is in: the connection can no longer be evicted.
    pub fn started(&self) {
        let mut g = self.conns.lock();
        if g.pending.remove(&self.id).is_some() {
            g.started.insert(self.id);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut g = self.conns.lock();
            g.pending.remove(&self.id);
            g.started.remove(&self.id);
        }
        self.conns.closed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Conns {
    pub fn new(config: &crate::config::MinterConfig) -> Conns {
        let l = &config.limits;
        Conns::with(l.max_connections, Duration::from_millis(l.header_read_timeout_ms), Duration::from_millis(l.body_read_timeout_ms), config.max_body_bytes)
    }

    pub fn with(max: usize, header_read_timeout: Duration, body_read_timeout: Duration, max_body_bytes: usize) -> Conns {
        Conns {
            max,
            header_read_timeout,
            body_read_timeout,
            max_body_bytes,
            inner: Mutex::new(Inner::default()),
            accepted: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
            body_timeouts: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            closed_at_last_trim: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection, or `None`: close it at once.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut g = self.lock();
        if g.open() >= self.max {
            match g.pending.pop_first() {
                Some((_, victim)) => {
                    victim.notify_one();
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let id = g.next_id;
        g.next_id += 1;
        let evict = Arc::new(Notify::new());
        g.pending.insert(id, evict.clone());
        drop(g);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Some(Slot { conns: self.clone(), id, evict })
    }

    pub fn header_timed_out(&self) {
        self.header_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn body_timed_out(&self) {
        self.body_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn open(&self) -> usize {
        self.lock().open()
    }

    /// What `/healthz` reports under `connections`.
    pub fn to_json(&self) -> serde_json::Value {
        let (open, pending) = {
            let g = self.lock();
            (g.open(), g.pending.len())
        };
        serde_json::json!({
            "open": open,
            "pending": pending,
            "max": self.max,
            "accepted": self.accepted.load(Ordering::Relaxed),
            "evicted": self.evicted.load(Ordering::Relaxed),
            "refused": self.refused.load(Ordering::Relaxed),
            "header_timeouts": self.header_timeouts.load(Ordering::Relaxed),
            "body_timeouts": self.body_timeouts.load(Ordering::Relaxed),
        })
    }

    /// Whether enough connections closed since the last trim that freed memory is worth
    /// handing back; marks the trim as done.
    pub fn should_trim(&self) -> bool {
        let closed = self.closed.load(Ordering::Relaxed);
        let last = self.closed_at_last_trim.load(Ordering::Relaxed);
        if closed.saturating_sub(last) < TRIM_AFTER_CLOSED {
            return false;
        }
        self.closed_at_last_trim.store(closed, Ordering::Relaxed);
        true
    }
}

/// Hands freed heap memory back to the OS. glibc keeps what thousands of closed connections
/// freed in its arenas (one per worker thread) and returns little of it by itself: after a
/// flood of slow clients the minter would stay at its peak size. `malloc_trim` releases the
/// free pages of every arena. Other C libraries: nothing to do.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists; it is
    // thread-safe (it takes each arena's lock).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn conns(max: usize) -> Arc<Conns> {
        Arc::new(Conns::with(max, Duration::from_secs(1), Duration::from_secs(1), 1024))
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_pending_connection_makes_room_and_started_ones_never_do() {
        let c = conns(3);
        let a = c.admit().unwrap();
        let b = c.admit().unwrap();
        let d = c.admit().unwrap();
        b.started();
        // Full: the oldest pending one (a) is evicted for the new one.
        let e = c.admit().unwrap();
        tokio::time::timeout(Duration::from_secs(1), a.evicted()).await.unwrap();
        assert_eq!(c.open(), 3);
        // Its slot was given away: dropping it frees nothing more.
        drop(a);
        assert_eq!(c.open(), 3);
        d.started();
        e.started();
        // Every open connection has started: the new one is refused.
        assert!(c.admit().is_none());
        let j = c.to_json();
        assert_eq!((j["open"].as_u64(), j["evicted"].as_u64(), j["refused"].as_u64(), j["accepted"].as_u64()), (Some(3), Some(1), Some(1), Some(4)));
        drop(b);
        assert_eq!(c.open(), 2);
        assert!(c.admit().is_some());
    }
}
