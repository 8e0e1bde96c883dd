//! A blocking client of the control API, for programs that drive sites: the demo, the testbed
//! and tests. The `meridian` CLI speaks the same protocol ([`crate::api`]) asynchronously; both
//! use its one codec.

use std::io::Read;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;

use crate::api::{
    self, ApiError, ApiRequest, ErrorKind, ListEntry, PutAnswer, ReadHeader, StatAnswer, StatusAnswer,
    blocking,
};

/// A client of one site's daemon.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client { socket: socket.into() }
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn connect(&self, request: &ApiRequest) -> anyhow::Result<UnixStream> {
        let mut stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("connecting to {}", self.socket.display()))?;
        blocking::write_frame(&mut stream, &api::encode_request(request))?;
        Ok(stream)
    }

    /// Sends a request and returns its answer, of the type the request names.
    pub fn call<T: DeserializeOwned>(&self, request: &ApiRequest) -> anyhow::Result<T> {
        let mut stream = self.connect(request)?;
        blocking::read_answer(&mut stream)
    }

    /// What is known of `path`.
    pub fn stat(&self, path: &str) -> anyhow::Result<StatAnswer> {
        self.call(&ApiRequest::Stat { path: path.to_owned() })
    }

    /// The id of the current version of the file at `path`, if it is one.
    pub fn version_id(&self, path: &str) -> anyhow::Result<Option<String>> {
        Ok(self.stat(path)?.version.map(|v| v.id))
    }

    /// Whether `path` exists at this site.
    pub fn exists(&self, path: &str) -> anyhow::Result<bool> {
        match self.stat(path) {
            Ok(_) => Ok(true),
            Err(e) if ApiError::kind_of(&e) == Some(ErrorKind::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes directory `path` and its parents.
    pub fn mkdir_p(&self, path: &str) -> anyhow::Result<()> {
        self.call(&ApiRequest::Mkdir { path: path.to_owned(), parents: true, mode: None })
    }

    /// Stores `data` at `path`.
    pub fn put(&self, path: &str, data: &[u8]) -> anyhow::Result<PutAnswer> {
        self.put_from(path, &mut std::io::Cursor::new(data))
    }

    /// Stores what `source` yields at `path`.
    pub fn put_from(&self, path: &str, source: &mut dyn Read) -> anyhow::Result<PutAnswer> {
        self.put_with_mode(path, 0o644, source)
    }

    /// Stores what `source` yields at `path`, with permission bits `mode`.
    pub fn put_with_mode(&self, path: &str, mode: u32, source: &mut dyn Read) -> anyhow::Result<PutAnswer> {
        self.put_with(path, mode, None, source)
    }

    /// Stores what `source` yields at `path`, with permission bits `mode` and modification time
    /// `mtime_ns` (now if `None`).
    pub fn put_with(
        &self,
        path: &str,
        mode: u32,
        mtime_ns: Option<i64>,
        source: &mut dyn Read,
    ) -> anyhow::Result<PutAnswer> {
        let mut stream = self.connect(&ApiRequest::Put { path: path.to_owned(), mode, mtime_ns })?;
        blocking::read_answer::<()>(&mut stream)?;
        let mut buf = vec![0u8; api::DATA_FRAME_BYTES];
        let sent = loop {
            let n = source.read(&mut buf).context("reading the data to put")?;
            if n == 0 {
                break blocking::write_frame(&mut stream, &[]);
            }
            if let Err(e) = blocking::write_frame(&mut stream, &buf[..n]) {
                break Err(e);
            }
        };
        match sent {
            Ok(()) => blocking::read_answer(&mut stream),
            // The node may have stopped taking the data to say why (a full disk): its answer
            // is the error to show.
            Err(e) => match blocking::read_answer::<PutAnswer>(&mut stream) {
                Err(answer) if ApiError::kind_of(&answer).is_some() => Err(answer),
                _ => Err(e.into()),
            },
        }
    }

    /// Reads `path` (or `range` of it), handing the bytes to `sink` as they arrive; returns the
    /// number of bytes.
    pub fn read_with(
        &self,
        path: &str,
        range: Option<Range<u64>>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> anyhow::Result<u64> {
        let request = ApiRequest::Read {
            path: path.to_owned(),
            start: range.as_ref().map(|r| r.start),
            end: range.as_ref().map(|r| r.end),
            version: None,
        };
        let mut stream = self.connect(&request)?;
        let header: ReadHeader = blocking::read_answer(&mut stream)?;
        let mut read = 0u64;
        loop {
            let frame =
                blocking::read_frame(&mut stream)?.context("the node closed the connection inside a read")?;
            if frame.is_empty() {
                break;
            }
            read += frame.len() as u64;
            sink(&frame);
        }
        blocking::read_answer::<()>(&mut stream)?;
        let expected = header.end - header.start;
        if read != expected {
            bail!("read {read} bytes of {path}, expected {expected}");
        }
        Ok(read)
    }

    /// Reads `path` (or `range` of it) into memory.
    pub fn read(&self, path: &str, range: Option<Range<u64>>) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_with(path, range, &mut |data| out.extend_from_slice(data))?;
        Ok(out)
    }

    /// Names in directory `path`, sorted.
    pub fn list(&self, path: &str) -> anyhow::Result<Vec<String>> {
        let entries: Vec<ListEntry> = self.call(&ApiRequest::Ls { path: path.to_owned() })?;
        Ok(entries.into_iter().map(|e| e.name).collect())
    }

    /// The site's status.
    pub fn status(&self) -> anyhow::Result<StatusAnswer> {
        self.call(&ApiRequest::Status)
    }
}
