//! The destination's count of the connections it holds before the migration takes them:
//! at most [`MAX_PENDING_HANDSHAKES`] in all and [`MAX_PENDING_PER_HOST`] from one host.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{MAX_PENDING_HANDSHAKES, MAX_PENDING_PER_HOST};

/// The connections held at once, shared by the acceptor and each connection's thread.
#[derive(Default, Clone)]
pub(super) struct Pending(Arc<Mutex<Counts>>);

#[derive(Default)]
struct Counts {
    total: usize,
    per_host: HashMap<IpAddr, usize>,
}

/// One connection held, given back on drop.
pub(super) struct PendingSlot {
    pending: Pending,
    host: IpAddr,
}

impl Pending {
    /// A slot for a connection from `peer`, if neither bound is reached.
    pub(super) fn take(&self, peer: IpAddr) -> Option<PendingSlot> {
        let host = host_of(peer);
        let mut held = self.lock();
        let of_host = held.per_host.get(&host).copied().unwrap_or(0);
        if held.total >= MAX_PENDING_HANDSHAKES || of_host >= MAX_PENDING_PER_HOST {
            return None;
        }
        held.total += 1;
        held.per_host.insert(host, of_host + 1);
        Some(PendingSlot {
            pending: self.clone(),
            host,
        })
    }

    /// The counts, even after a panic elsewhere while they were held (they are updated
    /// whole).
    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut held = self.pending.lock();
        held.total -= 1;
        if let Some(of_host) = held.per_host.get_mut(&self.host) {
            *of_host -= 1;
            if *of_host == 0 {
                // Bounded by what is held, not by every host ever seen.
                held.per_host.remove(&self.host);
            }
        }
    }
}

/// The host a peer address counts against: an IPv6 peer's /64 (one host is given a whole
/// /64 and may use any address in it), an IPv4-mapped one as its IPv4 address.
fn host_of(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let [a, b, c, d, ..] = v6.segments();
                IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_gets_its_share_and_its_slots_back() {
        let pending = Pending::default();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        // Another address of the same /64, and the same IPv4 host mapped or not.
        let a_too: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let slots: Vec<_> = (0..MAX_PENDING_PER_HOST)
            .map(|n| pending.take(if n % 2 == 0 { a } else { a_too }).unwrap())
            .collect();
        assert!(pending.take(a).is_none(), "the /64's share is taken");
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let others: Vec<_> = (0..MAX_PENDING_PER_HOST)
            .map(|n| pending.take(if n % 2 == 0 { v4 } else { mapped }))
            .collect();
        assert!(others.iter().all(Option::is_some));
        assert!(pending.take(v4).is_none(), "its share taken too");
        assert!(
            pending.take("192.0.2.8".parse().unwrap()).is_none(),
            "and all {MAX_PENDING_HANDSHAKES}"
        );
        drop(slots);
        drop(others);
        let back = pending.take(a);
        assert!(back.is_some(), "given back");
        assert_eq!(pending.lock().per_host.len(), 1, "emptied hosts forgotten");
    }
}
