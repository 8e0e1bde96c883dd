//! The local control API between the `meridian` CLI (and other clients) and its daemon:
//! length-prefixed frames over a Unix socket, typed on both sides.
//!
//! A request is one JSON frame, an [`ApiRequest`]. Its answer is one JSON frame, `{"ok": T}`
//! with the request's own answer type (named on each variant) or `{"error": {"kind": ...,
//! "message": ...}}` ([`ApiError`]): clients act on the [`ErrorKind`], never on the text.
//! A put sends data frames after the daemon's `ok`, ended by an empty frame, then gets a
//! [`PutAnswer`]; a read gets a [`ReadHeader`], data frames, an empty frame and a final answer.
//!
//! Framing exists once: [`frame_header`] and [`frame_len`] are the codec, and the blocking and
//! async readers and writers below only move its bytes.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crdt_namespace::{EffectiveTag, EntryKind, FindHit, OpError, Stat, TagValue};
use site_core::SiteError;

/// Largest frame: a data frame carries at most a chunk (16 MiB); JSON answers (a listing of a
/// large directory) get the same room.
pub const FRAME_MAX_BYTES: usize = 64 << 20;
/// Size of the data frames a sender cuts a stream into.
pub const DATA_FRAME_BYTES: usize = 1 << 20;

/// A request to the daemon. Each variant names the type its `ok` answer carries.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiRequest {
    /// Store a new version of a file: `()` once the path can take a file, then data frames,
    /// then a [`PutAnswer`].
    Put {
        /// Where.
        path: String,
        /// Permission bits.
        mode: u32,
        /// The version's modification time (nanoseconds since the Unix epoch); now if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtime_ns: Option<i64>,
    },
    /// Read a file (or bytes `start..end` of it): a [`ReadHeader`], data frames, `()`.
    Read {
        /// Which file.
        path: String,
        /// First byte.
        start: Option<u64>,
        /// One past the last byte.
        end: Option<u64>,
        /// The version to read, current or older (what a program that opened the file reads
        /// until it opens it again): its content id and size ([`VersionAnswer`]); the
        /// current one if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<ReadVersion>,
    },
    /// Make a directory: `()`.
    Mkdir {
        /// Where.
        path: String,
        /// With parents.
        parents: bool,
        /// Permission bits (default 0o755).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
    },
    /// Make a symbolic link at `path` pointing at `target` (stored as given, never resolved): `()`.
    Symlink {
        /// Where.
        path: String,
        /// What it points at.
        target: String,
    },
    /// Change the permission bits and/or the modification time of an entry: `()`.
    SetAttr {
        /// Which.
        path: String,
        /// New permission bits.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        /// New modification time, nanoseconds since the Unix epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtime_ns: Option<i64>,
    },
    /// Move or rename: `()`.
    Mv {
        /// From.
        from: String,
        /// To.
        to: String,
        /// Replace what is at `to` as POSIX's `rename` does (one change at every site);
        /// otherwise an existing `to` is an error.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        replace: bool,
    },
    /// Remove: `()`.
    Rm {
        /// What.
        path: String,
        /// Directories with entries too.
        recursive: bool,
    },
    /// List a directory: `Vec<`[`ListEntry`]`>`.
    Ls {
        /// Which.
        path: String,
    },
    /// Stat an entry: a [`StatAnswer`].
    Stat {
        /// Which.
        path: String,
    },
    /// Set a tag: `()`.
    TagSet {
        /// On what.
        path: String,
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Unset a tag explicitly: `()`.
    TagUnset {
        /// On what.
        path: String,
        /// Key.
        key: String,
    },
    /// Forget the entry's own definition of a tag (set or unset), so that it inherits it
    /// again: `()`.
    TagClear {
        /// On what.
        path: String,
        /// Key.
        key: String,
    },
    /// Effective tags: `Vec<`[`TagAnswer`]`>`.
    TagGet {
        /// Of what.
        path: String,
    },
    /// Find by tags and glob: `Vec<`[`FindAnswer`]`>`.
    Find {
        /// Predicates `k=v`, `k!=v`, `k`.
        tags: Vec<String>,
        /// Glob over paths.
        path: Option<String>,
    },
    /// The site's state: a [`StatusAnswer`].
    Status,
    /// The entries changed after a sequence number, for a cache of the namespace (the mount)
    /// to follow: a [`ChangesAnswer`]. `after`: the `next` of the last answer, less one;
    /// `None`: only where the log is now.
    Changes {
        /// The last sequence number seen.
        after: Option<u64>,
    },
    /// The mesh members and their links: `Vec<`[`MeshLink`]`>`.
    MeshLs,
    /// Change the membership (`mesh add|rm|rotate|block|unblock`): the configuration file and
    /// the live membership together, or neither: [`crate::membership::Outcome`].
    MeshEdit {
        /// The change.
        edit: crate::membership::Edit,
    },
}

