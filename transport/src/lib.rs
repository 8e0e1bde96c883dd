//! Transport: how meridian sites talk to each other.
//!
//! - [`proto`]: the site-to-site wire protocol, pure and versioned — namespace sync sessions,
//!   pushes of fresh changes, "which sites hold version V", chunk requests and responses with
//!   priorities. Every message is length-bounded and decoding hostile bytes returns an error.
//!
//! To come: `p2p`, the libp2p binding (QUIC with TLS 1.3, TCP with Noise as fallback,
//! gossipsub, streams) gated by mesh membership; and `staging`, the shared S3 bucket used
//! between regions, with client-side encryption.

pub mod proto;

/// Version of the site-to-site protocol. Bumped on any incompatible change of a message.
pub const PROTOCOL_VERSION: u16 = 1;
