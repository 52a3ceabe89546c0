//! Polling for a little while before an NBD connection's thread sleeps.
//!
//! A client that keeps one request in flight (a database's commit, `dd`, a VM's synchronous
//! write) waits for each reply before it sends the next request. Every such round trip puts the
//! connection's thread to sleep and wakes it again. On a VM whose guest does not poll before it
//! halts an idle vCPU (`haltpoll.guest_halt_poll_ns=0`, as on the machines we measure on), that
//! wake-up is an IPI and a VM exit and entry: tens of microseconds, more than the 4 KiB write
//! itself. So before the thread's runtime parks, it polls the sockets it waits on (the NBD
//! socket and its lanes to remote replicas) for up to a short window, and goes on at once when
//! one of them becomes readable.
//!
//! The window is adaptive, per thread, like the kernel's halt-polling: it grows while the
//! thread keeps being woken shortly after it slept, shrinks after long sleeps, and reaches zero
//! on an idle connection, so an idle cluster stays idle. Polling only happens while at most one
//! request is in flight (with more, the client is bound by throughput and the CPU is better left
//! to the replicas), and not while the thread waits for work done by another thread: a job on an
//! I/O thread, or a reply on a connection read by another thread ([`blind`]). That thread needs
//! the CPU more than a poller does. Any other wake from another thread (a task woken through the
//! runtime's queue) ends the poll as well.
//!
//! Everything here is per thread: only threads that called [`enable`] poll, and every other
//! function is a no-op elsewhere.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// The longest a connection's thread polls before it sleeps (`zebu agent --busy-poll-us`).
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(50);

thread_local! {
    static POLLER: RefCell<Option<Poller>> = const { RefCell::new(None) };
}

struct Poller {
    /// The configured maximum window.
    max: Duration,
    /// The current window: how long the next park polls.
    window: Duration,
    /// Sockets to poll, by registration id.
    fds: Vec<(u64, RawFd)>,
    next_id: u64,
    /// Waits in progress whose wake-up does not show in `fds`.
    blind: usize,
    /// Frontend requests in flight.
    requests: usize,
    /// The park in progress: when it began, and whether it polled.
    park: Option<(Instant, bool)>,
}

/// Sleeps longer than this many windows count as idle: the window shrinks.
const IDLE_FACTOR: u32 = 4;

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
            std::hint::spin_loop();
        }
    }

    /// Adapt the window to a park that has just ended.
    fn adapt(&mut self, slept: Duration, polled: bool, caught: bool) {
        if caught {
            return;
        }
        let floor = self.max / 4;
        if slept <= self.max * IDLE_FACTOR {
            // Woken soon after all: a longer window would have caught it.
            if polled || self.window.is_zero() {
                self.window = (self.window * 2).max(floor).min(self.max);
            }
        } else if polled {
            // A long sleep: polling was wasted. Halve the window; below a quarter, stop.
            self.window /= 2;
            if self.window < floor {
                self.window = Duration::ZERO;
            }
        }
    }
}

/// Make this thread poll before it sleeps, for at most `max` (zero: never). Call it at the
/// start of a thread that serves one frontend connection, and give its runtime the hooks
/// [`before_park`] and [`after_unpark`].
pub fn enable(max: Duration) {
    if max.is_zero() {
        return;
    }
    POLLER.with(|p| {
        *p.borrow_mut() = Some(Poller {
            max,
            window: max,
            fds: Vec::new(),
            next_id: 0,
            blind: 0,
            requests: 0,
            park: None,
        })
    });
}

/// The runtime's `on_thread_park` hook: poll for up to the window (if this park qualifies).
pub fn before_park() {
    POLLER.with(|p| {
        let mut p = p.borrow_mut();
        let Some(p) = p.as_mut() else { return };
        let start = Instant::now();
        let polled = p.should_poll();
        let caught = polled && {
            // Tasks woken from other threads wait in the runtime's global queue.
            let queue = tokio::runtime::Handle::try_current()
                .ok()
                .map(|h| h.metrics());
            p.poll(&|| queue.as_ref().is_some_and(|m| m.global_queue_depth() > 0))
        };
        if caught {
            p.park = None;
            p.adapt(Duration::ZERO, true, true);
        } else {
            p.park = Some((start, polled));
        }
    });
}

/// The runtime's `on_thread_unpark` hook: adapt the window to how long the thread slept.
pub fn after_unpark() {
    POLLER.with(|p| {
        let mut p = p.borrow_mut();
        let Some(p) = p.as_mut() else { return };
        if let Some((start, polled)) = p.park.take() {
            p.adapt(start.elapsed(), polled, false);
        }
    });
}

/// A socket polled before this thread sleeps, for as long as this is alive. Drop it on the
/// same thread (a socket read by a task of this thread's runtime does).
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
        self.id.is_some_and(is_watched)
    }
}

/// Poll `fd` before this thread sleeps (no-op on a thread that does not poll).
pub fn watch(fd: RawFd) -> Watch {
    let id = POLLER.with(|p| {
        let mut p = p.borrow_mut();
        let p = p.as_mut()?;
        p.next_id += 1;
        let id = p.next_id;
        p.fds.push((id, fd));
        Some(id)
    });
    Watch { id }
}

