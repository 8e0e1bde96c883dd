//! The binary encoding of namespace operations, as stored in the automerge document.
//!
//! Every field is bounded; decoding never allocates more than the input's length and returns an
//! error, never panics, on truncated, oversized or unknown input.

use crate::error::DecodeError;
use crate::ids::{ContentId, EntryId, OpId, SiteId, SiteIdx, Sites};
use crate::name::{
    SYMLINK_TARGET_MAX_BYTES, TAG_KEY_MAX_BYTES, TAG_VALUE_MAX_BYTES, check_name, check_symlink_target,
    check_tag_key, check_tag_value,
};
use crate::wire::{Reader, push_varint};
use crate::{Hlc, TagValue};

/// Version byte that starts every encoded operation.
const OP_FORMAT_V1: u8 = 1;
/// Most sites a remove operation may list in what it had seen. A mesh is tens of sites.
pub(crate) const SEEN_SITES_MAX: usize = 4096;
/// Most entries one remove may list: a recursive remove of a tree of 16 million entries.
pub(crate) const REMOVE_ENTRIES_MAX: usize = 16 << 20;

/// One namespace operation. Entry references are resolved through the replica's site numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Create {
        parent: EntryId,
        name: Box<str>,
        body: CreateBody,
    },
    Write {
        target: EntryId,
        base: OpId,
        meta: FileMeta,
    },
    Move {
        target: EntryId,
        parent: EntryId,
        name: Box<str>,
    },
    /// `seen`: the remover's version vector; `entries`: the live entries it saw in the subtree
    /// (the target included). Only those can be deleted.
    Remove {
        target: EntryId,
        seen: Vec<(SiteIdx, Hlc)>,
        entries: Vec<EntryId>,
    },
    SetTag {
        target: EntryId,
        key: Box<str>,
        change: TagChange,
    },
    SetAttr {
        target: EntryId,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
    },
}

/// What a create operation makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CreateBody {
    Dir { mode: u32, mtime_ns: i64 },
    File(FileMeta),
    Symlink { target: Box<str>, mtime_ns: i64 },
}

/// The metadata of a file version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileMeta {
    pub(crate) content: ContentId,
    pub(crate) size: u64,
    pub(crate) mode: u32,
    pub(crate) mtime_ns: i64,
}

/// A change of one tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TagChange {
    /// Set or explicitly unset the tag on the entry.
    Define(TagValue),
    /// Forget the entry's own definition: the tag is inherited again.
    Clear,
}

struct Writer<'s> {
    buf: Vec<u8>,
    sites: &'s Sites,
}

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn varint(&mut self, v: u64) {
        push_varint(&mut self.buf, v);
    }
    fn signed(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }
    fn str(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
    fn op_id(&mut self, id: OpId) {
        self.varint(id.hlc.raw());
        self.str(self.sites.name(id.site));
    }
    fn entry(&mut self, id: EntryId) {
        self.op_id(id.op);
        self.u8(u8::from(id.copy));
    }
    fn meta(&mut self, meta: &FileMeta) {
        self.buf.extend_from_slice(&meta.content.0);
        self.varint(meta.size);
        self.varint(u64::from(meta.mode));
        self.signed(meta.mtime_ns);
    }
}

/// Encodes an operation.
pub(crate) fn encode(op: &Op, sites: &Sites) -> Vec<u8> {
    let mut w = Writer { buf: Vec::with_capacity(64), sites };
    w.u8(OP_FORMAT_V1);
    match op {
        Op::Create { parent, name, body } => {
            w.u8(0);
            w.entry(*parent);
            w.str(name);
            match body {
                CreateBody::Dir { mode, mtime_ns } => {
                    w.u8(0);
                    w.varint(u64::from(*mode));
                    w.signed(*mtime_ns);
                }
                CreateBody::File(meta) => {
                    w.u8(1);
                    w.meta(meta);
                }
                CreateBody::Symlink { target, mtime_ns } => {
                    w.u8(2);
                    w.str(target);
                    w.signed(*mtime_ns);
                }
            }
        }
        Op::Write { target, base, meta } => {
            w.u8(1);
            w.entry(*target);
            w.op_id(*base);
            w.meta(meta);
        }
        Op::Move { target, parent, name } => {
            w.u8(2);
            w.entry(*target);
            w.entry(*parent);
            w.str(name);
        }
        Op::Remove { target, seen, entries } => {
            w.u8(3);
            w.entry(*target);
            w.varint(seen.len() as u64);
            for (site, hlc) in seen {
                w.str(sites.name(*site));
                w.varint(hlc.raw());
            }
            // Entries name their site by its place in `seen`: the remover saw their creation.
            let place: std::collections::HashMap<SiteIdx, usize> =
                seen.iter().enumerate().map(|(i, (site, _))| (*site, i)).collect();
            let listed: Vec<&EntryId> = entries.iter().filter(|e| place.contains_key(&e.op.site)).collect();
            w.varint(listed.len() as u64);
            for e in listed {
                w.varint(place[&e.op.site] as u64);
                w.varint(e.op.hlc.raw());
                w.u8(u8::from(e.copy));
            }
        }
        Op::SetTag { target, key, change } => {
            w.u8(4);
            w.entry(*target);
            w.str(key);
            match change {
                TagChange::Define(TagValue::Set(value)) => {
                    w.u8(0);
                    w.str(value);
                }
                TagChange::Define(TagValue::Unset) => w.u8(1),
                TagChange::Clear => w.u8(2),
            }
        }
        Op::SetAttr { target, mode, mtime_ns } => {
            w.u8(5);
            w.entry(*target);
            w.u8(u8::from(mode.is_some()) | (u8::from(mtime_ns.is_some()) << 1));
            if let Some(mode) = mode {
                w.varint(u64::from(*mode));
            }
            if let Some(mtime) = mtime_ns {
                w.signed(*mtime);
            }
        }
    }
    w.buf
}

