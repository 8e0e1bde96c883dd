//! Path globs and tag predicates for `find`.

use crate::error::OpError;
use crate::name::check_tag_key;

/// A glob over absolute paths: `*` matches within one name, `?` one character of a name, `**`
/// (as a whole component) any number of components, including none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
    parts: Vec<String>,
}

/// Longest glob accepted, in bytes.
const GLOB_MAX_BYTES: usize = 4096;

impl Glob {
    /// Parses a glob; it must be absolute.
    pub fn new(pattern: &str) -> Result<Glob, OpError> {
        let invalid =
            |reason: &str| OpError::InvalidGlob { glob: pattern.to_owned(), reason: reason.to_owned() };
        if !pattern.starts_with('/') {
            return Err(invalid("a glob must be absolute (start with `/`)"));
        }
        if pattern.len() > GLOB_MAX_BYTES {
            return Err(invalid("a glob is at most 4096 bytes"));
        }
        if pattern.contains('\0') {
            return Err(invalid("a glob cannot contain NUL"));
        }
        let parts: Vec<String> = pattern.split('/').filter(|p| !p.is_empty()).map(str::to_owned).collect();
        if let Some(p) = parts.iter().find(|p| p.contains("**") && p.as_str() != "**") {
            return Err(invalid(&format!("`**` must be a whole component, not part of {p:?}")));
        }
        Ok(Glob { pattern: pattern.to_owned(), parts })
    }

    /// The pattern as given.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether the absolute path matches.
    pub fn matches(&self, path: &str) -> bool {
        let names: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        // Dynamic programming over (pattern part, name): no exponential backtracking.
        let (p, n) = (self.parts.len(), names.len());
        let mut reach = vec![vec![false; n + 1]; p + 1];
        reach[0][0] = true;
        for i in 0..p {
            for j in 0..=n {
                if !reach[i][j] {
                    continue;
                }
                if self.parts[i] == "**" {
                    for slot in reach[i + 1].iter_mut().skip(j) {
                        *slot = true;
                    }
                } else if j < n && name_matches(self.parts[i].as_bytes(), names[j].as_bytes()) {
                    reach[i + 1][j + 1] = true;
                }
            }
        }
        reach[p][n]
    }
}

/// Matches one name against one component pattern with `*` and `?`, working on characters.
fn name_matches(pattern: &[u8], name: &[u8]) -> bool {
    let pattern: Vec<char> = String::from_utf8_lossy(pattern).chars().collect();
    let name: Vec<char> = String::from_utf8_lossy(name).chars().collect();
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

/// A condition on an entry's effective tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagPredicate {
    /// `key=value`: the tag is set to this value.
    Equals(String, String),
    /// `key!=value`: the tag is not set to this value (unset counts).
    NotEquals(String, String),
    /// `key`: the tag is set, to anything.
    Exists(String),
}

impl TagPredicate {
    /// Parses `key=value`, `key!=value` or `key`.
    pub fn parse(text: &str) -> Result<TagPredicate, OpError> {
        let invalid = |reason: String| OpError::InvalidPredicate { predicate: text.to_owned(), reason };
        let predicate = if let Some((key, value)) = text.split_once("!=") {
            TagPredicate::NotEquals(key.to_owned(), value.to_owned())
        } else if let Some((key, value)) = text.split_once('=') {
            TagPredicate::Equals(key.to_owned(), value.to_owned())
        } else {
            TagPredicate::Exists(text.to_owned())
        };
        check_tag_key(predicate.key()).map_err(invalid)?;
        Ok(predicate)
    }

    /// The key the predicate looks at.
    pub fn key(&self) -> &str {
        match self {
            TagPredicate::Equals(k, _) | TagPredicate::NotEquals(k, _) | TagPredicate::Exists(k) => k,
        }
    }

    /// Whether an effective value (None: not set) satisfies the predicate.
    pub fn holds(&self, value: Option<&str>) -> bool {
        match self {
            TagPredicate::Equals(_, v) => value == Some(v.as_str()),
            TagPredicate::NotEquals(_, v) => value != Some(v.as_str()),
            TagPredicate::Exists(_) => value.is_some(),
        }
    }
}

/// What `find` looks for: every predicate holds and the glob (if any) matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// Conditions on effective tags, all of which must hold.
    pub tags: Vec<TagPredicate>,
    /// A glob the path must match.
    pub path: Option<Glob>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_paths() {
        let g = Glob::new("/project/*/flame/*.clip").unwrap();
        assert!(g.matches("/project/apollo/flame/shot010.clip"));
        assert!(!g.matches("/project/apollo/x/flame/shot010.clip"));
        assert!(!g.matches("/project/apollo/flame/shot010.clips"));
        let g = Glob::new("/data/**/*.jpg").unwrap();
        assert!(g.matches("/data/a.jpg"));
        assert!(g.matches("/data/x/y/z/a.jpg"));
        assert!(!g.matches("/other/a.jpg"));
        let g = Glob::new("/s?ot*").unwrap();
        assert!(g.matches("/shot010"));
        assert!(!g.matches("/shot010/x"));
        assert!(Glob::new("relative/*").is_err());
        assert!(Glob::new("/a**b").is_err());
        assert!(Glob::new("/**").unwrap().matches("/"));
    }

    #[test]
    fn predicates_parse() {
        assert_eq!(TagPredicate::parse("a=b").unwrap(), TagPredicate::Equals("a".into(), "b".into()));
        assert_eq!(TagPredicate::parse("a!=b").unwrap(), TagPredicate::NotEquals("a".into(), "b".into()));
        assert_eq!(TagPredicate::parse("a").unwrap(), TagPredicate::Exists("a".into()));
        assert!(TagPredicate::parse("=b").is_err());
        assert!(TagPredicate::parse("a b=c").is_err());
    }
}
