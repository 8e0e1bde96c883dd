//! Content: FastCDC chunking, BLAKE3 hashing and manifests.
//!
//! A file version is a [`Manifest`]: the ordered chunks (BLAKE3 hash and length) cut by
//! FastCDC, the total size and the BLAKE3 hash of the whole file. The version's content id — what
//! the namespace records — is the BLAKE3 hash of the manifest's encoding. Identical chunks have
//! one hash and are stored once per site; an edit to part of a large file changes only the
//! chunks around the edit.

use std::fmt;
use std::ops::Range;

use crdt_namespace::ContentId;
use crdt_namespace::wire::{Reader, push_varint};

/// Largest chunk any configuration may produce (FastCDC 2020's own upper bound).
pub const CHUNK_MAX_BYTES: u32 = 16 << 20;

/// FastCDC's size parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkerConfig {
    /// No chunk is smaller, except the last one of a file.
    pub min_bytes: u32,
    /// The size chunks tend to.
    pub avg_bytes: u32,
    /// No chunk is larger.
    pub max_bytes: u32,
}

impl Default for ChunkerConfig {
    /// 256 KiB / 1 MiB / 4 MiB: sized for large media files. A 1 MiB edit inside a 1 GiB file
    /// then moves 2–4 chunks (under 1% of the file, the target is 2%); a 1 GiB file has ~1,000
    /// chunks, so its manifest stays near 36 KiB and per-chunk costs (a file, an fsync, a
    /// request) stay small against the bytes moved. `docs/benchmarks.md` has the measurements
    /// of the alternatives.
    fn default() -> ChunkerConfig {
        ChunkerConfig { min_bytes: 256 << 10, avg_bytes: 1 << 20, max_bytes: 4 << 20 }
    }
}

impl ChunkerConfig {
    /// Checks the sizes against FastCDC's bounds and each other.
    pub fn check(&self) -> Result<(), String> {
        let (min, avg, max) = (self.min_bytes as usize, self.avg_bytes as usize, self.max_bytes as usize);
        use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN};
        if !(MINIMUM_MIN..=MINIMUM_MAX).contains(&min) {
            return Err(format!("chunk min_bytes must be within {MINIMUM_MIN}..={MINIMUM_MAX}, not {min}"));
        }
        if !(AVERAGE_MIN..=AVERAGE_MAX).contains(&avg) {
            return Err(format!("chunk avg_bytes must be within {AVERAGE_MIN}..={AVERAGE_MAX}, not {avg}"));
        }
        if !(MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max) {
            return Err(format!("chunk max_bytes must be within {MAXIMUM_MIN}..={MAXIMUM_MAX}, not {max}"));
        }
        if !(min <= avg && avg <= max) {
            return Err(format!("chunk sizes must satisfy min <= avg <= max, not {min}, {avg}, {max}"));
        }
        Ok(())
    }
}

/// The BLAKE3 hash of a chunk.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// The hash of `data`.
    pub fn of(data: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    /// Lowercase hexadecimal.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One chunk of a manifest.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    /// Its BLAKE3 hash.
    pub hash: ChunkHash,
    /// Its length in bytes.
    pub len: u32,
}

/// Why bytes are not a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The bytes end early or run on.
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// The fields contradict each other.
    #[error("inconsistent manifest: {0}")]
    Inconsistent(String),
}

/// A file version: its chunks in order, its size and its whole-file hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Total size in bytes: the sum of the chunk lengths.
    pub size: u64,
    /// BLAKE3 hash of the whole file.
    pub file_hash: [u8; 32],
    /// The chunks, in file order.
    pub chunks: Vec<ChunkRef>,
    /// Offset of each chunk's first byte (derived; one more element than `chunks`).
    offsets: Vec<u64>,
}

const MANIFEST_MAGIC: &[u8; 4] = b"MMF1";

impl Manifest {
    /// A manifest from its chunks and whole-file hash.
    pub fn new(file_hash: [u8; 32], chunks: Vec<ChunkRef>) -> Manifest {
        let mut offsets = Vec::with_capacity(chunks.len() + 1);
        let mut at = 0u64;
        offsets.push(0);
        for c in &chunks {
            at += u64::from(c.len);
            offsets.push(at);
        }
        Manifest { size: at, file_hash, chunks, offsets }
    }

    /// The manifest of a byte slice, cut with `config` (for small files and tests; the store's
    /// put path streams instead).
    pub fn of_bytes(data: &[u8], config: ChunkerConfig) -> Manifest {
        let chunks = cut(data, config)
            .map(|r| ChunkRef { hash: ChunkHash::of(&data[r.clone()]), len: (r.end - r.start) as u32 })
            .collect();
        Manifest::new(*blake3::hash(data).as_bytes(), chunks)
    }

    /// The content id: BLAKE3 of the encoding.
    pub fn content_id(&self) -> ContentId {
        ContentId(*blake3::hash(&self.encode()).as_bytes())
    }

    /// The byte range of chunk `i` in the file.
    pub fn chunk_range(&self, i: usize) -> Range<u64> {
        self.offsets[i]..self.offsets[i + 1]
    }

    /// The indexes of the chunks that hold bytes `range` of the file.
    pub fn chunks_covering(&self, range: Range<u64>) -> Range<usize> {
        let end = range.end.min(self.size);
        if range.start >= end {
            return 0..0;
        }
        // The first chunk whose end is past the start, up to the first whose start is at or
        // past the end.
        let first = self.offsets[1..].partition_point(|e| *e <= range.start);
        let last = self.offsets[..self.chunks.len()].partition_point(|s| *s < end);
        first..last
    }

