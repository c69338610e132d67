//! Keeping resident memory small: glibc's allocator tuned at start, free heap and stack pages
//! handed back while serving, and the code pages only start-up and the first scrapes needed
//! dropped. What memory the collectors keep is their own business; this only shapes how it is held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// glibc's tunables, read once by the loader when a process starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TUNABLES: &str = "GLIBC_TUNABLES";

/// The tunables [`drop_thread_caches`] starts the process with.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const NO_THREAD_CACHES: &str = "glibc.malloc.tcache_count=0";

/// Set on the restart [`drop_thread_caches`] makes, so the restarted process knows
/// [`TUNABLES`] is its own and not the operator's.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const RESTARTED: &str = "CLUSTERWATCH_MALLOC_RESTARTED";

/// What [`drop_thread_caches`] does, from what the environment holds.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[derive(Debug, PartialEq, Eq)]
enum CachesPlan {
    /// Nothing set: start again with the caches off.
    Restart,
    /// This is that restart: take both variables out of the environment.
    Restarted,
    /// The operator set glibc's tunables: theirs win, as they are.
    Leave,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn caches_plan(tunables_set: bool, restarted: bool) -> CachesPlan {
    if restarted {
        CachesPlan::Restarted
    } else if tunables_set {
        CachesPlan::Leave
    } else {
        CachesPlan::Restart
    }
}

/// Turns off glibc's per-thread caches of freed small blocks (tcache); call first thing in
/// `main`, before any other thread exists. Each thread that frees memory keeps up to seven
/// blocks of every small size for itself; those count as in use, so `malloc_trim` cannot
/// hand back the pages they sit on nor merge them with their free neighbours. tokio's
/// blocking pool keeps a dozen and more threads alive, each cache filling over time with
/// blocks from all over the heap: in the soak that held the heap at 3 MiB and growing
/// where 1.6 MiB were enough without the caches (the live heap is about 0.5 MiB).
///
/// Only the loader reads that setting, from `GLIBC_TUNABLES` at start, so the executable
/// starts itself again (same process, same arguments) with it set, and the restarted
/// process takes it out of its environment: hooks and programs it runs see the environment
/// it was given. An operator's own `GLIBC_TUNABLES` wins; where the restart fails (no
/// `/proc`), the process goes on with the caches.
pub fn drop_thread_caches() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    match caches_plan(
        std::env::var_os(TUNABLES).is_some(),
        std::env::var_os(RESTARTED).is_some(),
    ) {
        CachesPlan::Restart => {
            use std::os::unix::process::CommandExt;
            let mut args = std::env::args_os();
            let arg0 = args.next().unwrap_or_default();
            // Started from /proc/self/exe, the process would be named "exe" (`ps`, `pgrep`,
            // /proc/PID/comm): its name goes along and is set again after the restart.
            let name = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
            // The running executable itself, even if its file was replaced meanwhile; exec
            // only returns on failure, and then nothing has changed.
            let _ = std::process::Command::new("/proc/self/exe")
                .arg0(arg0)
                .args(args)
                .env(TUNABLES, NO_THREAD_CACHES)
                .env(RESTARTED, name.trim_end_matches('\n'))
                .exec();
        }
        CachesPlan::Restarted => {
            if let Some(name) = std::env::var_os(RESTARTED) {
                set_thread_name(&name);
            }
            // No other thread exists yet, so nothing reads the environment meanwhile.
            std::env::remove_var(TUNABLES);
            std::env::remove_var(RESTARTED);
        }
        CachesPlan::Leave => {}
    }
}

/// Names the calling thread (the main thread's name is the process's); an empty name or one
/// with a NUL byte is left alone. The kernel keeps the first 15 bytes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thread_name(name: &std::ffi::OsStr) {
    use std::os::unix::ffi::OsStrExt;
    if name.is_empty() {
        return;
    }
    let Ok(name) = std::ffi::CString::new(name.as_bytes()) else {
        return;
    };
    // SAFETY: PR_SET_NAME reads a NUL-terminated string that lives across the call.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
    }
}

/// How often free heap pages are handed back while serving, and blocking threads' unused
/// stack at most.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// How soon after a scrape free heap pages are handed back. A scrape's short-lived blocks
/// leave free pages all over the heap, resident until a trim; one trim costs about 0.3 ms
/// of CPU (a 1.8 MiB heap), so under ten scrapes a second it runs at most this often, not
/// after each of them.
const TRIM_AFTER_SCRAPE: Duration = Duration::from_secs(2);

/// Set by every scrape, cleared by the trim that follows it.
static SCRAPED_SINCE_TRIM: AtomicBool = AtomicBool::new(false);

/// How long after the first scrape its first-use set-up code is dropped (once its answer is
/// on its way).
const AFTER_FIRST_SCRAPE: Duration = Duration::from_millis(500);

