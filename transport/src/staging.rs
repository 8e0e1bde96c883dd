//! Staging between regions: chunks packed into large objects of a shared S3 bucket, encrypted on
//! the client.
//!
//! A *pack* holds the chunks of one or many staged versions, under a name the caller chooses.
//! Its object key is a keyed BLAKE3 hash of that name, so the bucket's owner learns neither names
//! nor contents. Layout of a pack object:
//!
//! ```text
//! magic "MRDNPK01" | u32 LE length of the sealed header | sealed header | sealed chunk…
//! sealed x = 24-byte random nonce | XChaCha20-Poly1305(x) with its 16-byte tag
//! header   = u32 LE count | count × (32-byte BLAKE3 hash, u32 LE length)
//! ```
//!
//! The associated data of every seal names the object key (and, for a chunk, its index and hash),
//! so a sealed piece moved to another place does not open. A reader opens a pack with one ranged
//! GET of its first MiB — the header, and the chunks too of a pack that small (a batch of small
//! files: one request serves them all) — then fetches each chunk beyond it with a ranged GET.
//! Every chunk is checked twice: the seal, then the BLAKE3 hash of the plaintext. A tampered,
//! truncated or swapped object is an error, never data.
//!
//! Big packs go up as multipart uploads, parts uploaded concurrently; every request of a
//! [`Staging`] shares one bound on requests in flight; the SDK retries 5xx answers, throttling
//! (503 SlowDown) and timeouts with exponential backoff and jitter. The client never uses the
//! SDK's default credential chain (it probes an instance-metadata address): credentials come
//! from the configuration, or from the standard environment variables when it says so.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use chacha20poly1305::aead::{Aead, AeadCore, OsRng, Payload};
use chacha20poly1305::{Key, KeyInit, XChaCha20Poly1305, XNonce};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The most a ranged read reserves before its bytes arrive.
const GET_PREALLOCATE_MAX_BYTES: u64 = 8 << 20;
/// First bytes of every pack object.
const MAGIC: &[u8; 8] = b"MRDNPK01";
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
/// Bytes of a pack before its sealed header: the magic and the header's length.
const PREAMBLE_BYTES: usize = MAGIC.len() + 4;
/// Bytes read by the first GET of [`Staging::open`]: the whole header of packs of up to ~29,000
/// chunks, and every chunk of a pack up to this size, in one request.
const OPEN_PROBE_BYTES: u64 = 1 << 20;
/// A pack up to this size is read whole when opened (a second GET for what the first did not
/// cover): a pack of many small files is then read with two requests at most.
const WHOLE_PACK_BYTES: u64 = 8 << 20;
/// Most chunks in one pack (the header is then 36 MiB).
pub const PACK_CHUNKS_MAX: usize = 1 << 20;
/// Largest chunk a pack carries.
pub const CHUNK_MAX_BYTES: u32 = 16 << 20;
/// Smallest part S3 accepts in a multipart upload (every part but the last).
pub const PART_MIN_BYTES: usize = 5 << 20;

/// A chunk as the staging sees it: its BLAKE3 hash and its length.
pub type ChunkSpec = ([u8; 32], u32);

/// Where the bucket's credentials come from.
#[derive(Clone, PartialEq, Eq)]
pub enum StagingCredentials {
    /// Given in the configuration.
    Static {
        /// Access key id.
        access_key: String,
        /// Secret access key.
        secret_key: String,
    },
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and, if set, `AWS_SESSION_TOKEN`, read when
    /// the client is made.
    Environment,
}

impl std::fmt::Debug for StagingCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StagingCredentials::Static { access_key, .. } => {
                write!(f, "Static {{ access_key: {access_key:?}, secret_key: <hidden> }}")
            }
            StagingCredentials::Environment => f.write_str("Environment"),
        }
    }
}

