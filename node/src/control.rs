//! The daemon's side of the control API ([`crate::api`]): one tokio task per connection turns
//! an [`ApiRequest`] into requests to the core (through the runtime's [`Handle`]) and writes the
//! typed answer. Puts stream their data frames into the put pipeline on a blocking thread;
//! reads stream the core's data events out as frames.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::Ordering;

use anyhow::bail;
use crdt_namespace::{ContentId, EntryKind, Glob, OpError, Query, SiteId, TagPredicate};
use site_core::{Reply, Request};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use transport::p2p::LinkState;

use crate::api::{
    self, ApiError, ApiRequest, ChangesAnswer, ErrorKind, FindAnswer, ListEntry, MeshLink, PutAnswer,
    ReadHeader, StatAnswer, StatusAnswer, TagAnswer,
};
use crate::membership::{Edit, Outcome};
use crate::runtime::{Event, Handle, wall_ms};
use crate::store::{Claim, put_stream};

/// Serves one control connection.
pub(crate) async fn serve(mut stream: UnixStream, handle: Handle) -> anyhow::Result<()> {
    let Some(frame) = api::read_frame(&mut stream).await? else { return Ok(()) };
    crate::runtime::test_panic("connection");
    let request: ApiRequest = match serde_json::from_slice(&frame) {
        Ok(r) => r,
        Err(e) => {
            let error = ApiError::new(ErrorKind::BadRequest, format!("bad request: {e}"));
            return Ok(api::write_answer::<()>(&mut stream, Err(error)).await?);
        }
    };
    let s = &mut stream;
    match request {
        ApiRequest::Put { path, mode, mtime_ns } => {
            return serve_put(stream, handle, path, mode, mtime_ns).await;
        }
        ApiRequest::Read { path, start, end, version } => {
            let range = match (start, end) {
                (None, None) => None,
                (s, e) => Some(s.unwrap_or(0)..e.unwrap_or(u64::MAX)),
            };
            let request = match version {
                None => Request::Read { path, range },
                Some(v) => match ContentId::parse_hex(&v.content) {
                    Some(content) => Request::ReadVersion { path, content, size: v.size, range },
                    None => {
                        let why = format!("bad request: {:?} is not a content id", v.content);
                        let error = ApiError::new(ErrorKind::BadRequest, why);
                        return Ok(api::write_answer::<()>(s, Err(error)).await?);
                    }
                },
            };
            return serve_read(stream, handle, request).await;
        }
        ApiRequest::Mkdir { path, parents, mode } => {
            done(s, &handle, Request::Mkdir { path, parents, mode: mode.unwrap_or(0o755) }).await?
        }
        ApiRequest::Symlink { path, target } => done(s, &handle, Request::Symlink { path, target }).await?,
        ApiRequest::SetAttr { path, mode, mtime_ns } => {
            done(s, &handle, Request::SetAttr { path, mode, mtime_ns }).await?
        }
        ApiRequest::TagClear { path, key } => done(s, &handle, Request::ClearTag { path, key }).await?,
        ApiRequest::Mv { from, to, replace: false } => done(s, &handle, Request::Rename { from, to }).await?,
        ApiRequest::Mv { from, to, replace: true } => done(s, &handle, Request::Replace { from, to }).await?,
        ApiRequest::Rm { path, recursive } => done(s, &handle, Request::Remove { path, recursive }).await?,
        ApiRequest::TagSet { path, key, value } => {
            done(s, &handle, Request::SetTag { path, key, value }).await?
        }
        ApiRequest::TagUnset { path, key } => done(s, &handle, Request::UnsetTag { path, key }).await?,
        ApiRequest::Ls { path } => {
            let answer = ask(&handle, Request::List { path }, |reply| match reply {
                Reply::List(entries) => Some(
                    entries.into_iter().map(|e| ListEntry { name: e.name, stat: e.stat.into() }).collect(),
                ),
                _ => None,
            });
            api::write_answer::<Vec<ListEntry>>(s, answer.await?).await?
        }
        ApiRequest::Stat { path } => {
            let answer = ask(&handle, Request::Stat { path }, |reply| match reply {
                Reply::Stat(stat) => Some(StatAnswer::from(stat)),
                _ => None,
            });
            api::write_answer(s, answer.await?).await?
        }
        ApiRequest::TagGet { path } => {
            let answer = ask(&handle, Request::Tags { path }, |reply| match reply {
                Reply::Tags(tags) => Some(tags.into_iter().map(TagAnswer::from).collect()),
                _ => None,
            });
            api::write_answer::<Vec<TagAnswer>>(s, answer.await?).await?
        }
        ApiRequest::Find { tags, path } => {
            let answer = match query(&tags, path.as_deref()) {
                Ok(query) => {
                    ask(&handle, Request::Find { query }, |reply| match reply {
                        Reply::Found(hits) => Some(hits.into_iter().map(FindAnswer::from).collect()),
                        _ => None,
                    })
                    .await?
                }
                Err(e) => Err(e.into()),
            };
            api::write_answer::<Vec<FindAnswer>>(s, answer).await?
        }
        ApiRequest::Changes { after } => {
            let boot = handle.boot.clone();
            let answer = ask(&handle, Request::Changes { after }, |reply| match reply {
                Reply::Changes(changes) => Some(ChangesAnswer {
                    boot,
                    next: changes.next,
                    entries: changes.entries,
                    complete: changes.complete,
                }),
                _ => None,
            });
            api::write_answer(s, answer.await?).await?
        }
        ApiRequest::Status => {
            let backlog = handle.cache_backlog.load(Ordering::Relaxed);
            let answer = ask(&handle, Request::Status, |reply| match reply {
                Reply::Status(core) => Some(StatusAnswer { core, fetched_chunks_not_yet_durable: backlog }),
                _ => None,
            });
            api::write_answer(s, answer.await?).await?
        }
        ApiRequest::MeshLs => {
            let answer =
                mesh_links(&handle).await.map_err(|e| ApiError::new(ErrorKind::Internal, format!("{e:#}")));
            api::write_answer(s, answer).await?
        }
        ApiRequest::MeshEdit { edit } => {
            let answer = mesh_edit(&handle, edit).await?;
            api::write_answer(s, answer).await?
        }
    }
    Ok(())
}