/// What kind of failure an [`ApiError`] is: what a client acts on.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No such entry.
    NotFound,
    /// Something is already there.
    AlreadyExists,
    /// A path component (or the target) is not a directory.
    NotADirectory,
    /// The target is a directory.
    IsADirectory,
    /// The target is neither a file nor a directory (a symlink), or not a file to read.
    NotAFile,
    /// A directory that is not empty.
    NotEmpty,
    /// A bad argument: path, name, tag, glob, predicate, a move into itself, the root.
    InvalidArgument,
    /// The content cannot be had right now: no reachable site holds it, or the staging bucket
    /// failed.
    Unavailable,
    /// A local read or write failed (a chunk unreadable here, a put that could not store).
    Io,
    /// A site that is not a member of the mesh.
    NotMember,
    /// The request could not be decoded.
    BadRequest,
    /// No daemon answers on the control socket (reported by clients).
    NodeNotRunning,
    /// The caller may not use this node's control socket.
    PermissionDenied,
    /// The daemon failed otherwise.
    Internal,
}

/// A failed request: its kind and a message for people.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// What a client acts on.
    pub kind: ErrorKind,
    /// One line for a person.
    pub message: String,
}

impl ApiError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> ApiError {
        ApiError { kind, message: message.to_string() }
    }

    /// The kind of the daemon's answer inside `error`, if it is one.
    pub fn kind_of(error: &anyhow::Error) -> Option<ErrorKind> {
        error.downcast_ref::<ApiError>().map(|e| e.kind)
    }
}

impl From<&OpError> for ErrorKind {
    fn from(error: &OpError) -> ErrorKind {
        match error {
            OpError::NotFound { .. } => ErrorKind::NotFound,
            OpError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            OpError::NotADirectory { .. } => ErrorKind::NotADirectory,
            OpError::IsADirectory { .. } => ErrorKind::IsADirectory,
            OpError::IsASymlink { .. } => ErrorKind::NotAFile,
            OpError::NotEmpty { .. } => ErrorKind::NotEmpty,
            _ => ErrorKind::InvalidArgument,
        }
    }
}

impl From<SiteError> for ApiError {
    fn from(error: SiteError) -> ApiError {
        let kind = match &error {
            SiteError::Namespace(e) => e.into(),
            SiteError::NotAFile { .. } => ErrorKind::NotAFile,
            SiteError::NoHolder { .. } | SiteError::Staging { .. } => ErrorKind::Unavailable,
            SiteError::Chunk { .. } => ErrorKind::Io,
            SiteError::BeyondEnd { .. } => ErrorKind::BadRequest,
        };
        ApiError::new(kind, error)
    }
}

impl From<OpError> for ApiError {
    fn from(error: OpError) -> ApiError {
        ApiError::new((&error).into(), error)
    }
}

/// An answer as it travels: `{"ok": T}` or `{"error": ApiError}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Wire<T> {
    Ok(T),
    Error(ApiError),
}

/// What a kind of entry is called in answers.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
        })
    }
}

impl From<EntryKind> for Kind {
    fn from(kind: EntryKind) -> Kind {
        match kind {
            EntryKind::File => Kind::File,
            EntryKind::Dir => Kind::Dir,
            EntryKind::Symlink => Kind::Symlink,
        }
    }
}

