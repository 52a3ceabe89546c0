//! A [`TrySend`] socket for streams that can only be written through `&mut` (a TLS stream):
//! frames go into a bounded buffer, as into a socket's send buffer, and a writer task moves
//! them to the stream. `try_send` refuses (`WouldBlock`) while the buffer holds its limit, so
//! a peer that stops reading holds back the [`crate::sender::Sender`] just as a full socket
//! would, and the memory of a connection stays bounded.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::sender::TrySend;

/// What the buffer holds before `try_send` refuses (about a socket's send buffer).
const LIMIT: usize = 4 << 20;

struct State {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    failed: Option<io::ErrorKind>,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The writer has something to do.
    data: Notify,
    /// The buffer has room again (or the writer failed).
    room: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side; see the module docs.
pub struct Pipe {
    shared: Arc<Shared>,
}

/// Ends the writer: [`Writer::finish`] waits for what was sent to reach the stream.
pub struct Writer {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

/// A pipe into `stream`, whose writer task runs on the current runtime.
pub fn pipe<W: AsyncWrite + Unpin + Send + 'static>(stream: W) -> (Pipe, Writer) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            frames: VecDeque::new(),
            bytes: 0,
            failed: None,
            closing: false,
        }),
        data: Notify::new(),
        room: Notify::new(),
    });
    let task = tokio::spawn(write_loop(shared.clone(), stream));
    (
        Pipe {
            shared: shared.clone(),
        },
        Writer {
            shared,
            task: Some(task),
        },
    )
}

async fn write_loop<W: AsyncWrite + Unpin>(sh: Arc<Shared>, mut stream: W) {
    loop {
        let notified = sh.data.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (frames, closing) = {
            let mut st = sh.lock();
            (std::mem::take(&mut st.frames), st.closing)
        };
        if frames.is_empty() {
            if closing {
                let _ = stream.shutdown().await;
                return;
            }
            notified.await;
            continue;
        }
        let mut written = 0;
        let mut result = Ok(());
        for f in &frames {
            if let Err(e) = stream.write_all(f).await {
                result = Err(e);
                break;
            }
            written += f.len();
        }
        if result.is_ok() {
            result = stream.flush().await;
        }
        let mut st = sh.lock();
        st.bytes -= frames.iter().map(|f| f.len()).sum::<usize>();
        if let Err(e) = result {
            tracing::debug!("writing to a TLS stream failed after {written} bytes: {e}");
            st.failed = Some(e.kind());
            st.frames.clear();
            st.bytes = 0;
            drop(st);
            sh.room.notify_waiters();
            return;
        }
        drop(st);
        sh.room.notify_waiters();
    }
}

impl TrySend for Pipe {
    fn try_send(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut st = self.shared.lock();
        if let Some(kind) = st.failed {
            return Err(io::Error::new(kind, "the TLS stream failed"));
        }
        if st.bytes >= LIMIT {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        if n == 0 {
            return Ok(0);
        }
        let mut frame = Vec::with_capacity(n);
        for b in bufs {
            frame.extend_from_slice(b);
        }
        st.frames.push_back(frame);
        st.bytes += n;
        drop(st);
        self.shared.data.notify_one();
        Ok(n)
    }

    async fn writable(&self) -> io::Result<()> {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let st = self.shared.lock();
                if let Some(kind) = st.failed {
                    return Err(io::Error::new(kind, "the TLS stream failed"));
                }
                if st.bytes < LIMIT {
                    return Ok(());
                }
            }
            room.await;
        }
    }
}

impl Writer {
    /// Write out what was sent (for at most `patience`), close the stream's sending side and
    /// stop the writer.
    pub async fn finish(mut self, patience: Duration) {
        self.shared.lock().closing = true;
        self.shared.data.notify_one();
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(patience, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sender::Sender;
    use tokio::io::AsyncReadExt;

    /// Frames from many tasks through a pipe whose reader starts late: every byte arrives in
    /// order, and the pipe never holds more than its limit plus one frame.
    #[tokio::test(flavor = "current_thread")]
    async fn frames_arrive_in_order_and_the_buffer_stays_bounded() {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let (pipe, writer) = pipe(a);
        let sender = Arc::new(Sender::new(pipe));
        let mut tasks = Vec::new();
        for t in 0..4u8 {
            let s = sender.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u32 {
                    let body = vec![t ^ (i as u8); 100_000];
                    s.send(&[&[t], &i.to_be_bytes(), &body], false).unwrap();
                    s.wait_below(8 << 20).await;
                }
            }));
        }
        let reader = tokio::spawn(async move {
            let mut next = [0u32; 4];
            let mut frame = vec![0u8; 5 + 100_000];
            for _ in 0..800 {
                b.read_exact(&mut frame).await.unwrap();
                let t = frame[0] as usize;
                let i = u32::from_be_bytes(frame[1..5].try_into().unwrap());
                assert_eq!(i, next[t], "frames of task {t} out of order");
                assert!(frame[5..].iter().all(|&x| x == t as u8 ^ i as u8));
                next[t] += 1;
            }
        });
        for t in tasks {
            t.await.unwrap();
        }
        reader.await.unwrap();
        sender.drain().await;
        writer.finish(Duration::from_secs(5)).await;
    }
}