/// How to reach the staging bucket.
#[derive(Clone, Debug)]
pub struct StagingConfig {
    /// The S3 endpoint (`http://127.0.0.1:9000`); `None` for AWS's own endpoint of `region`.
    pub endpoint: Option<String>,
    /// The region the client signs for (for servers other than AWS: the one they expect).
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// Prepended to every object key (`meridian/`), so one bucket can serve several meshes.
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most servers other than AWS need.
    pub path_style: bool,
    /// Credentials.
    pub credentials: StagingCredentials,
    /// Requests in flight at once, over every operation of the client.
    pub concurrency: usize,
    /// Attempts per request (the first and its retries).
    pub max_attempts: u32,
    /// Size of the parts of a multipart upload; packs smaller than this go up in one request.
    pub part_bytes: usize,
}

impl StagingConfig {
    /// A configuration for `bucket` at `endpoint` with static credentials and the defaults.
    pub fn new(
        endpoint: Option<String>,
        region: &str,
        bucket: &str,
        credentials: StagingCredentials,
    ) -> Self {
        StagingConfig {
            endpoint,
            region: region.to_owned(),
            bucket: bucket.to_owned(),
            prefix: "meridian/".to_owned(),
            path_style: true,
            credentials,
            concurrency: 32,
            max_attempts: 5,
            part_bytes: 16 << 20,
        }
    }
}

/// What went wrong with staging.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The configuration or the mesh secret is unusable.
    #[error("staging configuration: {0}")]
    Config(String),
    /// A request to the bucket failed (after its retries).
    #[error("staging bucket {bucket}: {operation} failed: {reason}")]
    S3 {
        /// The bucket.
        bucket: String,
        /// The S3 operation.
        operation: &'static str,
        /// The error, with the server's code and message when it sent them.
        reason: String,
    },
    /// The object is not in the bucket.
    #[error("staged object {key} is not in the bucket")]
    Missing {
        /// Its key.
        key: String,
    },
    /// The object does not open with the mesh's key, or its content does not match its hash.
    #[error("staged object {key} was tampered with or is corrupt: {what}")]
    Tampered {
        /// Its key.
        key: String,
        /// What did not match.
        what: String,
    },
    /// The object is shorter than its header says.
    #[error("staged object {key} is truncated: {what}")]
    Truncated {
        /// Its key.
        key: String,
        /// What is missing.
        what: String,
    },
    /// The caller could not give a chunk to stage, or gave bytes that are not that chunk.
    #[error("staging chunk {chunk}: {reason}")]
    Chunk {
        /// The chunk's hash, in hex.
        chunk: String,
        /// Why.
        reason: String,
    },
}

/// The keys derived from the mesh secret.
#[derive(Clone)]
struct Keys {
    cipher: XChaCha20Poly1305,
    names: [u8; 32],
}

impl Keys {
    fn derive(secret: &[u8]) -> Result<Keys, StagingError> {
        if secret.len() < 16 {
            return Err(StagingError::Config(format!(
                "the mesh secret must be at least 16 bytes long, not {}",
                secret.len()
            )));
        }
        let seal = blake3::derive_key("meridian 2026 staging: sealing of packs", secret);
        let names = blake3::derive_key("meridian 2026 staging: object names", secret);
        Ok(Keys { cipher: XChaCha20Poly1305::new(&Key::from(seal)), names })
    }

    fn seal(&self, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(&nonce, Payload { msg: plain, aad })
            .expect("XChaCha20-Poly1305 seals any message shorter than 256 GiB");
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
    }

    fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_BYTES + TAG_BYTES {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_BYTES);
        let nonce = XNonce::from(<[u8; NONCE_BYTES]>::try_from(nonce).expect("split at the nonce's length"));
        self.cipher.decrypt(&nonce, Payload { msg: body, aad }).ok()
    }
}

fn header_aad(key: &str) -> Vec<u8> {
    [b"header:".as_slice(), key.as_bytes()].concat()
}

fn chunk_aad(key: &str, index: usize, hash: &[u8; 32]) -> Vec<u8> {
    [b"chunk:".as_slice(), key.as_bytes(), &(index as u32).to_le_bytes(), hash].concat()
}

/// Bytes of a sealed chunk of `len` bytes.
fn sealed_len(len: u32) -> u64 {
    (NONCE_BYTES + TAG_BYTES) as u64 + u64::from(len)
}