/// `meridian mesh add|rm|rotate|block|unblock` on a running node: the file first (so that a
/// change that cannot be written changes nothing), then the core's keys and regions and the
/// mesh's links.
async fn mesh_edit(handle: &Handle, edit: Edit) -> anyhow::Result<Result<Outcome, ApiError>> {
    let _one_at_a_time = handle.config_lock.lock().await;
    let path = &handle.config.path;
    let internal = |e: anyhow::Error| ApiError::new(ErrorKind::Internal, format!("{e:#}"));
    let mut config = match crate::config::Config::load(path) {
        Ok(loaded) => loaded.config,
        Err(e) => return Ok(Err(internal(e))),
    };
    if !matches!(edit, Edit::Add(_)) && !config.peers.iter().any(|p| p.site == edit.site()) {
        return Ok(Err(not_member(edit.site())));
    }
    let until_seq = match edit.retires().map(SiteId::new) {
        Some(Ok(site)) => match handle.call(Request::LastSeq { site }).await? {
            Ok(Reply::Seq(seq)) => Some(seq),
            _ => return Ok(Err(ApiError::new(ErrorKind::Internal, "the core answered another request"))),
        },
        Some(Err(e)) => return Ok(Err(ApiError::new(ErrorKind::InvalidArgument, e))),
        None => None,
    };
    let done = match edit.apply(&mut config, &handle.own_peer_id, until_seq) {
        Ok(done) => done,
        Err(e) => return Ok(Err(ApiError::new(ErrorKind::InvalidArgument, format!("{e:#}")))),
    };
    if let Err(e) = config.save(path) {
        return Ok(Err(internal(e.context("nothing was changed"))));
    }
    let (keys, regions) = match crate::membership::membership(&config) {
        Ok(membership) => membership,
        Err(e) => return Ok(Err(internal(e))),
    };
    let mut mesh_keys = keys.clone();
    mesh_keys.allow(&handle.config.config.site_id(), handle.own_key);
    handle.mesh.set_keys(mesh_keys);
    if let Err(e) = handle.call(Request::Membership { keys, regions }).await? {
        return Ok(Err(e.into()));
    }
    let site = SiteId::new(edit.site()).expect("checked by the edit");
    match &edit {
        Edit::Add(peer) => handle.mesh.add_member(peer.member().expect("checked by the edit")),
        Edit::Remove { .. } => {
            handle.mesh.remove_member(&site);
        }
        Edit::Rotate { .. } => {
            let peer = config.peers.iter().find(|p| p.site == site.as_str()).expect("rotated");
            handle.mesh.add_member(peer.member().expect("checked by the edit"));
        }
        Edit::Block { blocked, .. } => {
            handle.mesh.set_blocked(&site, *blocked);
        }
    }
    tracing::info!(%site, "membership: {done}");
    Ok(Ok(Outcome {
        site: site.to_string(),
        done: done.to_owned(),
        config: path.display().to_string(),
        live: true,
    }))
}

