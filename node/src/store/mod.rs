//! The site's durable store: one redb database for metadata and a directory of chunk files.
//!
//! Crash safety (DESIGN.md, "Persistence and crash safety"): chunks are made durable first (temp
//! file, rename, then one `syncfs` for all of a put's chunks); then one redb transaction records
//! the chunk index, the version's manifest and the namespace change that refers to it. After `kill -9` at any moment the
//! namespace only refers to versions whose chunks are durable; chunk files no transaction
//! recorded are leftovers and are removed when the store opens.

pub mod chunks;
pub mod claims;
pub mod db;
pub mod put;

pub use chunks::{ChunkError, ChunkStore};
pub use claims::Claim;
pub use db::{Db, DbError, Recovery};
pub use put::{PutError, PutOutcome, put_stream};