struct OpReader<'a, 's> {
    r: Reader<'a>,
    sites: &'s mut Sites,
}

impl OpReader<'_, '_> {
    fn site(&mut self, what: &'static str) -> Result<SiteIdx, DecodeError> {
        let name = self.r.str(what, crate::ids::SITE_ID_MAX_BYTES)?;
        if name.is_empty() {
            return Ok(SiteIdx::ROOT);
        }
        SiteId::new(name).map_err(|reason| DecodeError::Invalid { what, reason })?;
        Ok(self.sites.intern(name))
    }

    fn op_id(&mut self, what: &'static str) -> Result<OpId, DecodeError> {
        let hlc = Hlc::from_raw(self.r.varint(what)?);
        let site = self.site(what)?;
        if (hlc == Hlc::ZERO) != (site == SiteIdx::ROOT) {
            return Err(DecodeError::Invalid {
                what,
                reason: "the zero HLC belongs to the root alone".into(),
            });
        }
        Ok(OpId { hlc, site })
    }

    fn entry(&mut self, what: &'static str) -> Result<EntryId, DecodeError> {
        let op = self.op_id(what)?;
        let copy = match self.r.u8(what)? {
            0 => false,
            1 => true,
            tag => return Err(DecodeError::UnknownTag { what, tag }),
        };
        if copy && op == OpId::ROOT {
            return Err(DecodeError::Invalid { what, reason: "the root has no copies".into() });
        }
        Ok(EntryId { op, copy })
    }

    fn name(&mut self) -> Result<Box<str>, DecodeError> {
        let name = self.r.str("name", crate::NAME_MAX_BYTES)?;
        check_name(name).map_err(|e| DecodeError::Invalid { what: "name", reason: e.to_string() })?;
        Ok(name.into())
    }

    fn meta(&mut self) -> Result<FileMeta, DecodeError> {
        Ok(FileMeta {
            content: ContentId(self.r.array32("content id")?),
            size: self.r.varint("size")?,
            mode: self.r.u32("mode")?,
            mtime_ns: self.r.signed("mtime")?,
        })
    }
}

fn invalid(what: &'static str) -> impl FnOnce(String) -> DecodeError {
    move |reason| DecodeError::Invalid { what, reason }
}

