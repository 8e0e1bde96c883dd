//! The local control API between the `meridian` CLI and its daemon: length-prefixed frames over
//! a Unix socket. A request is one JSON frame; the answer is one JSON frame `{"ok": ...}` or
//! `{"error": "..."}`. A put sends data frames after the server's `ready` answer, ended by an
//! empty frame; a read answers with a header, data frames, an empty frame and a final status.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame: a data frame carries at most a chunk (16 MiB); JSON answers (a listing of a
/// large directory) get the same room.
pub const FRAME_MAX_BYTES: usize = 64 << 20;
/// Size of the data frames a sender cuts a stream into.
pub const DATA_FRAME_BYTES: usize = 1 << 20;

/// A request to the daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiRequest {
    /// Store a new version of a file; data frames follow the server's `ready`.
    Put {
        /// Where.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// Read a file (or bytes `start..end` of it).
    Read {
        /// Which file.
        path: String,
        /// First byte.
        start: Option<u64>,
        /// One past the last byte.
        end: Option<u64>,
    },
    /// Make a directory.
    Mkdir {
        /// Where.
        path: String,
        /// With parents.
        parents: bool,
    },
    /// Move or rename.
    Mv {
        /// From.
        from: String,
        /// To.
        to: String,
    },
    /// Remove.
    Rm {
        /// What.
        path: String,
        /// Directories with entries too.
        recursive: bool,
    },
    /// List a directory.
    Ls {
        /// Which.
        path: String,
    },
    /// Stat an entry.
    Stat {
        /// Which.
        path: String,
    },
    /// Set a tag.
    TagSet {
        /// On what.
        path: String,
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Unset a tag explicitly.
    TagUnset {
        /// On what.
        path: String,
        /// Key.
        key: String,
    },
    /// Effective tags.
    TagGet {
        /// Of what.
        path: String,
    },
    /// Find by tags and glob.
    Find {
        /// Predicates `k=v`, `k!=v`, `k`.
        tags: Vec<String>,
        /// Glob over paths.
        path: Option<String>,
    },
    /// The site's state.
    Status,
    /// The mesh members and their links.
    MeshLs,
    /// Cut (or restore) the link to a member until the node restarts.
    MeshBlock {
        /// The member's site id.
        site: String,
        /// Cut if true, restore if false.
        blocked: bool,
    },
    /// Admit a new mesh member (already written to the configuration).
    MeshAdd {
        /// The member.
        peer: crate::config::PeerConfig,
    },
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    w.write_all(&len.to_le_bytes()).await?;
    w.write_all(payload).await?;
    Ok(())
}

/// Writes a JSON frame.
pub async fn write_json<W: AsyncWrite + Unpin>(w: &mut W, value: &serde_json::Value) -> std::io::Result<()> {
    write_frame(w, &serde_json::to_vec(value).expect("JSON values serialize")).await
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > FRAME_MAX_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the bound of {FRAME_MAX_BYTES}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Reads a JSON answer frame: the `ok` value, or the error as `Err`.
pub async fn read_answer<R: AsyncRead + Unpin>(r: &mut R) -> anyhow::Result<serde_json::Value> {
    let frame = read_frame(r).await?.ok_or_else(|| anyhow::anyhow!("the node closed the connection"))?;
    let mut value: serde_json::Value =
        serde_json::from_slice(&frame).map_err(|e| anyhow::anyhow!("the node sent a bad answer: {e}"))?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{error}");
    }
    Ok(value.get_mut("ok").map(serde_json::Value::take).unwrap_or(serde_json::Value::Null))
}

/// `{"ok": value}`.
pub fn ok(value: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "ok": value })
}

/// `{"error": message}`.
pub fn error(message: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({ "error": message.to_string() })
}
