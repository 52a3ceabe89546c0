//! Sending frames on a socket shared by many request tasks, without a hop through a writer task.
//!
//! A request that is alone in flight writes its frame right away, from its own task, with one
//! vectored `send` (header and payload together, no copy): at queue depth 1 this saves a task
//! wake-up per frame, which on a small VM is a large part of a request's latency. Under load
//! (other requests in flight), when the socket is full, or when frames are already waiting, the
//! frame is copied into a queue that a flusher task drains in order, many frames per syscall.
//! Large frames (64 KiB and up) are written straight away whenever the socket is idle: batching
//! them saves nothing and the copy would cost.
//!
//! The queue is bounded by its callers: a frame is queued only by a request in flight (bounded
//! by the NBD connection's budget), and a reader that takes new requests waits first until the
//! bytes not yet on the socket are below its limit ([`Sender::wait_below`]), so a peer that
//! stops reading its replies holds at most that much plus the requests in flight. A frame may
//! carry a permit (its share of a node-wide budget), let go once the frame is on the socket;
//! with a stall limit, a socket that takes nothing for that long fails the sender.

use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::task::JoinHandle;

/// The write side of a socket that can be written without `&mut` (tokio's owned halves).
pub trait TrySend: Send + Sync + 'static {
    fn try_send(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
}

impl TrySend for tokio::net::tcp::OwnedWriteHalf {
    fn try_send(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.try_write_vectored(bufs)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::tcp::OwnedWriteHalf::writable(self)
    }
}

impl TrySend for tokio::net::unix::OwnedWriteHalf {
    fn try_send(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.try_write_vectored(bufs)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::unix::OwnedWriteHalf::writable(self)
    }
}

/// Frames at least this large are written straight away even under load.
const DIRECT_BYTES: usize = 64 * 1024;

struct State {
    /// Bytes waiting for the flusher, in order.
    queued: Vec<u8>,
    /// The flusher owns the socket: new frames must queue behind what it is sending.
    busy: bool,
    /// Why sending failed; every later send fails too.
    failed: Option<String>,
    /// Bytes queued or being written by the flusher: not on the socket yet.
    unsent: usize,
    /// What the queued frames hold (a share of a node-wide memory budget): let go once they
    /// are on the socket.
    held: Vec<OwnedSemaphorePermit>,
}

struct Shared<S> {
    socket: S,
    state: Mutex<State>,
    wake: Notify,
    /// Signalled whenever the flusher has emptied the queue (or given up).
    drained: Notify,
    /// Signalled whenever the flusher has written a batch (or given up).
    progress: Notify,
    /// Signalled once, when sending fails.
    broke: Notify,
    /// A socket that takes none of the queued bytes for this long fails the sender.
    stall: Option<std::time::Duration>,
}

/// A socket's sending side; see the module docs. Dropping it stops the flusher (frames still
/// queued are abandoned: their requests fail with the connection).
pub struct Sender<S: TrySend> {
    shared: Arc<Shared<S>>,
    flusher: JoinHandle<()>,
}

impl<S: TrySend> Drop for Sender<S> {
    fn drop(&mut self) {
        self.flusher.abort();
    }
}

impl<S: TrySend> Sender<S> {
    /// Must be called within a tokio runtime (it spawns the flusher).
    pub fn new(socket: S) -> Sender<S> {
        Self::with_stall(socket, None)
    }

    /// `stall`: once frames wait, a socket that takes none of their bytes for this long (a
    /// peer that has stopped reading) fails the sender, and every frame queued is let go.
    pub fn with_stall(socket: S, stall: Option<std::time::Duration>) -> Sender<S> {
        let shared = Arc::new(Shared {
            socket,
            state: Mutex::new(State {
                queued: Vec::new(),
                busy: false,
                failed: None,
                unsent: 0,
                held: Vec::new(),
            }),
            wake: Notify::new(),
            drained: Notify::new(),
            progress: Notify::new(),
            broke: Notify::new(),
            stall,
        });
        let flusher = tokio::spawn(flush_loop(shared.clone()));
        Sender { shared, flusher }
    }

