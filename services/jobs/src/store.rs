//! Durable state: job records (in an embedded database under `--data-dir`, or in a cluster's
//! etcd through a [`RecordBackend`]) and prompts in a spool directory under `--data-dir`. A
//! prompt is on disk (fsynced, renamed into place) before its record is committed, and the
//! record is committed before the client hears the job id.
//!
//! A spool file is the prompt's token ids (packed little-endian u32), its images' files one
//! after another (their lengths are in the record), then the job's record as accepted (JSON),
//! its length (u32), an xxh3-64 checksum of everything before it (u64) and a magic. So the
//! spool alone says which jobs were accepted and how to run them: at start every spooled job
//! must have a record, and one whose record is gone (a lost, emptied or damaged
//! job database) is recovered from its spool file, or recorded as lost with the reason. A
//! prompt is verified against its checksum before a job runs again; a damaged one fails that
//! job with DATA_LOSS instead of running different tokens.

use crate::error::{JobError, Result};
use crate::record::{JobRecord, JobState, now_unix_ms};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use ringbolt_model::scheduler::panic_message;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");

/// Ends every spool file of this format.
const SPOOL_MAGIC: &[u8; 8] = b"RBSPOOL1";
/// Bytes after the record in a spool file: its length, the checksum, the magic.
const SPOOL_TRAILER: usize = 4 + 8 + 8;

/// Where job records and idempotency keys live. Calls block; the manager makes them from
/// blocking threads (`commit`, `put`, `delete`) or expects them to be cheap (`get`, `all`,
/// `lookup_key`: a remote backend serves those from memory).
pub trait RecordBackend: Send + Sync {
    /// Commits `record` and its idempotency key, unless the key already names a job (then
    /// returns that job's id and commits nothing).
    fn commit(&self, record: &JobRecord) -> Result<Result<(), String>>;
    fn lookup_key(&self, key: &str) -> Result<Option<String>>;
    fn put(&self, record: &JobRecord) -> Result<()>;
    fn get(&self, id: &str) -> Result<Option<JobRecord>>;
    /// Every readable record, oldest first (ids are time-ordered).
    fn all(&self) -> Result<Vec<JobRecord>>;
    /// Removes a record and its idempotency key.
    fn delete(&self, record: &JobRecord) -> Result<()>;
}

/// Records in an embedded database (redb): standalone.
pub struct RedbRecords {
    db: Database,
}

/// What opening the store found and did about accepted jobs whose record was missing.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    /// The job database could not be read and was moved here; a new one was started.
    pub quarantined: Option<(PathBuf, String)>,
    /// Jobs whose record was gone, re-created from their spool file (they run again).
    pub recovered: Vec<String>,
    /// Jobs whose record was gone and whose spool file is damaged: recorded as failed with
    /// DATA_LOSS and this reason.
    pub lost: Vec<(String, String)>,
}

impl Recovery {
    pub fn is_clean(&self) -> bool {
        self.quarantined.is_none() && self.recovered.is_empty() && self.lost.is_empty()
    }

    /// Says what happened, at error level (an operator must hear of it).
    pub fn log(&self) {
        if let Some((aside, why)) = &self.quarantined {
            tracing::error!(
                moved_to = %aside.display(),
                error = %why,
                "the job database could not be read: it was moved aside and a new one started"
            );
        }
        if !self.recovered.is_empty() {
            tracing::error!(
                jobs = ?self.recovered,
                "{} accepted job(s) had no record in the job database: re-created from their \
                 spooled prompts; they run again",
                self.recovered.len()
            );
        }
        for (id, why) in &self.lost {
            tracing::error!(job = %id, reason = %why, "an accepted job is lost: recorded as failed (DATA_LOSS)");
        }
    }
}

pub struct JobStore {
    records: Box<dyn RecordBackend>,
    spool: PathBuf,
    recovery: Recovery,
}

/// A prompt being uploaded: a temporary spool file (and one for its images, which may arrive
/// between its tokens), removed unless committed.
pub struct SpoolWriter {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<BufWriter<std::fs::File>>,
    tokens: u64,
    hash: Xxh3,
    /// The images' bytes so far (created with the first image), copied after the tokens when
    /// the prompt is committed.
    images: Option<(PathBuf, BufWriter<std::fs::File>)>,
    image_hash: Xxh3,
}

