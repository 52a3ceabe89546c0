//! A small pool of dedicated threads for blocking file I/O (pread/pwrite/fdatasync).
//!
//! The async side hands each request to the pool through a bounded channel; the thread runs
//! the positioned I/O and answers through the request's own reply path. This keeps blocking
//! syscalls off the async runtime without a per-request hop through tokio's blocking pool.

use crossbeam_channel::{bounded, Sender};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct IoPool {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

/// Jobs waiting for a thread, at most. Submitters block beyond this (back-pressure).
const QUEUE_DEPTH: usize = 4096;

impl IoPool {
    pub fn new(name: &str, threads: usize) -> IoPool {
        let (tx, rx) = bounded::<Job>(QUEUE_DEPTH);
        let threads = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-io-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            job();
                        }
                    })
                    .expect("spawning an I/O thread must succeed at start-up")
            })
            .collect();
        IoPool {
            tx: Some(tx),
            threads,
        }
    }

    /// Run `job` on a pool thread.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(tx) = &self.tx {
            // The receivers live as long as the pool, so sending cannot fail.
            let _ = tx.send(Box::new(job));
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
