//! The site-to-site protocol: messages and their binary encoding. Pure.
//!
//! Every message starts with the protocol version (u16, little-endian) and a tag byte. Every
//! length is bounded by [`MESSAGE_MAX_BYTES`] and by the input: decoding hostile bytes returns an
//! error, never panics, and never allocates more than the input's length.

use crdt_namespace::wire::{Reader, push_bytes, push_varint};
use crdt_namespace::{ContentId, DecodeError, Frontier, SiteId};

/// Version of the site-to-site protocol. Bumped on any incompatible change of a message (4:
/// namespace changes are signed, and unsigned ones refused; 5: [`Message::Seen`]).
pub const PROTOCOL_VERSION: u16 = 5;

/// Largest encoded message. A chunk is at most 16 MiB; a first sync of a large namespace sends
/// the document in one message (about 18 MB per million entries), so the bound leaves room for
/// tens of millions of entries.
pub const MESSAGE_MAX_BYTES: usize = 512 << 20;

/// Largest chunk carried by a [`Message::Chunk`].
pub const CHUNK_MAX_BYTES: usize = 16 << 20;

/// The id a site gives one chunk request (to a peer, or to the staging bucket); the answer
/// echoes it, so a late answer to an earlier request is told apart.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FetchId(pub u64);

impl std::fmt::Display for FetchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fetch {}", self.0)
    }
}

/// The name of a region: 1 to [`REGION_MAX_BYTES`] ASCII letters, digits, `-` or `_` (the
/// rules of a site id). Sites of one region fetch from each other; regions meet through the
/// staging bucket.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Region(String);