/// Tunes glibc malloc; call first thing in `main`, before any other thread exists.
///
/// - One arena: glibc gives a thread that meets contention its own arena, up to eight per
///   core, and each keeps the pages of its own high-water mark and its own free holes; with
///   blocking threads coming and going, every extra arena warms up over hours and
///   resident memory creeps up although the live heap does not grow. An exporter's threads
///   mostly wait, so sharing one heap costs no measurable CPU per scrape.
/// - Blocks of 128 KiB and more mapped on their own, always: glibc otherwise raises that
///   threshold to the largest block freed so far (a stats file's parse, a large scrape), after
///   which such blocks stay in the heap, where freeing them rarely gives pages back and
///   growing them copies.
///
/// The operator's `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` win.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (variable, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 1),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 128 * 1024),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mallopt only sets a tunable; called before other threads exist.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

/// Once serving: drops start-up's code pages now and hands free heap pages back within
/// [`TRIM_AFTER_SCRAPE`] of a scrape, and every [`TRIM_EVERY`] anyway. Needs a tokio runtime.
pub fn spawn_upkeep() {
    tokio::spawn(async {
        release_file_pages();
        let mut tick = tokio::time::interval(TRIM_AFTER_SCRAPE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut trimmed = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let scraped = SCRAPED_SINCE_TRIM.swap(false, Ordering::Relaxed);
            if trim_due(scraped, trimmed.elapsed()) {
                trim_heap();
                trimmed = tokio::time::Instant::now();
            }
        }
    });
}

/// Whether free heap pages are handed back now: after a scrape, or when the last trim is
/// [`TRIM_EVERY`] old (webhooks, reloads and connections allocate too).
fn trim_due(scraped_since_trim: bool, since_trim: Duration) -> bool {
    scraped_since_trim || since_trim >= TRIM_EVERY
}

/// Called by the `/metrics` handler: the first scrape runs every collector's first-use
/// set-up (system tables, compiled patterns, connections), code no later scrape needs; it
/// is dropped shortly after. Every scrape asks for a trim soon after. Needs a tokio runtime.
pub fn scraped() {
    SCRAPED_SINCE_TRIM.store(true, Ordering::Relaxed);
    static FIRST: AtomicBool = AtomicBool::new(true);
    if FIRST.swap(false, Ordering::Relaxed) {
        tokio::spawn(async {
            tokio::time::sleep(AFTER_FIRST_SCRAPE).await;
            release_file_pages();
        });
    }
}

/// Gives the free pages inside the heap back to the system: glibc only returns the top of
/// the heap by itself, so a free hole below a live block otherwise stays resident.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's own locks; it frees nothing that is in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Hands back the pages of the calling thread's stack below the caller's frame, at most once
/// per [`TRIM_EVERY`] per thread; called by blocking-pool threads between calls. Ten scrapes
/// a second keep every pool thread alive, and each keeps resident the deepest its stack has
/// ever been, which creeps up as rarer paths (a reconnect, an error) run on it in turn.
/// What the next calls need comes back zeroed at the next touch.
pub fn release_unused_stack() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::cell::Cell;
        use std::time::Instant;
        thread_local! {
            static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
        }
        let now = Instant::now();
        if LAST
            .get()
            .is_some_and(|last| now.duration_since(last) < TRIM_EVERY)
        {
            return;
        }
        LAST.set(Some(now));
        let Some(lowest) = stack_lowest_address() else {
            return;
        };
        // An address in this frame; what the madvise call itself pushes stays well within
        // the margin below it.
        let here = std::ptr::addr_of!(now) as usize;
        // SAFETY: sysconf only reads a constant of the system.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let start = lowest.next_multiple_of(page);
        let end = here.saturating_sub(16 * 1024) & !(page - 1);
        if end > start {
            // SAFETY: [start, end) lies within this thread's own stack (above its guard
            // page) and below every live frame of it, so no one uses those pages: a later
            // push faults them in again, zeroed, as on first use.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

/// The lowest usable address of the calling thread's stack (above its guard page).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn stack_lowest_address() -> Option<usize> {
    // SAFETY: the attribute object is initialised by pthread_getattr_np before it is read
    // and destroyed once; both calls only read this thread's descriptor.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut address: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let ok = libc::pthread_attr_getstack(&attr, &mut address, &mut size) == 0;
        libc::pthread_attr_destroy(&mut attr);
        ok.then_some(address as usize)
    }
}