    /// Send one frame made of `parts`, in order after every frame sent before. `alone`: no
    /// other request is in flight, so nothing would be gained by waiting to batch. Returns once
    /// the frame is written or queued; an error means the connection is broken.
    pub fn send(&self, parts: &[&[u8]], alone: bool) -> Result<(), String> {
        self.send_holding(parts, alone, None)
    }

    /// [`Sender::send`], where `hold` is kept until the frame is on the socket (let go at
    /// once if it is written right away, or if sending has failed).
    pub fn send_holding(
        &self,
        parts: &[&[u8]],
        alone: bool,
        hold: Option<OwnedSemaphorePermit>,
    ) -> Result<(), String> {
        let sh = &*self.shared;
        let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &st.failed {
            return Err(why.clone());
        }
        let mut done = 0usize;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        // A large frame gains nothing from batching, and queueing it would cost a copy.
        let direct = alone || total >= DIRECT_BYTES;
        if !st.busy && !direct {
            st.busy = true;
            sh.wake.notify_one();
        } else if !st.busy {
            while done < total {
                let iov = slices_from(parts, done);
                match sh.socket.try_send(&iov) {
                    Ok(0) => {
                        let why = "the peer closed the connection".to_string();
                        st.failed = Some(why.clone());
                        sh.progress.notify_waiters();
                        sh.broke.notify_waiters();
                        return Err(why);
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let why = format!("send failed: {e}");
                        st.failed = Some(why.clone());
                        sh.progress.notify_waiters();
                        sh.broke.notify_waiters();
                        return Err(why);
                    }
                }
            }
            if done == total {
                return Ok(());
            }
            st.busy = true;
            sh.wake.notify_one();
        }
        let before = st.queued.len();
        append_from(&mut st.queued, parts, done);
        st.unsent += st.queued.len() - before;
        st.held.extend(hold);
        Ok(())
    }

    /// Bytes sent but not on the socket yet.
    pub fn unsent(&self) -> usize {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unsent
    }

    /// Wait until at most `limit` bytes are waiting for the socket (or sending failed).
    pub async fn wait_below(&self, limit: usize) {
        let sh = &*self.shared;
        loop {
            let progress = sh.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            {
                let st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.unsent <= limit || st.failed.is_some() {
                    return;
                }
            }
            progress.await;
        }
    }

    /// Wait until sending has failed (for ever if it never does). Woken by nothing else, so a
    /// reader may keep one such future across its requests at no cost per request.
    pub async fn wait_failed(&self) -> String {
        let sh = &*self.shared;
        loop {
            let broke = sh.broke.notified();
            tokio::pin!(broke);
            broke.as_mut().enable();
            if let Some(why) = self.failure() {
                return why;
            }
            broke.await;
        }
    }

    /// Wait until every frame sent so far has been written to the socket (or sending failed).
    pub async fn drain(&self) {
        let sh = &*self.shared;
        loop {
            let drained = sh.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
                if !st.busy || st.failed.is_some() {
                    return;
                }
            }
            drained.await;
        }
    }

    /// Why sending failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed
            .clone()
    }
}

/// `parts` without their first `skip` bytes, as I/O slices.
fn slices_from<'a>(parts: &[&'a [u8]], mut skip: usize) -> Vec<IoSlice<'a>> {
    let mut v = Vec::with_capacity(parts.len());
    for p in parts {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        v.push(IoSlice::new(&p[skip..]));
        skip = 0;
    }
    v
}

fn append_from(out: &mut Vec<u8>, parts: &[&[u8]], mut skip: usize) {
    for p in parts {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        out.extend_from_slice(&p[skip..]);
        skip = 0;
    }
}