/// A job's prompt as spooled.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    /// Each image's file, in placeholder order.
    pub images: Vec<Vec<u8>>,
}

impl SpoolWriter {
    pub fn write(&mut self, ids: &[u32]) -> Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| JobError::Store("spool file closed".into()))?;
        let mut buf = [0u8; 4096];
        for part in ids.chunks(buf.len() / 4) {
            let bytes = &mut buf[..part.len() * 4];
            for (b, id) in bytes.chunks_exact_mut(4).zip(part) {
                b.copy_from_slice(&id.to_le_bytes());
            }
            f.write_all(bytes)?;
            self.hash.update(bytes);
        }
        self.tokens += ids.len() as u64;
        Ok(())
    }

    /// Adds an image's file after the images written so far.
    pub fn write_image(&mut self, bytes: &[u8]) -> Result<()> {
        if self.images.is_none() {
            let path = self.tmp.with_extension("images.part");
            // Read back when the prompt is committed.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            self.images = Some((path, BufWriter::with_capacity(1 << 20, f)));
        }
        if let Some((_, f)) = &mut self.images {
            f.write_all(bytes)?;
        }
        self.image_hash.update(&(bytes.len() as u64).to_le_bytes());
        self.image_hash.update(bytes);
        Ok(())
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Hash of the prompt written so far: its token ids, and its images when it has any.
    pub fn prompt_hash(&self) -> u64 {
        match self.images {
            None => self.hash.digest(),
            Some(_) => {
                let mut h = Xxh3::new();
                h.update(&self.hash.digest().to_le_bytes());
                h.update(&self.image_hash.digest().to_le_bytes());
                h.digest()
            }
        }
    }

    /// Appends the images' bytes (if any) to the spool file, hashing them into `h`.
    fn append_images(&mut self, f: &mut BufWriter<std::fs::File>, h: &mut Xxh3) -> Result<()> {
        let Some((path, images)) = self.images.take() else {
            return Ok(());
        };
        let mut images = images
            .into_inner()
            .map_err(|e| JobError::Store(e.to_string()))?;
        use std::io::Seek;
        images.seek(std::io::SeekFrom::Start(0))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = images.read(&mut buf)?;
            if n == 0 {
                break;
            }
            f.write_all(&buf[..n])?;
            h.update(&buf[..n]);
        }
        drop(images);
        let _ = std::fs::remove_file(path);
        Ok(())
    }

    /// Writes the record and the checksum, flushes, fsyncs and moves the file into place.
    fn finish(&mut self, record: &JobRecord) -> Result<()> {
        let mut f = self
            .file
            .take()
            .ok_or_else(|| JobError::Store("spool file closed".into()))?;
        let meta = serde_json::to_vec(record)?;
        let len = (meta.len() as u32).to_le_bytes();
        let mut h = self.hash.clone();
        self.append_images(&mut f, &mut h)?;
        h.update(&meta);
        h.update(&len);
        f.write_all(&meta)?;
        f.write_all(&len)?;
        f.write_all(&h.digest().to_le_bytes())?;
        f.write_all(SPOOL_MAGIC)?;
        let f = f.into_inner().map_err(|e| JobError::Store(e.to_string()))?;
        f.sync_all()?;
        std::fs::rename(&self.tmp, &self.dest)?;
        if let Some(dir) = self.dest.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
        if let Some((path, _)) = self.images.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A spool file's contents once checked.
struct Spooled {
    tokens: Vec<u32>,
    images: Vec<Vec<u8>>,
    /// The record as accepted (None in a file of an older release, which has no checksum).
    record: Option<JobRecord>,
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Reads and verifies a spool file; the error says what is wrong with it.
fn read_spool(path: &Path) -> std::result::Result<Spooled, String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let n = bytes.len();
    if n < SPOOL_TRAILER || &bytes[n - 8..] != SPOOL_MAGIC {
        // An older release's file: token ids only, nothing to verify them against.
        if n % 4 != 0 {
            return Err(format!(
                "{} is damaged: no checksum trailer, and {n} bytes are not whole token ids",
                path.display()
            ));
        }
        return Ok(Spooled {
            tokens: u32s(&bytes),
            images: Vec::new(),
            record: None,
        });
    }
    let sum = u64::from_le_bytes(bytes[n - 16..n - 8].try_into().unwrap_or_default());
    let meta_len = u32::from_le_bytes(bytes[n - 20..n - 16].try_into().unwrap_or_default());
    let body = n - 16;
    let actual = xxhash_rust::xxh3::xxh3_64(&bytes[..body]);
    if actual != sum {
        return Err(format!(
            "{} is damaged: checksum {actual:016x} does not match the {sum:016x} written at \
             acceptance",
            path.display()
        ));
    }
    let meta_end = n - SPOOL_TRAILER;
    let bad_length = |what: &str| format!("{} is damaged: bad {what} length", path.display());
    let meta_start = meta_end
        .checked_sub(meta_len as usize)
        .ok_or_else(|| bad_length("record"))?;
    let record: JobRecord = serde_json::from_slice(&bytes[meta_start..meta_end]).map_err(|e| {
        format!(
            "{} is damaged: its record does not parse: {e}",
            path.display()
        )
    })?;
    let image_bytes = record
        .images
        .iter()
        .try_fold(0usize, |a, i| a.checked_add(usize::try_from(i.bytes).ok()?));
    let tokens_end = image_bytes
        .and_then(|b| meta_start.checked_sub(b))
        .filter(|e| e % 4 == 0)
        .ok_or_else(|| bad_length("images' or tokens'"))?;
    let mut images = Vec::with_capacity(record.images.len());
    let mut at = tokens_end;
    for i in &record.images {
        images.push(bytes[at..at + i.bytes as usize].to_vec());
        at += i.bytes as usize;
    }
    Ok(Spooled {
        tokens: u32s(&bytes[..tokens_end]),
        images,
        record: Some(record),
    })
}

impl RedbRecords {
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(JOBS)?;
        tx.open_table(IDEMPOTENCY)?;
        tx.commit()?;
        Ok(RedbRecords { db })
    }

    /// Opens the database and reads every entry once, so damage shows now rather than as a
    /// job that is silently missing later. Records that do not parse are left to the spool
    /// check (their jobs are recovered from the spool).
    fn open_checked(path: &Path) -> std::result::Result<Self, OpenFailure> {
        let scan = || -> std::result::Result<Self, redb::Error> {
            let db = Database::create(path)?;
            let tx = db.begin_write()?;
            tx.open_table(JOBS)?;
            tx.open_table(IDEMPOTENCY)?;
            tx.commit()?;
            {
                let tx = db.begin_read()?;
                for item in tx.open_table(JOBS)?.iter()? {
                    item?;
                }
                for item in tx.open_table(IDEMPOTENCY)?.iter()? {
                    item?;
                }
            }
            Ok(RedbRecords { db })
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(scan)) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) if damaged(&e) => Err(OpenFailure::Damaged(e.to_string())),
            // Held by another process, of another format version, unreadable for lack of
            // permission...: not damage. Nothing may be moved or rebuilt then.
            Ok(Err(e)) => Err(OpenFailure::Other(JobError::Store(format!(
                "cannot open the job database {}: {e}",
                path.display()
            )))),
            // redb panics on some damaged pages.
            Err(p) => Err(OpenFailure::Damaged(format!(
                "reading it panicked: {}",
                panic_message(&*p)
            ))),
        }
    }
}

