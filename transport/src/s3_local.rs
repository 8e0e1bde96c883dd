//! A real S3-compatible server on loopback, inside the process: `s3s` speaking the S3 protocol
//! over HTTP/1.1 (SigV4 signatures checked) in front of `s3s-fs`, which keeps buckets as
//! directories. The demo's staging store and the tests' S3 server; the staging client talks to
//! it exactly as to any other endpoint.
//!
//! For tests it can answer the next requests with `503 SlowDown`, as S3 does under load, and
//! answer ranged reads with the whole object, as a server that ignores `Range` does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

/// The `SlowDown` answer S3 gives when asked to slow down.
const SLOW_DOWN: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"#;

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalS3Error {
    /// The data directory or the socket failed.
    #[error("local S3 server: {0}")]
    Io(#[from] std::io::Error),
    /// s3s-fs refused the directory.
    #[error("local S3 server: the store in {path}: {reason}")]
    Store {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A running server; stopped when dropped.
pub struct LocalS3 {
    addr: SocketAddr,
    slow_down: Arc<AtomicUsize>,
    ignore_range: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl LocalS3 {
    /// Starts a server keeping its buckets under `root` (made if missing), accepting requests
    /// signed with `access_key` / `secret_key`, on 127.0.0.1 at a free port. Must be called
    /// within a tokio runtime, which then runs it.
    pub async fn start(root: &Path, access_key: &str, secret_key: &str) -> Result<LocalS3, LocalS3Error> {
        std::fs::create_dir_all(root)?;
        let store = s3s_fs::FileSystem::new(root)
            .map_err(|e| LocalS3Error::Store { path: root.to_owned(), reason: format!("{e:?}") })?;
        let mut builder = S3ServiceBuilder::new(store);
        builder.set_auth(SimpleAuth::from_single(access_key, secret_key));
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let slow_down = Arc::new(AtomicUsize::new(0));
        let ignore_range = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let (slow, whole, count) = (slow_down.clone(), ignore_range.clone(), served.clone());
        let root = root.to_owned();
        let task = tokio::spawn(async move {
            // Connections end with the server: the set aborts them when the task is aborted.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                // An answer's head and body go out in separate writes: with Nagle's algorithm the
                // body would wait for the client's delayed ACK (~40 ms per GET).
                let _ = socket.set_nodelay(true);
                let (service, slow, count) = (service.clone(), slow.clone(), count.clone());
                let (whole, root) = (whole.clone(), root.clone());
                let handler = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let (service, slow) = (service.clone(), slow.clone());
                    // A ranged GET answered with the whole object (path-style keys only).
                    let whole_object = (whole.load(Ordering::Relaxed)
                        && request.method() == hyper::Method::GET
                        && request.headers().contains_key(hyper::header::RANGE))
                    .then(|| root.join(request.uri().path().trim_start_matches('/')));
                    count.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let refuse =
                            slow.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                        if refuse.is_ok() {
                            let mut answer = hyper::Response::new(s3s::Body::from(SLOW_DOWN.to_owned()));
                            *answer.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                            return Ok(answer);
                        }
                        if let Some(Ok(object)) = whole_object.map(std::fs::read) {
                            return Ok(hyper::Response::new(s3s::Body::from(bytes::Bytes::from(object))));
                        }
                        hyper::service::Service::call(&service, request).await
                    }
                });
                connections.spawn(async move {
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(socket), handler).await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(LocalS3 { addr, slow_down, ignore_range, served, task })
    }

    /// The endpoint URL (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next `n` requests with `503 SlowDown`.
    pub fn slow_down_next(&self, n: usize) {
        self.slow_down.store(n, Ordering::Relaxed);
    }

    /// Answers ranged reads with the whole object (`true`), as a server that ignores `Range`.
    pub fn ignore_range(&self, ignore: bool) {
        self.ignore_range.store(ignore, Ordering::Relaxed);
    }

    /// Requests received so far (refused ones included).
    pub fn requests(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for LocalS3 {
    fn drop(&mut self) {
        self.task.abort();
    }
}