/// A file's current version.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionAnswer {
    /// `<hlc>.<site>`, the same at every site.
    pub id: String,
    /// BLAKE3 of the manifest, in hexadecimal.
    pub content: String,
    /// Bytes.
    pub size: u64,
    /// The site that wrote it.
    pub site: String,
    /// When it was written (hybrid logical clock).
    pub hlc: String,
}

/// A tag set on the entry itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnTag {
    /// Key.
    pub key: String,
    /// Value; `None` when the tag is explicitly unset here (blocking inheritance).
    pub value: Option<String>,
}

/// What is known of an entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatAnswer {
    /// Stable id, the same at every site.
    pub id: String,
    /// File, directory or symlink.
    pub kind: Kind,
    /// A file's size in bytes; 0 otherwise.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// A file's current version.
    pub version: Option<VersionAnswer>,
    /// A symlink's target.
    pub symlink_target: Option<String>,
    /// The entry's own tags.
    pub tags: Vec<OwnTag>,
}

impl From<Stat> for StatAnswer {
    fn from(stat: Stat) -> StatAnswer {
        StatAnswer {
            id: stat.id,
            kind: stat.kind.into(),
            size: stat.size,
            mode: stat.mode,
            mtime_ns: stat.mtime_ns,
            version: stat.version.map(|v| VersionAnswer {
                id: v.id,
                content: v.content.to_string(),
                size: v.size,
                site: v.site,
                hlc: v.hlc.to_string(),
            }),
            symlink_target: stat.symlink_target,
            tags: stat
                .tags
                .into_iter()
                .map(|(key, value)| OwnTag {
                    key,
                    value: match value {
                        TagValue::Set(v) => Some(v.to_string()),
                        TagValue::Unset => None,
                    },
                })
                .collect(),
        }
    }
}

/// One entry of a listing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListEntry {
    /// Its name.
    pub name: String,
    /// Its stat.
    pub stat: StatAnswer,
}

/// An effective tag and where it comes from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagAnswer {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
    /// The path of the entry that sets it.
    pub source: String,
}

impl From<EffectiveTag> for TagAnswer {
    fn from(tag: EffectiveTag) -> TagAnswer {
        TagAnswer { key: tag.key, value: tag.value, source: tag.source }
    }
}

/// One entry found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FindAnswer {
    /// Its path.
    pub path: String,
    /// Its effective tags.
    pub tags: Vec<TagAnswer>,
}

impl From<FindHit> for FindAnswer {
    fn from(hit: FindHit) -> FindAnswer {
        FindAnswer { path: hit.path, tags: hit.tags.into_iter().map(TagAnswer::from).collect() }
    }
}

/// The site's state: the core's, and what the daemon adds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusAnswer {
    /// The core's figures (flattened into the answer).
    #[serde(flatten)]
    pub core: site_core::Status,
    /// Fetched chunks written but not yet made durable.
    pub fetched_chunks_not_yet_durable: usize,
}

/// A member of the mesh and the link to it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeshLink {
    /// Its site id.
    pub site: String,
    /// Its region.
    pub region: String,
    /// Its peer id.
    pub peer_id: String,
    /// Its configured addresses.
    pub addrs: Vec<String>,
    /// The link: `up (quic)`, `connecting`, `down: ...`, `blocked`, `not admitted`, or `node not
    /// running` when the CLI read the configuration instead.
    pub link: String,
    /// The address the link uses, when up.
    pub addr: Option<String>,
    /// Milliseconds in the link's current state.
    pub since_ms: Option<u64>,
    /// This site's changes the member had not confirmed at the last sync round.
    pub lag_changes: Option<usize>,
    /// The member's changes held here, not integrated, because they are stamped more than
    /// `max_clock_ahead` ahead of this site's clock (its clock is wrong, or it lies).
    #[serde(default)]
    pub held_changes: usize,
}