/// One chunk of a pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// Its BLAKE3 hash.
    pub hash: [u8; 32],
    /// Its length.
    pub len: u32,
    /// Where its sealed bytes start in the object.
    offset: u64,
}

/// A pack in the bucket, opened: its chunks and where they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedPack {
    /// The object's key.
    pub key: String,
    /// The chunks, in the order they were staged.
    pub entries: Vec<PackEntry>,
    /// The object's size.
    pub size: u64,
    /// The object's first bytes, as read when it was opened: chunks within them are read
    /// without another request.
    head: bytes::Bytes,
}

impl StagedPack {
    /// Bytes of the pack kept in memory (read when it was opened).
    pub fn resident_bytes(&self) -> usize {
        self.head.len()
    }
}

fn plan(chunks: &[ChunkSpec], header_sealed_len: usize) -> (Vec<PackEntry>, u64) {
    let mut offset = (PREAMBLE_BYTES + header_sealed_len) as u64;
    let entries = chunks
        .iter()
        .map(|(hash, len)| {
            let entry = PackEntry { hash: *hash, len: *len, offset };
            offset += sealed_len(*len);
            entry
        })
        .collect();
    (entries, offset)
}

fn encode_header(chunks: &[ChunkSpec]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + chunks.len() * 36);
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for (hash, len) in chunks {
        out.extend_from_slice(hash);
        out.extend_from_slice(&len.to_le_bytes());
    }
    out
}

fn decode_header(bytes: &[u8]) -> Option<Vec<ChunkSpec>> {
    let (count, rest) = bytes.split_first_chunk::<4>()?;
    let count = u32::from_le_bytes(*count) as usize;
    if count > PACK_CHUNKS_MAX || rest.len() != count * 36 {
        return None;
    }
    rest.chunks_exact(36)
        .map(|c| {
            let hash: [u8; 32] = c[..32].try_into().ok()?;
            let len = u32::from_le_bytes(c[32..].try_into().ok()?);
            (len <= CHUNK_MAX_BYTES).then_some((hash, len))
        })
        .collect()
}

/// A client of the staging bucket.
#[derive(Clone)]
pub struct Staging {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    part_bytes: usize,
    keys: Keys,
    limit: Arc<Semaphore>,
}

