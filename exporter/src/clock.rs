//! Wall-clock time as the exposition writes it: seconds since the unix epoch. Deadlines use
//! tokio's monotonic `Instant` instead and never come here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the unix epoch; zero if the clock is set before 1970.
pub fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Seconds from `t` to now; zero for a time in the future (a clock step, a touched file).
pub fn age_seconds(t: SystemTime) -> f64 {
    SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
