//! Zebu replica: a full, thin-provisioned copy of a volume on one disk, stored as a chain of
//! checksummed layers ([`store`]), with its metadata replaced crash-safely ([`meta`]), and the
//! data server engines talk to ([`server`]). `docs/formats.md` describes the files byte by byte.

pub mod error;
pub mod file;
pub mod io_pool;
pub mod meta;
pub mod ops;
pub mod server;
pub mod store;
pub mod tls;
pub mod wil;

pub use error::ReplicaError;
pub use io_pool::IoPool;
pub use server::ReplicaServer;
pub use store::{Replica, ReplicaFacts, Session, DEFAULT_BLOCK_SIZE};
