//! The driver of scenario tests: it keeps every answer the sites give, and the requests that
//! a test sends through it run the world until nothing moves.

use std::collections::HashMap;

use crdt_namespace::SiteId;
use site_core::content::{ChunkerConfig, Manifest};
use site_core::{Reply, Request, RequestId, SiteConfig, SiteError};

use super::{At, Driver, Latency, Setup, World};
use crate::{Faults, Rng};

/// Small chunks, so that files of a few tens of kilobytes have several.
pub const SCENARIO_CHUNKS: ChunkerConfig =
    ChunkerConfig { min_bytes: 1024, avg_bytes: 4096, max_bytes: 16384 };

/// Every answer the sites gave, by request.
#[derive(Debug, Default)]
pub struct Answers {
    /// Replies not yet taken.
    pub replies: HashMap<RequestId, Result<Reply, String>>,
    /// Reads started and not yet taken.
    pub reads: HashMap<RequestId, ReadResult>,
}

/// What a read delivered so far.
#[derive(Debug, Default)]
pub struct ReadResult {
    /// The offset the next bytes must start at.
    pub next: u64,
    /// The bytes, in order.
    pub data: Vec<u8>,
    /// How it ended, once it has.
    pub done: Option<Result<(), String>>,
}

impl Driver for Answers {
    type Wake = std::convert::Infallible;

    fn reply(&mut self, _: At<'_>, id: RequestId, reply: Result<Reply, SiteError>) {
        if let Ok(Reply::ReadStarted { range, .. }) = &reply {
            self.reads.entry(id).or_default().next = range.start;
        }
        self.replies.insert(id, reply.map_err(|e| e.to_string()));
    }

    fn read_data(&mut self, _: At<'_>, id: RequestId, offset: u64, data: Vec<u8>) {
        let read = self.reads.get_mut(&id).expect("data follows the start of a read");
        assert_eq!(offset, read.next, "read data arrives in order");
        read.next += data.len() as u64;
        read.data.extend_from_slice(&data);
    }

    fn read_done(&mut self, _: At<'_>, id: RequestId, result: Result<(), SiteError>) {
        self.reads.entry(id).or_default().done = Some(result.map_err(|e| e.to_string()));
    }

    fn wake(_: &mut World<Answers>, wake: Self::Wake) -> Result<(), String> {
        match wake {}
    }
}

impl World<Answers> {
    /// The sites of `configs`, every pair linked, with the network's and the bucket's faults
    /// off, everything arriving in the order it was sent ([`Latency::InOrder`]), clocks in
    /// step, no timers (a site's timeouts fire when [`World::timeout`] says), recording a
    /// [`Log`](super::Log); run until nothing moves.
    pub fn with_faults_off(configs: Vec<SiteConfig>) -> World<Answers> {
        let setup = Setup {
            skews_ms: vec![0; configs.len()],
            configs,
            faults: Faults::default(),
            latency: Latency::InOrder,
            rng: Rng::new(0),
            record: true,
        };
        let mut world = World::new(setup, Answers::default());
        world.connect_all();
        world.run().unwrap_or_else(|e| panic!("{e}"));
        world
    }

    /// Sites with default configurations.
    pub fn with_sites(names: &[&str]) -> World<Answers> {
        let configs = names.iter().map(|n| SiteConfig::new(SiteId::new(n).expect("a valid name"))).collect();
        World::with_faults_off(configs)
    }

    /// Hands site `s` a request, runs the world until nothing moves, and returns the request's
    /// id. Panics if a checker fails.
    pub fn request(&mut self, s: usize, request: Request) -> RequestId {
        let id = self.start(s, request);
        self.run().unwrap_or_else(|e| panic!("{e}"));
        id
    }

    /// Hands site `s` a request and returns its reply, which must be a success.
    pub fn ok(&mut self, s: usize, request: Request) -> Reply {
        let id = self.request(s, request);
        let reply = self.driver.replies.remove(&id).expect("a reply");
        reply.unwrap_or_else(|e| panic!("request {id} at {} failed: {e}", self.name(s)))
    }

    /// Writes `data` at `path` of site `s` (its chunks stored as the put path does, in
    /// [`SCENARIO_CHUNKS`]); returns its manifest.
    pub fn put(&mut self, s: usize, path: &str, data: &[u8]) -> Manifest {
        let manifest = Manifest::of_bytes(data, SCENARIO_CHUNKS);
        self.store_chunks(s, &manifest, data);
        let request = Request::CommitVersion {
            path: path.into(),
            manifest: manifest.clone(),
            mode: 0o644,
            mtime_ns: 0,
        };
        assert_eq!(self.ok(s, request), Reply::Done);
        manifest
    }

    /// Reads `path` (or `range` of it) at site `s`, running the world until nothing moves: the
    /// bytes, or why the request or the read failed.
    pub fn read(
        &mut self,
        s: usize,
        path: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Vec<u8>, String> {
        let id = self.request(s, Request::Read { path: path.into(), range });
        self.driver.replies.remove(&id).expect("a reply")?;
        let result = self.driver.reads.remove(&id).unwrap_or_default();
        result.done.expect("the read finished")?;
        Ok(result.data)
    }

    /// Starts a read of `path` at site `s` without running the world; returns its id.
    pub fn start_read(&mut self, s: usize, path: &str) -> RequestId {
        self.start(s, Request::Read { path: path.into(), range: None })
    }

    /// Read `id`'s result, taken; it must have started.
    pub fn take_read(&mut self, id: RequestId) -> ReadResult {
        self.driver.reads.remove(&id).expect("a read that started")
    }
}
