//! Polling for a little while before an NBD connection's thread sleeps.
//!
//! A client that keeps one request in flight (a database's commit, `dd`, a VM's synchronous
//! write) waits for each reply before it sends the next request. Every such round trip puts the
//! connection's thread to sleep and wakes it again. On a VM whose guest does not poll before it
//! halts an idle vCPU (`haltpoll.guest_halt_poll_ns=0`, as on the machines we measure on), that
//! wake-up is an IPI and a VM exit and entry: tens of microseconds, more than the 4 KiB write
//! itself. So before the thread's runtime parks, it polls the sockets it waits on (the NBD
//! socket and its lanes to remote replicas) for up to a short window, and goes on at once when
//! one of them becomes readable or another thread has queued a task for it.
//!
//! The window is adaptive, per thread, like the kernel's halt-polling: it doubles while the
//! thread keeps being woken soon after the window, halves after long sleeps, and drops to zero
//! on an idle connection, so an idle cluster stays idle. Polling only happens
//! - while at most one request is in flight: with more, the client is bound by throughput and
//!   the CPU is better left to the replicas;
//! - not while the thread waits for work done by another thread — a job on an I/O thread, or a
//!   reply on a connection read by another thread ([`blind`]): that thread needs the CPU;
//! - on at most half of the process's CPUs at once (at least one).
//!
//! A wake the poll cannot see is only delayed, never lost, and by one window at most: the
//! runtime still parks afterwards and finds it. Those are wakes of the connection's main loop
//! from another thread (the engine closing), timers, and waits for a socket to become writable.
//!
//! Everything here is per thread: only threads that called [`enable`] poll, and every other
//! function is a no-op elsewhere.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The longest a connection's thread polls before it sleeps (`zebu agent --busy-poll-us`).
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(50);
/// The largest window accepted: a wake the poll cannot see waits this long at most.
pub const MAX_WINDOW: Duration = Duration::from_millis(1);

thread_local! {
    static POLLER: RefCell<Option<Poller>> = const { RefCell::new(None) };
}

/// Ids of pollers and of watched sockets, unique in the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Threads of this process polling right now.
static POLLING: AtomicUsize = AtomicUsize::new(0);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// How many threads of the process may poll at once: half the CPUs, at least one. Each poller
/// holds a CPU; the client and the replicas need the others.
fn max_pollers() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() / 2)
            .unwrap_or(1)
            .max(1)
    })
}

struct Poller {
    /// Tells this thread's guards from another thread's.
    id: u64,
    /// The configured maximum window.
    max: Duration,
    /// The current window: how long the next park polls.
    window: Duration,
    /// Sockets to poll, by registration id.
    fds: Vec<(u64, RawFd)>,
    /// Waits in progress whose wake-up does not show in `fds`.
    blind: usize,
    /// Frontend requests in flight.
    requests: usize,
    /// The park in progress: when it began, and whether it polled.
    park: Option<(Instant, bool)>,
    /// Parks that polled, and those of them a socket or a woken task ended.
    polls: u64,
    caught: u64,
}

/// A sleep up to this many maximum windows long counts as short: the wait ended soon after the
/// window, and waking from the sleep (tens of µs on a VM) is part of what was measured. Longer
/// sleeps count as idle.
const SHORT_FACTOR: u32 = 2;

impl Poller {
    /// Whether this park should poll: there is a window, something to poll, and the client
    /// waits for at most one reply.
    fn should_poll(&self) -> bool {
        !self.window.is_zero() && !self.fds.is_empty() && self.blind == 0 && self.requests <= 1
    }

