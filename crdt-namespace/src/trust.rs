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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keys {
    by_site: HashMap<String, Vec<PublicKey>>,
}

impl Keys {
    /// No keys: every change from outside is refused.
    pub fn new() -> Keys {
        Keys::default()
    }

    /// Accepts changes of `site` signed with `key` (besides its other keys).
    pub fn allow(&mut self, site: &SiteId, key: PublicKey) {
        let keys = self.by_site.entry(site.as_str().to_owned()).or_default();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }

    /// Refuses every change of `site` from now on (it left the membership).
    pub fn remove(&mut self, site: &SiteId) {
        self.by_site.remove(site.as_str());
    }

    /// The keys of `site`.
    pub fn of(&self, site: &str) -> &[PublicKey] {
        self.by_site.get(site).map_or(&[], Vec::as_slice)
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
    let allowed = keys.of(author);
    if allowed.is_empty() {
        return Err(format!("change {hash} is authored by {author}, who is not a member"));
    }
    let signature = expanded
        .message
        .as_deref()
        .and_then(|m| m.strip_prefix(SIGNATURE_PREFIX))
        .and_then(parse_signature)
        .ok_or_else(|| format!("change {hash} of {author} is not signed"))?;
    let signed = signed_hash(expanded.clone());
    if allowed.iter().any(|key| key.0.verify_strict(&signed.0, &signature).is_ok()) {
        Ok(())
    } else {
        Err(format!("change {hash} claims to be {author}'s but no key of {author} signed it"))
    }
}

fn parse_signature(hex: &str) -> Option<Signature> {
    let bytes = hex.as_bytes();
    if bytes.len() != 128 {
        return None;
    }
    let mut out = [0u8; 64];
    for (i, pair) in bytes.chunks(2).enumerate() {
        // Lowercase only: one spelling per signature.
        let digit =
            |c: u8| matches!(c, b'0'..=b'9' | b'a'..=b'f').then(|| (c as char).to_digit(16)).flatten();
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(Signature::from_bytes(&out))
}
