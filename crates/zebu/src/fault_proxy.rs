//! `zebu fault-proxy` (hidden; for fault tests): a TCP proxy between a node's replica port and
//! the engines that reach it, whose behaviour a test changes by writing a control file:
//!
//! - `pass`: bytes go through as they come;
//! - `delay MS`: every chunk waits MS milliseconds before it is passed on (both directions);
//! - `cut`: a partition: every open connection is dropped and new ones are closed at once.
//!
//! The file is read every 100 ms; a missing or unreadable file means `pass`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    Delay(Duration),
    Cut,
}

fn parse(text: &str) -> Mode {
    let mut words = text.split_whitespace();
    match (
        words.next(),
        words.next().and_then(|w| w.parse::<u64>().ok()),
    ) {
        (Some("cut"), _) => Mode::Cut,
        (Some("delay"), Some(ms)) => Mode::Delay(Duration::from_millis(ms)),
        _ => Mode::Pass,
    }
}

pub async fn run(listen: String, to: String, control: PathBuf) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let (tx, rx) = watch::channel(Mode::Pass);
    tokio::spawn(async move {
        loop {
            let mode = std::fs::read_to_string(&control)
                .map(|t| parse(&t))
                .unwrap_or(Mode::Pass);
            tx.send_if_modified(|m| std::mem::replace(m, mode) != mode);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let to = Arc::new(to);
    loop {
        let (client, _) = listener.accept().await.context("accepting")?;
        if *rx.borrow() == Mode::Cut {
            drop(client);
            continue;
        }
        let (to, rx) = (to.clone(), rx.clone());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(to.as_str()).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            // Either direction ending (or a cut) ends both.
            tokio::select! {
                _ = pipe(cr, sw, rx.clone()) => {}
                _ = pipe(sr, cw, rx) => {}
            }
        });
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = mode.wait_for(|m| *m == Mode::Cut) => return,
        };
        let now = *mode.borrow();
        match now {
            Mode::Cut => return,
            Mode::Delay(d) => tokio::time::sleep(d).await,
            Mode::Pass => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_text_is_read_leniently() {
        assert_eq!(parse("cut\n"), Mode::Cut);
        assert_eq!(parse("delay 40"), Mode::Delay(Duration::from_millis(40)));
        assert_eq!(parse("delay x"), Mode::Pass);
        assert_eq!(parse(""), Mode::Pass);
    }
}
