//! `zebu`: the one binary — the all-in-one cluster (`up`), the manager and agent processes, and
//! the CLI client of the REST API.

mod cli;
mod clone;
mod fault_proxy;
mod import;
mod nbd_client;
mod size;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::watch;
use zebu_agent::{
    Agent, AgentConfig, Scrub, DEFAULT_BUSY_POLL_US, DEFAULT_DATA_PORT, DEFAULT_NBD_PORT,
    DEFAULT_SCRUB_INTERVAL_S, DEFAULT_SCRUB_MIBS,
};
use zebu_api::{ApiClient, CreateVolume, VolumeState};
use zebu_manager::Manager;

#[derive(Parser)]
#[command(
    name = "zebu",
    version,
    about = "Zebu: distributed, replicated block storage",
    long_about = "Zebu: distributed, replicated block storage.\n\n\
        Start everything on one machine with `zebu up`, then reach the `demo` volume over NBD,\n\
        or manage volumes with `zebu volume ...` (a client of the manager's REST API)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// --api, --token and -o: accepted before or after the subcommand, as kubectl takes them.
    #[command(flatten)]
    client: TopClientArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run an all-in-one cluster on this machine: a manager and N node agents in one process.
    Up(UpArgs),
    /// Run the manager (REST API, metadata store, reconcilers) as its own process.
    Manager(ManagerArgs),
    /// Run a node agent (replicas, engines, NBD server) as its own process.
    Agent(AgentArgs),
    /// Create, inspect, attach, detach and delete volumes.
    Volume(Group<VolumeCmd>),
    /// Take, list and delete a volume's snapshots.
    Snapshot(Group<SnapshotCmd>),
    /// Inspect nodes.
    Node(Group<NodeCmd>),
    /// List, show and change cluster-wide settings (Longhorn's names and units).
    Setting(Group<SettingCmd>),
    /// Work on a replica directory directly, without the cluster (recovery by hand).
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// For fault tests: a TCP proxy that passes, delays or cuts traffic as a control file
    /// says (`pass`, `delay MS`, `cut`; read every 100 ms).
    #[command(hide = true)]
    FaultProxy {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        control: PathBuf,
    },
}

#[derive(Subcommand)]
enum ReplicaCmd {
    /// Verify every block of a replica and write its contents to a raw image file.
    ///
    /// Reads the replica directory on its own (e.g. .../replicas/demo-r-1234abcd), checking each
    /// block's checksum. Run it on a detached volume's replica to get the data out by hand.
    Export {
        /// The replica directory (holds replica.meta).
        #[arg(long)]
        dir: PathBuf,
        /// The raw image to write (created; must not exist).
        output: PathBuf,
        /// Export this snapshot's content instead of the live head's.
        #[arg(long)]
        snapshot: Option<String>,
    },
}

#[derive(Args)]
struct UpArgs {
    /// Directory for the manager's metadata, the admin token and every node's replicas.
    #[arg(long, default_value = "./zebu-data")]
    data_dir: PathBuf,
    /// Number of simulated nodes (each an agent with its own data directory and address).
    #[arg(long, default_value_t = 3)]
    nodes: u8,
    /// Address of the manager's REST API.
    #[arg(long, default_value = "127.0.0.1:9500")]
    api: SocketAddr,
    /// Loopback address of the first node; node N gets this address plus N-1.
    #[arg(long, default_value = "127.0.0.1")]
    first_ip: Ipv4Addr,
    /// Do not create and attach the `demo` volume.
    #[arg(long)]
    no_demo: bool,
    #[command(flatten)]
    serving: ServingArgs,
}

