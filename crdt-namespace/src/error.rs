//! Errors: one enum per family of operations.

use thiserror::Error;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The name is empty.
    #[error("a name cannot be empty")]
    Empty,
    /// The name is longer than 255 bytes.
    #[error("a name is at most 255 bytes, this one is {len}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The name is `.`.
    #[error("a name cannot be `.`")]
    Dot,
    /// The name is `..`.
    #[error("a name cannot be `..`")]
    DotDot,
    /// The name contains `/`.
    #[error("a name cannot contain `/`")]
    Slash,
    /// The name contains NUL.
    #[error("a name cannot contain NUL")]
    Nul,
}

/// Errors of local operations and reads: bad paths, missing entries, wrong kinds.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OpError {
    /// Every HLC after the largest one seen is taken: a local operation cannot get an id.
    #[error("the clock cannot advance past {last}: no operation can be recorded")]
    ClockExhausted {
        /// The largest HLC seen.
        last: crate::Hlc,
    },
    /// The path does not start with `/`.
    #[error("path {path:?} is not absolute (it must start with `/`)")]
    NotAbsolute {
        /// The path given.
        path: String,
    },
    /// A component of the path is not a valid name.
    #[error("invalid name {name:?} in path {path:?}: {reason}")]
    InvalidName {
        /// The path given.
        path: String,
        /// The offending component.
        name: String,
        /// What is wrong with it.
        reason: NameError,
    },
    /// The path has more components than [`crate::PATH_DEPTH_MAX`].
    #[error("path {path:?} is deeper than {} components", crate::PATH_DEPTH_MAX)]
    TooDeep {
        /// The path given.
        path: String,
    },
    /// Nothing lives at the path.
    #[error("no such file or directory: {path}")]
    NotFound {
        /// The first missing path.
        path: String,
    },
    /// A directory was needed.
    #[error("not a directory: {path}")]
    NotADirectory {
        /// The path that is not a directory.
        path: String,
    },
    /// A file was needed, the path is a directory.
    #[error("is a directory: {path}")]
    IsADirectory {
        /// The path that is a directory.
        path: String,
    },
    /// A file was needed, the path is a symlink.
    #[error("is a symlink: {path}")]
    IsASymlink {
        /// The path that is a symlink.
        path: String,
    },
    /// Something already lives at the path.
    #[error("already exists: {path}")]
    AlreadyExists {
        /// The path given.
        path: String,
    },
    /// A non-recursive remove of a directory that has entries.
    #[error("directory not empty: {path} (remove it recursively)")]
    NotEmpty {
        /// The directory.
        path: String,
    },
    /// A move of a directory into itself or below itself.
    #[error("cannot move {from} into itself ({to})")]
    MoveIntoSelf {
        /// The source.
        from: String,
        /// The destination.
        to: String,
    },
    /// The root cannot be moved, removed or replaced.
    #[error("the root directory cannot be {action}")]
    Root {
        /// What was attempted.
        action: &'static str,
    },
    /// A tag key or value was refused.
    #[error("invalid tag: {reason}")]
    InvalidTag {
        /// What is wrong.
        reason: String,
    },
    /// A symlink target was refused.
    #[error("invalid symlink target: {reason}")]
    InvalidSymlinkTarget {
        /// What is wrong.
        reason: String,
    },
    /// A path glob was refused.
    #[error("invalid glob {glob:?}: {reason}")]
    InvalidGlob {
        /// The glob given.
        glob: String,
        /// What is wrong.
        reason: String,
    },
    /// A tag predicate was refused.
    #[error("invalid tag predicate {predicate:?}: {reason}")]
    InvalidPredicate {
        /// The predicate given.
        predicate: String,
        /// What is wrong.
        reason: String,
    },
}

/// Errors of decoding bytes that come from outside: peers, disk.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended early.
    #[error("truncated input while reading {what}")]
    Truncated {
        /// What was being read.
        what: &'static str,
    },
    /// A length or count is beyond its bound.
    #[error("{what} is {len}, more than the bound of {max}")]
    TooLong {
        /// What was being read.
        what: &'static str,
        /// The length or count found.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A variable-length integer does not fit 64 bits.
    #[error("integer overflow while reading {what}")]
    Overflow {
        /// What was being read.
        what: &'static str,
    },
    /// A tag byte is unknown.
    #[error("unknown {what} tag {tag}")]
    UnknownTag {
        /// What was being read.
        what: &'static str,
        /// The tag found.
        tag: u8,
    },
    /// Bytes were left after the end of a value.
    #[error("{count} unexpected bytes after {what}")]
    TrailingBytes {
        /// What was read.
        what: &'static str,
        /// How many bytes were left.
        count: usize,
    },
    /// A value was read but is not valid.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was read.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Errors of exchanging the namespace: import, load, sync messages.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExchangeError {
    /// The input is larger than accepted.
    #[error("{what} of {len} bytes is larger than the bound of {max} bytes")]
    TooLarge {
        /// What was given.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Automerge refused the bytes.
    #[error("{what} is not valid automerge data: {reason}")]
    Automerge {
        /// What was given.
        what: &'static str,
        /// Automerge's reason.
        reason: String,
    },
    /// The bytes are valid automerge data but not a valid meridian namespace change.
    #[error("{what} holds an invalid namespace change: {reason}")]
    InvalidChange {
        /// What was given.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A change claims an author whose key did not sign it (or is not signed, or its author is
    /// not a member): a forgery, refused whole.
    #[error("{what} holds a change that {site} did not sign: {reason}")]
    Signature {
        /// What was given.
        what: &'static str,
        /// The author the change claims.
        site: String,
        /// What is wrong.
        reason: String,
    },
    /// The framing of an export is malformed.
    #[error("malformed {what}: {source}")]
    Framing {
        /// What was given.
        what: &'static str,
        /// The decoding error.
        source: DecodeError,
    },
}

/// Result of local operations and reads.
pub type Result<T, E = OpError> = std::result::Result<T, E>;