fn is_watched(id: u64) -> bool {
    POLLER.with(|p| {
        p.borrow()
            .as_ref()
            .is_some_and(|p| p.fds.iter().any(|&(i, _)| i == id))
    })
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            // `try_with`: a task dropped while the thread's locals are torn down.
            let _ = POLLER.try_with(|p| {
                if let Some(p) = p.borrow_mut().as_mut() {
                    p.fds.retain(|&(i, _)| i != id);
                }
            });
        }
    }
}

/// A wait whose wake-up the poll cannot see (a job on an I/O thread, a reply read by another
/// thread): while one is alive, this thread sleeps without polling.
pub struct Blind {
    counted: bool,
}

/// Mark a wait that the poll cannot see, until the guard drops (on the same thread).
pub fn blind() -> Blind {
    let counted = POLLER.with(|p| match p.borrow_mut().as_mut() {
        Some(p) => {
            p.blind += 1;
            true
        }
        None => false,
    });
    Blind { counted }
}

impl Drop for Blind {
    fn drop(&mut self) {
        if self.counted {
            let _ = POLLER.try_with(|p| {
                if let Some(p) = p.borrow_mut().as_mut() {
                    p.blind -= 1;
                }
            });
        }
    }
}

/// One frontend request in flight, until the guard drops (on the same thread).
pub struct Request {
    counted: bool,
}

/// Count a frontend request in flight on this thread.
pub fn request() -> Request {
    let counted = POLLER.with(|p| match p.borrow_mut().as_mut() {
        Some(p) => {
            p.requests += 1;
            true
        }
        None => false,
    });
    Request { counted }
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.counted {
            let _ = POLLER.try_with(|p| {
                if let Some(p) = p.borrow_mut().as_mut() {
                    p.requests -= 1;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn window() -> Duration {
        POLLER.with(|p| p.borrow().as_ref().unwrap().window)
    }

    #[test]
    fn off_threads_are_untouched() {
        std::thread::spawn(|| {
            let (a, _b) = UnixStream::pair().unwrap();
            let w = watch(a.as_raw_fd());
            assert!(!w.token().is_here());
            let _b = blind();
            let _r = request();
            before_park();
            after_unpark();
            POLLER.with(|p| assert!(p.borrow().is_none()));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_readable_socket_ends_the_poll_at_once() {
        std::thread::spawn(|| {
            enable(Duration::from_secs(5));
            let (a, mut b) = UnixStream::pair().unwrap();
            let w = watch(a.as_raw_fd());
            assert!(w.token().is_here());
            b.write_all(b"x").unwrap();
            let t = Instant::now();
            before_park();
            after_unpark();
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "polled {:?}",
                t.elapsed()
            );
            assert_eq!(window(), Duration::from_secs(5));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn blind_waits_and_busy_clients_sleep_without_polling() {
        std::thread::spawn(|| {
            enable(Duration::from_secs(5));
            let (a, _b) = UnixStream::pair().unwrap();
            let _w = watch(a.as_raw_fd());
            {
                let _blind = blind();
                let t = Instant::now();
                before_park();
                assert!(t.elapsed() < Duration::from_secs(1));
                after_unpark();
            }
            {
                let (_r1, _r2) = (request(), request());
                let t = Instant::now();
                before_park();
                assert!(t.elapsed() < Duration::from_secs(1));
                after_unpark();
            }
            // Neither a blind wait nor a busy client changes the window.
            assert_eq!(window(), Duration::from_secs(5));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_window_shrinks_to_zero_when_idle_and_grows_back_when_busy() {
        std::thread::spawn(|| {
            let max = Duration::from_millis(2);
            enable(max);
            let (a, _b) = UnixStream::pair().unwrap();
            let _w = watch(a.as_raw_fd());
            // Nothing arrives: every park polls the whole window, then sleeps long.
            let mut seen = vec![window()];
            for _ in 0..4 {
                before_park();
                std::thread::sleep(max * IDLE_FACTOR * 2);
                after_unpark();
                seen.push(window());
            }
            assert_eq!(
                seen,
                [max, max / 2, max / 4, Duration::ZERO, Duration::ZERO],
                "halved while idle, then off"
            );
            // Short sleeps again: the window comes back, a quarter first, then doubling.
            let mut seen = Vec::new();
            for _ in 0..3 {
                before_park();
                after_unpark();
                seen.push(window());
            }
            assert_eq!(seen, [max / 4, max / 2, max]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_task_woken_from_another_thread_ends_the_poll() {
        std::thread::spawn(|| {
            enable(Duration::from_secs(5));
            let (a, _b) = UnixStream::pair().unwrap();
            let _w = watch(a.as_raw_fd());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(before_park)
                .on_thread_unpark(after_unpark)
                .build()
                .unwrap();
            let t = Instant::now();
            rt.block_on(async {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let task = tokio::spawn(rx);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    tx.send(7).unwrap();
                });
                assert_eq!(task.await.unwrap().unwrap(), 7);
            });
            // The poll window is 5 s: only the woken task ended it.
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "took {:?}",
                t.elapsed()
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_dropped_watch_leaves_the_poll_set() {
        std::thread::spawn(|| {
            enable(Duration::from_millis(1));
            let (a, _b) = UnixStream::pair().unwrap();
            let w = watch(a.as_raw_fd());
            let token = w.token();
            assert!(token.is_here());
            drop(w);
            assert!(!token.is_here());
            POLLER.with(|p| assert!(p.borrow().as_ref().unwrap().fds.is_empty()));
        })
        .join()
        .unwrap();
    }
}
