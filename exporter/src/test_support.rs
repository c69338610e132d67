//! Helpers shared by unit tests only: judging that a process a test had killed is gone.
//! Nothing here is compiled into clusterwatch itself.

use std::time::{Duration, Instant};

/// Whether process `pid` is gone (reaped, or a zombie) within two seconds: a SIGKILLed
/// process can show as running for a moment while the kernel tears it down, so look again
/// until the deadline. `Err` carries its last `/proc/PID/stat`.
pub fn wait_gone(pid: i32) -> Result<(), String> {
    let gone = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, s)| s.trim_start().chars().next());
        (stat.is_empty() || state == Some('Z'), stat)
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (is_gone, stat) = gone();
        if is_gone {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(stat);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