/// How a node serves the volumes attached to it (for `up` and `agent`).
#[derive(Args)]
struct ServingArgs {
    /// How long, in microseconds, an NBD connection's thread polls its sockets before it
    /// sleeps, while a client has at most one request in flight. Saves a thread wake-up per
    /// request (on a VM most of a 4 KiB write's latency) for some CPU; the window adapts per
    /// connection and drops to zero while a connection is idle. 0 turns it off; at most 1000.
    #[arg(long, default_value_t = DEFAULT_BUSY_POLL_US, value_name = "US",
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    busy_poll_us: u64,
    /// Seconds from the end of one scrub of an attached volume to the start of the next: every
    /// stored block of every replica is read and checked, and damaged copies are rewritten
    /// from a clean one (damage that reads never meet is found too). The first runs this long
    /// after the volume is first attached on the node; the time of the last one is kept in
    /// DATA_DIR/scrubs, so restarts keep the schedule. 0 turns scrubs off.
    #[arg(long, default_value_t = DEFAULT_SCRUB_INTERVAL_S, value_name = "SECS")]
    scrub_interval: u64,
    /// Scrub speed limit for each volume, in MiB of volume data per second (each MiB is read
    /// from every replica), so scrubs leave the disks to the workload. 0: unlimited.
    #[arg(long, default_value_t = DEFAULT_SCRUB_MIBS, value_name = "MIB")]
    scrub_rate: u64,
    /// Speed of a deleted snapshot's merge into its neighbour, in MiB a second, so merges
    /// leave the disks to the workload. 0: unlimited.
    #[arg(long, default_value_t = 128, value_name = "MIB")]
    snapshot_merge_rate: u64,
    /// NBD connections the node takes at once (negotiating or serving); past it a client is
    /// refused, with a log line naming it, and the node's status says so.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_nbd_connections: usize,
    /// NBD connections one volume takes at once on its node.
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_nbd_connections_per_volume: usize,
    /// Memory all NBD clients of the node together may hold in requests in flight and in
    /// replies their clients have not taken yet (e.g. 1GiB); past it, requests wait to be
    /// read. Each connection also holds at most 64 MiB of requests and 32 MiB of replies.
    #[arg(long, default_value = "1GiB", value_parser = size::parse_size, value_name = "SIZE")]
    max_nbd_memory: u64,
    /// An NBD client that takes none of its replies for this many seconds (it has stopped
    /// reading) is disconnected, with a log line naming it, and what its replies held is let go.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    nbd_send_timeout: u64,
    /// An NBD connection with no request for this many seconds gives back its thread and its
    /// connections to other nodes, and waits for its next request without them (a connection
    /// over TLS keeps its thread). 0: never.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    nbd_idle_release: u64,
    /// TLS for NBD over TCP with pre-shared keys: a file of IDENTITY:HEXKEY lines, as GnuTLS's
    /// `psktool -u NAME -p FILE` makes and qemu and libnbd read (clients connect with
    /// nbds://NAME@HOST/VOLUME?tls-psk-file=FILE). With TLS, TCP clients that do not start it
    /// are refused; the node's unix socket stays plain.
    #[arg(long, value_name = "FILE")]
    nbd_tls_psk_file: Option<PathBuf>,
    /// TLS for NBD over TCP with X.509: a directory with server-cert.pem and server-key.pem,
    /// and ca-cert.pem to require client certificates signed by it (qemu's and nbdkit's
    /// layout; without ca-cert.pem, clients are not authenticated, which is refused on an
    /// address other than loopback unless --nbd-allow-plain-tcp). May be given with
    /// --nbd-tls-psk-file. Any client that proves itself reaches every volume on the node.
    #[arg(long, value_name = "DIR")]
    nbd_tls_x509_dir: Option<PathBuf>,
    /// Serve NBD over TCP to clients without TLS: needed to serve NBD on an address other than
    /// loopback without TLS credentials; with them, makes TLS optional.
    #[arg(long)]
    nbd_allow_plain_tcp: bool,
    /// Speak the data protocol (engines to replicas, between nodes) over TLS: this node's
    /// engines start TLS, and its replica server refuses engines that do not. Give it to every
    /// agent of the cluster. Both ends already prove they hold the cluster secret without it;
    /// TLS adds secrecy and integrity of the data itself on the wire, for some CPU.
    #[arg(long)]
    data_tls: bool,
    /// For durability tests only: `crash-sim` puts the replicas' files behind a cache in this
    /// process, written to disk only by a flush (or early, at random, whole or torn, as a
    /// kernel's writeback would), so ending the process loses what was not flushed, as a power
    /// cut does. `direct` (the default) is the real files. Hidden: never for real data.
    #[arg(long, env = "ZEBU_FILE_LAYER", value_enum, default_value_t = FileLayerArg::Direct, hide = true)]
    file_layer: FileLayerArg,
    /// Serve every volume attached to the node as a file DIR/VOLUME of the volume's size,
    /// through FUSE (needs /dev/fuse and fusermount3): `losetup --direct-io=on -f --show
    /// DIR/VOLUME` makes it a block device without kernel NBD. With `up`, each node's files are
    /// in DIR/node-N. Unmounted when the agent stops. Default: not served.
    #[arg(long, value_name = "DIR")]
    fuse_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FileLayerArg {
    Direct,
    CrashSim,
}

impl ServingArgs {
    fn nbd_limits(&self) -> zebu_agent::NbdLimits {
        zebu_agent::NbdLimits {
            per_node: self.max_nbd_connections,
            per_export: self.max_nbd_connections_per_volume,
            memory_bytes: self.max_nbd_memory,
            send_stall: Duration::from_secs(self.nbd_send_timeout.max(1)),
            idle_release: (self.nbd_idle_release > 0)
                .then(|| Duration::from_secs(self.nbd_idle_release)),
            ..Default::default()
        }
    }
    fn nbd_tls(&self) -> zebu_agent::NbdTlsFiles {
        zebu_agent::NbdTlsFiles {
            psk_file: self.nbd_tls_psk_file.clone(),
            x509_dir: self.nbd_tls_x509_dir.clone(),
        }
    }
    fn busy_poll(&self) -> Duration {
        Duration::from_micros(self.busy_poll_us)
    }
    fn files(&self) -> Arc<dyn zebu_replica::file::FileLayer> {
        match self.file_layer {
            FileLayerArg::Direct => zebu_replica::file::direct(),
            FileLayerArg::CrashSim => {
                let seed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
                    ^ std::process::id() as u64;
                tracing::warn!(
                    seed,
                    "crash-simulating file layer (writeback from 8 MiB dirty per file)"
                );
                Arc::new(zebu_replica::file::CrashSim::new(8 << 20, seed))
            }
        }
    }
    fn scrub(&self) -> Scrub {
        Scrub {
            interval: Duration::from_secs(self.scrub_interval),
            rate: self.scrub_rate.saturating_mul(1 << 20),
        }
    }
}

#[derive(Args)]
struct ManagerArgs {
    /// Directory for the metadata store (meta.redb), cluster.id, the tokens (admin.token,
    /// readonly.token, agent.token) and cluster.secret.
    #[arg(long)]
    data_dir: PathBuf,
    /// Address of the REST API.
    #[arg(long, default_value = "127.0.0.1:9500")]
    listen: SocketAddr,
    /// The metadata store (DATA_DIR/meta.redb) is lost or damaged: move a damaged one aside
    /// and rebuild the volume and replica records from what the agents hold on their disks.
    /// Agents keep serving what they run meanwhile; changes are refused until the window ends.
    #[arg(long)]
    recover_from_agents: bool,
    /// How long to gather the agents' reports when recovering (every node that holds
    /// replicas should heartbeat within it). Also used by a recovery that did not finish,
    /// which any start of the manager resumes.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    recover_window: u64,
    /// When the manager's whole data directory is lost: the id of the cluster to recover (in
    /// DATA_DIR/cluster.id on any of its nodes). Agents of another cluster are refused.
    #[arg(long, value_name = "ID", requires = "recover_from_agents")]
    cluster_id: Option<String>,
}

#[derive(Args)]
struct AgentArgs {
    /// URL of the manager, e.g. http://127.0.0.1:9500.
    #[arg(long, env = "ZEBU_API")]
    manager: String,
    /// Name of this node (lowercase letters, digits and '-').
    #[arg(long)]
    node: String,
    /// The node's disk: replicas are stored under DIR/replicas.
    #[arg(long)]
    data_dir: PathBuf,
    /// The node's address; replica traffic and NBD are served there.
    #[arg(long, default_value = "127.0.0.1")]
    listen: IpAddr,
    /// Port of the replica data server.
    #[arg(long, default_value_t = DEFAULT_DATA_PORT)]
    data_port: u16,
    /// The port other nodes reach the replica data server on, if not --data-port (a port
    /// forward or a proxy between the nodes).
    #[arg(long, value_name = "PORT")]
    advertise_data_port: Option<u16>,
    /// Port of the NBD server.
    #[arg(long, default_value_t = DEFAULT_NBD_PORT)]
    nbd_port: u16,
    /// The manager's agent token, which may send heartbeats and retirement records but not
    /// manage volumes (default: $ZEBU_AGENT_TOKEN, else ./zebu-data/agent.token; the manager
    /// writes it to DATA_DIR/agent.token).
    #[arg(long, env = "ZEBU_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    serving: ServingArgs,
}

/// The client options as given before the subcommand (`zebu --api URL volume list`).
#[derive(Args, Clone, Default)]
struct TopClientArgs {
    /// URL of the manager's REST API (default: $ZEBU_API, else http://127.0.0.1:9500).
    #[arg(long = "api", value_name = "URL")]
    client_api: Option<String>,
    /// API token (default: $ZEBU_TOKEN, else the contents of ./zebu-data/admin.token).
    #[arg(long = "token", value_name = "TOKEN")]
    client_token: Option<String>,
    /// Output format: table (default) or json.
    #[arg(short = 'o', long = "output", value_enum)]
    client_output: Option<Output>,
}

/// The client options of a CLI command group, accepted anywhere after its name
/// (`zebu volume list --api URL`, `zebu volume -o json get NAME`).
#[derive(Args, Clone, Default)]
struct GroupClientArgs {
    /// URL of the manager's REST API (default: $ZEBU_API, else http://127.0.0.1:9500).
    #[arg(long, value_name = "URL", global = true)]
    api: Option<String>,
    /// API token (default: $ZEBU_TOKEN, else the contents of ./zebu-data/admin.token).
    #[arg(long, global = true)]
    token: Option<String>,
    /// Output format: table (default) or json.
    #[arg(short = 'o', long, value_enum, global = true)]
    output: Option<Output>,
}

/// Where the CLI sends its requests and how it prints answers.
#[derive(Clone)]
struct ClientArgs {
    api: String,
    token: Option<String>,
    output: Output,
}

impl ClientArgs {
    /// Options after the subcommand win over those before it, both over the environment.
    fn resolve(top: &TopClientArgs, group: &GroupClientArgs) -> ClientArgs {
        ClientArgs {
            api: group
                .api
                .clone()
                .or_else(|| top.client_api.clone())
                .or_else(|| std::env::var("ZEBU_API").ok().filter(|s| !s.is_empty()))
                .unwrap_or_else(|| "http://127.0.0.1:9500".into()),
            token: group
                .token
                .clone()
                .or_else(|| top.client_token.clone())
                .or_else(|| std::env::var("ZEBU_TOKEN").ok().filter(|s| !s.is_empty())),
            output: group.output.or(top.client_output).unwrap_or(Output::Table),
        }
    }
}

/// A CLI command group with its client options.
#[derive(Args)]
struct Group<C: Subcommand + clap::FromArgMatches> {
    #[command(subcommand)]
    cmd: C,
    #[command(flatten)]
    client: GroupClientArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume; its replicas are placed on distinct nodes.
    ///
    /// With --from, the volume gets another image's content: a raw image file (or block
    /// device) or another NBD server's export (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH). The source is read before anything is created; the
    /// volume is attached, written (holes and zero blocks are skipped, so they stay holes),
    /// read back and compared by sha256, then detached. If that fails, the volume is deleted.
    Create {
        name: String,
        /// Size, e.g. 1GiB, 512MiB, 10G (K/M/G/T and Ki/Mi/Gi/Ti are powers of 1024; KB/MB/GB/TB of 1000).
        /// With --from: at least the source's size (default: the source's size, rounded up to
        /// whole 4 KiB blocks).
        #[arg(long, required_unless_present = "from")]
        size: Option<String>,
        /// Number of replicas (default: the default-replica-count setting, 3 unless changed).
        #[arg(long)]
        replicas: Option<u32>,
        /// Import this raw image file, block device or NBD URI into the new volume.
        #[arg(long, value_name = "FILE|NBD-URI")]
        from: Option<String>,
        /// With --from: the node to attach the volume to while it is written (default: where
        /// the manager places it).
        #[arg(long, requires = "from")]
        node: Option<String>,
    },
    /// Make a new volume with a snapshot's content, usable at once: it is attached (to --node,
    /// or where the manager places it) and its NBD URI printed while its engine copies the
    /// snapshot in the background, reading what it has not copied yet from the source's
    /// replicas. `zebu volume get NEW` shows how far the copy is; until it is done the source
    /// snapshot and volume cannot be deleted and the clone cannot be expanded or snapshotted.
    /// The copy is paced by replica-rebuild-bandwidth-limit and runs only while the clone is
    /// attached (detached, it pauses and resumes where it was).
    Clone {
        /// The new volume's name.
        name: String,
        /// The snapshot to copy, as VOLUME/SNAPSHOT.
        #[arg(long, value_name = "VOLUME/SNAPSHOT")]
        from: String,
        /// Number of replicas (default: the default-replica-count setting).
        #[arg(long)]
        replicas: Option<u32>,
        /// The node to attach the clone to (default: where the manager places it).
        #[arg(long, conflicts_with = "no_attach")]
        node: Option<String>,
        /// Only create the clone; its copy starts when it is attached.
        #[arg(long, conflicts_with = "wait")]
        no_attach: bool,
        /// Wait until the copy is done, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// List volumes.
    List,
    /// Show one volume and its replicas.
    Get {
        name: String,
        /// Redraw every second until the volume is healthy, with a progress bar for each
        /// rebuilding replica (Ctrl-C stops watching; the rebuild goes on).
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Attach a volume to a node and print its NBD URI once it serves I/O.
    Attach {
        name: String,
        /// Node to attach to (default: a node holding a healthy replica).
        #[arg(long)]
        node: Option<String>,
        /// Do not wait for the volume to be attached.
        #[arg(long)]
        no_wait: bool,
    },
    /// Detach a volume (its NBD export goes away; data stays).
    Detach {
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Bring back a volume whose replicas have all failed.
    ///
    /// Without --replica: from the freshest replica(s) by recorded evidence (the generation),
    /// refused, with the reason, if one of the freshest cannot be read now. With --replica:
    /// from that one, accepting that writes only fresher replicas hold are lost. The other
    /// replicas then rejoin by rebuild from it. (The manager does the first by itself while the
    /// auto-salvage setting is true.)
    Salvage {
        name: String,
        /// The replica to bring back (see `zebu volume get NAME`).
        #[arg(long)]
        replica: Option<String>,
    },
    /// Grow a volume, attached (under I/O) or detached; shrinking is refused.
    ///
    /// The new size is recorded first; an attached volume's replicas then grow (a brief pause of
    /// I/O on each, as for a snapshot), then its engine: an NBD connection opened after that sees
    /// the new size (one open already keeps the size it negotiated; reconnect it). A detached
    /// volume's replicas grow when it is next attached. The data is untouched; grow the
    /// filesystem on it afterwards (e.g. resize2fs). Waits until the engine serves the new size,
    /// unless --no-wait; while a rebuild runs the growth waits for it.
    Expand {
        name: String,
        /// The new size, e.g. 20GiB (a whole number of 4 KiB blocks; at least the current size).
        #[arg(long)]
        size: String,
        /// Do not wait for the attached engine to serve the new size.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a detached volume and all its replicas.
    Delete {
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Take a snapshot of an attached volume, crash-consistent across its replicas (I/O pauses
    /// only while every replica switches to a new head; nothing is copied).
    Create {
        volume: String,
        /// The snapshot's name (default: snap- and 8 hex digits).
        name: Option<String>,
        /// A label, KEY=VALUE; may be repeated.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Take it as a system snapshot (the kind Zebu takes for its own work, which
        /// `zebu snapshot purge` removes) rather than a user one.
        #[arg(long)]
        system: bool,
    },
    /// Delete every system snapshot of a volume (those Zebu took for its own work; user
    /// snapshots stay). Each is merged in the background, as a deletion is.
    Purge {
        volume: String,
        /// Wait until every replica has merged them, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// List a volume's snapshots: a tree in the table, a list with `parent` in -o json.
    List { volume: String },
    /// Show one snapshot.
    Get { volume: String, name: String },
    /// Make a detached volume's content exactly a snapshot's (refused while attached). What
    /// was written since that snapshot is dropped; snapshots taken after it stay.
    Revert { volume: String, name: String },
    /// Delete a snapshot. It is gone at once; its data is merged into the snapshot (or the
    /// live head) above it in the background, paced, resumed after any crash; `zebu volume get`
    /// shows the merge's progress.
    Delete {
        volume: String,
        name: String,
        /// Wait until every replica has merged its data, with a progress bar (Ctrl-C stops
        /// waiting; the merge goes on).
        #[arg(long)]
        wait: bool,
    },
    /// Write a snapshot's content to a new raw image file or to an NBD export
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH): holes are kept, and the
    /// result is read back and compared by sha256. A detached volume is attached for it (to
    /// --node, or where the manager places it) and detached again.
    Export {
        volume: String,
        name: String,
        /// A file that does not exist yet, or an NBD URI at least the volume's size.
        #[arg(value_name = "FILE|NBD-URI")]
        dest: String,
        /// The node to attach a detached volume to for the export.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Subcommand)]
enum SettingCmd {
    /// List every setting with its value, default and meaning.
    List,
    /// Show one setting.
    Get {
        /// e.g. replica-replenishment-wait-interval (see `zebu setting list`).
        name: String,
    },
    /// Change a setting; the manager checks the value and keeps it across restarts.
    Set {
        name: String,
        /// The new value, in the setting's unit (see `zebu setting list`).
        #[arg(allow_hyphen_values = true)]
        value: String,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List nodes and whether they are ready.
    List,
    /// Forget a node that is gone for good (its agent stopped): the records of its replicas go
    /// with it, so its volumes heal on other nodes or can be deleted, and volumes attached there
    /// are detached. Refused while the node is up, and while it holds the only in-sync copy of
    /// a volume unless --force repeats the node's name. Its disk is not touched.
    Delete {
        /// The node to forget.
        name: String,
        /// Remove it even if it holds the only in-sync copy of a volume: repeat its name.
        #[arg(long, value_name = "NAME")]
        force: Option<String>,
    },
}

fn default_token(explicit: Option<String>) -> String {
    if let Some(t) = explicit {
        return t.trim().to_owned();
    }
    std::fs::read_to_string(Path::new("zebu-data").join(zebu_manager::TOKEN_FILE))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZEBU_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
    let server = matches!(
        cli.command,
        Command::Up(_) | Command::Manager(_) | Command::Agent(_)
    );
    init_logging(if server { "info" } else { "warn" });
    if !server {
        // A CLI command whose output goes to a reader that stopped (`| head`) ends quietly, as
        // Unix tools do, rather than with a panic's backtrace. (SIGPIPE stays ignored: a
        // socket whose peer went away must give an error, not end the command unseen.)
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
                std::process::exit(141);
            }
            default(info);
        }));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if server { 2 } else { 1 })
        .thread_name("zebu-control")
        .enable_all()
        .build()
        .expect("the control runtime must start");
    let top = cli.client.clone();
    let top_given =
        top.client_api.is_some() || top.client_token.is_some() || top.client_output.is_some();
    if server && top_given {
        eprintln!("error: --api, --token and -o before the subcommand are for CLI commands (volume, node, setting); give a server's own options after its name, e.g. `zebu up --api 127.0.0.1:9500`");
        std::process::exit(2);
    }
    let result = rt.block_on(async move {
        match cli.command {
            Command::Up(a) => up(a).await,
            Command::Manager(a) => manager(a).await,
            Command::Agent(a) => agent(a).await,
            Command::Volume(g) => cli::volume(g.cmd, &ClientArgs::resolve(&top, &g.client)).await,
            Command::Node(g) => cli::node(g.cmd, &ClientArgs::resolve(&top, &g.client)).await,
            Command::Snapshot(g) => {
                cli::snapshot(g.cmd, &ClientArgs::resolve(&top, &g.client)).await
            }
            Command::Setting(g) => cli::setting(g.cmd, &ClientArgs::resolve(&top, &g.client)).await,
            Command::Replica(ReplicaCmd::Export {
                dir,
                output,
                snapshot,
            }) => replica_export(&dir, &output, snapshot.as_deref()),
            Command::FaultProxy {
                listen,
                to,
                control,
            } => fault_proxy::run(listen, to, control).await,
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn replica_export(dir: &Path, output: &Path, snapshot: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let r = zebu_replica::Replica::open_beside(dir)?;
    let view = snapshot.map(|s| r.snapshot_view(s)).transpose()?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(output)
        .with_context(|| format!("creating {} (it must not exist yet)", output.display()))?;
    f.set_len(r.size_bytes())?;
    let chunk = 4u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut at = 0;
    let start = Instant::now();
    while at < r.size_bytes() {
        let n = chunk.min(r.size_bytes() - at) as usize;
        match &view {
            Some(v) => v.read(at, &mut buf[..n])?,
            None => r.read(at, &mut buf[..n])?,
        }
        // Leave zero ranges as holes in the output.
        if buf[..n].iter().any(|&b| b != 0) {
            f.write_all_at(&buf[..n], at)?;
        }
        at += n as u64;
        if start.elapsed().as_secs() > 2 && at % (1 << 30) == 0 {
            eprint!("\r{} of {} GiB", at >> 30, r.size_bytes() >> 30);
        }
    }
    f.sync_all()?;
    std::io::stderr().flush().ok();
    println!(
        "{}replica {} of volume {} (generation {}) exported to {}: {} bytes, every block verified",
        snapshot
            .map(|s| format!("snapshot {s} of "))
            .unwrap_or_default(),
        r.name(),
        r.volume(),
        r.generation(),
        output.display(),
        r.size_bytes()
    );
    Ok(())
}

async fn manager(a: ManagerArgs) -> anyhow::Result<()> {
    // The window also applies to a recovery that did not finish, resumed by any start.
    let recover = Some(Duration::from_secs(a.recover_window)).filter(|_| a.recover_from_agents);
    let resume_window = Duration::from_secs(a.recover_window);
    let m = Manager::open(&a.data_dir, recover, resume_window, a.cluster_id.as_deref())?;
    eprintln!(
        "admin token in {}, the agents' token in {}, a read-only token in {}",
        a.data_dir.join(zebu_manager::TOKEN_FILE).display(),
        a.data_dir.join(zebu_manager::AGENT_TOKEN_FILE).display(),
        a.data_dir.join(zebu_manager::READONLY_TOKEN_FILE).display()
    );
    zebu_manager::serve(m, a.listen, shutdown_signal()).await
}

async fn agent(a: AgentArgs) -> anyhow::Result<()> {
    let token = match a.token {
        Some(t) => t.trim().to_owned(),
        None => {
            std::fs::read_to_string(Path::new("zebu-data").join(zebu_manager::AGENT_TOKEN_FILE))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        }
    };
    let agent = Agent::start(AgentConfig {
        node: a.node,
        data_dir: a.data_dir,
        listen_ip: a.listen,
        data_port: a.data_port,
        advertise_data_port: a.advertise_data_port,
        nbd_port: a.nbd_port,
        manager_url: a.manager,
        token,
        heartbeat_interval: Duration::from_secs(1),
        io_threads: 4,
        busy_poll: a.serving.busy_poll(),
        nbd_limits: a.serving.nbd_limits(),
        nbd_tls: a.serving.nbd_tls(),
        nbd_plain_tcp: a.serving.nbd_allow_plain_tcp,
        data_tls: a.serving.data_tls,
        scrub: a.serving.scrub(),
        merge_rate: a.serving.snapshot_merge_rate.saturating_mul(1 << 20),
        files: a.serving.files(),
        fuse_dir: a.serving.fuse_dir.clone(),
    })?;
    let (tx, rx) = watch::channel(false);
    let run = tokio::spawn(agent.run(rx));
    shutdown_signal().await;
    let _ = tx.send(true);
    let _ = run.await;
    Ok(())
}

async fn up(a: UpArgs) -> anyhow::Result<()> {
    if a.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let m = Manager::open(
        &a.data_dir,
        None,
        zebu_manager::state::recovery::DEFAULT_WINDOW,
        None,
    )?;
    let token = m.token().to_owned();
    let agent_token = m.agent_token().to_owned();
    let (stop_tx, stop_rx) = watch::channel(false);
    let api_task = {
        let mut rx = stop_rx.clone();
        let listener_check = tokio::net::TcpListener::bind(a.api)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (is another `zebu up` running? use --api)",
                    a.api
                )
            })?;
        drop(listener_check);
        tokio::spawn(zebu_manager::serve(m.clone(), a.api, async move {
            let _ = rx.wait_for(|s| *s).await;
        }))
    };
    let url = format!("http://{}", a.api);
    let mut agents = Vec::new();
    let files = a.serving.files();
    for i in 0..a.nodes {
        let ip = Ipv4Addr::from(u32::from(a.first_ip) + i as u32);
        let node = format!("node-{}", i + 1);
        let agent = Agent::start(AgentConfig {
            node: node.clone(),
            data_dir: a.data_dir.join("nodes").join(&node),
            listen_ip: IpAddr::V4(ip),
            data_port: DEFAULT_DATA_PORT,
            advertise_data_port: None,
            nbd_port: DEFAULT_NBD_PORT,
            manager_url: url.clone(),
            token: agent_token.clone(),
            heartbeat_interval: Duration::from_secs(1),
            io_threads: 3,
            busy_poll: a.serving.busy_poll(),
            nbd_limits: a.serving.nbd_limits(),
            nbd_tls: a.serving.nbd_tls(),
            nbd_plain_tcp: a.serving.nbd_allow_plain_tcp,
            data_tls: a.serving.data_tls,
            scrub: a.serving.scrub(),
            merge_rate: a.serving.snapshot_merge_rate.saturating_mul(1 << 20),
            files: files.clone(),
            fuse_dir: a.serving.fuse_dir.as_ref().map(|d| d.join(&node)),
        })?;
        agents.push(tokio::spawn(agent.run(stop_rx.clone())));
    }
    let client = ApiClient::new(&url, &token);
    // Wait until every node has checked in.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = client
            .list_nodes()
            .await
            .map(|n| n.iter().filter(|n| n.ready).count())
            .unwrap_or(0);
        if ready >= a.nodes as usize {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {ready} of {} nodes checked in within 30 s; see the log above",
                a.nodes
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "Zebu is up: manager API {url}, {} node(s), data in {}",
        a.nodes,
        a.data_dir.display()
    );
    println!(
        "  token: {}",
        a.data_dir.join(zebu_manager::TOKEN_FILE).display()
    );
    if !a.no_demo {
        let demo = match client.get_volume("demo").await {
            Ok(v) => v,
            Err(e) if e.status() == Some(404) => {
                let replicas = (a.nodes as u32).min(3);
                client
                    .create_volume(&CreateVolume {
                        name: "demo".into(),
                        size_bytes: 1 << 30,
                        replica_count: Some(replicas),
                        clone_from: None,
                    })
                    .await?
            }
            Err(e) => return Err(e.into()),
        };
        if demo.desired_node.is_none() {
            client.attach_volume("demo", Some("node-1".into())).await?;
        }
        let v = cli::wait_for(&client, "demo", Duration::from_secs(90), |v| {
            v.state == VolumeState::Attached
        })
        .await?;
        let uri = v.nbd_uri.clone().unwrap_or_default();
        println!();
        println!(
            "Volume demo ({} bytes, {} replicas) is attached: {uri}",
            v.size_bytes, v.replica_count
        );
        println!("  qemu-img info {uri}");
        println!("  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}");
        match &a.serving.fuse_dir {
            Some(dir) => {
                let node = v.node.as_deref().unwrap_or("node-1");
                println!(
                    "  as a block device: losetup --direct-io=on -f --show {}",
                    dir.join(node).join("demo").display()
                );
            }
            None => println!(
                "  as a block device: start up with --fuse-dir DIR (docs/frontends.md), or: mkdir -p /tmp/zebu-fuse && nbdfuse /tmp/zebu-fuse/demo {uri} &   # then: losetup -f --show /tmp/zebu-fuse/demo"
            ),
        }
        if let Some(local) = &v.nbd_unix_uri {
            println!("  on this machine, the same volume over a unix socket (faster): '{local}'");
        }
    }
    println!("\nPress Ctrl-C to stop. Manage volumes with: zebu volume list");
    shutdown_signal().await;
    eprintln!("shutting down...");
    let _ = stop_tx.send(true);
    for a in agents {
        let _ = a.await;
    }
    let _ = api_task.await;
    // Every agent has flushed its engines; the process exits now.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks (duplicate names between global and local options, ...),
    /// which otherwise run only in debug builds.
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
