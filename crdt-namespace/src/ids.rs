//! Identities: sites, operations, entries, contents.

use std::collections::HashMap;
use std::fmt;

use crate::Hlc;

/// Longest site id, in bytes.
pub const SITE_ID_MAX_BYTES: usize = 32;

/// The id of a site: 1–32 ASCII letters, digits, `-` or `_`. It appears in conflict names, so it
/// is limited to characters that are safe in a file name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SiteId(Box<str>);

impl SiteId {
    /// Checks and wraps a site id.
    pub fn new(id: &str) -> Result<SiteId, String> {
        if id.is_empty() || id.len() > SITE_ID_MAX_BYTES {
            return Err(format!("site id {id:?} must be 1 to {SITE_ID_MAX_BYTES} bytes long"));
        }
        if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
            return Err(format!(
                "site id {id:?} may hold only ASCII letters, digits, `-` and `_`, not {c:?}"
            ));
        }
        Ok(SiteId(id.into()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A site as numbered by one replica. Numbers are local: they never leave the replica.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub(crate) struct SiteIdx(pub(crate) u32);

impl SiteIdx {
    /// The pseudo-site of the root entry; never a real site.
    pub(crate) const ROOT: SiteIdx = SiteIdx(0);
}

/// The sites a replica has heard of, numbered in the order it heard of them.
#[derive(Clone, Debug)]
pub(crate) struct Sites {
    names: Vec<Box<str>>,
    numbers: HashMap<Box<str>, SiteIdx>,
}

impl Sites {
    pub(crate) fn new() -> Sites {
        Sites { names: vec!["".into()], numbers: HashMap::new() }
    }

    /// The number of a site, giving it one if it is new. The caller has checked the name.
    pub(crate) fn intern(&mut self, name: &str) -> SiteIdx {
        if let Some(idx) = self.numbers.get(name) {
            return *idx;
        }
        let idx = SiteIdx(u32::try_from(self.names.len()).expect("fewer than 2^32 sites"));
        self.names.push(name.into());
        self.numbers.insert(name.into(), idx);
        idx
    }

    pub(crate) fn name(&self, idx: SiteIdx) -> &str {
        &self.names[idx.0 as usize]
    }
}

/// The id of an operation: the HLC reading it was made at and the site that made it. Unique,
/// because a site never issues two operations at the same reading.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
pub(crate) struct OpId {
    pub(crate) hlc: Hlc,
    pub(crate) site: SiteIdx,
}

impl OpId {
    pub(crate) const ROOT: OpId = OpId { hlc: Hlc::ZERO, site: SiteIdx::ROOT };

    /// The total order of operations: HLC, then site id.
    pub(crate) fn cmp(self, other: OpId, sites: &Sites) -> std::cmp::Ordering {
        self.hlc.cmp(&other.hlc).then_with(|| sites.name(self.site).cmp(sites.name(other.site)))
    }

    /// The key of the operation in the automerge document: `<!hlc in 16 hex digits>.<site>`,
    /// the HLC's bits inverted so that newer operations sort first. Automerge applies a change
    /// to a map by walking the map's keys in order up to the first key the change touches, so
    /// keys of fresh operations at the front keep that walk short however large the map.
    pub(crate) fn key(self, sites: &Sites) -> String {
        format!("{:016x}.{}", !self.hlc.raw(), sites.name(self.site))
    }
}

/// Parses an operation key into its HLC and site, checking both.
pub(crate) fn parse_op_key(key: &str) -> Result<(Hlc, &str), String> {
    let (hlc, site) = key.split_once('.').ok_or_else(|| format!("operation key {key:?} has no `.`"))?;
    if hlc.len() != 16 || !hlc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("operation key {key:?} does not start with 16 lowercase hexadecimal digits"));
    }
    let raw = !u64::from_str_radix(hlc, 16).map_err(|e| format!("operation key {key:?}: {e}"))?;
    if raw == 0 {
        return Err(format!("operation key {key:?} has the zero HLC"));
    }
    SiteId::new(site)?;
    Ok((Hlc::from_raw(raw), site))
}

/// The stable id of an entry within one replica: the operation that created it, and whether it
/// is a conflict copy (then the operation is the version it preserves).
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
pub(crate) struct EntryId {
    pub(crate) op: OpId,
    pub(crate) copy: bool,
}

impl EntryId {
    pub(crate) const ROOT: EntryId = EntryId { op: OpId::ROOT, copy: false };

    pub(crate) fn created_by(op: OpId) -> EntryId {
        EntryId { op, copy: false }
    }

    pub(crate) fn copy_of(version: OpId) -> EntryId {
        EntryId { op: version, copy: true }
    }

    /// The id shown to users: 32 hexadecimal digits, the same at every site.
    pub(crate) fn hex(self, sites: &Sites) -> String {
        if self == EntryId::ROOT {
            return "0".repeat(32);
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"meridian.entry.v1");
        hasher.update(&self.op.hlc.raw().to_be_bytes());
        hasher.update(sites.name(self.op.site).as_bytes());
        hasher.update(&[u8::from(self.copy)]);
        let hash = hasher.finalize();
        hash.as_bytes()[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The content of a file version: the BLAKE3 hash of its manifest.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ContentId(pub [u8; 32]);

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl ContentId {
    /// The id its lowercase hexadecimal spelling (as displayed) names.
    pub fn parse_hex(text: &str) -> Option<ContentId> {
        parse_lower_hex(text).map(ContentId)
    }
}

/// The `N` bytes spelled by `text` in lowercase hexadecimal (one spelling per value).
pub(crate) fn parse_lower_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = text.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| matches!(c, b'0'..=b'9' | b'a'..=b'f').then(|| (c as char).to_digit(16)).flatten();
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks(2).enumerate() {
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ids_parse_from_their_spelling_only() {
        let id = ContentId([0xab; 32]);
        assert_eq!(ContentId::parse_hex(&id.to_string()), Some(id));
        assert_eq!(ContentId::parse_hex(&id.to_string().to_uppercase()), None);
        assert_eq!(ContentId::parse_hex("ab"), None);
        assert_eq!(ContentId::parse_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn site_ids_are_checked() {
        assert!(SiteId::new("west-1_a").is_ok());
        assert!(SiteId::new("").is_err());
        assert!(SiteId::new("we.st").is_err());
        assert!(SiteId::new(&"a".repeat(33)).is_err());
    }

    #[test]
    fn op_keys_round_trip_and_reject_junk() {
        let mut sites = Sites::new();
        let west = sites.intern("west");
        let id = OpId { hlc: Hlc::new(1_700_000_000_000, 3), site: west };
        let key = id.key(&sites);
        assert_eq!(parse_op_key(&key).unwrap(), (id.hlc, "west"));
        for junk in [
            "",
            ".",
            "x.west",
            "ffffffffffffffff.west",
            "fffffffffffffffe.",
            "1.west",
            "1111111111111111.we/st",
            "11111111111111111.a",
            "FFFFFFFFFFFFFFFE.west",
        ] {
            assert!(parse_op_key(junk).is_err(), "{junk:?}");
        }
    }
}
