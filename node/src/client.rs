//! A blocking client of the control API, for programs that drive sites: the demo, the testbed
//! and tests. The `meridian` CLI speaks the same protocol ([`crate::api`]) asynchronously.

use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::api::{self, ApiRequest};

/// A client of one site's daemon.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

fn write_frame(stream: &mut UnixStream, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    stream.write_all(&len.to_le_bytes())?;
    stream.write_all(payload)
}

fn read_frame(stream: &mut UnixStream) -> anyhow::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).context("the node closed the connection")?;
    let len = u32::from_le_bytes(len) as usize;
    if len > api::FRAME_MAX_BYTES {
        bail!("the node sent a frame of {len} bytes, over the bound of {}", api::FRAME_MAX_BYTES);
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).context("the node closed the connection inside a frame")?;
    Ok(buf)
}

fn read_answer(stream: &mut UnixStream) -> anyhow::Result<Value> {
    let frame = read_frame(stream)?;
    let mut value: Value =
        serde_json::from_slice(&frame).map_err(|e| anyhow::anyhow!("the node sent a bad answer: {e}"))?;
    if let Some(error) = value.get("error").and_then(Value::as_str) {
        bail!("{error}");
    }
    Ok(value.get_mut("ok").map(Value::take).unwrap_or(Value::Null))
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
        write_frame(&mut stream, &serde_json::to_vec(request)?)?;
        Ok(stream)
    }

    /// Sends a request and returns its answer.
    pub fn call(&self, request: &ApiRequest) -> anyhow::Result<Value> {
        let mut stream = self.connect(request)?;
        read_answer(&mut stream)
    }

    /// Whether `path` exists at this site.
    pub fn exists(&self, path: &str) -> anyhow::Result<bool> {
        match self.call(&ApiRequest::Stat { path: path.to_owned() }) {
            Ok(_) => Ok(true),
            Err(e) if e.to_string().contains("no such") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Stores `data` at `path`; returns the answer (`size`, `new_chunks`, `new_bytes`).
    pub fn put(&self, path: &str, data: &[u8]) -> anyhow::Result<Value> {
        self.put_from(path, &mut std::io::Cursor::new(data))
    }

    /// Stores what `source` yields at `path`.
    pub fn put_from(&self, path: &str, source: &mut dyn Read) -> anyhow::Result<Value> {
        let mut stream = self.connect(&ApiRequest::Put { path: path.to_owned(), mode: 0o644 })?;
        read_answer(&mut stream)?;
        let mut buf = vec![0u8; api::DATA_FRAME_BYTES];
        loop {
            let n = source.read(&mut buf).context("reading the data to put")?;
            if n == 0 {
                break;
            }
            write_frame(&mut stream, &buf[..n])?;
        }
        write_frame(&mut stream, &[])?;
        read_answer(&mut stream)
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
        };
        let mut stream = self.connect(&request)?;
        let header = read_answer(&mut stream)?;
        let expected = header["end"].as_u64().unwrap_or(0) - header["start"].as_u64().unwrap_or(0);
        let mut read = 0u64;
        loop {
            let frame = read_frame(&mut stream)?;
            if frame.is_empty() {
                break;
            }
            read += frame.len() as u64;
            sink(&frame);
        }
        read_answer(&mut stream)?;
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
        let v = self.call(&ApiRequest::Ls { path: path.to_owned() })?;
        Ok(v.as_array().into_iter().flatten().filter_map(|e| e["name"].as_str().map(str::to_owned)).collect())
    }

    /// The site's status.
    pub fn status(&self) -> anyhow::Result<Value> {
        self.call(&ApiRequest::Status)
    }
}