impl Staging {
    /// A client for `config`, sealing with keys derived from the mesh `secret`. Makes no request.
    pub fn new(config: &StagingConfig, secret: &[u8]) -> Result<Staging, StagingError> {
        let keys = Keys::derive(secret)?;
        if config.bucket.is_empty() {
            return Err(StagingError::Config("no bucket is named".into()));
        }
        if config.part_bytes < PART_MIN_BYTES {
            return Err(StagingError::Config(format!(
                "parts must be at least {PART_MIN_BYTES} bytes (S3's minimum), not {}",
                config.part_bytes
            )));
        }
        let credentials = match &config.credentials {
            StagingCredentials::Static { access_key, secret_key } => {
                Credentials::new(access_key, secret_key, None, None, "meridian config")
            }
            StagingCredentials::Environment => {
                let var = |name: &str| {
                    std::env::var(name).map_err(|_| {
                        StagingError::Config(format!(
                            "the configuration takes credentials from the environment, but {name} is not set"
                        ))
                    })
                };
                let token = std::env::var("AWS_SESSION_TOKEN").ok();
                Credentials::new(
                    var("AWS_ACCESS_KEY_ID")?,
                    var("AWS_SECRET_ACCESS_KEY")?,
                    token,
                    None,
                    "environment",
                )
            }
        };
        let retry = RetryConfig::standard()
            .with_max_attempts(config.max_attempts.max(1))
            .with_initial_backoff(Duration::from_millis(50))
            .with_max_backoff(Duration::from_secs(5));
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_secs(60))
            .build();
        let mut builder = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .force_path_style(config.path_style)
            .credentials_provider(credentials)
            // Packs are sealed (authenticated) and every chunk is checked against its hash: the
            // SDK's own checksums would only add work, and streaming ones a trailer some servers
            // do not take.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(retry)
            .timeout_config(timeouts);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Ok(Staging {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            part_bytes: config.part_bytes,
            keys,
            limit: Arc::new(Semaphore::new(config.concurrency.max(1))),
        })
    }

    /// The object key of the pack named `name`.
    pub fn key_of(&self, name: &[u8]) -> String {
        format!("{}{}", self.prefix, blake3::keyed_hash(&self.keys.names, name).to_hex())
    }

    fn s3_error<E>(&self, operation: &'static str) -> impl FnOnce(E) -> StagingError + '_
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    {
        move |e| StagingError::S3 {
            bucket: self.bucket.clone(),
            operation,
            reason: match (e.code(), e.message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.to_owned(),
                _ => DisplayErrorContext(&e).to_string(),
            },
        }
    }

    async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.limit.acquire().await.expect("the semaphore is never closed")
    }

    /// Creates the bucket unless it exists (for the demo and tests; production buckets are made
    /// by their owners).
    pub async fn ensure_bucket(&self) -> Result<(), StagingError> {
        let _permit = self.permit().await;
        if self.client.head_bucket().bucket(&self.bucket).send().await.is_ok() {
            return Ok(());
        }
        match self.client.create_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.code(), Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")) => Ok(()),
            Err(e) => Err(self.s3_error("CreateBucket")(e.into_service_error())),
        }
    }

    /// Seals `chunks` (hash and length each) into the pack named `name` and uploads it, once.
    /// `load` gives the bytes of chunk `i` (a quick local read: it runs on the uploading task);
    /// bytes that do not match their hash are refused. Memory stays within a few parts whatever
    /// the pack's size.
    pub async fn upload(
        &self,
        name: &[u8],
        chunks: &[ChunkSpec],
        load: &mut (dyn FnMut(usize) -> Result<Vec<u8>, String> + Send),
    ) -> Result<StagedPack, StagingError> {
        if chunks.len() > PACK_CHUNKS_MAX {
            return Err(StagingError::Config(format!(
                "a pack holds at most {PACK_CHUNKS_MAX} chunks, not {}",
                chunks.len()
            )));
        }
        let key = self.key_of(name);
        let mut object = Vec::with_capacity(self.part_bytes.min(1 << 20));
        object.extend_from_slice(MAGIC);
        let mut header = Vec::new();
        self.keys.seal(&header_aad(&key), &encode_header(chunks), &mut header);
        object.extend_from_slice(&(header.len() as u32).to_le_bytes());
        object.extend_from_slice(&header);
        let (entries, size) = plan(chunks, header.len());
        let mut upload: Option<Multipart> = None;
        for (index, (hash, len)) in chunks.iter().enumerate() {
            let chunk = |reason: String| StagingError::Chunk {
                chunk: blake3::Hash::from(*hash).to_hex().to_string(),
                reason,
            };
            let data = load(index).map_err(chunk)?;
            if data.len() != *len as usize || blake3::hash(&data) != *hash {
                return Err(chunk("the bytes given do not match the chunk's hash and length".into()));
            }
            self.keys.seal(&chunk_aad(&key, index, hash), &data, &mut object);
            while object.len() >= self.part_bytes {
                let rest = object.split_off(self.part_bytes);
                let part = std::mem::replace(&mut object, rest);
                let multipart = match &mut upload {
                    Some(m) => m,
                    None => upload.insert(Multipart::start(self, &key).await?),
                };
                if let Err(e) = multipart.send_part(self, part).await {
                    multipart.abort(self).await;
                    return Err(e);
                }
            }
        }
        match upload {
            None => {
                let _permit = self.permit().await;
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .body(ByteStream::from(object))
                    .send()
                    .await
                    .map_err(|e| self.s3_error("PutObject")(e.into_service_error()))?;
            }
            Some(mut multipart) => {
                let finished = match multipart.send_part(self, object).await {
                    Ok(()) => multipart.complete(self).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = finished {
                    multipart.abort(self).await;
                    return Err(e);
                }
            }
        }
        Ok(StagedPack { key, entries, size, head: bytes::Bytes::new() })
    }

    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<bytes::Bytes, StagingError> {
        let _permit = self.permit().await;
        let answer = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .send()
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                let e = e.into_service_error();
                return Err(match e.code() {
                    Some("NoSuchKey") => StagingError::Missing { key: key.to_owned() },
                    Some("InvalidRange") => StagingError::Truncated {
                        key: key.to_owned(),
                        what: format!("nothing at bytes {}..{}", range.start, range.end),
                    },
                    _ => self.s3_error("GetObject")(e),
                });
            }
        };
        // At most the bytes asked for are taken in: a server that ignores `Range` (and sends a
        // whole multi-gigabyte pack) is an error, not an allocation of its size.
        let asked = range.end - range.start;
        let too_much = |got: u64| StagingError::S3 {
            bucket: self.bucket.clone(),
            operation: "GetObject",
            reason: format!(
                "asked for {asked} bytes ({}..{} of {key}), the server answers {got} or more: does it ignore Range?",
                range.start, range.end
            ),
        };
        if let Some(len) = answer.content_length().and_then(|l| u64::try_from(l).ok()).filter(|&l| l > asked)
        {
            return Err(too_much(len));
        }
        let mut body = answer.body;
        let mut out = Vec::with_capacity(asked.min(GET_PREALLOCATE_MAX_BYTES) as usize);
        loop {
            let piece = body.try_next().await.map_err(|e| StagingError::S3 {
                bucket: self.bucket.clone(),
                operation: "GetObject",
                reason: format!("reading the body: {e}"),
            })?;
            let Some(piece) = piece else { break };
            let got = (out.len() + piece.len()) as u64;
            if got > asked {
                return Err(too_much(got));
            }
            out.extend_from_slice(&piece);
        }
        Ok(bytes::Bytes::from(out))
    }

    /// Opens the pack named `name`: reads and checks its header. `None` if it is not staged.
    pub async fn open(&self, name: &[u8]) -> Result<Option<StagedPack>, StagingError> {
        let key = self.key_of(name);
        let probe = match self.get_range(&key, 0..OPEN_PROBE_BYTES).await {
            Ok(probe) => probe,
            Err(StagingError::Missing { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let tampered = |what: &str| StagingError::Tampered { key: key.clone(), what: what.to_owned() };
        if probe.len() < PREAMBLE_BYTES || &probe[..MAGIC.len()] != MAGIC {
            return Err(tampered("it does not start like a pack"));
        }
        let header_len = u32::from_le_bytes(probe[MAGIC.len()..PREAMBLE_BYTES].try_into().expect("4 bytes"));
        let header_len = header_len as usize;
        if header_len > NONCE_BYTES + TAG_BYTES + 4 + PACK_CHUNKS_MAX * 36 {
            return Err(tampered("its header claims more chunks than a pack holds"));
        }
        let header_end = PREAMBLE_BYTES + header_len;
        let sealed = if header_end <= probe.len() {
            probe.slice(PREAMBLE_BYTES..header_end)
        } else if (probe.len() as u64) < OPEN_PROBE_BYTES {
            return Err(StagingError::Truncated { key, what: "the object ends inside its header".into() });
        } else {
            let sealed = self.get_range(&key, PREAMBLE_BYTES as u64..header_end as u64).await?;
            if sealed.len() != header_len {
                return Err(StagingError::Truncated {
                    key,
                    what: "the object ends inside its header".into(),
                });
            }
            sealed
        };
        let header =
            self.keys.open(&header_aad(&key), &sealed).ok_or_else(|| tampered("its header does not open"))?;
        let chunks = decode_header(&header).ok_or_else(|| tampered("its header is malformed"))?;
        let (entries, size) = plan(&chunks, header_len);
        let mut head = probe;
        let covered = head.len() as u64;
        if covered == OPEN_PROBE_BYTES && covered < size && size <= WHOLE_PACK_BYTES {
            // If this fails (or the object is truncated), the chunks past what was read are
            // read one by one, and fail then if they are not there.
            if let Ok(rest) = self.get_range(&key, covered..size).await {
                let mut whole = bytes::BytesMut::with_capacity(covered as usize + rest.len());
                whole.extend_from_slice(&head);
                whole.extend_from_slice(&rest);
                head = whole.freeze();
            }
        }
        Ok(Some(StagedPack { key, entries, size, head }))
    }

    /// Reads chunk `index` of `pack`: one ranged GET, opened and checked against its hash.
    pub async fn read_chunk(&self, pack: &StagedPack, index: usize) -> Result<Vec<u8>, StagingError> {
        let Some(entry) = pack.entries.get(index) else {
            return Err(StagingError::Config(format!("pack {} has no chunk {index}", pack.key)));
        };
        let want = sealed_len(entry.len);
        let span = entry.offset..entry.offset + want;
        let sealed = if span.end <= pack.head.len() as u64 {
            pack.head.slice(span.start as usize..span.end as usize)
        } else {
            self.get_range(&pack.key, span).await?
        };
        if (sealed.len() as u64) < want {
            return Err(StagingError::Truncated {
                key: pack.key.clone(),
                what: format!("chunk {index} has {} of its {want} bytes", sealed.len()),
            });
        }
        let tampered = |what: String| StagingError::Tampered { key: pack.key.clone(), what };
        let data = self
            .keys
            .open(&chunk_aad(&pack.key, index, &entry.hash), &sealed)
            .ok_or_else(|| tampered(format!("chunk {index} does not open")))?;
        if blake3::hash(&data) != entry.hash {
            return Err(tampered(format!("chunk {index} does not match its hash")));
        }
        Ok(data)
    }

    /// Deletes the pack named `name` (nothing if it is not there).
    pub async fn delete(&self, name: &[u8]) -> Result<(), StagingError> {
        let key = self.key_of(name);
        self.delete_key(&key).await
    }

    async fn delete_key(&self, key: &str) -> Result<(), StagingError> {
        let _permit = self.permit().await;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.s3_error("DeleteObject")(e.into_service_error()))?;
        Ok(())
    }

    /// Deletes every pack under the prefix last written more than `ttl` ago — those whose
    /// uploader died before anyone cleaned them up. Returns how many were deleted.
    pub async fn sweep(&self, ttl: Duration) -> Result<usize, StagingError> {
        let cutoff = SystemTime::now().checked_sub(ttl).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut stale = Vec::new();
        let mut token = None;
        loop {
            let page = {
                let _permit = self.permit().await;
                self.client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&self.prefix)
                    .set_continuation_token(token.take())
                    .send()
                    .await
                    .map_err(|e| self.s3_error("ListObjectsV2")(e.into_service_error()))?
            };
            for object in page.contents() {
                let written = object.last_modified().and_then(|t| SystemTime::try_from(*t).ok());
                if let (Some(key), Some(written)) = (object.key(), written)
                    && written < cutoff
                {
                    stale.push(key.to_owned());
                }
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        for key in &stale {
            self.delete_key(key).await?;
        }
        Ok(stale.len())
    }
}

/// A multipart upload in progress: parts go up concurrently, within the client's bound.
struct Multipart {
    key: String,
    upload_id: String,
    next_part: i32,
    sending: JoinSet<Result<CompletedPart, StagingError>>,
    done: Vec<CompletedPart>,
}

impl Multipart {
    async fn start(staging: &Staging, key: &str) -> Result<Multipart, StagingError> {
        let _permit = staging.permit().await;
        let started = staging
            .client
            .create_multipart_upload()
            .bucket(&staging.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| staging.s3_error("CreateMultipartUpload")(e.into_service_error()))?;
        let upload_id = started.upload_id().ok_or_else(|| StagingError::S3 {
            bucket: staging.bucket.clone(),
            operation: "CreateMultipartUpload",
            reason: "the answer has no upload id".into(),
        })?;
        Ok(Multipart {
            key: key.to_owned(),
            upload_id: upload_id.to_owned(),
            next_part: 1,
            sending: JoinSet::new(),
            done: Vec::new(),
        })
    }

    /// Starts uploading `part`; waits first if the client's bound is reached.
    async fn send_part(&mut self, staging: &Staging, part: Vec<u8>) -> Result<(), StagingError> {
        let number = self.next_part;
        self.next_part += 1;
        let permit = staging.limit.clone().acquire_owned().await.expect("the semaphore is never closed");
        // Collect what finished, so a failure surfaces early.
        while let Some(finished) = self.sending.try_join_next() {
            self.done.push(joined(finished)?);
        }
        let request = staging
            .client
            .upload_part()
            .bucket(&staging.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(number)
            .body(ByteStream::from(part));
        let bucket = staging.bucket.clone();
        self.sending.spawn(async move {
            let answer = request.send().await;
            drop(permit);
            let answer = answer.map_err(|e| {
                let e = e.into_service_error();
                StagingError::S3 {
                    bucket,
                    operation: "UploadPart",
                    reason: DisplayErrorContext(&e).to_string(),
                }
            })?;
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(answer.e_tag().map(str::to_owned))
                .build())
        });
        Ok(())
    }

    async fn complete(&mut self, staging: &Staging) -> Result<(), StagingError> {
        while let Some(finished) = self.sending.join_next().await {
            self.done.push(joined(finished)?);
        }
        self.done.sort_by_key(|p| p.part_number());
        let parts =
            CompletedMultipartUpload::builder().set_parts(Some(std::mem::take(&mut self.done))).build();
        let _permit = staging.permit().await;
        staging
            .client
            .complete_multipart_upload()
            .bucket(&staging.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(parts)
            .send()
            .await
            .map_err(|e| staging.s3_error("CompleteMultipartUpload")(e.into_service_error()))?;
        Ok(())
    }

    /// Gives up: stops the parts in flight and asks the server to drop the parts it has (the
    /// TTL sweep does not see unfinished uploads; a bucket lifecycle rule should).
    async fn abort(&mut self, staging: &Staging) {
        self.sending.abort_all();
        let _permit = staging.permit().await;
        let aborted = staging
            .client
            .abort_multipart_upload()
            .bucket(&staging.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .send()
            .await;
        if let Err(e) = aborted {
            tracing::warn!("aborting the upload of {}: {}", self.key, DisplayErrorContext(&e));
        }
    }
}

fn joined(
    finished: Result<Result<CompletedPart, StagingError>, tokio::task::JoinError>,
) -> Result<CompletedPart, StagingError> {
    finished.map_err(|e| StagingError::Config(format!("a part upload task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_hostile_headers_are_refused() {
        let chunks = vec![([7u8; 32], 10), ([9u8; 32], 1 << 20)];
        assert_eq!(decode_header(&encode_header(&chunks)), Some(chunks.clone()));
        let mut long = encode_header(&chunks);
        long.push(0);
        assert_eq!(decode_header(&long), None);
        assert_eq!(decode_header(&[1, 0]), None);
        let mut huge = encode_header(&[([1u8; 32], 5)]);
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_header(&huge), None);
        let too_big = encode_header(&[([1u8; 32], CHUNK_MAX_BYTES + 1)]);
        assert_eq!(decode_header(&too_big), None);
    }

    #[test]
    fn seals_open_only_with_their_key_and_place() {
        let keys = Keys::derive(b"a mesh secret of some length").unwrap();
        let other = Keys::derive(b"another mesh secret entirely").unwrap();
        let mut sealed = Vec::new();
        keys.seal(b"here", b"payload", &mut sealed);
        assert_eq!(keys.open(b"here", &sealed).as_deref(), Some(b"payload".as_slice()));
        assert_eq!(keys.open(b"there", &sealed), None);
        assert_eq!(other.open(b"here", &sealed), None);
        sealed[30] ^= 1;
        assert_eq!(keys.open(b"here", &sealed), None);
        assert_eq!(keys.open(b"here", &sealed[..10]), None);
        assert!(matches!(Keys::derive(b"short"), Err(StagingError::Config(_))));
    }
}
