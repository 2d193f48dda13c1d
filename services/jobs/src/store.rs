//! Durable state: job records (in an embedded database under `--data-dir`, or in a cluster's
//! etcd through a [`RecordBackend`]) and prompts in a spool directory under `--data-dir`. A
//! prompt is on disk (fsynced, renamed into place) before its record is committed, and the
//! record is committed before the client hears the job id.

use crate::error::{JobError, Result};
use crate::record::JobRecord;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");

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
    /// Every record, oldest first (ids are time-ordered).
    fn all(&self) -> Result<Vec<JobRecord>>;
    /// Removes a record and its idempotency key.
    fn delete(&self, record: &JobRecord) -> Result<()>;
}

/// Records in an embedded database (redb): standalone.
pub struct RedbRecords {
    db: Database,
}

pub struct JobStore {
    records: Box<dyn RecordBackend>,
    spool: PathBuf,
}

/// A prompt being uploaded: a temporary spool file, removed unless committed.
pub struct SpoolWriter {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<BufWriter<std::fs::File>>,
    tokens: u64,
}

impl SpoolWriter {
    pub fn write(&mut self, ids: &[u32]) -> Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| JobError::Store("spool file closed".into()))?;
        for id in ids {
            f.write_all(&id.to_le_bytes())?;
        }
        self.tokens += ids.len() as u64;
        Ok(())
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Flushes, fsyncs and moves the file into place.
    fn finish(&mut self) -> Result<()> {
        let f = self
            .file
            .take()
            .ok_or_else(|| JobError::Store("spool file closed".into()))?;
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
    }
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
}

impl JobStore {
    /// Records in `data_dir/jobs.redb`, prompts in `data_dir/spool`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let records = RedbRecords::open(&data_dir.join("jobs.redb"))?;
        Self::with_records(data_dir, Box::new(records))
    }

    /// Records in `records`, prompts in `data_dir/spool`.
    pub fn with_records(data_dir: &Path, records: Box<dyn RecordBackend>) -> Result<Self> {
        let spool = data_dir.join("spool");
        std::fs::create_dir_all(&spool)?;
        // Uploads that never committed (a crash mid-upload) leave .part files: no job owns them.
        for e in std::fs::read_dir(&spool)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "part") {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(JobStore { records, spool })
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
        })
    }

    /// Makes an upload a job: the prompt goes into place, then the record (and its idempotency
    /// key) is committed. When the key already names a job, the upload is discarded and that
    /// job's id is returned instead.
    pub fn commit(&self, record: &JobRecord, mut spool: SpoolWriter) -> Result<Result<(), String>> {
        if let Some(key) = &record.idempotency_key
            && let Some(existing) = self.records.lookup_key(key)?
        {
            return Ok(Err(existing));
        }
        spool.finish()?;
        let done = self.records.commit(record);
        if !matches!(done, Ok(Ok(()))) {
            let _ = std::fs::remove_file(self.prompt_path(&record.id));
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

    /// The spooled prompt of job `id`.
    pub fn read_prompt(&self, id: &str) -> Result<Vec<u32>> {
        let mut bytes = Vec::new();
        std::fs::File::open(self.prompt_path(id))
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| JobError::Store(format!("prompt of job {id}: {e}")))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Removes a finished job's record, key and prompt.
    pub fn delete(&self, record: &JobRecord) -> Result<()> {
        self.records.delete(record)?;
        let _ = std::fs::remove_file(self.prompt_path(&record.id));
        Ok(())
    }
}

impl RecordBackend for RedbRecords {
    fn commit(&self, record: &JobRecord) -> Result<Result<(), String>> {
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

    fn lookup_key(&self, key: &str) -> Result<Option<String>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(IDEMPOTENCY)?;
        Ok(t.get(key)?.map(|v| v.value().to_string()))
    }

    fn put(&self, record: &JobRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut jobs = tx.open_table(JOBS)?;
            jobs.insert(record.id.as_str(), serde_json::to_vec(record)?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<JobRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(JOBS)?;
        match t.get(id)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    fn all(&self) -> Result<Vec<JobRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(JOBS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (_, v) = item?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    fn delete(&self, record: &JobRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            tx.open_table(JOBS)?.remove(record.id.as_str())?;
            if let Some(key) = &record.idempotency_key {
                tx.open_table(IDEMPOTENCY)?.remove(key.as_str())?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}
