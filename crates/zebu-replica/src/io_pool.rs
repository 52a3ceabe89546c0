//! A small pool of dedicated threads for blocking file I/O (pread/pwrite/fdatasync).
//!
//! The async side hands each request to the pool; a thread runs the positioned I/O and answers
//! through the request's own reply path. This keeps blocking syscalls off the async runtime
//! without a per-request hop through tokio's blocking pool. Idle threads sleep on a condition
//! variable (no spinning: on a 2-core machine a spinning waiter steals the CPU the data path
//! needs).

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

thread_local! {
    /// Whether this thread serves one client connection only (see [`dedicated`]).
    static DEDICATED: Cell<bool> = const { Cell::new(false) };
}

/// Mark the calling thread as dedicated to one client connection: it may run quick I/O (see
/// [`crate::ops::is_quick`]) itself instead of handing it to the pool, since blocking it holds
/// up nobody else. (Page-cache writes into small folios take a few microseconds, less than the
/// two wake-ups of a hand-off; measured at queue depths 1 and 32, with and without a flush every
/// 16 writes, running them inline was never slower.)
pub fn dedicated() {
    DEDICATED.with(|d| d.set(true));
}

/// Whether the calling thread may run quick I/O itself (see [`dedicated`]).
pub fn may_run_inline() -> bool {
    DEDICATED.with(Cell::get)
}

struct Pending {
    jobs: VecDeque<Job>,
    /// Threads asleep on `ready`: a submit only pays for a wake-up syscall when one sleeps.
    idle: usize,
    stop: bool,
}

struct Queue {
    pending: Mutex<Pending>,
    ready: Condvar,
}

pub struct IoPool {
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<()>>,
}

impl IoPool {
    pub fn new(name: &str, threads: usize) -> IoPool {
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                jobs: VecDeque::new(),
                idle: 0,
                stop: false,
            }),
            ready: Condvar::new(),
        });
        let threads = (0..threads.max(1))
            .map(|i| {
                let q = queue.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-io-{i}"))
                    .spawn(move || loop {
                        let job = {
                            let mut g = q.pending.lock().unwrap_or_else(|p| p.into_inner());
                            loop {
                                if let Some(j) = g.jobs.pop_front() {
                                    break j;
                                }
                                if g.stop {
                                    return;
                                }
                                g.idle += 1;
                                g = q.ready.wait(g).unwrap_or_else(|p| p.into_inner());
                                g.idle -= 1;
                            }
                        };
                        job();
                    })
                    .expect("spawning an I/O thread must succeed at start-up")
            })
            .collect();
        IoPool { queue, threads }
    }

    /// Run `job` on a pool thread. The queue is bounded by the callers: every submitter holds a
    /// per-connection budget (see `server.rs`) or an engine request slot.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let wake = {
            let mut g = self.queue.pending.lock().unwrap_or_else(|p| p.into_inner());
            g.jobs.push_back(Box::new(job));
            // Only a sleeping thread needs a wake-up (a syscall); busy ones come back for more.
            g.idle > 0
        };
        if wake {
            self.queue.ready.notify_one();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.queue
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop = true;
        self.queue.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