    /// Poll every socket until one is readable or another thread has woken a task of this
    /// thread's runtime (`woken`): true; or until the window has passed: false.
    fn poll(&self, woken: &dyn Fn() -> bool) -> bool {
        let mut set: Vec<libc::pollfd> = self
            .fds
            .iter()
            .map(|&(_, fd)| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let deadline = Instant::now() + self.window;
        loop {
            // SAFETY: `set` is a valid array of `set.len()` pollfd entries; a zero timeout
            // never blocks. A closed descriptor reports POLLNVAL, which only ends the poll.
            let n = unsafe { libc::poll(set.as_mut_ptr(), set.len() as libc::nfds_t, 0) };
            if n != 0 || woken() {
                // Ready, or an error (EINTR, ENOMEM): either way, stop and let the runtime look.
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // Let any thread waiting for this CPU run first (a replica thread, the client):
            // with more busy threads than CPUs, a poller that only spins holds up the very
            // reply it waits for. With nothing else runnable this returns at once.
            // SAFETY: sched_yield has no arguments and no memory effects.
            unsafe { libc::sched_yield() };
        }
    }

    /// Adapt the window to a park that ended without the poll catching its wake: after a short
    /// sleep, double it (from zero: a quarter of the maximum); after a long one that polled in
    /// vain, halve it, and below a quarter of the maximum, stop polling.
    fn adapt(&mut self, slept: Duration, polled: bool) {
        let floor = self.max / 4;
        if slept <= self.max * SHORT_FACTOR {
            if polled || self.window.is_zero() {
                self.window = (self.window * 2).max(floor).min(self.max);
            }
        } else if polled {
            self.window /= 2;
            if self.window < floor {
                self.window = Duration::ZERO;
            }
        }
    }
}

/// Make this thread poll before it sleeps, for at most `max` (zero: never; capped at
/// [`MAX_WINDOW`]). Call it at the start of a thread that serves one frontend connection, and
/// give its runtime the hooks [`before_park`] and [`after_unpark`].
pub fn enable(max: Duration) {
    let max = max.min(MAX_WINDOW);
    if max.is_zero() {
        return;
    }
    POLLER.with(|p| {
        *p.borrow_mut() = Some(Poller {
            id: next_id(),
            max,
            window: max,
            fds: Vec::new(),
            blind: 0,
            requests: 0,
            park: None,
            polls: 0,
            caught: 0,
        })
    });
}

/// Run `f` on this thread's poller, if it has one (and its thread-locals are still there).
fn with_poller<T>(f: impl FnOnce(&mut Poller) -> T) -> Option<T> {
    POLLER
        .try_with(|p| p.try_borrow_mut().ok()?.as_mut().map(f))
        .ok()
        .flatten()
}

/// The runtime's `on_thread_park` hook: poll for up to the window (if this park qualifies).
pub fn before_park() {
    with_poller(|p| {
        let start = Instant::now();
        let mut polled = p.should_poll();
        if polled && POLLING.fetch_add(1, Ordering::AcqRel) >= max_pollers() {
            // Enough threads of this process poll already.
            POLLING.fetch_sub(1, Ordering::AcqRel);
            polled = false;
        }
        let caught = polled && {
            // Tasks woken from other threads wait in the runtime's global queue.
            let queue = tokio::runtime::Handle::try_current()
                .ok()
                .map(|h| h.metrics());
            let caught = p.poll(&|| queue.as_ref().is_some_and(|m| m.global_queue_depth() > 0));
            POLLING.fetch_sub(1, Ordering::AcqRel);
            caught
        };
        p.polls += u64::from(polled);
        p.caught += u64::from(caught);
        // A caught wake keeps the window as it is.
        p.park = (!caught).then_some((start, polled));
    });
}

/// The runtime's `on_thread_unpark` hook: adapt the window to how long the thread slept.
pub fn after_unpark() {
    with_poller(|p| {
        if let Some((start, polled)) = p.park.take() {
            p.adapt(start.elapsed(), polled);
        }
    });
}

/// A socket polled before this thread sleeps, for as long as this is alive. Drop it on the
/// same thread (a socket read by a task of this thread's runtime is).
pub struct Watch {
    id: Option<u64>,
}

impl Watch {
    /// A copyable reference to this registration, for the socket's users.
    pub fn token(&self) -> WatchToken {
        WatchToken { id: self.id }
    }
}

/// Refers to a [`Watch`] without keeping it alive.
#[derive(Debug, Clone, Copy)]
pub struct WatchToken {
    id: Option<u64>,
}

impl WatchToken {
    /// Whether the socket is polled by the calling thread: a wait for it is then in sight of
    /// the poll.
    pub fn is_here(&self) -> bool {
        self.id
            .is_some_and(|id| with_poller(|p| p.fds.iter().any(|&(i, _)| i == id)).unwrap_or(false))
    }
}

/// Poll `fd` before this thread sleeps (no-op on a thread that does not poll).
pub fn watch(fd: RawFd) -> Watch {
    let id = with_poller(|p| {
        let id = next_id();
        p.fds.push((id, fd));
        id
    });
    Watch { id }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            with_poller(|p| p.fds.retain(|&(i, _)| i != id));
        }
    }
}