/// The answer to a put.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PutAnswer {
    /// Where the file is.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Chunks this site did not hold before.
    pub new_chunks: usize,
    /// Their bytes.
    pub new_bytes: u64,
    /// The id of the entry at `path` right after the commit (the file's, unless another
    /// request moved it in between).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A version of a file to read ([`ApiRequest::Read`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReadVersion {
    /// Its content id ([`VersionAnswer::content`]).
    pub content: String,
    /// Its size.
    pub size: u64,
}

/// What changed after a sequence number ([`ApiRequest::Changes`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChangesAnswer {
    /// This run of the node: sequence numbers of another run say nothing about this one's (a
    /// follower that sees it change forgets everything).
    pub boot: String,
    /// The sequence number to ask after next time.
    pub next: u64,
    /// Ids of the entries changed, oldest first (one may be named twice).
    pub entries: Vec<String>,
    /// Whether `entries` is everything that changed; if not, a follower forgets all it holds.
    pub complete: bool,
}

/// The start of a read: these bytes of a file of this size follow.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReadHeader {
    /// The file's size.
    pub size: u64,
    /// First byte that follows.
    pub start: u64,
    /// One past the last.
    pub end: u64,
}

// ---------------------------------------------------------------------------------------------
// Framing: the codec, then the blocking and async movers of its bytes.

/// The header of a frame of `len` bytes.
pub fn frame_header(len: usize) -> std::io::Result<[u8; 4]> {
    if len > FRAME_MAX_BYTES {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes is over the bound of {FRAME_MAX_BYTES}"
        )));
    }
    Ok((len as u32).to_le_bytes())
}

/// The length a frame header announces, checked against the bound.
pub fn frame_len(header: [u8; 4]) -> std::io::Result<usize> {
    let len = u32::from_le_bytes(header) as usize;
    if len > FRAME_MAX_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the bound of {FRAME_MAX_BYTES}"),
        ));
    }
    Ok(len)
}

/// An answer's frame.
pub fn encode_answer<T: Serialize>(answer: Result<T, ApiError>) -> Vec<u8> {
    let wire = match answer {
        Ok(value) => Wire::Ok(value),
        Err(error) => Wire::Error(error),
    };
    serde_json::to_vec(&wire).expect("answers serialize")
}

/// The answer a frame carries: its value, or the daemon's [`ApiError`] inside the error.
pub fn decode_answer<T: DeserializeOwned>(frame: Option<Vec<u8>>) -> anyhow::Result<T> {
    let frame = frame.ok_or_else(|| anyhow::anyhow!("the node closed the connection"))?;
    match serde_json::from_slice(&frame) {
        Ok(Wire::Ok(value)) => Ok(value),
        Ok(Wire::Error(error)) => Err(error.into()),
        Err(e) => anyhow::bail!("the node sent an answer this client does not understand: {e}"),
    }
}

/// A request's frame.
pub fn encode_request(request: &ApiRequest) -> Vec<u8> {
    serde_json::to_vec(request).expect("requests serialize")
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&frame_header(payload.len())?).await?;
    w.write_all(payload).await
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; frame_len(header)?];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Writes an answer.
pub async fn write_answer<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    answer: Result<T, ApiError>,
) -> std::io::Result<()> {
    write_frame(w, &encode_answer(answer)).await
}

