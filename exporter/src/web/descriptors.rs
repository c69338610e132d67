//! File descriptors for the listeners: the soft `RLIMIT_NOFILE` raised to the hard one at
//! start, and each listener's connection cap sized from it so collectors, the journal and
//! the other listener always keep descriptors. Nothing here accepts or counts connections.

/// Descriptors kept back from the listeners at least: collectors' connections, the journal,
/// file watchers, hook processes' pipes, logs.
const RESERVE_MIN: u64 = 48;

/// Reserve at most, on a large limit.
const RESERVE_MAX: u64 = 1024;

/// Connections one listener keeps at most, however large the limit.
const PER_LISTENER_MAX: u64 = 4096;

/// Connections one listener keeps at least, however small the limit.
const PER_LISTENER_MIN: u64 = 4;

/// Raises the soft descriptor limit to the hard one when it is lower (one system call, never
/// made when they are equal, as under the units' `LimitNOFILE`), and returns the soft limit
/// in force.
pub fn raise_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    limit.rlim_cur
}

/// The connection cap of each of `listeners` listeners under a soft limit of `limit`
/// descriptors: what is left after the reserve, split evenly.
pub fn per_listener(limit: u64, listeners: usize) -> usize {
    let reserve = (limit / 4).clamp(RESERVE_MIN, RESERVE_MAX);
    let share = limit.saturating_sub(reserve) / (listeners.max(1) as u64);
    share.clamp(PER_LISTENER_MIN, PER_LISTENER_MAX) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_leave_a_reserve_and_split_evenly() {
        // Two listeners under 128 descriptors: 40 each, 48 kept back.
        assert_eq!(per_listener(128, 2), 40);
        assert_eq!(per_listener(1024, 2), 384);
        assert_eq!(per_listener(1024, 1), 768);
        assert_eq!(per_listener(65_536, 2), 4096);
        // Absurdly low limits still serve someone.
        assert_eq!(per_listener(16, 2), 4);
        assert!(per_listener(u64::MAX, 2) <= 4096);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let soft = raise_limit();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads into the struct passed by pointer.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(soft, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