fn not_member(site: &str) -> ApiError {
    ApiError::new(ErrorKind::NotMember, format!("{site} is not a member of this site's mesh"))
}

fn query(tags: &[String], path: Option<&str>) -> Result<Query, OpError> {
    Ok(Query {
        tags: tags.iter().map(|t| TagPredicate::parse(t)).collect::<Result<_, _>>()?,
        path: path.map(Glob::new).transpose()?,
    })
}

/// Asks the core and turns its reply into the answer `pick` makes of it (a reply of another
/// kind is the daemon's own failure).
async fn ask<T>(
    handle: &Handle,
    request: Request,
    pick: impl FnOnce(Reply) -> Option<T>,
) -> anyhow::Result<Result<T, ApiError>> {
    Ok(match handle.call(request).await? {
        Ok(reply) => {
            pick(reply).ok_or_else(|| ApiError::new(ErrorKind::Internal, "the core answered another request"))
        }
        Err(e) => Err(e.into()),
    })
}

/// Asks the core for a change and writes `()` once it is done (durable).
async fn done(stream: &mut UnixStream, handle: &Handle, request: Request) -> anyhow::Result<()> {
    let answer = ask(handle, request, |_| Some(())).await?;
    Ok(api::write_answer(stream, answer).await?)
}

/// The members, their links and lags, for `meridian mesh ls`.
async fn mesh_links(handle: &Handle) -> anyhow::Result<Vec<MeshLink>> {
    // The file, not the configuration the node started with: `mesh add` may have changed it.
    let config = crate::config::Config::load(&handle.config.path)?.config;
    let (lags, held): (HashMap<String, usize>, _) = match handle.call(Request::Status).await? {
        Ok(Reply::Status(status)) => {
            (status.peers.into_iter().map(|p| (p.site, p.lag_changes)).collect(), status.held_changes)
        }
        _ => Default::default(),
    };
    let links = handle.mesh.links();
    let rows = config
        .peers
        .iter()
        .map(|p| {
            let link = links.iter().find(|l| l.member.site.as_str() == p.site);
            let (state, addr) = match link.map(|l| &l.state) {
                Some(LinkState::Connected { transport, addr }) => {
                    (format!("up ({transport})"), Some(addr.to_string()))
                }
                Some(LinkState::Down { last_error: Some(e) }) => {
                    (format!("down: {}", e.chars().take(60).collect::<String>()), None)
                }
                Some(LinkState::Down { last_error: None }) => ("connecting".to_owned(), None),
                Some(LinkState::Blocked) => ("blocked".to_owned(), None),
                None => ("not admitted".to_owned(), None),
            };
            MeshLink {
                site: p.site.clone(),
                region: p.region.clone(),
                peer_id: p.peer_id.clone(),
                addrs: p.addrs.clone(),
                link: state,
                addr,
                since_ms: link.map(|l| l.since_ms),
                lag_changes: lags.get(&p.site).copied(),
                held_changes: held.get(&p.site).copied().unwrap_or(0),
            }
        })
        .collect();
    Ok(rows)
}