impl Region {
    /// The region `name`, if it is a valid name (checked by the site id's own rule).
    pub fn new(name: impl Into<String>) -> Result<Region, String> {
        let name = name.into();
        match SiteId::new(&name) {
            Ok(_) => Ok(Region(name)),
            Err(_) => Err(format!(
                "region {name:?} must be 1 to {REGION_MAX_BYTES} ASCII letters, digits, `-` or `_`"
            )),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for Region {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// How urgent a chunk request is. Chunks covering the bytes a reader asked for come first.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Covers the byte range a reader is waiting for.
    Urgent = 0,
    /// The rest of a version being pulled.
    Background = 1,
}

/// One message between sites.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A message of the namespace sync session between the two sites.
    Sync {
        /// Automerge sync protocol bytes.
        payload: Vec<u8>,
    },
    /// Fresh namespace changes, pushed the moment they commit.
    Push {
        /// A namespace export (`Namespace::export_since`).
        changes: Vec<u8>,
    },
    /// Which sites hold version `content`?
    WhoHas {
        /// The version's content id.
        content: ContentId,
    },
    /// The answer to [`Message::WhoHas`].
    Holds {
        /// The version's content id.
        content: ContentId,
        /// The version's manifest if the sender holds every chunk of it; `None` if it does not.
        manifest: Option<Vec<u8>>,
    },
    /// A request for one chunk.
    GetChunk {
        /// The requester's id for the request, echoed in the answer.
        request: FetchId,
        /// The chunk's BLAKE3 hash.
        chunk: [u8; 32],
        /// How urgent it is.
        priority: Priority,
    },
    /// A chunk, in answer to [`Message::GetChunk`].
    Chunk {
        /// The request answered.
        request: FetchId,
        /// The chunk's hash, as requested (the receiver checks the bytes against it).
        chunk: [u8; 32],
        /// The bytes.
        data: Vec<u8>,
    },
    /// The sender does not hold the chunk asked for.
    NoChunk {
        /// The request answered.
        request: FetchId,
        /// The chunk asked for.
        chunk: [u8; 32],
    },
    /// Please put these versions in the bucket for the sites of `region` (or say where they
    /// are already).
    Stage {
        /// The region that will read them from the bucket.
        region: Region,
        /// The versions (at most [`STAGE_VERSIONS_MAX`]): the first is being read; the others
        /// are read ahead, and a holder that cannot stage one of them just leaves it out.
        contents: Vec<ContentId>,
        /// The pack the sender was told holds the versions and found missing, tampered with or
        /// truncated: the holder drops it and stages its versions again.
        spoiled: Option<Vec<u8>>,
    },
    /// The answer to [`Message::Stage`]: the pack that holds these versions, or why there is
    /// none.
    Staged {
        /// The region they were staged for.
        region: Region,
        /// The name of the pack, or why they could not be staged.
        pack: Result<Vec<u8>, String>,
        /// The versions (at most [`STAGE_VERSIONS_MAX`]), each with its manifest when it is
        /// small (the reader then reads it without asking who holds it).
        versions: Vec<StagedVersion>,
    },
    /// The sender now holds these versions, read from the bucket, or no longer needs them
    /// there: when every site of its region has said so, the uploader deletes the staged copy.
    Unstage {
        /// The sender's region.
        region: Region,
        /// The versions (at most [`STAGE_VERSIONS_MAX`]).
        contents: Vec<ContentId>,
    },
    /// The namespace changes the sender has integrated: the last change of each site (at most
    /// [`SEEN_SITES_MAX`]). What a site collects waits until every member has said it saw
    /// the change that made it garbage.
    Seen {
        /// The sender's frontier.
        frontier: Frontier,
    },
}

/// A version named in [`Message::Staged`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedVersion {
    /// The version.
    pub content: ContentId,
    /// Its encoded manifest, for a small version.
    pub manifest: Option<Vec<u8>>,
}

/// Most versions one staging message names.
pub const STAGE_VERSIONS_MAX: usize = 4_096;

/// Most sites one [`Message::Seen`] names.
pub const SEEN_SITES_MAX: usize = 4_096;

/// Longest region name: that of a site id.
pub const REGION_MAX_BYTES: usize = crdt_namespace::SITE_ID_MAX_BYTES;
/// Longest pack name a message carries.
pub const PACK_NAME_MAX_BYTES: usize = 128;
/// Longest error text a message carries.
pub const ERROR_MAX_BYTES: usize = 1024;

/// Why bytes are not a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The message is larger than [`MESSAGE_MAX_BYTES`].
    #[error("message of {0} bytes is larger than the bound of {MESSAGE_MAX_BYTES}")]
    TooLarge(usize),
    /// The peer speaks another version of the protocol.
    #[error("protocol version {0} is not supported (this site speaks {PROTOCOL_VERSION})")]
    Version(u16),
    /// The message is malformed.
    #[error("malformed message: {0}")]
    Malformed(#[from] DecodeError),
}

const TAG_SYNC: u8 = 0;
const TAG_PUSH: u8 = 1;
const TAG_WHO_HAS: u8 = 2;
const TAG_HOLDS: u8 = 3;
const TAG_GET_CHUNK: u8 = 4;
const TAG_CHUNK: u8 = 5;
const TAG_NO_CHUNK: u8 = 6;
const TAG_STAGE: u8 = 7;
const TAG_STAGED: u8 = 8;
const TAG_UNSTAGE: u8 = 9;
const TAG_SEEN: u8 = 10;

/// A flag byte (0 for none, 1 for some), then the bytes if some.
fn push_optional(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.push(0),
        Some(bytes) => {
            out.push(1);
            push_bytes(out, bytes);
        }
    }
}

/// A count, then the versions.
fn push_contents(out: &mut Vec<u8>, contents: &[ContentId]) {
    push_varint(out, contents.len() as u64);
    for content in contents {
        out.extend_from_slice(&content.0);
    }
}

fn read_region(r: &mut Reader<'_>) -> Result<Region, DecodeError> {
    Region::new(r.str("region", REGION_MAX_BYTES)?)
        .map_err(|reason| DecodeError::Invalid { what: "region", reason })
}

