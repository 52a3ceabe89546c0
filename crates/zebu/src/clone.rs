//! `zebu volume clone NEW --from VOLUME/SNAP`: a new volume with a snapshot's content, usable at
//! once. The manager records the clone; its engine copies the snapshot from the source's
//! replicas in the background while the clone is attached, and serves what it has not copied
//! yet by reading the snapshot there (`docs/snapshots.md`, "Clone").

use std::time::Duration;

use anyhow::bail;
use zebu_api::{ApiClient, CreateVolume, SnapshotRef, Volume, VolumeState};

/// Split `VOLUME/SNAPSHOT`.
pub fn parse_from(from: &str) -> anyhow::Result<SnapshotRef> {
    match from
        .split_once('/')
        .filter(|(v, s)| !v.is_empty() && !s.is_empty() && !s.contains('/'))
    {
        Some((volume, snapshot)) => Ok(SnapshotRef {
            volume: volume.to_owned(),
            snapshot: snapshot.to_owned(),
        }),
        None => bail!("--from {from:?}: name a snapshot as VOLUME/SNAPSHOT"),
    }
}

/// Create the clone and, unless `attach` is false, attach it (to `node`, or where the manager
/// places it) and wait until it serves I/O. An attach the manager refuses (an unknown node, say)
/// deletes the clone again, so a bad command leaves nothing behind.
pub async fn clone_volume(
    c: &ApiClient,
    name: &str,
    from: &str,
    replicas: Option<u32>,
    node: Option<String>,
    attach: bool,
) -> anyhow::Result<Volume> {
    let source = parse_from(from)?;
    if let Some(n) = &node {
        if !c.list_nodes().await?.iter().any(|x| x.name == *n) {
            bail!("node {n} does not exist (see zebu node list); nothing was created");
        }
    }
    let v = c
        .create_volume(&CreateVolume {
            name: name.to_owned(),
            size_bytes: 0,
            replica_count: replicas,
            clone_from: Some(source),
        })
        .await?;
    if !attach {
        return Ok(v);
    }
    if let Err(e) = c.attach_volume(name, node).await {
        let back = crate::import::take_back(c, name).await;
        bail!("attaching clone {name} failed: {e:#}; {back}");
    }
    crate::cli::wait_for(c, name, Duration::from_secs(90), |v| {
        v.state == VolumeState::Attached
    })
    .await
}

/// Draw the clone's copy on stderr until the manager records it done. Fails if the clone is
/// detached (its copy runs only while attached) or is not a clone.
pub async fn wait_copied(c: &ApiClient, name: &str) -> anyhow::Result<Volume> {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut last_error: Option<String> = None;
    loop {
        let v = c.get_volume(name).await?;
        let Some(p) = v.clone.clone() else {
            bail!("volume {name} is not a clone");
        };
        let b = bar.get_or_insert_with(|| crate::import::progress(p.bytes_total, "cloning"));
        b.set_position(p.bytes_done);
        if p.done {
            b.finish_and_clear();
            return Ok(v);
        }
        if p.error != last_error {
            if let Some(e) = &p.error {
                b.println(format!("clone {name}: the copy waits: {e}"));
            }
            last_error = p.error.clone();
        }
        if v.desired_node.is_none() {
            b.abandon();
            bail!(
                "clone {name} is detached, so its copy is paused ({}% done); attach it to go on",
                p.bytes_done * 100 / p.bytes_total.max(1)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