/// A count on this thread's poller, undone when the guard drops — on this thread only: a guard
/// dropped elsewhere changes nothing.
struct Counted {
    poller: Option<u64>,
    field: fn(&mut Poller) -> &mut usize,
}

impl Counted {
    fn new(field: fn(&mut Poller) -> &mut usize) -> Counted {
        let poller = with_poller(|p| {
            *field(p) += 1;
            p.id
        });
        Counted { poller, field }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(id) = self.poller {
            with_poller(|p| {
                if p.id == id {
                    let n = (self.field)(p);
                    *n = n.saturating_sub(1);
                }
            });
        }
    }
}

/// A wait whose wake-up the poll cannot see (a job on an I/O thread, a reply read by another
/// thread): while one is alive, this thread sleeps without polling.
pub struct Blind {
    _count: Counted,
}

/// Mark a wait that the poll cannot see, until the guard drops.
pub fn blind() -> Blind {
    Blind {
        _count: Counted::new(|p| &mut p.blind),
    }
}

/// One frontend request in flight, until the guard drops.
pub struct Request {
    _count: Counted,
}

/// Count a frontend request in flight on this thread.
pub fn request() -> Request {
    Request {
        _count: Counted::new(|p| &mut p.requests),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;

    /// Tests that poll take turns: the process-wide cap on pollers would refuse a second one.
    static TURN: Mutex<()> = Mutex::new(());

    fn state() -> (Duration, u64, u64) {
        with_poller(|p| (p.window, p.polls, p.caught)).unwrap()
    }

    fn on_thread(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(f).join().unwrap();
    }

    #[test]
    fn off_threads_are_untouched() {
        on_thread(|| {
            let (a, _b) = UnixStream::pair().unwrap();
            let w = watch(a.as_raw_fd());
            assert!(!w.token().is_here());
            let _b = blind();
            let _r = request();
            before_park();
            after_unpark();
            POLLER.with(|p| assert!(p.borrow().is_none()));
        });
    }

    #[test]
    fn a_readable_socket_ends_the_poll_at_once() {
        let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        on_thread(|| {
            enable(MAX_WINDOW);
            let (a, mut b) = UnixStream::pair().unwrap();
            let w = watch(a.as_raw_fd());
            assert!(w.token().is_here());
            b.write_all(b"x").unwrap();
            before_park();
            after_unpark();
            assert_eq!(
                state(),
                (MAX_WINDOW, 1, 1),
                "polled once, caught it, window kept"
            );
        });
    }

    #[test]
    fn a_task_woken_from_another_thread_ends_the_poll() {
        let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        on_thread(|| {
            enable(MAX_WINDOW);
            let (a, _b) = UnixStream::pair().unwrap();
            let _w = watch(a.as_raw_fd());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(before_park)
                .on_thread_unpark(after_unpark)
                .build()
                .unwrap();
            // The other thread sends while the runtime polls (it is the only poller: the tests
            // that poll take turns). On a loaded machine the sender may not run within the
            // window, so up to 100 rounds, each with the whole window again (a miss shrinks it).
            for _ in 0..100 {
                with_poller(|p| p.window = p.max).unwrap();
                let got = rt.block_on(async {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let task = tokio::spawn(rx);
                    std::thread::spawn(move || {
                        let t = Instant::now();
                        while POLLING.load(Ordering::Acquire) == 0
                            && t.elapsed() < Duration::from_millis(20)
                        {
                            std::hint::spin_loop();
                        }
                        let _ = tx.send(7);
                    });
                    task.await.unwrap().unwrap()
                });
                assert_eq!(got, 7);
                if state().2 > 0 {
                    return;
                }
            }
            panic!("no poll ended by the woken task: {:?}", state());
        });
    }

    #[test]
    fn blind_waits_and_busy_clients_sleep_without_polling() {
        let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        on_thread(|| {
            enable(MAX_WINDOW);
            let (a, _b) = UnixStream::pair().unwrap();
            let _w = watch(a.as_raw_fd());
            {
                let _blind = blind();
                before_park();
                after_unpark();
            }
            {
                let (_r1, _r2) = (request(), request());
                before_park();
                after_unpark();
            }
            // Checked before the polling park: that one may shrink the window if this thread is
            // preempted while it polls (a loaded CI machine), the others must not touch it.
            let (window, polls, _) = state();
            assert_eq!(polls, 0, "a blind or busy park polled");
            assert_eq!(
                window, MAX_WINDOW,
                "a park that does not poll changed the window"
            );
            // One request in flight still polls.
            let _r = request();
            before_park();
            after_unpark();
            let (_, polls, _) = state();
            assert_eq!(polls, 1, "only the park with one request in flight polled");
        });
    }

    #[test]
    fn guards_dropped_on_another_thread_change_nothing_there() {
        on_thread(|| {
            enable(MAX_WINDOW);
            let guards = (blind(), request());
            on_thread(move || {
                enable(MAX_WINDOW);
                let _mine = request();
                drop(guards);
                assert_eq!(with_poller(|p| (p.blind, p.requests)), Some((0, 1)));
            });
            assert_eq!(with_poller(|p| (p.blind, p.requests)), Some((1, 1)));
        });
    }

    #[test]
    fn the_window_shrinks_to_zero_when_idle_and_grows_back_when_busy() {
        let max = Duration::from_micros(400);
        let mut p = Poller {
            id: 0,
            max,
            window: max,
            fds: Vec::new(),
            blind: 0,
            requests: 0,
            park: None,
            polls: 0,
            caught: 0,
        };
        let long = max * SHORT_FACTOR + Duration::from_micros(1);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let polled = !p.window.is_zero();
            p.adapt(long, polled);
            seen.push(p.window);
        }
        assert_eq!(seen, [max / 2, max / 4, Duration::ZERO, Duration::ZERO]);
        // Short sleeps again: a quarter first, then doubling up to the maximum.
        let mut seen = Vec::new();
        for _ in 0..4 {
            let polled = !p.window.is_zero();
            p.adapt(max * SHORT_FACTOR, polled);
            seen.push(p.window);
        }
        assert_eq!(seen, [max / 4, max / 2, max, max]);
        // A long sleep that did not poll (a busy client, a blind wait) changes nothing.
        p.adapt(long * 100, false);
        assert_eq!(p.window, max);
    }

    #[test]
    fn a_dropped_watch_leaves_the_poll_set() {
        on_thread(|| {
            enable(MAX_WINDOW);
            let (a, _b) = UnixStream::pair().unwrap();
            let w = watch(a.as_raw_fd());
            let token = w.token();
            assert!(token.is_here());
            drop(w);
            assert!(!token.is_here());
            assert_eq!(with_poller(|p| p.fds.len()), Some(0));
        });
    }

    #[test]
    fn the_window_is_capped() {
        on_thread(|| {
            enable(Duration::from_secs(60));
            assert_eq!(state().0, MAX_WINDOW);
        });
    }
}