/// Drops this process's mapped pages of files (the executable, shared libraries) that are
/// still the file's, read-only and never written: start-up code (argument and configuration
/// parsing, TLS and runtime set-up) is megabytes the kernel mapped in 64 KiB runs and would
/// keep resident for the life of the process. What scrapes need comes back from the page
/// cache at the next touch. Pages written at load (relocations) are anonymous: left alone.
pub fn release_file_pages() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    for (range, anonymous) in read_only_file_mappings(&smaps) {
        if anonymous != 0 {
            continue;
        }
        // SAFETY: a read-only file mapping that holds no anonymous (copied-on-write) page is
        // the file's content as the page cache has it: MADV_DONTNEED only makes the next
        // access fault it in again from there, as the first access did. A running
        // executable cannot be written (ETXTBSY); a replaced file keeps its old inode while
        // mapped.
        unsafe {
            libc::madvise(
                range.start as *mut libc::c_void,
                range.end - range.start,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// The address ranges of read-only mappings of files in `/proc/PID/smaps` text, with their
/// `Anonymous:` size in kB.
fn read_only_file_mappings(smaps: &str) -> Vec<(std::ops::Range<usize>, u64)> {
    let mut out: Vec<(std::ops::Range<usize>, u64)> = Vec::new();
    let mut current: Option<std::ops::Range<usize>> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                continue;
            };
            let perms = words.next().unwrap_or_default();
            let file = words.nth(3).unwrap_or_default();
            current = (file.starts_with('/') && !perms.contains('w')).then_some(start..end);
        } else if first == "Anonymous:" {
            if let Some(range) = current.take() {
                let kb = words
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(u64::MAX);
                out.push((range, kb));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_file_mappings_are_listed() {
        let smaps = "\
5555a000-5555c000 r--p 00000000 fd:01 42 /usr/bin/clusterwatch
Rss:                   8 kB
Anonymous:             0 kB
5555c000-5556c000 r-xp 00002000 fd:01 42 /usr/bin/clusterwatch
Anonymous:             0 kB
5556c000-5556d000 r--p 00012000 fd:01 42 /usr/bin/clusterwatch
Anonymous:             4 kB
5556d000-5556e000 rw-p 00013000 fd:01 42 /usr/bin/clusterwatch
Anonymous:             4 kB
7f00000000-7f00001000 r-xp 00000000 fd:01 7 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f00001000-7f00002000 rw-p 00000000 00:00 0
Anonymous:             4 kB
7ffc0000-7ffc1000 r-xp 00000000 00:00 0                          [vdso]
Anonymous:             0 kB
";
        assert_eq!(
            read_only_file_mappings(smaps),
            [
                (0x5555a000..0x5555c000, 0),
                (0x5555c000..0x5556c000, 0),
                (0x5556c000..0x5556d000, 4),
                (0x7f00000000..0x7f00001000, 0)
            ]
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn thread_caches_are_dropped_once_and_never_against_the_operator() {
        assert_eq!(caches_plan(false, false), CachesPlan::Restart);
        assert_eq!(caches_plan(true, true), CachesPlan::Restarted);
        assert_eq!(caches_plan(true, false), CachesPlan::Leave);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_name_carried_over_a_restart_is_set_again() {
        std::thread::spawn(|| {
            let comm = || std::fs::read_to_string("/proc/thread-self/comm").unwrap();
            set_thread_name("clusterwatch".as_ref());
            assert_eq!(comm(), "clusterwatch\n");
            set_thread_name("".as_ref());
            assert_eq!(comm(), "clusterwatch\n");
        })
        .join()
        .unwrap();
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn releasing_unused_stack_keeps_the_thread_working() {
        fn deep(n: u64) -> u64 {
            let buffer = std::hint::black_box([n; 512]);
            if n == 0 {
                buffer[0]
            } else {
                deep(n - 1) + buffer[511]
            }
        }
        fn resident(page: usize) -> bool {
            let mut state = 0u8;
            // SAFETY: mincore only reports on a page of this thread's own stack mapping.
            let ok = unsafe { libc::mincore(page as *mut libc::c_void, 1, &mut state) } == 0;
            ok && state & 1 == 1
        }
        std::thread::spawn(|| {
            let frame = 0u8;
            // A page the recursion below uses, far below this frame.
            // SAFETY: sysconf only reads a constant of the system.
            let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
            let page = (std::ptr::addr_of!(frame) as usize - 128 * 1024) & !(size - 1);
            assert_eq!(deep(64), (1..=64).sum::<u64>());
            assert!(resident(page));
            release_unused_stack();
            assert!(!resident(page));
            // The pages handed back come back zeroed on the next touch, and hold values again.
            assert_eq!(deep(64), (1..=64).sum::<u64>());
            assert!(resident(page));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_heap_is_trimmed_after_a_scrape_and_every_ten_seconds_regardless() {
        assert!(trim_due(true, TRIM_AFTER_SCRAPE));
        assert!(!trim_due(false, TRIM_AFTER_SCRAPE));
        assert!(!trim_due(false, TRIM_EVERY - TRIM_AFTER_SCRAPE));
        assert!(trim_due(false, TRIM_EVERY));
    }

    #[test]
    fn releasing_file_pages_keeps_the_process_working() {
        release_file_pages();
        // Code and read-only data come back from the file on the next touch.
        assert_eq!(format!("{:?}", Some(42)), "Some(42)");
    }
}
