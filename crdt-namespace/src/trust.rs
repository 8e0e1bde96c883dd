//! Signed changes: every automerge change a site commits is signed with the site's Ed25519 key,
//! and every change that comes from outside (an export, a sync message, relayed or not) is
//! checked against the keys of the membership before anything of it is applied.
//!
//! What is signed is the change as it would be without its message: automerge's hash of its
//! author, sequence number, counters, time, dependencies and operations. The signature then
//! travels in the change's message (`mrdn-sig1:` and 128 lowercase hexadecimal digits), so it
//! goes wherever the change goes (sync messages, saves, first syncs of a whole document) and
//! needs no side channel. Because the sequence number and the dependencies are signed, a member
//! cannot take another site's next sequence number: only that site's key can make a change at
//! it, so the real change is never pushed aside. The message has one spelling per signature
//! (lowercase, strict Ed25519 verification), so nobody can make a second, different change out
//! of a signed one either.
//!
//! A site may have more than one key: its current one and those it had before a rotation, so
//! that what it wrote before stays valid.

use std::collections::HashMap;

use automerge::{Change, ExpandedChange};
use ed25519_dalek::{Signature, Signer, VerifyingKey};

use crate::SiteId;

/// How a signature begins in a change's message.
const SIGNATURE_PREFIX: &str = "mrdn-sig1:";

/// A site's secret signing key. Its `Debug` shows the public half only.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// The key whose 32-byte secret is `secret` (an Ed25519 seed, as libp2p keeps it).
    pub fn from_secret(secret: &[u8; 32]) -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(secret))
    }

    /// The public half: what other sites check this site's changes with.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(public {})", self.public())
    }
}

/// A site's public key.
#[derive(Copy, Clone, PartialEq, Eq, Hash)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// The key of these 32 bytes, if they are a valid Ed25519 point.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, String> {
        VerifyingKey::from_bytes(bytes).map(PublicKey).map_err(|_| "not an Ed25519 public key".to_owned())
    }

    /// Its 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// The keys each member's changes are checked with: its current key and its former ones.
///
/// A former key (one replaced by `mesh rotate`, or the key of a site removed by `mesh rm`) is
/// valid only for the changes its site made up to a sequence number: those written before the
/// key was retired. A change after that signed with it is refused at once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keys {
    by_site: HashMap<String, Vec<Grant>>,
}

/// One key of a site and the changes it may sign.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Grant {
    key: PublicKey,
    /// `None` for a current key; for a former one, the last sequence number it may sign.
    until_seq: Option<u64>,
}

impl Keys {
    /// No keys: every change from outside is refused.
    pub fn new() -> Keys {
        Keys::default()
    }

    /// Accepts changes of `site` signed with `key` (besides its other keys).
    pub fn allow(&mut self, site: &SiteId, key: PublicKey) {
        self.grant(site, Grant { key, until_seq: None });
    }

    /// Accepts changes of `site` up to its sequence number `until_seq` signed with its former
    /// key `key`. A key that is also current stays current.
    pub fn allow_until(&mut self, site: &SiteId, key: PublicKey, until_seq: u64) {
        self.grant(site, Grant { key, until_seq: Some(until_seq) });
    }

    fn grant(&mut self, site: &SiteId, grant: Grant) {
        let grants = self.by_site.entry(site.as_str().to_owned()).or_default();
        match grants.iter_mut().find(|g| g.key == grant.key) {
            // The wider grant wins: current over former, the later sequence number over the
            // earlier.
            Some(g) => {
                g.until_seq = match (g.until_seq, grant.until_seq) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                }
            }
            None => grants.push(grant),
        }
    }

    /// The keys of `site` that may sign its change at sequence number `seq`.
    pub fn of(&self, site: &str, seq: u64) -> impl Iterator<Item = &PublicKey> {
        self.by_site
            .get(site)
            .into_iter()
            .flatten()
            .filter(move |g| g.until_seq.is_none_or(|until| seq <= until))
            .map(|g| &g.key)
    }

    /// The sites with a current key: the members (a site removed from the mesh keeps only
    /// former keys, for the changes it wrote before).
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.by_site.iter().filter(|(_, g)| g.iter().any(|g| g.until_seq.is_none())).map(|(s, _)| s.as_str())
    }

    /// Whether `site` has any key at all (current or former).
    pub fn knows(&self, site: &str) -> bool {
        self.by_site.get(site).is_some_and(|g| !g.is_empty())
    }
}

/// The hash a change's signature signs: the change's own hash with the message left out.
fn signed_hash(mut expanded: ExpandedChange) -> automerge::ChangeHash {
    expanded.message = None;
    expanded.hash = None;
    Change::from(expanded).hash()
}

/// Signs `expanded` (whose message must be empty): the message that carries the signature,
/// and the hash of the change with that message.
pub(crate) fn sign(key: &SigningKey, mut expanded: ExpandedChange) -> (String, automerge::ChangeHash) {
    debug_assert!(expanded.message.is_none(), "a local change has no message of its own");
    let hash = signed_hash(expanded.clone());
    let signature = key.0.sign(&hash.0);
    let mut message = String::with_capacity(SIGNATURE_PREFIX.len() + 128);
    message.push_str(SIGNATURE_PREFIX);
    for b in signature.to_bytes() {
        message.push_str(&format!("{b:02x}"));
    }
    expanded.message = Some(message.clone());
    (message, Change::from(expanded).hash())
}

/// Checks that `expanded` (the decoded `change`, authored by `author`) carries a signature by
/// one of `author`'s keys.
pub(crate) fn verify(
    change: &Change,
    expanded: &ExpandedChange,
    author: &str,
    keys: &Keys,
) -> Result<(), String> {
    let hash = change.hash();
    if !keys.knows(author) {
        return Err(format!("change {hash} is authored by {author}, who is not a member"));
    }
    let signature = expanded
        .message
        .as_deref()
        .and_then(|m| m.strip_prefix(SIGNATURE_PREFIX))
        .and_then(parse_signature)
        .ok_or_else(|| format!("change {hash} of {author} is not signed"))?;
    let signed = signed_hash(expanded.clone());
    let seq = change.seq();
    if keys.of(author, seq).any(|key| key.0.verify_strict(&signed.0, &signature).is_ok()) {
        Ok(())
    } else if keys.of(author, 0).any(|key| key.0.verify_strict(&signed.0, &signature).is_ok()) {
        Err(format!(
            "change {hash} of {author} (its change {seq}) is signed with a key of {author} retired before it"
        ))
    } else {
        Err(format!("change {hash} claims to be {author}'s but no key of {author} signed it"))
    }
}

fn parse_signature(hex: &str) -> Option<Signature> {
    // Lowercase only: one spelling per signature.
    crate::ids::parse_lower_hex::<64>(hex).map(|bytes| Signature::from_bytes(&bytes))
}