fn read_contents(r: &mut Reader<'_>) -> Result<Vec<ContentId>, DecodeError> {
    let (count, capacity) = r.count("versions", STAGE_VERSIONS_MAX, 32)?;
    let mut contents = Vec::with_capacity(capacity);
    for _ in 0..count {
        contents.push(ContentId(r.array32("content id")?));
    }
    Ok(contents)
}

impl Message {
    /// The binary encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = PROTOCOL_VERSION.to_le_bytes().to_vec();
        match self {
            Message::Sync { payload } => {
                out.push(TAG_SYNC);
                push_bytes(&mut out, payload);
            }
            Message::Push { changes } => {
                out.push(TAG_PUSH);
                push_bytes(&mut out, changes);
            }
            Message::WhoHas { content } => {
                out.push(TAG_WHO_HAS);
                out.extend_from_slice(&content.0);
            }
            Message::Holds { content, manifest } => {
                out.push(TAG_HOLDS);
                out.extend_from_slice(&content.0);
                push_optional(&mut out, manifest.as_deref());
            }
            Message::GetChunk { request, chunk, priority } => {
                out.push(TAG_GET_CHUNK);
                push_varint(&mut out, request.0);
                out.extend_from_slice(chunk);
                out.push(*priority as u8);
            }
            Message::Chunk { request, chunk, data } => {
                out.push(TAG_CHUNK);
                push_varint(&mut out, request.0);
                out.extend_from_slice(chunk);
                push_bytes(&mut out, data);
            }
            Message::NoChunk { request, chunk } => {
                out.push(TAG_NO_CHUNK);
                push_varint(&mut out, request.0);
                out.extend_from_slice(chunk);
            }
            Message::Stage { region, contents, spoiled } => {
                out.push(TAG_STAGE);
                push_bytes(&mut out, region.as_str().as_bytes());
                push_contents(&mut out, contents);
                push_optional(&mut out, spoiled.as_deref());
            }
            Message::Staged { region, pack, versions } => {
                out.push(TAG_STAGED);
                push_bytes(&mut out, region.as_str().as_bytes());
                match pack {
                    Ok(name) => {
                        out.push(0);
                        push_bytes(&mut out, name);
                    }
                    Err(e) => {
                        out.push(1);
                        // Cut on a character boundary to the bound the decoder checks.
                        let mut end = e.len().min(ERROR_MAX_BYTES);
                        while !e.is_char_boundary(end) {
                            end -= 1;
                        }
                        push_bytes(&mut out, &e.as_bytes()[..end]);
                    }
                }
                push_varint(&mut out, versions.len() as u64);
                for version in versions {
                    out.extend_from_slice(&version.content.0);
                    push_optional(&mut out, version.manifest.as_deref());
                }
            }
            Message::Unstage { region, contents } => {
                out.push(TAG_UNSTAGE);
                push_bytes(&mut out, region.as_str().as_bytes());
                push_contents(&mut out, contents);
            }
            Message::Seen { frontier } => {
                out.push(TAG_SEEN);
                push_varint(&mut out, frontier.len() as u64);
                for (site, seq) in frontier.iter() {
                    push_bytes(&mut out, site.as_str().as_bytes());
                    push_varint(&mut out, seq);
                }
            }
        }
        out
    }

    /// Decodes a message, checking every bound.
    pub fn decode(bytes: &[u8]) -> Result<Message, ProtoError> {
        if bytes.len() > MESSAGE_MAX_BYTES {
            return Err(ProtoError::TooLarge(bytes.len()));
        }
        let mut r = Reader::new(bytes);
        let version = u16::from_le_bytes([r.u8("version")?, r.u8("version")?]);
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::Version(version));
        }
        let message = match r.u8("message tag")? {
            TAG_SYNC => Message::Sync { payload: r.bytes("sync payload", MESSAGE_MAX_BYTES)?.to_vec() },
            TAG_PUSH => Message::Push { changes: r.bytes("push changes", MESSAGE_MAX_BYTES)?.to_vec() },
            TAG_WHO_HAS => Message::WhoHas { content: ContentId(r.array32("content id")?) },
            TAG_HOLDS => {
                let content = ContentId(r.array32("content id")?);
                let manifest = match r.u8("manifest flag")? {
                    0 => None,
                    1 => Some(r.bytes("manifest", MESSAGE_MAX_BYTES)?.to_vec()),
                    tag => return Err(DecodeError::UnknownTag { what: "manifest flag", tag }.into()),
                };
                Message::Holds { content, manifest }
            }
            TAG_GET_CHUNK => {
                let request = FetchId(r.varint("request id")?);
                let chunk = r.array32("chunk hash")?;
                let priority = match r.u8("priority")? {
                    0 => Priority::Urgent,
                    1 => Priority::Background,
                    tag => return Err(DecodeError::UnknownTag { what: "priority", tag }.into()),
                };
                Message::GetChunk { request, chunk, priority }
            }
            TAG_CHUNK => {
                let request = FetchId(r.varint("request id")?);
                let chunk = r.array32("chunk hash")?;
                let data = r.bytes("chunk data", CHUNK_MAX_BYTES)?.to_vec();
                Message::Chunk { request, chunk, data }
            }
            TAG_NO_CHUNK => Message::NoChunk {
                request: FetchId(r.varint("request id")?),
                chunk: r.array32("chunk hash")?,
            },
            TAG_STAGE => {
                let region = read_region(&mut r)?;
                let contents = read_contents(&mut r)?;
                let spoiled = match r.u8("spoiled flag")? {
                    0 => None,
                    1 => Some(r.bytes("pack name", PACK_NAME_MAX_BYTES)?.to_vec()),
                    tag => return Err(DecodeError::UnknownTag { what: "spoiled flag", tag }.into()),
                };
                Message::Stage { region, contents, spoiled }
            }
            TAG_STAGED => {
                let region = read_region(&mut r)?;
                let pack = match r.u8("pack flag")? {
                    0 => Ok(r.bytes("pack name", PACK_NAME_MAX_BYTES)?.to_vec()),
                    1 => Err(r.str("error", ERROR_MAX_BYTES)?.to_owned()),
                    tag => return Err(DecodeError::UnknownTag { what: "pack flag", tag }.into()),
                };
                let (count, capacity) = r.count("staged versions", STAGE_VERSIONS_MAX, 33)?;
                let mut versions = Vec::with_capacity(capacity);
                for _ in 0..count {
                    let content = ContentId(r.array32("content id")?);
                    let manifest = match r.u8("manifest flag")? {
                        0 => None,
                        1 => Some(r.bytes("manifest", MESSAGE_MAX_BYTES)?.to_vec()),
                        tag => return Err(DecodeError::UnknownTag { what: "manifest flag", tag }.into()),
                    };
                    versions.push(StagedVersion { content, manifest });
                }
                Message::Staged { region, pack, versions }
            }
            TAG_UNSTAGE => {
                let region = read_region(&mut r)?;
                Message::Unstage { region, contents: read_contents(&mut r)? }
            }
            TAG_SEEN => {
                let (count, _) = r.count("sites seen", SEEN_SITES_MAX, 3)?;
                let mut frontier = Frontier::new();
                for _ in 0..count {
                    let site = SiteId::new(r.str("site", crdt_namespace::SITE_ID_MAX_BYTES)?)
                        .map_err(|reason| DecodeError::Invalid { what: "site", reason })?;
                    frontier.include(site, r.varint("sequence number")?);
                }
                Message::Seen { frontier }
            }
            tag => return Err(DecodeError::UnknownTag { what: "message", tag }.into()),
        };
        r.finish("message")?;
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn region(name: &str) -> Region {
        Region::new(name).expect("a valid region")
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Sync { payload: vec![1, 2, 3] },
            Message::Push { changes: vec![9; 300] },
            Message::WhoHas { content: ContentId([4; 32]) },
            Message::Holds { content: ContentId([5; 32]), manifest: None },
            Message::Holds { content: ContentId([5; 32]), manifest: Some(vec![7; 40]) },
            Message::GetChunk { request: FetchId(1 << 40), chunk: [6; 32], priority: Priority::Background },
            Message::Chunk { request: FetchId(3), chunk: [6; 32], data: vec![0; 1000] },
            Message::NoChunk { request: FetchId(3), chunk: [6; 32] },
            Message::Stage { region: region("eu-west"), contents: vec![ContentId([8; 32])], spoiled: None },
            Message::Stage {
                region: region("us"),
                contents: vec![ContentId([8; 32]), ContentId([9; 32])],
                spoiled: Some(vec![3; 40]),
            },
            Message::Staged {
                region: region("eu-west"),
                pack: Ok(vec![2; 49]),
                versions: vec![
                    StagedVersion { content: ContentId([8; 32]), manifest: None },
                    StagedVersion { content: ContentId([9; 32]), manifest: Some(vec![1; 70]) },
                ],
            },
            Message::Staged {
                region: region("ap"),
                pack: Err("bucket gone".into()),
                versions: vec![StagedVersion { content: ContentId([8; 32]), manifest: None }],
            },
            Message::Unstage {
                region: region("eu-west"),
                contents: vec![ContentId([8; 32]), ContentId([7; 32])],
            },
            Message::Seen {
                frontier: [(SiteId::new("west").unwrap(), 7), (SiteId::new("east").unwrap(), 1 << 40)]
                    .into_iter()
                    .collect(),
            },
            Message::Seen { frontier: Frontier::new() },
        ]
    }

    #[test]
    fn long_errors_are_cut_to_their_bound() {
        let error = "é".repeat(ERROR_MAX_BYTES);
        let m = Message::Staged { region: region("r"), pack: Err(error.clone()), versions: Vec::new() };
        let Message::Staged { pack: Err(cut), .. } = Message::decode(&m.encode()).unwrap() else {
            panic!("a Staged message")
        };
        assert!(cut.len() <= ERROR_MAX_BYTES && error.starts_with(&cut) && !cut.is_empty());
    }

    #[test]
    fn staging_messages_refuse_more_versions_than_their_bound() {
        let contents = vec![ContentId([1; 32]); STAGE_VERSIONS_MAX + 1];
        let m = Message::Unstage { region: region("r"), contents };
        assert!(matches!(
            Message::decode(&m.encode()),
            Err(ProtoError::Malformed(DecodeError::TooLong { what: "versions", .. }))
        ));
    }

    #[test]
    fn a_region_that_breaks_the_naming_rules_is_refused_when_made_and_when_decoded() {
        for bad in ["", "eu west", "é", &"r".repeat(REGION_MAX_BYTES + 1)] {
            assert!(Region::new(bad).is_err(), "{bad:?}");
        }
        let mut bytes = Message::Unstage { region: region("eu"), contents: Vec::new() }.encode();
        let at = bytes.iter().position(|b| *b == b'e').expect("the region's bytes");
        bytes[at] = b' ';
        assert!(matches!(
            Message::decode(&bytes),
            Err(ProtoError::Malformed(DecodeError::Invalid { what: "region", .. }))
        ));
    }

    #[test]
    fn messages_round_trip_and_refuse_truncation() {
        for m in samples() {
            let bytes = m.encode();
            assert_eq!(Message::decode(&bytes).unwrap(), m);
            for cut in 0..bytes.len() {
                assert!(Message::decode(&bytes[..cut]).is_err());
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Message::decode(&longer).is_err());
        }
        let mut other_version = samples()[0].encode();
        other_version[0] = 99;
        assert_eq!(Message::decode(&other_version), Err(ProtoError::Version(99)));
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(index in 0usize..64, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..5)) {
            let samples = samples();
            let mut bytes = samples[index % samples.len()].encode();
            for (at, v) in flips {
                let at = at % bytes.len();
                bytes[at] = v;
            }
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = Message::decode(&bytes);
        }
    }
}
