//! Transport: how meridian sites talk to each other.
//!
//! - [`proto`] (its own crate, `transport/proto`, re-exported): the site-to-site wire protocol,
//!   pure and versioned — namespace sync sessions,
//!   pushes of fresh changes, "which sites hold version V", chunk requests and responses with
//!   priorities. Every message is length-bounded and decoding hostile bytes returns an error.
//!
//! - [`p2p`]: the libp2p binding — QUIC with TLS 1.3 first, TCP with Noise and Yamux as
//!   fallback, gossipsub for pushes, one framed stream per direction and peer for everything
//!   else — gated by mesh membership, with redial and backoff.
//!
//! - [`staging`]: the shared S3 bucket between regions — chunks packed into large objects
//!   sealed with a key of the mesh, ranged reads checked against their hashes, multipart
//!   uploads, bounded concurrency, retries, cleanup.
//!
//! - `s3_local` (feature `local-s3`): a real S3-compatible server on loopback inside the process
//!   (s3s + s3s-fs), the demo's staging store and the tests' server.

pub mod p2p;
pub use proto;
#[cfg(feature = "local-s3")]
pub mod s3_local;
pub mod staging;

pub use proto::PROTOCOL_VERSION;
