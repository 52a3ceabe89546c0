//! Block-range lock: at most one mutating request in flight per overlapping block range.
//!
//! The engine holds a range while a write, trim or write-zeroes is sent to every replica, so two
//! overlapping mutations can never reach two replicas in different orders. Ranges are rounded
//! out to whole blocks because replicas read-modify-write partial blocks. Non-overlapping
//! requests never wait for each other. Waiters are woken in bulk when any range is released and
//! re-check; the list of held ranges is small (bounded by the requests in flight).

use std::sync::Mutex;

use tokio::sync::Notify;

pub struct RangeLock {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_ticket: Mutex<u64>,
    released: Notify,
}

pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    ticket: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|h| h.2 == self.ticket) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.released.notify_waiters();
    }
}

impl Default for RangeLock {
    fn default() -> Self {
        RangeLock {
            held: Mutex::new(Vec::new()),
            next_ticket: Mutex::new(0),
            released: Notify::new(),
        }
    }
}

impl RangeLock {
    /// Lock `[start, end)` (already block-aligned by the caller).
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let ticket = {
            let mut t = self.next_ticket.lock().unwrap_or_else(|p| p.into_inner());
            *t += 1;
            *t
        };
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register for wake-ups before checking, so a release in between is not missed.
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                if !held.iter().any(|&(s, e, _)| s < end && start < e) {
                    held.push((start, end, ticket));
                    return RangeGuard { lock: self, ticket };
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let l = Arc::new(RangeLock::default());
        let g = l.lock(0, 8192).await;
        let _other = l.lock(8192, 16384).await; // disjoint: immediate
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(4096, 12288 - 4096).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "an overlapping lock must wait");
        drop(g);
        tokio::time::timeout(std::time::Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