/// Reads an answer.
pub async fn read_answer<T: DeserializeOwned>(r: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<T> {
    decode_answer(read_frame(r).await?)
}

/// A read in progress over a connection of its own: [`Reading::start`] sends the request and
/// takes the [`ReadHeader`]; [`Reading::next`] gives the data frames, then `None` once the
/// node's final answer came and the bytes add up to what the header announced.
pub struct Reading<S> {
    stream: S,
    path: String,
    header: ReadHeader,
    got: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Reading<S> {
    /// Asks for `path` (or bytes `range` of it; of `version` of it, the current one if
    /// `None`) on `stream`, a new connection to the node.
    pub async fn start(
        mut stream: S,
        path: &str,
        range: Option<(u64, u64)>,
        version: Option<ReadVersion>,
    ) -> anyhow::Result<Reading<S>> {
        let request = ApiRequest::Read {
            path: path.to_owned(),
            start: range.map(|r| r.0),
            end: range.map(|r| r.1),
            version,
        };
        write_frame(&mut stream, &encode_request(&request)).await?;
        let header = read_answer(&mut stream).await?;
        Ok(Reading { stream, path: path.to_owned(), header, got: 0 })
    }

    /// The size and the range being read.
    pub fn header(&self) -> ReadHeader {
        self.header
    }

    /// The next data frame; `None` at the end of a read that delivered every byte.
    pub async fn next(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        let frame = read_frame(&mut self.stream)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the node closed the connection inside a read"))?;
        if !frame.is_empty() {
            self.got += frame.len() as u64;
            return Ok(Some(frame));
        }
        read_answer::<()>(&mut self.stream).await?;
        let expected = self.header.end - self.header.start;
        if self.got != expected {
            anyhow::bail!("read {} bytes of {}, expected {expected}", self.got, self.path);
        }
        Ok(None)
    }
}

/// The blocking movers, for clients without an async runtime.
pub mod blocking {
    use std::io::{Read, Write};

    use serde::de::DeserializeOwned;

    /// Writes one frame.
    pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
        w.write_all(&super::frame_header(payload.len())?)?;
        w.write_all(payload)
    }

    /// Reads one frame; `None` at a clean end of stream.
    pub fn read_frame(r: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
        let mut header = [0u8; 4];
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut buf = vec![0u8; super::frame_len(header)?];
        r.read_exact(&mut buf)?;
        Ok(Some(buf))
    }

    /// Reads an answer.
    pub fn read_answer<T: DeserializeOwned>(r: &mut impl Read) -> anyhow::Result<T> {
        super::decode_answer(read_frame(r)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_errors_keep_their_kind() {
        let frame = encode_answer::<ReadHeader>(Ok(ReadHeader { size: 10, start: 2, end: 5 }));
        assert_eq!(String::from_utf8_lossy(&frame), r#"{"ok":{"size":10,"start":2,"end":5}}"#);
        let header: ReadHeader = decode_answer(Some(frame)).unwrap();
        assert_eq!(header, ReadHeader { size: 10, start: 2, end: 5 });
        let frame = encode_answer::<()>(Err(ApiError::new(ErrorKind::NotFound, "no such file: /a")));
        let error = decode_answer::<()>(Some(frame)).unwrap_err();
        assert_eq!(ApiError::kind_of(&error), Some(ErrorKind::NotFound));
        assert_eq!(error.to_string(), "no such file: /a");
        let error = decode_answer::<()>(Some(b"{\"ok\":".to_vec())).unwrap_err();
        assert_eq!(ApiError::kind_of(&error), None);
        assert!(decode_answer::<()>(None).is_err());
    }

    #[test]
    fn frames_over_the_bound_are_refused_both_ways() {
        assert!(frame_header(FRAME_MAX_BYTES + 1).is_err());
        assert!(frame_len(((FRAME_MAX_BYTES + 1) as u32).to_le_bytes()).is_err());
        let mut bytes = Vec::new();
        blocking::write_frame(&mut bytes, b"abc").unwrap();
        blocking::write_frame(&mut bytes, b"").unwrap();
        let mut r = bytes.as_slice();
        assert_eq!(blocking::read_frame(&mut r).unwrap(), Some(b"abc".to_vec()));
        assert_eq!(blocking::read_frame(&mut r).unwrap(), Some(Vec::new()));
        assert_eq!(blocking::read_frame(&mut r).unwrap(), None);
    }

    #[test]
    fn namespace_errors_map_to_kinds() {
        let e = ApiError::from(SiteError::Namespace(OpError::NotFound { path: "/x".into() }));
        assert_eq!(e.kind, ErrorKind::NotFound);
        let e = ApiError::from(SiteError::NotAFile { path: "/d".into() });
        assert_eq!(e.kind, ErrorKind::NotAFile);
    }
}