/// Why a job database did not open.
enum OpenFailure {
    /// Its contents are damaged: it may be moved aside and rebuilt from the spool.
    Damaged(String),
    /// Anything else: the store must not start.
    Other(JobError),
}

/// Whether a redb error says the file's contents are damaged (rather than that it is in use,
/// of another version, or unreadable for an outside reason).
fn damaged(e: &redb::Error) -> bool {
    match e {
        redb::Error::Corrupted(_) => true,
        redb::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// Runs a database call; a panic in it (redb panics on some damaged pages) becomes an error.
fn unpanicked<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(JobError::Store(format!(
            "the job database is damaged ({})",
            panic_message(&*p)
        )))
    })
}

impl JobStore {
    /// Records in `data_dir/jobs.redb`, prompts in `data_dir/spool`. A database that cannot
    /// be read is moved aside (`jobs.redb.damaged-<unix ms>`) and replaced by a new one; either
    /// way every accepted job in the spool gets a record again (see [`JobStore::recovery`]).
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("jobs.redb");
        let (records, quarantined) = match RedbRecords::open_checked(&path) {
            Ok(r) => (r, None),
            Err(OpenFailure::Other(e)) => return Err(e),
            Err(OpenFailure::Damaged(e)) => {
                let aside = data_dir.join(format!("jobs.redb.damaged-{}", now_unix_ms()));
                std::fs::rename(&path, &aside).map_err(|re| {
                    JobError::Store(format!(
                        "the job database {} is damaged ({e}) and cannot be moved aside: {re}",
                        path.display()
                    ))
                })?;
                (RedbRecords::open(&path)?, Some((aside, e.to_string())))
            }
        };
        let mut store = Self::with_records(data_dir, Box::new(records))?;
        store.recovery.quarantined = quarantined;
        Ok(store)
    }

    /// Records in `records`, prompts in `data_dir/spool`.
    pub fn with_records(data_dir: &Path, records: Box<dyn RecordBackend>) -> Result<Self> {
        let spool = data_dir.join("spool");
        std::fs::create_dir_all(&spool)?;
        let mut spooled = Vec::new();
        for e in std::fs::read_dir(&spool)? {
            let p = e?.path();
            match p.extension().and_then(|x| x.to_str()) {
                // Uploads that never committed (a crash mid-upload): no job owns them.
                Some("part") => {
                    let _ = std::fs::remove_file(p);
                }
                Some("tokens") => {
                    if let Some(id) = p.file_stem().and_then(|s| s.to_str()) {
                        spooled.push(id.to_string());
                    }
                }
                _ => {}
            }
        }
        spooled.sort();
        let mut store = JobStore {
            records,
            spool,
            recovery: Recovery::default(),
        };
        for id in spooled {
            if !matches!(store.records.get(&id), Ok(Some(_))) {
                store.recover(&id)?;
            }
        }
        Ok(store)
    }

    /// What opening found: a damaged database, jobs recovered from the spool, jobs lost.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Job `id` is in the spool (it was accepted) but has no readable record: re-creates the
    /// record from the spool file, or records the job as lost when the file is damaged.
    fn recover(&mut self, id: &str) -> Result<()> {
        let path = self.prompt_path(id);
        let why = match read_spool(&path) {
            Ok(Spooled {
                tokens,
                record: Some(rec),
                ..
            }) if rec.id == id && rec.spooled_tokens() == tokens.len() as u64 => {
                let rec = JobRecord {
                    state: JobState::Queued,
                    tokens: Vec::new(),
                    finished_unix_ms: None,
                    finish_reason: None,
                    error: None,
                    ..rec
                };
                match self.records.commit(&rec)? {
                    Ok(()) => {}
                    // The key survived and names this job: keep it.
                    Err(other) if other == id => self.records.put(&rec)?,
                    // The key names another job now: this one keeps no key.
                    Err(_) => self.records.put(&JobRecord {
                        idempotency_key: None,
                        ..rec
                    })?,
                }
                self.recovery.recovered.push(id.to_string());
                return Ok(());
            }
            Ok(Spooled {
                record: Some(_), ..
            }) => "its spool file's record names another job or length".to_string(),
            Ok(Spooled { record: None, .. }) => {
                "its spool file is from an older release and holds only the prompt, not the \
                 job's parameters"
                    .to_string()
            }
            Err(damage) => damage,
        };
        let msg = format!("job {id} was accepted but its record is gone and {why}");
        let lost = JobRecord {
            id: id.to_string(),
            state: JobState::Failed,
            prompt_tokens: 0,
            max_new_tokens: 0,
            sampling: crate::record::Sampling {
                temperature: 0.0,
                top_p: 1.0,
                seed: 0,
                stop_tokens: Vec::new(),
            },
            idempotency_key: None,
            context_parallel: 0,
            created_unix_ms: now_unix_ms(),
            finished_unix_ms: Some(now_unix_ms()),
            tokens: Vec::new(),
            finish_reason: None,
            error: Some((tonic::Code::DataLoss as i32, msg.clone())),
            timings: Default::default(),
            fingerprint: None,
            ignore_eos: false,
            cache_bytes_per_rank: Vec::new(),
            cached_tokens: 0,
            no_context_cache: false,
            images: Vec::new(),
        };
        self.records.put(&lost)?;
        // Kept for inspection, out of the spool's way.
        let _ = std::fs::rename(&path, path.with_extension("tokens.damaged"));
        self.recovery.lost.push((id.to_string(), msg));
        Ok(())
    }

    fn prompt_path(&self, id: &str) -> PathBuf {
        self.spool.join(format!("{id}.tokens"))
    }

    pub fn spool_writer(&self, id: &str) -> Result<SpoolWriter> {
        let tmp = self.spool.join(format!("{id}.tokens.part"));
        let file = std::fs::File::create(&tmp)?;
        Ok(SpoolWriter {
            tmp,
            dest: self.prompt_path(id),
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            tokens: 0,
            hash: Xxh3::new(),
            images: None,
            image_hash: Xxh3::new(),
        })
    }

    /// Makes an upload a job: the prompt (with the record) goes into place, then the record
    /// (and its idempotency key) is committed. When the key already names a job, the upload
    /// is discarded and that job's id is returned instead.
    pub fn commit(&self, record: &JobRecord, mut spool: SpoolWriter) -> Result<Result<(), String>> {
        if let Some(key) = &record.idempotency_key
            && let Some(existing) = self.records.lookup_key(key)?
        {
            return Ok(Err(existing));
        }
        if let Err(e) = spool.finish(record) {
            // Neither half of the upload may stay behind: no record will own it.
            let _ = std::fs::remove_file(&spool.tmp);
            let _ = std::fs::remove_file(&spool.dest);
            return Err(e);
        }
        let done = self.records.commit(record);
        match &done {
            // The key names another job: this upload is not a job.
            Ok(Err(_)) => {
                let _ = std::fs::remove_file(self.prompt_path(&record.id));
            }
            Ok(Ok(())) => {}
            // Unknown outcome (a remote store may have applied it before failing to answer):
            // the prompt stays; the next start matches it to its record or recovers the job.
            Err(e) => {
                tracing::warn!(job = %record.id, error = %e, "committing a job failed; its prompt stays in the spool")
            }
        }
        done
    }

    pub fn lookup_key(&self, key: &str) -> Result<Option<String>> {
        self.records.lookup_key(key)
    }

    pub fn put(&self, record: &JobRecord) -> Result<()> {
        self.records.put(record)
    }

    pub fn get(&self, id: &str) -> Result<Option<JobRecord>> {
        self.records.get(id)
    }

    /// Every record, oldest first (ids are time-ordered).
    pub fn all(&self) -> Result<Vec<JobRecord>> {
        self.records.all()
    }

    /// The spooled prompt of job `rec`, verified against its checksum and against the tokens
    /// and images its record says it has: DATA_LOSS, never another prompt.
    pub fn read_prompt(&self, rec: &JobRecord) -> Result<Prompt> {
        let id = &rec.id;
        let lost =
            |why: String| JobError::DataLoss(format!("the prompt of job {id} is lost: {why}"));
        let s = read_spool(&self.prompt_path(id)).map_err(lost)?;
        if let Some(r) = &s.record
            && (&r.id != id || r.spooled_tokens() != s.tokens.len() as u64)
        {
            return Err(lost(format!(
                "its spool file holds job {}'s {} tokens",
                r.id,
                r.spooled_tokens()
            )));
        }
        let tokens = rec.spooled_tokens();
        if s.tokens.len() as u64 != tokens {
            return Err(lost(format!(
                "its spool file has {} tokens, the record says {tokens}",
                s.tokens.len()
            )));
        }
        let held: Vec<u64> = s.images.iter().map(|i| i.len() as u64).collect();
        let said: Vec<u64> = rec.images.iter().map(|i| i.bytes).collect();
        if held != said {
            return Err(lost(format!(
                "its spool file has images of {held:?} bytes, the record says {said:?}"
            )));
        }
        Ok(Prompt {
            tokens: s.tokens,
            images: s.images,
        })
    }

    /// Removes a finished job's prompt, then its record and key (in that order: a crash
    /// between leaves a finished record, never a spooled job without one).
    pub fn delete(&self, record: &JobRecord) -> Result<()> {
        match std::fs::remove_file(self.prompt_path(&record.id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        self.records.delete(record)
    }
}

impl RecordBackend for RedbRecords {
    fn commit(&self, record: &JobRecord) -> Result<Result<(), String>> {
        unpanicked(|| self.commit_tx(record))
    }

    fn lookup_key(&self, key: &str) -> Result<Option<String>> {
        unpanicked(|| {
            let tx = self.db.begin_read()?;
            let t = tx.open_table(IDEMPOTENCY)?;
            Ok(t.get(key)?.map(|v| v.value().to_string()))
        })
    }

    fn put(&self, record: &JobRecord) -> Result<()> {
        unpanicked(|| {
            let tx = self.db.begin_write()?;
            {
                let mut jobs = tx.open_table(JOBS)?;
                jobs.insert(record.id.as_str(), serde_json::to_vec(record)?.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn get(&self, id: &str) -> Result<Option<JobRecord>> {
        unpanicked(|| {
            let tx = self.db.begin_read()?;
            let t = tx.open_table(JOBS)?;
            match t.get(id)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
                None => Ok(None),
            }
        })
    }

    fn all(&self) -> Result<Vec<JobRecord>> {
        unpanicked(|| self.all_tx())
    }

    fn delete(&self, record: &JobRecord) -> Result<()> {
        unpanicked(|| {
            let tx = self.db.begin_write()?;
            {
                tx.open_table(JOBS)?.remove(record.id.as_str())?;
                if let Some(key) = &record.idempotency_key {
                    tx.open_table(IDEMPOTENCY)?.remove(key.as_str())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }
}

impl RedbRecords {
    fn commit_tx(&self, record: &JobRecord) -> Result<Result<(), String>> {
        let tx = self.db.begin_write()?;
        let existing = match &record.idempotency_key {
            Some(key) => {
                let mut idem = tx.open_table(IDEMPOTENCY)?;
                let found = idem.get(key.as_str())?.map(|v| v.value().to_string());
                if found.is_none() {
                    idem.insert(key.as_str(), record.id.as_str())?;
                }
                found
            }
            None => None,
        };
        if let Some(existing) = existing {
            tx.abort()?;
            return Ok(Err(existing));
        }
        {
            let mut jobs = tx.open_table(JOBS)?;
            jobs.insert(record.id.as_str(), serde_json::to_vec(record)?.as_slice())?;
        }
        tx.commit()?;
        Ok(Ok(()))
    }

    fn all_tx(&self) -> Result<Vec<JobRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(JOBS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            match serde_json::from_slice(v.value()) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::error!(job = %k.value(), error = %e, "a job record does not parse")
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Sampling, Timings};

    fn record(id: &str, prompt: &[u32], key: Option<&str>) -> JobRecord {
        JobRecord {
            id: id.into(),
            state: JobState::Queued,
            prompt_tokens: prompt.len() as u64,
            max_new_tokens: 7,
            sampling: Sampling {
                temperature: 0.5,
                top_p: 0.9,
                seed: 3,
                stop_tokens: vec![2],
            },
            idempotency_key: key.map(Into::into),
            context_parallel: 0,
            created_unix_ms: 1,
            finished_unix_ms: None,
            tokens: Vec::new(),
            finish_reason: None,
            error: None,
            timings: Timings::default(),
            fingerprint: Some(42),
            ignore_eos: false,
            cache_bytes_per_rank: Vec::new(),
            cached_tokens: 0,
            no_context_cache: false,
            images: Vec::new(),
        }
    }

    /// Accepts three jobs (the second finished, the third with two images that arrived
    /// between its tokens) into a store in `dir`.
    fn accept_jobs(dir: &Path) -> Vec<(JobRecord, Prompt)> {
        let store = JobStore::open(dir).unwrap();
        assert!(store.recovery().is_clean());
        let mut out = Vec::new();
        for (i, key) in [(0u32, Some("k0")), (1, None), (2, Some("k2"))] {
            let id = format!("0000000{i}-job");
            let tokens: Vec<u32> = (0..1000 + i).map(|t| t * 7 + i).collect();
            let images: Vec<Vec<u8>> = match i {
                2 => vec![(0..333u32).map(|b| b as u8).collect(), vec![9; 5]],
                _ => Vec::new(),
            };
            let mut w = store.spool_writer(&id).unwrap();
            w.write(&tokens[..500]).unwrap();
            for img in &images {
                w.write_image(img).unwrap();
            }
            w.write(&tokens[500..]).unwrap();
            let mut rec = record(&id, &tokens, key);
            for img in &images {
                rec.images.push(crate::record::ImageInfo {
                    bytes: img.len() as u64,
                    width: 2,
                    height: 3,
                    features: 40,
                });
                rec.prompt_tokens += 39;
            }
            assert_eq!(rec.spooled_tokens(), tokens.len() as u64);
            store.commit(&rec, w).unwrap().unwrap();
            let prompt = Prompt { tokens, images };
            if i == 1 {
                store
                    .put(&JobRecord {
                        state: JobState::Succeeded,
                        tokens: vec![5, 6],
                        finished_unix_ms: Some(2),
                        ..rec.clone()
                    })
                    .unwrap();
            }
            out.push((rec, prompt));
        }
        out
    }

    fn spool_file(dir: &Path, id: &str) -> PathBuf {
        dir.join("spool").join(format!("{id}.tokens"))
    }

    #[test]
    fn a_lost_emptied_or_damaged_job_database_is_rebuilt_from_the_spool() {
        for damage in [
            "deleted",
            "emptied",
            "garbage in the middle",
            "garbage everywhere",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let jobs = accept_jobs(dir.path());
            let db = dir.path().join("jobs.redb");
            let len = std::fs::metadata(&db).unwrap().len() as usize;
            match damage {
                "deleted" => std::fs::remove_file(&db).unwrap(),
                "emptied" => std::fs::write(&db, b"").unwrap(),
                "garbage in the middle" => {
                    let mut bytes = std::fs::read(&db).unwrap();
                    for b in &mut bytes[len / 4..len * 3 / 4] {
                        *b = 0xA5;
                    }
                    std::fs::write(&db, bytes).unwrap();
                }
                _ => std::fs::write(&db, vec![0x5Au8; len]).unwrap(),
            }
            let store = JobStore::open(dir.path()).unwrap();
            let r = store.recovery().clone();
            assert!(!r.is_clean(), "{damage}: damage went unnoticed");
            assert!(r.lost.is_empty(), "{damage}: {r:?}");
            for (rec, prompt) in &jobs {
                let got = store
                    .get(&rec.id)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{damage}: job {} forgotten ({r:?})", rec.id));
                // Either its record survived, or it was re-created from the spool, queued.
                if r.recovered.contains(&rec.id) {
                    assert_eq!(got, *rec, "{damage}");
                }
                assert_eq!(store.read_prompt(rec).unwrap(), *prompt, "{damage}");
                if let Some(k) = &rec.idempotency_key {
                    assert_eq!(
                        store.lookup_key(k).unwrap().as_deref(),
                        Some(rec.id.as_str())
                    );
                }
            }
            // Opened again: nothing more to do.
            drop(store);
            let again = JobStore::open(dir.path()).unwrap();
            assert!(again.recovery().recovered.is_empty(), "{damage}");
        }
    }

    #[test]
    fn a_database_held_by_another_process_is_refused_never_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = accept_jobs(dir.path());
        let first = JobStore::open(dir.path()).unwrap();
        // A second server on the same data directory (redb's lock says so).
        let err = JobStore::open(dir.path()).err().expect("refused");
        assert!(
            err.to_string().contains("cannot open the job database"),
            "{err}"
        );
        assert!(
            !std::fs::read_dir(dir.path())
                .unwrap()
                .any(|e| { e.unwrap().file_name().to_string_lossy().contains("damaged") })
        );
        assert!(first.get(&jobs[0].0.id).unwrap().is_some());
    }

    #[test]
    fn a_prompts_images_are_spooled_after_its_tokens_and_in_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        let hash = |images: &[&[u8]]| {
            let mut w = store.spool_writer("hash").unwrap();
            w.write(&[1, 2, 3]).unwrap();
            for img in images {
                w.write_image(img).unwrap();
            }
            w.prompt_hash()
        };
        // Images change the hash (a retry must send the same ones); none leaves it as it was.
        let mut plain = store.spool_writer("plain").unwrap();
        plain.write(&[1, 2, 3]).unwrap();
        assert_eq!(hash(&[]), plain.prompt_hash());
        assert_ne!(hash(&[b"ab"]), hash(&[]));
        assert_ne!(hash(&[b"ab"]), hash(&[b"a", b"b"]));
        assert_ne!(hash(&[b"ab"]), hash(&[b"ac"]));
        drop(plain);
        // A writer dropped before commit leaves nothing behind, its images' file included.
        let spool: Vec<_> = std::fs::read_dir(dir.path().join("spool"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(spool.is_empty(), "{spool:?}");
        drop(store);
        let jobs = accept_jobs(dir.path());
        let store = JobStore::open(dir.path()).unwrap();
        let (rec, prompt) = &jobs[2];
        assert_eq!(store.read_prompt(rec).unwrap(), *prompt);
        // A record that says other image sizes is refused.
        let mut other = rec.clone();
        other.images[0].bytes -= 4;
        other.images[1].bytes += 4;
        match store.read_prompt(&other) {
            Err(JobError::DataLoss(m)) => assert!(m.contains("images"), "{m}"),
            other => panic!("want DATA_LOSS, got {other:?}"),
        }
        // A flipped byte in an image is caught by the checksum.
        let path = spool_file(dir.path(), &rec.id);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[prompt.tokens.len() * 4 + 100] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        match store.read_prompt(rec) {
            Err(JobError::DataLoss(m)) => assert!(m.contains("checksum"), "{m}"),
            other => panic!("want DATA_LOSS, got {other:?}"),
        }
    }

    #[test]
    fn a_damaged_spool_file_is_data_loss_never_other_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = accept_jobs(dir.path());
        let (rec, _) = &jobs[0];
        // Zero some tokens in the middle of the prompt.
        let path = spool_file(dir.path(), &rec.id);
        let mut bytes = std::fs::read(&path).unwrap();
        for b in &mut bytes[400..440] {
            *b = 0;
        }
        std::fs::write(&path, &bytes).unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        match store.read_prompt(rec) {
            Err(JobError::DataLoss(m)) => assert!(m.contains("checksum"), "{m}"),
            other => panic!("want DATA_LOSS, got {other:?}"),
        }
        // Truncated, and gone: the same.
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(store.read_prompt(rec), Err(JobError::DataLoss(_))));
        std::fs::remove_file(&path).unwrap();
        match store.read_prompt(rec) {
            Err(JobError::DataLoss(m)) => assert!(m.contains(&rec.id), "{m}"),
            other => panic!("want DATA_LOSS, got {other:?}"),
        }
    }

    #[test]
    fn a_job_with_neither_record_nor_sound_spool_file_is_reported_lost() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = accept_jobs(dir.path());
        let (rec, _) = &jobs[2];
        let path = spool_file(dir.path(), &rec.id);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        std::fs::remove_file(dir.path().join("jobs.redb")).unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        let r = store.recovery();
        assert_eq!(r.recovered.len(), 2, "{r:?}");
        assert_eq!(r.lost.len(), 1, "{r:?}");
        let lost = store
            .get(&rec.id)
            .unwrap()
            .expect("a record says it is lost");
        assert_eq!(lost.state, JobState::Failed);
        let (code, msg) = lost.error.unwrap();
        assert_eq!(code, tonic::Code::DataLoss as i32);
        assert!(msg.contains("checksum") && msg.contains(&rec.id), "{msg}");
        // The damaged file is kept aside, out of the spool's way.
        assert!(!path.exists());
        assert!(path.with_extension("tokens.damaged").exists());
    }

    #[test]
    fn expiry_removes_the_prompt_before_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = accept_jobs(dir.path());
        let store = JobStore::open(dir.path()).unwrap();
        let done = store.get(&jobs[1].0.id).unwrap().unwrap();
        store.delete(&done).unwrap();
        assert!(!spool_file(dir.path(), &done.id).exists());
        assert!(store.get(&done.id).unwrap().is_none());
        drop(store);
        // A finished job is not resurrected by a later start.
        let store = JobStore::open(dir.path()).unwrap();
        assert!(store.recovery().is_clean());
        assert!(store.get(&done.id).unwrap().is_none());
    }
}
