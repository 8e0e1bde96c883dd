//! Sites joined by links whose messages are carried by hand, each with a chunk store: the
//! harness of the tests that follow several sites through time.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};

use crdt_namespace::{ContentId, Keys, Namespace, SigningKey, SiteId};
use proto::Message;
use site_core::content::{ChunkHash, ChunkerConfig, Manifest};
use site_core::{Holdings, Output, Request, RequestId, Site, SiteConfig};

pub const WALL_MS: u64 = 1_796_000_000_000;
pub const CHUNKS: ChunkerConfig = ChunkerConfig { min_bytes: 256, avg_bytes: 1024, max_bytes: 4096 };

pub fn key(id: &SiteId) -> SigningKey {
    SigningKey::from_secret(blake3::hash(id.as_str().as_bytes()).as_bytes())
}

/// Sites joined by links whose messages are carried by hand; each with a chunk store.
pub struct Net {
    pub names: Vec<SiteId>,
    pub sites: Vec<Site>,
    pub stores: Vec<HashMap<ChunkHash, Vec<u8>>>,
    pub queue: VecDeque<(usize, usize, Message)>,
    /// Links (one direction) whose messages wait.
    pub held: HashSet<(usize, usize)>,
    pub parked: Vec<(usize, usize, Message)>,
    /// Links (one direction) whose messages are lost.
    pub cut: HashSet<(usize, usize)>,
    /// Versions each site was told to forget, and chunks it deleted.
    pub reclaimed: Vec<(Vec<ContentId>, Vec<ChunkHash>)>,
    /// Bytes each read delivered.
    pub read: HashMap<RequestId, Vec<u8>>,
    pub now: u64,
    pub next_id: u64,
}

impl Net {
    pub fn new(names: &[&str], configure: impl Fn(&mut SiteConfig)) -> Net {
        let names: Vec<SiteId> = names.iter().map(|n| SiteId::new(n).unwrap()).collect();
        let mut keys = Keys::new();
        for name in &names {
            keys.allow(name, key(name).public());
        }
        let sites = names
            .iter()
            .map(|name| {
                let mut config = SiteConfig::new(name.clone());
                config.keys = keys.clone();
                config.collect_grace_ms = 0;
                configure(&mut config);
                Site::new(config, Namespace::new(name.clone(), key(name)), Holdings::default())
            })
            .collect();
        let n = names.len();
        let mut net = Net {
            names,
            sites,
            stores: vec![HashMap::new(); n],
            queue: VecDeque::new(),
            held: HashSet::new(),
            parked: Vec::new(),
            cut: HashSet::new(),
            reclaimed: vec![(Vec::new(), Vec::new()); n],
            read: HashMap::new(),
            now: 10,
            next_id: 1,
        };
        for a in 0..n {
            net.sites[a].handle_wall_clock(net.now, WALL_MS);
            for b in 0..n {
                if a != b {
                    let peer = net.names[b].clone();
                    net.sites[a].handle_peer_up(net.now, peer);
                }
            }
        }
        net.pump();
        net
    }

    pub fn index(&self, name: &SiteId) -> usize {
        self.names.iter().position(|n| n == name).unwrap()
    }

    pub fn carry_out(&mut self, s: usize, output: Output) {
        match output {
            Output::Send { to, message } => {
                let to = self.index(&to);
                self.queue.push_back((s, to, message));
            }
            Output::Broadcast { to, message } => {
                for to in to {
                    let to = self.index(&to);
                    self.queue.push_back((s, to, message.clone()));
                }
            }
            Output::Durable { then, .. } => {
                for output in then {
                    self.carry_out(s, output);
                }
            }
            Output::Cache { chunks, .. } => self.stores[s].extend(chunks),
            Output::LoadChunk { hash, purpose } => {
                let loaded = self.stores[s].get(&hash).cloned().ok_or_else(|| "missing".to_owned());
                self.sites[s].handle_chunk_loaded(hash, purpose, loaded);
            }
            Output::ReadData { id, data, .. } => {
                self.read.entry(id).or_default().extend(data);
                self.sites[s].handle_read_taken(self.now, id);
            }
            Output::Reclaim { versions, chunks } => {
                for hash in &chunks {
                    if !self.sites[s].holds_chunk(hash) {
                        self.stores[s].remove(hash);
                    }
                }
                self.reclaimed[s].0.extend(versions);
                self.reclaimed[s].1.extend(chunks);
            }
            _ => {}
        }
    }