/// Reads data frames from a channel, for the blocking put pipeline.
struct FrameReader {
    frames: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for FrameReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            match self.frames.blocking_recv() {
                Some(frame) => {
                    self.current = frame;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Why `path` cannot take a file, checked before any byte moves.
async fn refuse_put(handle: &Handle, path: &str) -> anyhow::Result<Option<ApiError>> {
    let parent = match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => path,
    };
    match handle.call(Request::Stat { path: parent.to_owned() }).await? {
        Ok(Reply::Stat(stat)) if stat.kind == EntryKind::Dir => {}
        Ok(_) => {
            return Ok(Some(ApiError::new(ErrorKind::NotADirectory, format!("not a directory: {parent}"))));
        }
        Err(e) => return Ok(Some(e.into())),
    }
    Ok(match handle.call(Request::Stat { path: path.to_owned() }).await? {
        Ok(Reply::Stat(stat)) if stat.kind == EntryKind::Dir => {
            Some(ApiError::new(ErrorKind::IsADirectory, format!("is a directory: {path}")))
        }
        Ok(Reply::Stat(stat)) if stat.kind == EntryKind::Symlink => {
            Some(ApiError::new(ErrorKind::NotAFile, format!("is a symlink: {path}")))
        }
        _ => None,
    })
}

async fn serve_put(
    mut stream: UnixStream,
    handle: Handle,
    path: String,
    mode: u32,
    mtime_ns: Option<i64>,
) -> anyhow::Result<()> {
    if let Some(refused) = refuse_put(&handle, &path).await? {
        return Ok(api::write_answer::<()>(&mut stream, Err(refused)).await?);
    }
    api::write_answer(&mut stream, Ok(())).await?;
    let (frames, frame_rx) = mpsc::channel::<Vec<u8>>(8);
    let chunker = handle.chunker;
    let workers = handle.put_workers;
    // The put claims every chunk it stores or finds stored until its commit is answered: the
    // reclaimer leaves those files alone meanwhile (see `store::claims`).
    let claim = Claim::new(handle.chunks.clone());
    let put = tokio::task::spawn_blocking(move || {
        let reader = FrameReader { frames: frame_rx, current: Vec::new(), at: 0 };
        let outcome = put_stream(reader, chunker, &claim, workers, &mut |_| {});
        (outcome, claim)
    });
    let mut complete = false;
    let mut broken = None;
    loop {
        match api::read_frame(&mut stream).await {
            Ok(Some(frame)) if frame.is_empty() => {
                complete = true;
                break;
            }
            Ok(Some(frame)) => {
                if frames.send(frame).await.is_err() {
                    // The put stopped taking data: it failed (the disk is full, say). The
                    // client hears why now, rather than after sending the rest.
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                broken = Some(e);
                break;
            }
        }
    }
    drop(frames);
    let (outcome, claim) = put.await?;
    let outcome = match outcome {
        Ok(_) if !complete => {
            // Nothing records the chunks it wrote: they go now rather than at the next start.
            handle.give_back(claim.into_written()).await;
            let why = broken.map_or("went away".to_owned(), |e| format!("broke off ({e})"));
            bail!("the client {why} before the end of the data; nothing was recorded")
        }
        Ok(outcome) => outcome,
        Err(e) => {
            handle.give_back(claim.into_written()).await;
            let error = ApiError::new(ErrorKind::Io, e);
            return Ok(api::write_answer::<PutAnswer>(&mut stream, Err(error)).await?);
        }
    };
    let mtime_ns = mtime_ns.unwrap_or_else(|| (wall_ms() as i64).saturating_mul(1_000_000));
    let size = outcome.manifest.size;
    let request = Request::CommitVersion { path: path.clone(), manifest: outcome.manifest, mode, mtime_ns };
    let mut answer = ask(&handle, request, |_| {
        Some(PutAnswer { path, size, new_chunks: outcome.new_chunks, new_bytes: outcome.new_bytes, id: None })
    })
    .await?;
    if let Ok(put) = &mut answer
        && let Ok(Reply::Stat(stat)) = handle.call(Request::Stat { path: put.path.clone() }).await?
    {
        // The entry's id, for a client that made the file (the mount) and would ask next.
        put.id = Some(stat.id);
    }
    if answer.is_err() {
        // The commit was refused (the path became a directory meanwhile, say): nothing records
        // the chunks this put wrote.
        handle.give_back(claim.into_written()).await;
    } else {
        drop(claim);
    }
    api::write_answer(&mut stream, answer).await?;
    Ok(())
}

async fn serve_read(mut stream: UnixStream, handle: Handle, request: Request) -> anyhow::Result<()> {
    let mut events = handle.submit(request).await?;
    while let Some(event) = events.recv().await {
        match event {
            Event::Reply(reply) => {
                let header = match reply {
                    Ok(Reply::ReadStarted { size, range }) => {
                        Ok(ReadHeader { size, start: range.start, end: range.end })
                    }
                    Ok(_) => Err(ApiError::new(ErrorKind::Internal, "the core answered another request")),
                    Err(e) => Err(e.into()),
                };
                let failed = header.is_err();
                api::write_answer(&mut stream, header).await?;
                if failed {
                    return Ok(());
                }
            }
            Event::Data(data) => {
                for piece in data.chunks(api::DATA_FRAME_BYTES) {
                    api::write_frame(&mut stream, piece).await?;
                }
                events.taken().await?;
            }
            Event::Done(result) => {
                api::write_frame(&mut stream, &[]).await?;
                api::write_answer(&mut stream, result.map_err(ApiError::from)).await?;
                return Ok(());
            }
        }
    }
    bail!("the node stopped during the read")
}