    /// The binary encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.chunks.len() * 36);
        out.extend_from_slice(MANIFEST_MAGIC);
        push_varint(&mut out, self.size);
        out.extend_from_slice(&self.file_hash);
        push_varint(&mut out, self.chunks.len() as u64);
        for c in &self.chunks {
            out.extend_from_slice(&c.hash.0);
            push_varint(&mut out, u64::from(c.len));
        }
        out
    }

    /// Decodes and checks a manifest: every chunk 1..=16 MiB, lengths adding up to the size.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let malformed = |e: crdt_namespace::DecodeError| ManifestError::Malformed(e.to_string());
        let rest = bytes
            .strip_prefix(MANIFEST_MAGIC.as_slice())
            .ok_or_else(|| ManifestError::Malformed("bad magic".into()))?;
        let mut r = Reader::new(rest);
        let size = r.varint("size").map_err(malformed)?;
        let file_hash = r.array32("file hash").map_err(malformed)?;
        let count = r.varint("chunk count").map_err(malformed)?;
        // Each chunk takes at least 33 bytes: the count cannot promise more than the input holds.
        if count > (r.remaining() / 33) as u64 {
            return Err(ManifestError::Malformed("chunk count larger than the input".into()));
        }
        let mut chunks = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let hash = ChunkHash(r.array32("chunk hash").map_err(malformed)?);
            let len = r.varint("chunk length").map_err(malformed)?;
            if len == 0 || len > u64::from(CHUNK_MAX_BYTES) {
                return Err(ManifestError::Inconsistent(format!("chunk length {len} out of 1..=16 MiB")));
            }
            chunks.push(ChunkRef { hash, len: len as u32 });
        }
        r.finish("manifest").map_err(malformed)?;
        let manifest = Manifest::new(file_hash, chunks);
        if manifest.size != size {
            return Err(ManifestError::Inconsistent(format!(
                "chunks add up to {} bytes, the manifest says {size}",
                manifest.size
            )));
        }
        Ok(manifest)
    }
}

/// The chunk boundaries of `data`.
pub fn cut(data: &[u8], config: ChunkerConfig) -> impl Iterator<Item = Range<usize>> + '_ {
    fastcdc::v2020::FastCDC::new(
        data,
        config.min_bytes as usize,
        config.avg_bytes as usize,
        config.max_bytes as usize,
    )
    .map(|c| c.offset..c.offset + c.length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        crate::sample::pseudo_random(seed, len)
    }

    fn small() -> ChunkerConfig {
        ChunkerConfig { min_bytes: 1024, avg_bytes: 4096, max_bytes: 16384 }
    }

    #[test]
    fn manifests_round_trip_and_cover_ranges() {
        let data = bytes(200_000, 7);
        let m = Manifest::of_bytes(&data, small());
        assert_eq!(m.size, 200_000);
        assert!(m.chunks.len() > 10);
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.chunks_covering(0..1), 0..1);
        assert_eq!(m.chunks_covering(0..m.size), 0..m.chunks.len());
        assert_eq!(m.chunks_covering(m.size..m.size + 5), 0..0);
        let r = m.chunk_range(3);
        assert_eq!(m.chunks_covering(r.clone()), 3..4);
        assert_eq!(m.chunks_covering(r.start - 1..r.end + 1), 2..5);
        for (i, c) in m.chunks.iter().enumerate() {
            let r = m.chunk_range(i);
            assert_eq!(ChunkHash::of(&data[r.start as usize..r.end as usize]), c.hash);
        }
    }

    #[test]
    fn an_edit_changes_only_nearby_chunks() {
        let data = bytes(1 << 20, 9);
        let mut edited = data.clone();
        for b in &mut edited[500_000..504_096] {
            *b = !*b;
        }
        let (a, b) = (Manifest::of_bytes(&data, small()), Manifest::of_bytes(&edited, small()));
        let old: std::collections::HashSet<_> = a.chunks.iter().map(|c| c.hash).collect();
        let moved: u64 = b.chunks.iter().filter(|c| !old.contains(&c.hash)).map(|c| u64::from(c.len)).sum();
        assert!(moved < 40_000, "{moved} bytes changed for a 4 KiB edit");
        assert_ne!(a.content_id(), b.content_id());
    }

    #[test]
    fn bad_manifests_are_refused() {
        let m = Manifest::of_bytes(&bytes(50_000, 3), small());
        let good = m.encode();
        for cut in 0..good.len() {
            assert!(Manifest::decode(&good[..cut]).is_err(), "prefix {cut}");
        }
        let mut lying = m.clone();
        lying.size += 1;
        assert!(matches!(Manifest::decode(&lying.encode()), Err(ManifestError::Inconsistent(_))));
        let mut huge_count = b"MMF1".to_vec();
        push_varint(&mut huge_count, 10);
        huge_count.extend_from_slice(&[0; 32]);
        push_varint(&mut huge_count, u64::MAX >> 1);
        assert!(Manifest::decode(&huge_count).is_err());
        assert!(ChunkerConfig { min_bytes: 10, avg_bytes: 4096, max_bytes: 16384 }.check().is_err());
        assert!(ChunkerConfig::default().check().is_ok());
    }
}