/// Decodes an operation, numbering the sites it names in `sites`.
pub(crate) fn decode(bytes: &[u8], sites: &mut Sites) -> Result<Op, DecodeError> {
    let mut d = OpReader { r: Reader::new(bytes), sites };
    let version = d.r.u8("format version")?;
    if version != OP_FORMAT_V1 {
        return Err(DecodeError::UnknownTag { what: "operation format", tag: version });
    }
    let op = match d.r.u8("operation")? {
        0 => {
            let parent = d.entry("parent")?;
            let name = d.name()?;
            let body = match d.r.u8("entry kind")? {
                0 => CreateBody::Dir { mode: d.r.u32("mode")?, mtime_ns: d.r.signed("mtime")? },
                1 => CreateBody::File(d.meta()?),
                2 => {
                    let target = d.r.str("symlink target", SYMLINK_TARGET_MAX_BYTES)?;
                    check_symlink_target(target).map_err(invalid("symlink target"))?;
                    CreateBody::Symlink { target: target.into(), mtime_ns: d.r.signed("mtime")? }
                }
                tag => return Err(DecodeError::UnknownTag { what: "entry kind", tag }),
            };
            Op::Create { parent, name, body }
        }
        1 => Op::Write { target: d.entry("target")?, base: d.op_id("base version")?, meta: d.meta()? },
        2 => Op::Move { target: d.entry("target")?, parent: d.entry("parent")?, name: d.name()? },
        3 => {
            let target = d.entry("target")?;
            // A seen site takes at least two bytes, a removed entry three.
            let (count, capacity) = d.r.count("seen sites", SEEN_SITES_MAX, 2)?;
            let mut seen = Vec::with_capacity(capacity);
            for _ in 0..count {
                let site = d.site("seen site")?;
                seen.push((site, Hlc::from_raw(d.r.varint("seen hlc")?)));
            }
            let (count, capacity) = d.r.count("removed entries", REMOVE_ENTRIES_MAX, 3)?;
            let mut entries = Vec::with_capacity(capacity);
            for _ in 0..count {
                let place = d.r.varint("removed entry site")?;
                let (site, _) = *seen.get(place as usize).ok_or(DecodeError::Invalid {
                    what: "removed entry",
                    reason: format!("site number {place} is not among the {} seen", seen.len()),
                })?;
                let hlc = Hlc::from_raw(d.r.varint("removed entry hlc")?);
                let copy = match d.r.u8("removed entry kind")? {
                    0 => false,
                    1 => true,
                    tag => return Err(DecodeError::UnknownTag { what: "removed entry kind", tag }),
                };
                entries.push(EntryId { op: OpId { hlc, site }, copy });
            }
            Op::Remove { target, seen, entries }
        }
        4 => {
            let target = d.entry("target")?;
            let key = d.r.str("tag key", TAG_KEY_MAX_BYTES)?;
            check_tag_key(key).map_err(invalid("tag key"))?;
            let change = match d.r.u8("tag change")? {
                0 => {
                    let value = d.r.str("tag value", TAG_VALUE_MAX_BYTES)?;
                    check_tag_value(value).map_err(invalid("tag value"))?;
                    TagChange::Define(TagValue::Set(value.into()))
                }
                1 => TagChange::Define(TagValue::Unset),
                2 => TagChange::Clear,
                tag => return Err(DecodeError::UnknownTag { what: "tag change", tag }),
            };
            Op::SetTag { target, key: key.into(), change }
        }
        5 => {
            let target = d.entry("target")?;
            let flags = d.r.u8("attribute flags")?;
            if flags > 3 {
                return Err(DecodeError::UnknownTag { what: "attribute flags", tag: flags });
            }
            let mode = if flags & 1 != 0 { Some(d.r.u32("mode")?) } else { None };
            let mtime_ns = if flags & 2 != 0 { Some(d.r.signed("mtime")?) } else { None };
            Op::SetAttr { target, mode, mtime_ns }
        }
        tag => return Err(DecodeError::UnknownTag { what: "operation", tag }),
    };
    d.r.finish("operation")?;
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_ops(sites: &mut Sites) -> Vec<Op> {
        let west = sites.intern("west");
        let id = |h: u64| EntryId::created_by(OpId { hlc: Hlc::from_raw(h), site: west });
        let meta = FileMeta { content: ContentId([7; 32]), size: 1 << 40, mode: 0o644, mtime_ns: -5 };
        vec![
            Op::Create {
                parent: EntryId::ROOT,
                name: "a".into(),
                body: CreateBody::Dir { mode: 0o755, mtime_ns: 9 },
            },
            Op::Create { parent: id(1), name: "f.clip".into(), body: CreateBody::File(meta) },
            Op::Create {
                parent: id(1),
                name: "l".into(),
                body: CreateBody::Symlink { target: "../x".into(), mtime_ns: 1 },
            },
            Op::Write { target: id(2), base: OpId { hlc: Hlc::from_raw(2), site: west }, meta },
            Op::Move { target: EntryId::copy_of(id(2).op), parent: EntryId::ROOT, name: "b".into() },
            Op::Remove { target: id(1), seen: vec![(west, Hlc::from_raw(77))], entries: vec![id(1), id(2)] },
            Op::SetTag {
                target: id(1),
                key: "project".into(),
                change: TagChange::Define(TagValue::Set("apollo".into())),
            },
            Op::SetTag { target: id(1), key: "stage".into(), change: TagChange::Define(TagValue::Unset) },
            Op::SetTag { target: id(1), key: "stage".into(), change: TagChange::Clear },
            Op::SetAttr { target: id(2), mode: Some(0o600), mtime_ns: None },
        ]
    }

    #[test]
    fn every_operation_round_trips() {
        let mut sites = Sites::new();
        for op in sample_ops(&mut sites) {
            let bytes = encode(&op, &sites);
            assert_eq!(decode(&bytes, &mut sites).unwrap(), op);
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut], &mut sites).is_err(), "prefix {cut} of {op:?}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode(&longer, &mut sites).is_err());
        }
    }

    proptest! {
        #[test]
        fn mutated_operations_never_panic(index in 0usize..10, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
            let mut sites = Sites::new();
            let ops = sample_ops(&mut sites);
            let mut bytes = encode(&ops[index], &sites);
            for (at, value) in flips {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            if let Ok(op) = decode(&bytes, &mut sites) {
                // Whatever decodes re-encodes to a valid operation.
                let again = encode(&op, &sites);
                prop_assert_eq!(decode(&again, &mut sites).unwrap(), op);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut sites = Sites::new();
            let _ = decode(&bytes, &mut sites);
        }
    }
}