async fn flush_loop<S: TrySend>(sh: Arc<Shared<S>>) {
    loop {
        sh.wake.notified().await;
        loop {
            let (buf, held) = {
                let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.queued.is_empty() {
                    st.busy = false;
                    sh.drained.notify_waiters();
                    break;
                }
                (std::mem::take(&mut st.queued), std::mem::take(&mut st.held))
            };
            let written = write_all(&sh.socket, &buf, sh.stall).await;
            drop(held);
            let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
            st.unsent -= buf.len();
            sh.progress.notify_waiters();
            if let Err(why) = written {
                st.failed = Some(why);
                sh.broke.notify_waiters();
                st.unsent -= st.queued.len();
                st.queued = Vec::new();
                st.held = Vec::new();
                sh.drained.notify_waiters();
                return;
            }
        }
    }
}

async fn write_all<S: TrySend>(
    socket: &S,
    buf: &[u8],
    stall: Option<std::time::Duration>,
) -> Result<(), String> {
    let mut at = 0;
    // Progress is a socket that took at least this much (or the rest): a peer that drips a
    // byte now and then does not count as reading.
    const PROGRESS_BYTES: usize = 64 * 1024;
    let mut progressed = tokio::time::Instant::now();
    let mut at_progress = 0;
    while at < buf.len() {
        let writable = socket.writable();
        let ready = match stall {
            None => writable.await,
            Some(stall) => match tokio::time::timeout_at(progressed + stall, writable).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(format!(
                        "the peer has taken none of its replies for {} s",
                        stall.as_secs()
                    ))
                }
            },
        };
        ready.map_err(|e| format!("send failed: {e}"))?;
        match socket.try_send(&[IoSlice::new(&buf[at..])]) {
            Ok(0) => return Err("the peer closed the connection".into()),
            Ok(n) => {
                at += n;
                if at - at_progress >= PROGRESS_BYTES || at == buf.len() {
                    progressed = tokio::time::Instant::now();
                    at_progress = at;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(format!("send failed: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn slices_skip_whole_and_partial_parts() {
        let parts: [&[u8]; 3] = [b"abc", b"", b"defg"];
        let joined = |v: Vec<IoSlice<'_>>| v.iter().flat_map(|s| s.to_vec()).collect::<Vec<u8>>();
        assert_eq!(joined(slices_from(&parts, 0)), b"abcdefg");
        assert_eq!(joined(slices_from(&parts, 2)), b"cdefg");
        assert_eq!(joined(slices_from(&parts, 3)), b"defg");
        assert_eq!(joined(slices_from(&parts, 5)), b"fg");
        let mut out = Vec::new();
        append_from(&mut out, &parts, 4);
        assert_eq!(out, b"efg");
    }

    /// Many frames from many tasks, far more than a socket buffer holds while the peer is not
    /// reading: every frame arrives whole and each task's frames arrive in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_arrive_whole_and_in_order_under_backpressure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let (_rd, wr) = client.into_split();
        let sender = Arc::new(Sender::new(wr));
        const TASKS: u8 = 8;
        const FRAMES: u32 = 400;
        const BODY: usize = 3000;
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let s = sender.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..FRAMES {
                    let head = [t, (i >> 8) as u8, i as u8];
                    let body = vec![t ^ (i as u8); BODY];
                    s.send(&[&head, &body], i % 3 == 0).unwrap();
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let drain = tokio::spawn({
            let s = sender.clone();
            async move { s.drain().await }
        });
        // The peer starts reading only now: most frames went through the queue.
        let mut next = [0u32; TASKS as usize];
        let mut frame = vec![0u8; 3 + BODY];
        for _ in 0..(TASKS as u32 * FRAMES) {
            server.read_exact(&mut frame).await.unwrap();
            let (t, i) = (frame[0], (frame[1] as u32) << 8 | frame[2] as u32);
            assert!(
                t < TASKS,
                "frame from an unknown task {t}: frames were torn"
            );
            assert_eq!(i, next[t as usize], "task {t}'s frames out of order");
            assert!(
                frame[3..].iter().all(|&b| b == t ^ (i as u8)),
                "frame body torn"
            );
            next[t as usize] += 1;
        }
        drain.await.unwrap();
        assert!(sender.failure().is_none());
    }
}
