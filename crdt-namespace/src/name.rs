//! Validation of names, paths, site ids and tags.

use crate::error::{NameError, OpError};

/// Longest name of an entry, in bytes.
pub const NAME_MAX_BYTES: usize = 255;
/// Deepest path accepted, in components. Bounds every walk up or down the tree.
pub const PATH_DEPTH_MAX: usize = 1024;
/// Longest tag key, in bytes.
pub const TAG_KEY_MAX_BYTES: usize = 128;
/// Longest tag value, in bytes.
pub const TAG_VALUE_MAX_BYTES: usize = 1024;
/// Longest symlink target, in bytes (Linux's PATH_MAX).
pub const SYMLINK_TARGET_MAX_BYTES: usize = 4096;

/// Checks one entry name: UTF-8 (guaranteed by `&str`), 1–255 bytes, not `.` or `..`, no `/`
/// and no NUL.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > NAME_MAX_BYTES {
        return Err(NameError::TooLong { len: name.len() });
    }
    if name == "." {
        return Err(NameError::Dot);
    }
    if name == ".." {
        return Err(NameError::DotDot);
    }
    if name.contains('/') {
        return Err(NameError::Slash);
    }
    if name.contains('\0') {
        return Err(NameError::Nul);
    }
    Ok(())
}

/// Splits an absolute path into its names. Repeated and trailing slashes are ignored; every
/// component must be a valid name. `/` gives no components.
pub fn split_path(path: &str) -> Result<Vec<&str>, OpError> {
    if !path.starts_with('/') {
        return Err(OpError::NotAbsolute { path: path.to_owned() });
    }
    let mut names = Vec::new();
    for name in path.split('/').filter(|c| !c.is_empty()) {
        check_name(name).map_err(|reason| OpError::InvalidName {
            path: path.to_owned(),
            name: name.to_owned(),
            reason,
        })?;
        names.push(name);
        if names.len() > PATH_DEPTH_MAX {
            return Err(OpError::TooDeep { path: path.to_owned() });
        }
    }
    Ok(names)
}

/// Checks a tag key: 1–128 bytes, no `=`, `!`, NUL, or whitespace (so `k=v` parses).
pub fn check_tag_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("a tag key cannot be empty".into());
    }
    if key.len() > TAG_KEY_MAX_BYTES {
        return Err(format!("a tag key is at most {TAG_KEY_MAX_BYTES} bytes, this one is {}", key.len()));
    }
    if let Some(c) = key.chars().find(|c| *c == '=' || *c == '!' || *c == '\0' || c.is_whitespace()) {
        return Err(format!("a tag key cannot contain {c:?}"));
    }
    Ok(())
}

/// Checks a tag value: at most 1024 bytes, no NUL.
pub fn check_tag_value(value: &str) -> Result<(), String> {
    if value.len() > TAG_VALUE_MAX_BYTES {
        return Err(format!(
            "a tag value is at most {TAG_VALUE_MAX_BYTES} bytes, this one is {}",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Err("a tag value cannot contain NUL".into());
    }
    Ok(())
}

/// Checks a symlink target: 1–4096 bytes, no NUL.
pub fn check_symlink_target(target: &str) -> Result<(), String> {
    if target.is_empty() {
        return Err("a symlink target cannot be empty".into());
    }
    if target.len() > SYMLINK_TARGET_MAX_BYTES {
        return Err(format!("a symlink target is at most {SYMLINK_TARGET_MAX_BYTES} bytes"));
    }
    if target.contains('\0') {
        return Err("a symlink target cannot contain NUL".into());
    }
    Ok(())
}

/// Joins a parent path and a name.
pub(crate) fn join(parent: &str, name: &str) -> String {
    if parent == "/" { format!("/{name}") } else { format!("{parent}/{name}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert_eq!(check_name("shot010.clip"), Ok(()));
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(check_name("."), Err(NameError::Dot));
        assert_eq!(check_name(".."), Err(NameError::DotDot));
        assert_eq!(check_name("a/b"), Err(NameError::Slash));
        assert_eq!(check_name("a\0b"), Err(NameError::Nul));
        assert_eq!(check_name(&"x".repeat(256)), Err(NameError::TooLong { len: 256 }));
        assert_eq!(check_name(&"é".repeat(127)), Ok(()));
        assert_eq!(check_name("...."), Ok(()));
    }

    #[test]
    fn paths_are_split() {
        assert_eq!(split_path("/").unwrap(), Vec::<&str>::new());
        assert_eq!(split_path("//a///b/").unwrap(), vec!["a", "b"]);
        assert!(matches!(split_path("a/b"), Err(OpError::NotAbsolute { .. })));
        let err = split_path("/a/../b").unwrap_err();
        assert_eq!(err.to_string(), "invalid name \"..\" in path \"/a/../b\": a name cannot be `..`");
    }
}
