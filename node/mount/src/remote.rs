//! The node's control API as the mount uses it: metadata calls answered at once by the local
//! replica (blocking, on the FUSE thread that asked), reads and commits as tasks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use fuser::Errno;
use node::api::{self, ApiError, ApiRequest, ErrorKind, ReadVersion};
use node::client::Client;
use tokio::net::UnixStream;

/// The errno a program understands for a failed call.
pub fn errno(error: &anyhow::Error) -> Errno {
    match ApiError::kind_of(error) {
        Some(ErrorKind::NotFound) => Errno::ENOENT,
        Some(ErrorKind::AlreadyExists) => Errno::EEXIST,
        Some(ErrorKind::NotADirectory) => Errno::ENOTDIR,
        Some(ErrorKind::IsADirectory) => Errno::EISDIR,
        Some(ErrorKind::NotAFile) => Errno::EINVAL,
        Some(ErrorKind::NotEmpty) => Errno::ENOTEMPTY,
        Some(ErrorKind::InvalidArgument) => Errno::EINVAL,
        Some(ErrorKind::PermissionDenied) => Errno::EACCES,
        Some(ErrorKind::Unavailable | ErrorKind::Io) => Errno::EIO,
        Some(
            ErrorKind::NotMember | ErrorKind::BadRequest | ErrorKind::NodeNotRunning | ErrorKind::Internal,
        )
        | None => Errno::EIO,
    }
}

/// A client of the node's control socket.
#[derive(Clone, Debug)]
pub struct Remote {
    /// The client (puts go through it as they are).
    pub(crate) client: Client,
    /// How long a read may wait for its bytes before it fails with EIO.
    pub read_timeout: Duration,
}

impl Remote {
    /// A client of the node listening on `socket`.
    pub fn new(socket: PathBuf, read_timeout: Duration) -> Remote {
        Remote { client: Client::new(socket), read_timeout }
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        self.client.socket()
    }

    /// A call answered by the local replica.
    pub fn call<T: serde::de::DeserializeOwned>(&self, request: &ApiRequest) -> anyhow::Result<T> {
        self.client.call(request)
    }

    /// Reads bytes `start..end` of `version` of the file at `path` (the current one if
    /// `None`; fewer bytes at its end), waiting at most `read_timeout` for them.
    pub async fn read(
        &self,
        path: &str,
        version: Option<ReadVersion>,
        start: u64,
        end: u64,
    ) -> anyhow::Result<Vec<u8>> {
        let reading = read_range(self.client.socket(), path, version, start, end);
        match tokio::time::timeout(self.read_timeout, reading).await {
            Ok(read) => read,
            Err(_) => bail!(
                "reading {path}: no reachable site or bucket supplied bytes {start}..{end} within {:?}",
                self.read_timeout
            ),
        }
    }
}

impl Remote {
    /// Copies the current content of the file at `path` into `file`, failing if no bytes come
    /// for `read_timeout`.
    pub async fn copy_into(&self, path: &str, file: &std::fs::File) -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        let socket = self.client.socket();
        let stream = UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let mut reading = api::Reading::start(stream, path, None, None).await?;
        let mut at = 0u64;
        loop {
            let frame = match tokio::time::timeout(self.read_timeout, reading.next()).await {
                Ok(frame) => frame?,
                Err(_) => bail!(
                    "reading {path}: no reachable site or bucket supplied bytes from {at} on within {:?}",
                    self.read_timeout
                ),
            };
            let Some(frame) = frame else { return Ok(()) };
            file.write_all_at(&frame, at)?;
            at += frame.len() as u64;
        }
    }
}

async fn read_range(
    socket: &Path,
    path: &str,
    version: Option<ReadVersion>,
    start: u64,
    end: u64,
) -> anyhow::Result<Vec<u8>> {
    let stream =
        UnixStream::connect(socket).await.with_context(|| format!("connecting to {}", socket.display()))?;
    let mut reading = api::Reading::start(stream, path, Some((start, end)), version).await?;
    let header = reading.header();
    let mut data = Vec::with_capacity((header.end - header.start) as usize);
    while let Some(frame) = reading.next().await? {
        data.extend_from_slice(&frame);
    }
    Ok(data)
}
