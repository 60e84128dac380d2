//! How many network connections the agent takes, and from whom, so that a
//! flood neither exhausts it nor keeps administrators and peers out.
//!
//! A connection is first *pending* (TCP accepted, TLS handshake not done),
//! then *established*. Pending connections cost an attacker nothing but a
//! SYN, so they have a budget of their own, much smaller than the
//! established one, and a per-address share of it. When the pending budget
//! is full, a newcomer takes the place of the oldest pending connection of
//! the address that holds the most, if that address holds more than the
//! newcomer's does: an attacker's flood then only ever pushes out its own
//! handshakes, and a client from any other address gets its turn.
//! Established connections (a valid certificate) are capped in all and per
//! address too.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

/// The limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Established connections at once.
    pub established: usize,
    /// Established connections from one address.
    pub established_per_address: usize,
    /// Connections still in their handshake, at once.
    pub pending: usize,
    /// Connections in their handshake from one address.
    pub pending_per_address: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            established: super::MAX_CONNECTIONS,
            established_per_address: 512,
            pending: 256,
            pending_per_address: 32,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Pending connections by address, oldest first: their ids and what
    /// closes them.
    pending: BTreeMap<IpAddr, VecDeque<(u64, CancellationToken)>>,
    pending_total: usize,
    established: BTreeMap<IpAddr, usize>,
    established_total: usize,
}

/// The agent's connection limits and what holds them.
#[derive(Debug, Default)]
pub struct Limits {
    budget: Budget,
    state: Mutex<State>,
}

/// A pending connection's place; dropped when its handshake ends (either
/// way). `closed` fires when a newcomer took its place.
#[derive(Debug)]
pub struct Pending {
    limits: Arc<Limits>,
    ip: IpAddr,
    id: u64,
    /// Cancelled when the connection must give up its handshake.
    pub closed: CancellationToken,
}

/// An established connection's place.
#[derive(Debug)]
pub struct Established {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Limits {
    /// Limits of `budget`.
    pub fn new(budget: Budget) -> Arc<Limits> {
        Arc::new(Limits {
            budget,
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection from `ip` to do its handshake, or none
    /// (close it at once).
    pub fn pending(self: &Arc<Self>, ip: IpAddr) -> Option<Pending> {
        let mut state = self.lock();
        let mine = state.pending.get(&ip).map_or(0, VecDeque::len);
        if mine >= self.budget.pending_per_address {
            return None;
        }
        if state.pending_total >= self.budget.pending {
            // The address holding the most, if it holds more than this one
            // would: its oldest handshake goes.
            let (victim, held) = state
                .pending
                .iter()
                .map(|(ip, queue)| (*ip, queue.len()))
                .max_by_key(|(_, held)| *held)?;
            if held <= mine + 1 {
                return None;
            }
            let queue = state.pending.get_mut(&victim)?;
            let (_, token) = queue.pop_front()?;
            if queue.is_empty() {
                state.pending.remove(&victim);
            }
            state.pending_total -= 1;
            token.cancel();
        }
        state.next += 1;
        let id = state.next;
        let closed = CancellationToken::new();
        state
            .pending
            .entry(ip)
            .or_default()
            .push_back((id, closed.clone()));
        state.pending_total += 1;
        Some(Pending {
            limits: self.clone(),
            ip,
            id,
            closed,
        })
    }

    /// A place for a connection from `ip` whose handshake succeeded, or
    /// none (close it).
    pub fn established(self: &Arc<Self>, ip: IpAddr) -> Option<Established> {
        let mut state = self.lock();
        let mine = state.established.get(&ip).copied().unwrap_or(0);
        if mine >= self.budget.established_per_address
            || state.established_total >= self.budget.established
        {
            return None;
        }
        *state.established.entry(ip).or_default() += 1;
        state.established_total += 1;
        Some(Established {
            limits: self.clone(),
            ip,
        })
    }

    /// Pending and established connections now.
    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.pending_total, state.established_total)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut state = self.limits.lock();
        let Some(queue) = state.pending.get_mut(&self.ip) else {
            return;
        };
        let before = queue.len();
        queue.retain(|(id, _)| *id != self.id);
        let removed = before - queue.len();
        if queue.is_empty() {
            state.pending.remove(&self.ip);
        }
        state.pending_total -= removed;
    }
}

impl Drop for Established {
    fn drop(&mut self) {
        let mut state = self.limits.lock();
        if let Some(n) = state.established.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                state.established.remove(&self.ip);
            }
        }
        state.established_total -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn small() -> Arc<Limits> {
        Limits::new(Budget {
            established: 4,
            established_per_address: 2,
            pending: 4,
            pending_per_address: 3,
        })
    }

    #[test]
    fn one_address_cannot_take_every_handshake_slot() {
        let limits = small();
        let flood: Vec<_> = (0..3).map(|_| limits.pending(ip(1)).unwrap()).collect();
        assert!(limits.pending(ip(1)).is_none(), "its share is 3");
        let other = limits.pending(ip(2)).unwrap();
        assert_eq!(limits.counts().0, 4);
        // Full: a newcomer from a third address pushes out the flood's
        // oldest, not the other client.
        let newcomer = limits.pending(ip(3)).unwrap();
        assert!(flood[0].closed.is_cancelled());
        assert!(!flood[1].closed.is_cancelled() && !other.closed.is_cancelled());
        assert_eq!(limits.counts().0, 4);
        drop(flood);
        let second = limits.pending(ip(3)).unwrap();
        let fourth = limits.pending(ip(4)).unwrap();
        assert_eq!(limits.counts().0, 4);
        // The address with two gives one up for a fifth ...
        let fifth = limits.pending(ip(5)).unwrap();
        assert!(newcomer.closed.is_cancelled() && !second.closed.is_cancelled());
        // ... and with one each, nobody is pushed out.
        assert!(limits.pending(ip(6)).is_none());
        drop((other, newcomer, second, fourth, fifth));
        assert_eq!(limits.counts().0, 0);
    }

    #[test]
    fn established_connections_are_capped_in_all_and_per_address() {
        let limits = small();
        let a: Vec<_> = (0..2).map(|_| limits.established(ip(1)).unwrap()).collect();
        assert!(limits.established(ip(1)).is_none());
        let b: Vec<_> = (0..2).map(|_| limits.established(ip(2)).unwrap()).collect();
        assert!(limits.established(ip(3)).is_none(), "4 in all");
        drop(a);
        assert!(limits.established(ip(3)).is_some());
        drop(b);
        assert_eq!(limits.counts().1, 0);
    }

    #[test]
    fn a_pushed_out_handshake_releases_nothing_twice() {
        let limits = small();
        let flood: Vec<_> = (0..3).map(|_| limits.pending(ip(1)).unwrap()).collect();
        let _other = limits.pending(ip(2)).unwrap();
        let _newcomer = limits.pending(ip(3)).unwrap();
        drop(flood);
        assert_eq!(limits.counts().0, 2);
    }
}
