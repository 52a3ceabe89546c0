//! The CLI client commands: tables by default, `-o json` for scripts.

use std::time::{Duration, Instant};

use anyhow::bail;
use zebu_api::{ApiClient, CreateVolume, Volume, VolumeState};

use crate::size::{human, parse_size};
use crate::{default_token, ClientArgs, NodeCmd, Output, SettingCmd, SnapshotCmd, VolumeCmd};

fn client(c: &ClientArgs) -> ApiClient {
    ApiClient::new(&c.api, &default_token(c.token.clone()))
}

/// Print rows as aligned columns.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("API types serialize")
    );
}

fn show_volume(v: &Volume, out: Output) {
    if out == Output::Json {
        return print_json(v);
    }
    println!("Name:        {}", v.name);
    println!(
        "Size:        {} ({} bytes)",
        human(v.size_bytes),
        v.size_bytes
    );
    println!("State:       {}", v.state.as_str());
    println!("Robustness:  {}", v.robustness.as_str());
    println!("Node:        {}", v.node.as_deref().unwrap_or("-"));
    println!("NBD URI:     {}", v.nbd_uri.as_deref().unwrap_or("-"));
    if let Some(u) = &v.nbd_unix_uri {
        println!("NBD (local): {u}");
    }
    if let Some(f) = &v.block_file {
        println!(
            "Block file:  {f} (on node {}; losetup --direct-io=on -f --show it)",
            v.node.as_deref().unwrap_or("-")
        );
    }
    if let Some(m) = &v.message {
        println!("Message:     {m}");
    }
    if let Some(cl) = &v.clone {
        let how = if cl.done {
            "done".to_owned()
        } else {
            let pct = (cl.bytes_done * 100)
                .checked_div(cl.bytes_total)
                .unwrap_or(0);
            let paused = if v.desired_node.is_none() {
                " (paused while detached)"
            } else {
                ""
            };
            let waits = cl
                .error
                .as_deref()
                .map(|e| format!("; waits: {e}"))
                .unwrap_or_default();
            format!(
                "copying, {pct}% ({} of {}){paused}{waits}",
                human(cl.bytes_done),
                human(cl.bytes_total)
            )
        };
        println!("Clone of:    {}/{}: {how}", cl.volume, cl.snapshot);
    }
    println!("Replicas:    {} wanted", v.replica_count);
    table(
        &["  NAME", "NODE", "MODE", "GENERATION", "REBUILD", "ERROR"],
        v.replicas
            .iter()
            .map(|r| {
                vec![
                    format!("  {}", r.name),
                    r.node.clone(),
                    r.mode.as_str().into(),
                    r.generation.to_string(),
                    rebuild_cell(r),
                    r.error.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    );
    for r in &v.replicas {
        if let Some(m) = &r.merge {
            let pct = (m.bytes_done * 100)
                .checked_div(m.bytes_total)
                .unwrap_or(100);
            println!(
                "Merging:     deleted snapshot {} on {}: {pct}% ({} of {})",
                m.snapshot,
                r.name,
                human(m.bytes_done),
                human(m.bytes_total)
            );
        }
    }
}

/// Wait until no replica of `volume` has a deleted snapshot left to merge, drawing a bar of
/// the merges done on stderr. A replica whose node does not report is named and not waited for
/// (it merges once it is back). Agents report every second: a count is trusted only once two
/// reports came after the deletion.
async fn wait_merged(c: &ApiClient, volume: &str) -> anyhow::Result<()> {
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "merging [{bar:30}] {pos}/{len} snapshot merges {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let since = Instant::now();
    let mut most = 0u64;
    loop {
        let v = c.get_volume(volume).await?;
        let left: u64 = v
            .replicas
            .iter()
            .filter_map(|r| r.pending_merges)
            .map(u64::from)
            .sum();
        most = most.max(left);
        bar.set_length(most);
        bar.set_position(most - left);
        let now: Vec<String> = v
            .replicas
            .iter()
            .filter_map(|r| {
                let m = r.merge.as_ref()?;
                Some(format!(
                    "{}: {} {}/{}",
                    r.name,
                    m.snapshot,
                    human(m.bytes_done),
                    human(m.bytes_total)
                ))
            })
            .collect();
        bar.set_message(now.join(", "));
        if left == 0 && since.elapsed() >= Duration::from_millis(2500) {
            bar.finish_and_clear();
            let silent: Vec<String> = v
                .replicas
                .iter()
                .filter(|r| r.pending_merges.is_none())
                .map(|r| format!("{} (node {})", r.name, r.node))
                .collect();
            if silent.is_empty() {
                eprintln!("volume {volume}: every replica has merged its deleted snapshots");
            } else {
                eprintln!(
                    "volume {volume}: the replicas that report have merged; {} do not report now and merge once they are back",
                    silent.join(", ")
                );
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A running rebuild's kind and progress, or how the last one went.
fn rebuild_cell(r: &zebu_api::Replica) -> String {
    if let Some(b) = &r.rebuild {
        let pct = (b.bytes_done * 100).checked_div(b.bytes_total).unwrap_or(0);
        let resumed = if b.resumed_from > 0 {
            format!(", resumed at {}", human(b.resumed_from))
        } else {
            String::new()
        };
        return format!(
            "{} {pct}% ({} of {}{resumed})",
            b.kind,
            human(b.bytes_done),
            human(b.bytes_total)
        );
    }
    if r.mode == zebu_api::ReplicaMode::WO {
        return "waiting to start".into();
    }
    match &r.last_rebuild {
        Some(l) => format!(
            "last: {}, {} in {:.1} s{}",
            l.kind,
            human(l.bytes_copied),
            l.duration_ms as f64 / 1000.0,
            if l.snapshots_copied + l.snapshots_kept > 0 {
                format!(
                    ", snapshots: {} copied, {} kept",
                    l.snapshots_copied, l.snapshots_kept
                )
            } else {
                String::new()
            }
        ),
        None => "-".into(),
    }
}

/// `volume get --watch`: redraw until healthy, with a bar and a rate for each rebuild.
async fn watch_volume(c: &ApiClient, name: &str) -> anyhow::Result<()> {
    use std::collections::HashMap;
    let mut last: HashMap<String, (u64, Instant)> = HashMap::new();
    loop {
        let v = c.get_volume(name).await?;
        // Clear the screen and draw from the top.
        print!("\x1b[2J\x1b[H");
        show_volume(&v, Output::Table);
        for r in &v.replicas {
            let Some(b) = &r.rebuild else { continue };
            let now = Instant::now();
            let rate = last.get(&r.name).and_then(|(done, at)| {
                let s = now.duration_since(*at).as_secs_f64();
                (s > 0.0 && b.bytes_done >= *done).then(|| (b.bytes_done - done) as f64 / s)
            });
            last.insert(r.name.clone(), (b.bytes_done, now));
            let width = 40u64;
            let filled = (b.bytes_done * width)
                .checked_div(b.bytes_total)
                .unwrap_or(0);
            println!(
                "\n  {} [{}{}] {}{}",
                r.name,
                "#".repeat(filled as usize),
                ".".repeat((width - filled) as usize),
                rebuild_cell(r),
                rate.map(|r| format!(", {}/s", human(r as u64)))
                    .unwrap_or_default()
            );
        }
        if v.robustness == zebu_api::Robustness::Healthy
            && !v
                .replicas
                .iter()
                .any(|r| r.mode == zebu_api::ReplicaMode::WO)
        {
            println!("\nvolume {name} is healthy");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Poll a volume until `done` holds, printing what it waits for when that changes.
pub async fn wait_for(
    c: &ApiClient,
    name: &str,
    timeout: Duration,
    done: impl Fn(&Volume) -> bool,
) -> anyhow::Result<Volume> {
    let deadline = Instant::now() + timeout;
    let mut last_msg = String::new();
    loop {
        let v = c.get_volume(name).await?;
        if done(&v) {
            return Ok(v);
        }
        let msg = format!(
            "{} ({})",
            v.state.as_str(),
            v.message.clone().unwrap_or_default()
        );
        if msg != last_msg {
            eprintln!("volume {name}: {msg}");
            last_msg = msg;
        }
        if Instant::now() > deadline {
            bail!(
                "volume {name} is still {} after {} s: {}",
                v.state.as_str(),
                timeout.as_secs(),
                v.message.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A volume made with another's content (import, clone): `key` names the copy in `-o json`.
fn show_filled(
    v: &Volume,
    copied: &crate::import::Copied,
    from: &str,
    key: &str,
    verb: &str,
    out: Output,
) {
    if out == Output::Json {
        print_json(&serde_json::json!({
            "volume": v,
            key: {
                "source": from,
                "data_bytes": copied.data_bytes,
                "hole_bytes": copied.hole_bytes,
                "sha256": copied.sha256,
            }
        }));
    } else {
        println!(
            "volume {} {verb} {from}: {} with {} replicas; {} of data written, {} of holes kept; verified (sha256 {})",
            v.name,
            human(v.size_bytes),
            v.replica_count,
            human(copied.data_bytes),
            human(copied.hole_bytes),
            copied.sha256
        );
    }
}

pub async fn volume(cmd: VolumeCmd, ca: &ClientArgs) -> anyhow::Result<()> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            replicas,
            from: Some(from),
            node,
        } => {
            let size = size
                .map(|s| parse_size(&s).map_err(anyhow::Error::msg))
                .transpose()?;
            let c = client(ca);
            let (v, copied) =
                crate::import::create_from(&c, &name, size, replicas, &from, node).await?;
            show_filled(&v, &copied, &from, "imported", "created from", ca.output);
        }
        VolumeCmd::Create {
            name,
            size,
            replicas,
            from: None,
            ..
        } => {
            let size = size.expect("clap requires --size without --from");
            let size_bytes = parse_size(&size).map_err(anyhow::Error::msg)?;
            let c = client(ca);
            let v = c
                .create_volume(&CreateVolume {
                    name: name.clone(),
                    size_bytes,
                    replica_count: replicas,
                    clone_from: None,
                })
                .await?;
            if ca.output == Output::Json {
                print_json(&v);
            } else {
                println!(
                    "volume {name} created: {} with {} replicas",
                    human(v.size_bytes),
                    v.replica_count
                );
            }
        }
        VolumeCmd::Clone {
            name,
            from,
            replicas,
            node,
            no_attach,
            wait,
        } => {
            let c = client(ca);
            let mut v =
                crate::clone::clone_volume(&c, &name, &from, replicas, node, !no_attach).await?;
            if wait {
                v = crate::clone::wait_copied(&c, &name).await?;
            }
            if ca.output == Output::Json {
                print_json(&v);
            } else if no_attach {
                println!(
                    "volume {name} created as a clone of {from} ({}); its copy starts when it is attached",
                    human(v.size_bytes)
                );
            } else {
                if wait {
                    eprintln!(
                        "volume {name}: clone of {from} copied; it no longer reads its source"
                    );
                } else {
                    eprintln!(
                        "volume {name}: clone of {from}, usable now; copying in the background (`zebu volume get {name}` shows how far)"
                    );
                }
                match &v.nbd_uri {
                    Some(uri) => println!("{uri}"),
                    None => println!("volume {name} is {}", v.state.as_str()),
                }
            }
        }
        VolumeCmd::List => {
            let vols = client(ca).list_volumes().await?;
            if ca.output == Output::Json {
                return {
                    let _: () = print_json(&vols);
                    Ok(())
                };
            }
            table(
                &[
                    "NAME",
                    "SIZE",
                    "REPLICAS",
                    "STATE",
                    "ROBUSTNESS",
                    "NODE",
                    "NBD URI",
                ],
                vols.iter()
                    .map(|v| {
                        vec![
                            v.name.clone(),
                            human(v.size_bytes),
                            format!(
                                "{}/{}",
                                v.replicas
                                    .iter()
                                    .filter(|r| r.mode == zebu_api::ReplicaMode::RW)
                                    .count(),
                                v.replica_count
                            ),
                            v.state.as_str().into(),
                            v.robustness.as_str().into(),
                            v.node.clone().unwrap_or_else(|| "-".into()),
                            v.nbd_uri.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect(),
            );
        }
        VolumeCmd::Get { name, watch: false } => {
            let v = client(ca).get_volume(&name).await?;
            show_volume(&v, ca.output);
        }
        VolumeCmd::Get { name, watch: true } => {
            if ca.output == Output::Json {
                bail!(
                    "--watch redraws a table; for scripts, poll `zebu volume get {name} -o json`"
                );
            }
            watch_volume(&client(ca), &name).await?;
        }
        VolumeCmd::Attach {
            name,
            node,
            no_wait,
        } => {
            let c = client(ca);
            let mut v = c.attach_volume(&name, node).await?;
            if !no_wait {
                v = wait_for(&c, &name, Duration::from_secs(90), |v| {
                    v.state == VolumeState::Attached
                })
                .await?;
            }
            if ca.output == Output::Json {
                print_json(&v);
            } else if let Some(uri) = &v.nbd_uri {
                println!("{uri}");
            } else {
                println!("volume {name} is {}", v.state.as_str());
            }
        }
        VolumeCmd::Detach { name, no_wait } => {
            let c = client(ca);
            let mut v = c.detach_volume(&name).await?;
            if !no_wait {
                v = wait_for(&c, &name, Duration::from_secs(60), |v| {
                    v.state == VolumeState::Detached
                })
                .await?;
            }
            if ca.output == Output::Json {
                print_json(&v);
            } else {
                println!("volume {name} is {}", v.state.as_str());
            }
        }
        VolumeCmd::Expand {
            name,
            size,
            no_wait,
        } => {
            let size_bytes = parse_size(&size).map_err(anyhow::Error::msg)?;
            let c = client(ca);
            let mut v = c.expand_volume(&name, size_bytes).await?;
            let attached = v.desired_node.is_some();
            if attached && !no_wait {
                v = wait_for(&c, &name, Duration::from_secs(120), |v| {
                    v.engine_size_bytes == Some(size_bytes)
                })
                .await?;
            }
            if ca.output == Output::Json {
                print_json(&v);
            } else if !attached {
                println!(
                    "volume {name} is now {} ({} bytes); its replicas grow when it is next attached",
                    human(size_bytes),
                    size_bytes
                );
            } else if v.engine_size_bytes == Some(size_bytes) {
                println!(
                    "volume {name} is now {} ({} bytes); new NBD connections see the new size",
                    human(size_bytes),
                    size_bytes
                );
            } else {
                println!(
                    "volume {name} is growing to {} ({} bytes); zebu volume get {name} shows when it is done",
                    human(size_bytes),
                    size_bytes
                );
            }
        }
        VolumeCmd::Salvage { name, replica } => {
            let v = client(ca).salvage_volume(&name, replica).await?;
            if ca.output == Output::Json {
                print_json(&v);
            } else {
                let back: Vec<&str> = v
                    .replicas
                    .iter()
                    .filter(|r| r.mode == zebu_api::ReplicaMode::RW)
                    .map(|r| r.name.as_str())
                    .collect();
                println!(
                    "volume {name} salvaged from {}; the other replicas rejoin by rebuild",
                    back.join(", ")
                );
            }
        }
        VolumeCmd::Delete { name, no_wait } => {
            let c = client(ca);
            let v = c.delete_volume(&name).await?;
            if !no_wait {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match c.get_volume(&name).await {
                        Err(e) if e.status() == Some(404) => break,
                        Err(e) => return Err(e.into()),
                        Ok(v) if Instant::now() > deadline => {
                            bail!("volume {name} is still {} after 60 s: are all its replicas' nodes up?", v.state.as_str())
                        }
                        Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                println!("volume {name} deleted");
            } else if ca.output == Output::Json {
                print_json(&v);
            } else {
                println!("volume {name} is {}", v.state.as_str());
            }
        }
    }
    Ok(())
}

pub async fn node(cmd: NodeCmd, ca: &ClientArgs) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::List => {
            let nodes = client(ca).list_nodes().await?;
            if ca.output == Output::Json {
                return {
                    let _: () = print_json(&nodes);
                    Ok(())
                };
            }
            table(
                &["NAME", "READY", "ADDRESS", "REPLICAS", "DISK FREE", "DISK"],
                nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            n.ready.to_string(),
                            n.address.clone(),
                            n.replicas.to_string(),
                            format!(
                                "{}/{}",
                                human(n.status.disk_free_bytes),
                                human(n.status.disk_total_bytes)
                            ),
                            n.disk_path.clone(),
                        ]
                    })
                    .collect(),
            );
        }
        NodeCmd::Delete { name, force } => {
            let n = client(ca).delete_node(&name, force.as_deref()).await?;
            if ca.output == Output::Json {
                print_json(&n);
            } else {
                println!(
                    "node {} removed, with the records of its {} replica(s); its disk was not touched",
                    n.name, n.replicas
                );
            }
        }
    }
    Ok(())
}

pub async fn setting(cmd: SettingCmd, ca: &ClientArgs) -> anyhow::Result<()> {
    let c = client(ca);
    let show = |s: &zebu_api::Setting| {
        println!("Name:        {}", s.name);
        println!("Value:       {}", s.value);
        println!("Default:     {}", s.default);
        println!("Description: {}", s.description);
    };
    match cmd {
        SettingCmd::List => {
            let all = c.list_settings().await?;
            if ca.output == Output::Json {
                print_json(&all);
                return Ok(());
            }
            table(
                &["NAME", "VALUE", "DEFAULT", "DESCRIPTION"],
                all.iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.value.clone(),
                            s.default.clone(),
                            s.description.clone(),
                        ]
                    })
                    .collect(),
            );
        }
        SettingCmd::Get { name } => {
            let s = c.get_setting(&name).await?;
            if ca.output == Output::Json {
                print_json(&s);
            } else {
                show(&s);
            }
        }
        SettingCmd::Set { name, value } => {
            let s = c.set_setting(&name, &value).await?;
            if ca.output == Output::Json {
                print_json(&s);
            } else {
                println!("setting {} is {}", s.name, s.value);
            }
        }
    }
    Ok(())
}

fn time_cell(unix: u64) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .saturating_sub(unix);
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

fn labels_cell(l: &std::collections::BTreeMap<String, String>) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn show_snapshot(s: &zebu_api::Snapshot, out: Output) {
    if out == Output::Json {
        return print_json(s);
    }
    println!("Name:      {}", s.name);
    println!("Volume:    {}", s.volume);
    println!("Parent:    {}", s.parent.as_deref().unwrap_or("-"));
    println!(
        "Children:  {}",
        if s.children.is_empty() {
            "-".into()
        } else {
            s.children.join(", ")
        }
    );
    println!(
        "Created:   {} ({})",
        time_cell(s.created_unix),
        s.created_unix
    );
    println!(
        "Size:      {} ({} bytes)",
        human(s.size_bytes),
        s.size_bytes
    );
    println!("Kind:      {}", s.kind);
    println!("Labels:    {}", labels_cell(&s.labels));
}

/// The snapshots as a tree (oldest at the top, children indented), then the live head.
fn snapshot_tree(all: &[zebu_api::Snapshot]) {
    fn walk(
        all: &[zebu_api::Snapshot],
        parent: Option<&str>,
        depth: usize,
        rows: &mut Vec<Vec<String>>,
    ) {
        for s in all.iter().filter(|s| s.parent.as_deref() == parent) {
            rows.push(vec![
                format!("{}{}", "  ".repeat(depth), s.name),
                human(s.size_bytes),
                time_cell(s.created_unix),
                s.kind.clone(),
                labels_cell(&s.labels),
            ]);
            walk(all, Some(&s.name), depth + 1, rows);
            if s.children.iter().any(|c| c == "volume-head") {
                rows.push(vec![
                    format!("{}volume-head", "  ".repeat(depth + 1)),
                    String::new(),
                    String::new(),
                    "live".into(),
                    String::new(),
                ]);
            }
        }
    }
    let mut rows = Vec::new();
    walk(all, None, 0, &mut rows);
    table(&["NAME", "SIZE", "CREATED", "KIND", "LABELS"], rows);
}

pub async fn snapshot(cmd: SnapshotCmd, ca: &ClientArgs) -> anyhow::Result<()> {
    use zebu_api::seg;
    let c = client(ca);
    match cmd {
        SnapshotCmd::Create {
            volume,
            name,
            labels,
            system,
        } => {
            let mut map = std::collections::BTreeMap::new();
            for l in labels {
                let Some((k, v)) = l.split_once('=') else {
                    bail!("label {l:?} is not KEY=VALUE; nothing was changed");
                };
                map.insert(k.to_owned(), v.to_owned());
            }
            let req = zebu_api::CreateSnapshot {
                name,
                labels: map,
                system,
            };
            let s: zebu_api::Snapshot = c
                .post(&format!("/v1/volumes/{}/snapshots", seg(&volume)), &req)
                .await?;
            show_snapshot(&s, ca.output);
        }
        SnapshotCmd::Purge { volume, wait } => {
            let gone: Vec<zebu_api::Snapshot> = c
                .post(
                    &format!("/v1/volumes/{}/snapshot-purge", seg(&volume)),
                    &serde_json::json!({}),
                )
                .await?;
            if ca.output == Output::Json {
                print_json(&gone);
            } else if gone.is_empty() {
                println!("volume {volume} has no system snapshots; nothing was changed");
            } else {
                let names: Vec<&str> = gone.iter().map(|s| s.name.as_str()).collect();
                println!(
                    "{} system snapshot(s) of volume {volume} deleted: {}; their data is merged in the background (zebu volume get {volume} shows the progress)",
                    gone.len(),
                    names.join(", ")
                );
            }
            if wait && !gone.is_empty() {
                wait_merged(&c, &volume).await?;
            }
        }
        SnapshotCmd::List { volume } => {
            let all: Vec<zebu_api::Snapshot> = c
                .get(&format!("/v1/volumes/{}/snapshots", seg(&volume)))
                .await?;
            if ca.output == Output::Json {
                print_json(&all);
            } else if all.is_empty() {
                println!(
                    "volume {volume} has no snapshots (take one: zebu snapshot create {volume})"
                );
            } else {
                snapshot_tree(&all);
            }
        }
        SnapshotCmd::Export {
            volume,
            name,
            dest,
            node,
        } => {
            let copied = crate::import::export_snapshot(&c, &volume, &name, &dest, node).await?;
            if ca.output == Output::Json {
                print_json(&serde_json::json!({
                    "volume": volume,
                    "snapshot": name,
                    "destination": dest,
                    "data_bytes": copied.data_bytes,
                    "hole_bytes": copied.hole_bytes,
                    "sha256": copied.sha256,
                }));
            } else {
                println!(
                    "snapshot {name} of volume {volume} exported to {dest}: {} of data, {} of holes kept; verified (sha256 {})",
                    human(copied.data_bytes),
                    human(copied.hole_bytes),
                    copied.sha256
                );
            }
        }
        SnapshotCmd::Get { volume, name } => {
            let s = c.get_snapshot(&volume, &name).await?;
            show_snapshot(&s, ca.output);
        }
        SnapshotCmd::Revert { volume, name } => {
            let s: zebu_api::Snapshot = c
                .post(
                    &format!(
                        "/v1/volumes/{}/snapshots/{}/revert",
                        seg(&volume),
                        seg(&name)
                    ),
                    &serde_json::json!({}),
                )
                .await?;
            if ca.output == Output::Json {
                print_json(&s);
            } else {
                println!("volume {volume} reverted to snapshot {name}");
            }
        }
        SnapshotCmd::Delete { volume, name, wait } => {
            let s: zebu_api::Snapshot = c
                .delete(&format!(
                    "/v1/volumes/{}/snapshots/{}",
                    seg(&volume),
                    seg(&name)
                ))
                .await?;
            if ca.output == Output::Json {
                print_json(&s);
            } else {
                println!("snapshot {name} of volume {volume} deleted; its data is merged in the background (zebu volume get {volume} shows the progress)");
            }
            if wait {
                wait_merged(&c, &volume).await?;
            }
        }
    }
    Ok(())
}