    /// Carries out every output and delivers every message not held, until all is quiet.
    pub fn pump(&mut self) {
        loop {
            for s in 0..self.sites.len() {
                while let Some(output) = self.sites[s].poll_output() {
                    self.carry_out(s, output);
                }
            }
            let Some((from, to, message)) = self.queue.pop_front() else { return };
            if self.cut.contains(&(from, to)) {
                continue;
            }
            if self.held.contains(&(from, to)) {
                self.parked.push((from, to, message));
            } else {
                let name = self.names[from].clone();
                self.sites[to].handle_message(self.now, &name, message);
            }
        }
    }

    /// Time passes, in steps of a second: every site's timers run.
    pub fn wait(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now = (self.now + 1_000).min(end);
            for s in 0..self.sites.len() {
                self.sites[s].handle_wall_clock(self.now, WALL_MS + self.now);
                self.sites[s].handle_timeout(self.now);
            }
            self.pump();
        }
    }

    pub fn hold(&mut self, from: usize, to: usize) {
        self.held.insert((from, to));
    }

    pub fn release(&mut self, from: usize, to: usize) {
        self.held.remove(&(from, to));
        let (go, stay): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.parked).into_iter().partition(|(f, t, _)| (*f, *t) == (from, to));
        self.parked = stay;
        self.queue.extend(go);
        self.pump();
    }

    /// Delivers the held reports (`Seen`) from `from` to `to` ahead of the rest, as if the
    /// changes they name had been lost on the way: the link stays held.
    pub fn release_reports(&mut self, from: usize, to: usize) {
        let (go, stay): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|(f, t, m)| (*f, *t) == (from, to) && matches!(m, Message::Seen { .. }));
        self.parked = stay;
        for (from, to, message) in go {
            let name = self.names[from].clone();
            self.sites[to].handle_message(self.now, &name, message);
        }
        self.pump();
    }

    /// The link between `a` and `b` goes down and comes up again.
    pub fn reconnect(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            let peer = self.names[y].clone();
            self.sites[x].handle_peer_down(self.now, &peer);
            self.sites[x].handle_peer_up(self.now, peer);
        }
        self.pump();
    }

    pub fn request(&mut self, s: usize, request: Request) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.sites[s].handle_local(self.now, WALL_MS + self.now, id, request);
        self.pump();
        id
    }

    /// Site `s` writes `data` at `path`, its chunks stored first as the put path does.
    pub fn put(&mut self, s: usize, path: &str, data: &[u8]) -> Manifest {
        let manifest = Manifest::of_bytes(data, CHUNKS);
        for (i, c) in manifest.chunks.iter().enumerate() {
            let r = manifest.chunk_range(i);
            self.stores[s].insert(c.hash, data[r.start as usize..r.end as usize].to_vec());
        }
        let commit = Request::CommitVersion {
            path: path.into(),
            manifest: manifest.clone(),
            mode: 0o644,
            mtime_ns: 0,
        };
        self.request(s, commit);
        manifest
    }

    pub fn read(&mut self, s: usize, path: &str) -> Vec<u8> {
        let id = self.request(s, Request::Read { path: path.into(), range: None });
        self.read.remove(&id).unwrap_or_default()
    }

    pub fn stored(&self, s: usize, manifest: &Manifest) -> usize {
        manifest.chunks.iter().filter(|c| self.stores[s].contains_key(&c.hash)).count()
    }
}

pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    site_core::sample::pseudo_random(seed, len)
}
