//! The context cache: what a prefill computed, kept by the prompt's token prefix, so that a new
//! job sharing a cached prefix starts its prefill at the longest cached boundary.
//!
//! Prompts are cut into blocks of the prefill chunk; block `i`'s key hashes the key of block
//! `i - 1` and the block's tokens (a hash chain, rooted in the model, its backend and the chunk
//! size), so a key names a whole prefix. An entry holds one block's contribution: the softmax
//! layers' keys and values of its positions and every lightning layer's state at its end (a
//! fixed size, whatever the prefix). Restoring a prefix of `k` blocks takes the keys and values
//! of blocks `1..=k` and the lightning states of block `k`; the prefill then resumes at a
//! boundary the cold run also crosses, with the same chunks after it, so the results are the
//! same bit for bit.
//!
//! Memory is bounded (`budget` bytes); the least recently used entries that no restore is
//! reading are evicted whole (a prefix's deeper blocks before its shallower ones). With a spill
//! directory, evicted entries go to disk (one file each, checksummed) and come back on a hit; a
//! damaged or truncated file is a miss, never a wrong answer. A thread of their own writes them,
//! so that an eviction does not wait for the disk, while at most a quarter of the budget waits
//! for it (beyond that the evicting thread writes).
//!
//! A context-parallel group keeps its prefix differently: each rank keeps its own share (its
//! keys and values; the decoding rank also every lightning state) under [`share_key`].

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One block's contribution to a prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// The block's tokens (a hit is checked against them, not only the hash).
    pub tokens: Vec<u32>,
    /// Each lightning layer's state at the block's end, in layer order.
    pub lightning: Vec<Vec<f32>>,
    /// Each softmax layer's keys and values of the block's positions, in layer order.
    pub kv: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Block {
    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        let floats: usize = self.lightning.iter().map(Vec::len).sum::<usize>()
            + self
                .kv
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        floats * 4 + self.tokens.len() * 4
    }
}

/// Names a prefix: the hash chain's value after its last block.
pub type Key = u128;

/// The key of the empty prefix for a model identified by `fingerprint` (its weights, config,
/// backend: whatever changes the arithmetic) prefilled in chunks of `chunk`.
pub fn root(fingerprint: &[u8], chunk: usize) -> Key {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(b"ringbolt context cache v1");
    h.update(&(chunk as u64).to_le_bytes());
    h.update(fingerprint);
    h.digest128()
}

/// The root of prompts whose embeddings are replaced at some positions (images' features):
/// `root` salted with every replacement's position and values, so that their blocks are shared
/// only with prompts that have the same rows at the same positions (token ids alone do not say
/// which image a placeholder stands for).
pub fn embeddings_root(root: Key, embeddings: &[(usize, Vec<f32>)]) -> Key {
    if embeddings.is_empty() {
        return root;
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(b"replaced embeddings");
    h.update(&root.to_le_bytes());
    let mut buf = Vec::with_capacity(4 << 10);
    for (pos, rows) in embeddings {
        h.update(&(*pos as u64).to_le_bytes());
        h.update(&(rows.len() as u64).to_le_bytes());
        for part in rows.chunks(1 << 10) {
            buf.clear();
            buf.extend(part.iter().flat_map(|v| v.to_le_bytes()));
            h.update(&buf);
        }
    }
    h.digest128()
}

/// The key of `parent`'s prefix followed by `tokens`.
pub fn key(parent: Key, tokens: &[u32]) -> Key {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&parent.to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.digest128()
}

/// The keys of `prompt`'s prefixes of whole blocks of `chunk` from `root` that end at most at
/// `max`: `(end, key)`, shortest first.
pub fn prefix_keys(root: Key, prompt: &[u32], chunk: usize, max: usize) -> Vec<(usize, Key)> {
    let chunk = chunk.max(1);
    let mut k = root;
    prompt[..max.min(prompt.len())]
        .chunks_exact(chunk)
        .enumerate()
        .map(|(i, block)| {
            k = key(k, block);
            ((i + 1) * chunk, k)
        })
        .collect()
}

/// The key of rank `rank`'s share, in a context-parallel group of `ranks`, of prefix `prefix`
/// (see [`ContextCache::share`]).
pub fn share_key(prefix: Key, ranks: usize, rank: usize) -> Key {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(b"context-parallel share");
    h.update(&prefix.to_le_bytes());
    h.update(&(ranks as u64).to_le_bytes());
    h.update(&(rank as u64).to_le_bytes());
    h.digest128()
}

/// What the cache has done, for metrics and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Tokens jobs did not prefill because the cache had them.
    pub hit_tokens: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub entries: u64,
    /// Entries spilled to disk, and their bytes.
    pub spilled: u64,
    pub spilled_bytes: u64,
    /// Spill files that failed their checks (dropped as misses).
    pub corrupt: u64,
}

struct Entry {
    block: Arc<Block>,
    parent: Key,
    bytes: usize,
    last_use: u64,
}

struct Spilled {
    path: PathBuf,
    bytes: u64,
    last_use: u64,
}

/// An evicted entry on its way to the spill directory (still readable meanwhile).
struct Pending {
    parent: Key,
    block: Arc<Block>,
    bytes: usize,
    last_use: u64,
}

impl Inner {
    fn take_pending(&mut self, k: Key) -> Option<Pending> {
        let p = self.pending.remove(&k)?;
        self.pending_bytes -= p.bytes;
        Some(p)
    }
}

struct Inner {
    entries: HashMap<Key, Entry>,
    /// Evicted entries the spill writer has not written yet, and their bytes.
    pending: HashMap<Key, Pending>,
    pending_bytes: usize,
    disk: HashMap<Key, Spilled>,
    bytes: usize,
    disk_bytes: u64,
    clock: u64,
    stats: CacheStats,
}

/// See the module's docs. Shared by the engine's threads; cheap to clone.
#[derive(Clone)]
pub struct ContextCache {
    inner: Arc<Mutex<Inner>>,
    budget: usize,
    /// Where evicted entries go (None: they are dropped).
    disk: Option<Arc<Disk>>,
    /// The thread that writes them, so that an eviction never waits for the disk.
    spiller: Option<Arc<Spiller>>,
}

/// The spill directory and the most bytes of files kept there.
struct Disk {
    dir: PathBuf,
    budget: u64,
}

enum SpillJob {
    Write(Key),
    /// Answered once every job sent before it is done.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The spill writer thread's mailbox; dropping the last handle lets the thread finish what
/// it was sent and waits for it.
struct Spiller {
    tx: Mutex<Option<std::sync::mpsc::SyncSender<SpillJob>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Evictions queued for the spill writer at most; beyond them the evicting thread writes.
const SPILL_QUEUE: usize = 8;

impl Spiller {
    fn start(inner: Arc<Mutex<Inner>>, disk: Arc<Disk>) -> Option<Spiller> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<SpillJob>(SPILL_QUEUE);
        let thread = std::thread::Builder::new()
            .name("context-cache-spill".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        SpillJob::Write(k) => write_spill(&inner, &disk, k),
                        SpillJob::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .map_err(|e| tracing::warn!(error = %e, "no context cache spill thread: evictions write their files themselves"))
            .ok()?;
        Some(Spiller {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn sender(&self) -> Option<std::sync::mpsc::SyncSender<SpillJob>> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Spiller {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

fn lock_inner(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes pending entry `k` to its spill file and notes it on disk, dropping the oldest files
/// beyond the disk budget. An entry that went back to memory meanwhile keeps no file.
fn write_spill(inner: &Mutex<Inner>, disk: &Disk, k: Key) {
    let Some((parent, block, last_use)) = lock_inner(inner)
        .pending
        .get(&k)
        .map(|p| (p.parent, p.block.clone(), p.last_use))
    else {
        return;
    };
    let path = disk.dir.join(format!("{k:032x}.ctx"));
    let body = encode(k, parent, &block);
    drop(block);
    let tmp = path.with_extension("tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&body))
        .and_then(|_| std::fs::rename(&tmp, &path));
    let mut g = lock_inner(inner);
    let still_evicted = g.take_pending(k).is_some();
    if let Err(err) = written {
        drop(g);
        tracing::warn!(file = %path.display(), error = %err, "cannot spill a context cache entry");
        let _ = std::fs::remove_file(&tmp);
        return;
    }
    if !still_evicted {
        // Back in memory: no file, unless an older spill of the same entry is noted (the
        // same key, the same bytes: the file just written is it).
        let noted = g.disk.contains_key(&k);
        drop(g);
        if !noted {
            let _ = std::fs::remove_file(&path);
        }
        return;
    }
    g.disk_bytes += body.len() as u64;
    if let Some(old) = g.disk.insert(
        k,
        Spilled {
            path,
            bytes: body.len() as u64,
            last_use,
        },
    ) {
        g.disk_bytes -= old.bytes;
    }
    while g.disk_bytes > disk.budget {
        let Some((&oldest, _)) = g.disk.iter().min_by_key(|(_, s)| s.last_use) else {
            break;
        };
        if let Some(s) = g.disk.remove(&oldest) {
            g.disk_bytes -= s.bytes;
            let _ = std::fs::remove_file(&s.path);
        }
    }
}

/// Spill files hold `MAGIC`, a version, then the entry; the last 16 bytes are the xxh3-128 of
/// everything before them.
const MAGIC: &[u8; 8] = b"RBCTXv01";

/// Disk kept for spilled entries, as a multiple of the memory budget.
const DISK_BUDGET_FACTOR: u64 = 4;

impl ContextCache {
    /// A cache of at most `budget` bytes in memory; with `dir`, evicted entries spill there
    /// (at most 4 × `budget` bytes of files; files a previous run left are used too).
    pub fn new(budget: usize, dir: Option<&Path>) -> std::io::Result<ContextCache> {
        let mut disk = HashMap::new();
        let mut disk_bytes = 0;
        if let Some(d) = dir {
            std::fs::create_dir_all(d)?;
            for e in std::fs::read_dir(d)?.flatten() {
                let name = e.file_name();
                // A spill a crash cut short.
                if name.to_str().is_some_and(|n| n.ends_with(".tmp")) {
                    let _ = std::fs::remove_file(e.path());
                    continue;
                }
                let Some(k) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".ctx"))
                    .and_then(|n| Key::from_str_radix(n, 16).ok())
                else {
                    continue;
                };
                let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                disk_bytes += bytes;
                disk.insert(
                    k,
                    Spilled {
                        path: e.path(),
                        bytes,
                        last_use: 0,
                    },
                );
            }
        }
        let inner = Arc::new(Mutex::new(Inner {
            entries: HashMap::new(),
            pending: HashMap::new(),
            pending_bytes: 0,
            disk,
            bytes: 0,
            disk_bytes,
            clock: 0,
            stats: CacheStats::default(),
        }));
        let disk = dir.map(|d| {
            Arc::new(Disk {
                dir: d.to_path_buf(),
                budget: budget as u64 * DISK_BUDGET_FACTOR,
            })
        });
        let disk_budget = disk.as_ref().map_or(0, |d| d.budget);
        let spiller = disk
            .clone()
            .and_then(|d| Spiller::start(inner.clone(), d))
            .map(Arc::new);
        let cache = ContextCache {
            inner,
            budget,
            disk,
            spiller,
        };
        {
            // Files a previous run left beyond today's disk budget: the oldest go.
            let mut g = cache.lock();
            if g.disk_bytes > disk_budget {
                let mut files: Vec<(std::time::SystemTime, Key)> = g
                    .disk
                    .iter()
                    .map(|(k, s)| {
                        let t = std::fs::metadata(&s.path)
                            .and_then(|m| m.modified())
                            .unwrap_or(std::time::UNIX_EPOCH);
                        (t, *k)
                    })
                    .collect();
                files.sort_unstable();
                for (_, k) in files {
                    if g.disk_bytes <= disk_budget {
                        break;
                    }
                    if let Some(s) = g.disk.remove(&k) {
                        g.disk_bytes -= s.bytes;
                        let _ = std::fs::remove_file(&s.path);
                    }
                }
            }
        }
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock_inner(&self.inner)
    }

    /// Waits until every eviction so far is written to the spill directory.
    pub fn flush(&self) {
        let Some(tx) = self.spiller.as_ref().and_then(|s| s.sender()) else {
            return;
        };
        let (done, wait) = std::sync::mpsc::channel();
        if tx.send(SpillJob::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    pub fn stats(&self) -> CacheStats {
        let g = self.lock();
        CacheStats {
            bytes: g.bytes as u64,
            entries: g.entries.len() as u64,
            // Those on their way count.
            spilled: (g.disk.len() + g.pending.len()) as u64,
            spilled_bytes: g.disk_bytes,
            ..g.stats
        }
    }

    /// Whether prefix `k` is cached (in memory or spilled).
    pub fn contains(&self, k: Key) -> bool {
        let g = self.lock();
        g.entries.contains_key(&k) || g.pending.contains_key(&k) || g.disk.contains_key(&k)
    }

    /// The blocks of the longest cached prefix of `prompt` that ends before its last token
    /// (the last chunk must still run, for its logits), cut in blocks of `chunk` from `root`.
    /// Counts a hit or a miss.
    pub fn lookup(&self, root: Key, prompt: &[u32], chunk: usize) -> Vec<Arc<Block>> {
        let mut out = Vec::new();
        let mut parent = root;
        let mut end = chunk;
        while end < prompt.len() {
            let tokens = &prompt[end - chunk..end];
            let k = key(parent, tokens);
            match self.get(k, parent) {
                Some(b) if b.tokens == tokens => out.push(b),
                _ => break,
            }
            parent = k;
            end += chunk;
        }
        {
            let mut g = self.lock();
            // The prefix's shallower blocks are used more recently than its deeper ones, so
            // that eviction takes a chain from its end.
            let mut k = root;
            let mut keys = Vec::with_capacity(out.len());
            for b in &out {
                k = key(k, &b.tokens);
                keys.push(k);
            }
            for k in keys.iter().rev() {
                g.clock += 1;
                let now = g.clock;
                if let Some(e) = g.entries.get_mut(k) {
                    e.last_use = now;
                }
            }
        }
        self.count_lookup(out.len() * chunk);
        out
    }

    /// Whether rank `rank`'s share, in a context-parallel group of `ranks`, of prefix
    /// `prefix` is cached (in memory or spilled; not yet checked).
    pub fn has_share(&self, prefix: Key, ranks: usize, rank: usize) -> bool {
        self.contains(share_key(prefix, ranks, rank))
    }

    /// Rank `rank`'s share, in a context-parallel group of `ranks`, of prefix `prefix` (the
    /// prompt's first `tokens`), from memory or read back and checked from its spill file.
    pub fn share(
        &self,
        prefix: Key,
        ranks: usize,
        rank: usize,
        tokens: &[u32],
    ) -> Option<Arc<Block>> {
        self.get(share_key(prefix, ranks, rank), prefix)
            .filter(|b| b.tokens == tokens)
    }

    /// Keeps rank `rank`'s share, in a context-parallel group of `ranks`, of prefix `prefix`
    /// (see [`Model::share_block`](crate::Model::share_block)). Whether it was kept.
    pub fn insert_share(&self, prefix: Key, ranks: usize, rank: usize, block: Block) -> bool {
        self.put(share_key(prefix, ranks, rank), prefix, Arc::new(block))
    }

    /// Counts one lookup: a hit of `tokens` cached tokens, or a miss (0).
    pub fn count_lookup(&self, tokens: usize) {
        let mut g = self.lock();
        if tokens == 0 {
            g.stats.misses += 1;
            metrics::counter!("ringbolt_context_cache_misses_total").increment(1);
        } else {
            g.stats.hits += 1;
            g.stats.hit_tokens += tokens as u64;
            metrics::counter!("ringbolt_context_cache_hits_total").increment(1);
            metrics::counter!("ringbolt_context_cache_hit_tokens_total").increment(tokens as u64);
        }
    }

    /// Entry `k` (the block after `parent`) from memory, or read back from its spill file.
    fn get(&self, k: Key, parent: Key) -> Option<Arc<Block>> {
        let spilled = {
            let g = self.lock();
            if let Some(e) = g.entries.get(&k) {
                return (e.parent == parent).then(|| e.block.clone());
            }
            if let Some(p) = g.pending.get(&k) {
                // Not written yet: back to memory (the writer then keeps no file).
                if p.parent != parent {
                    return None;
                }
                let block = p.block.clone();
                drop(g);
                if self.put(k, parent, block.clone()) {
                    self.lock().take_pending(k);
                }
                return Some(block);
            }
            g.disk.get(&k)?.path.clone()
        };
        let Some(block) = read_spill(&spilled, k, parent) else {
            let mut g = self.lock();
            if let Some(s) = g.disk.remove(&k) {
                g.disk_bytes = g.disk_bytes.saturating_sub(s.bytes);
            }
            g.stats.corrupt += 1;
            drop(g);
            tracing::warn!(file = %spilled.display(), "a context cache spill file failed its checks: dropped");
            let _ = std::fs::remove_file(&spilled);
            return None;
        };
        let block = Arc::new(block);
        // Back in memory: the file goes (if it does not fit, the file stays for next time).
        if self.put(k, parent, block.clone()) {
            let mut g = self.lock();
            if let Some(s) = g.disk.remove(&k) {
                g.disk_bytes = g.disk_bytes.saturating_sub(s.bytes);
                let _ = std::fs::remove_file(&s.path);
            }
        }
        Some(block)
    }

    /// Keeps `block`, the block after prefix `parent`, as prefix `k` (evicting to stay within
    /// the budget; a block larger than the budget is not kept). Whether it was kept: a
    /// prefill adds no later block of a prompt once one is not (they could never be reached).
    pub fn insert(&self, k: Key, parent: Key, block: Block) -> bool {
        self.put(k, parent, Arc::new(block))
    }

    /// Whether a block of `bytes` could be kept at all (a caller skips copying one out
    /// otherwise).
    pub fn could_keep(&self, bytes: usize) -> bool {
        bytes <= self.budget
    }

    /// Keeps `block` as prefix `k` if room can be made for it: the least recently used entries
    /// go first, except those a restore is reading and `k`'s own ancestors (a prefix is only
    /// usable whole, so a long prefill keeps its first blocks rather than its last). Nothing is
    /// evicted unless the block then fits. Whether it was kept.
    fn put(&self, k: Key, parent: Key, block: Arc<Block>) -> bool {
        let bytes = block.bytes();
        if bytes > self.budget {
            return false;
        }
        let mut evicted = Vec::new();
        let kept = {
            let mut g = self.lock();
            if g.entries.contains_key(&k) {
                return true;
            }
            // The block's ancestors in memory, nearest first.
            let mut chain = Vec::new();
            let mut a = parent;
            while let Some(e) = g.entries.get(&a) {
                if chain.contains(&a) {
                    break;
                }
                chain.push(a);
                a = e.parent;
            }
            let need = (g.bytes + bytes).saturating_sub(self.budget);
            let mut victims = Vec::new();
            if need > 0 {
                let ancestors: std::collections::HashSet<Key> = chain.iter().copied().collect();
                let mut candidates: Vec<(u64, Key, usize)> = g
                    .entries
                    .iter()
                    .filter(|(key, e)| {
                        Arc::strong_count(&e.block) == 1 && !ancestors.contains(*key)
                    })
                    .map(|(key, e)| (e.last_use, *key, e.bytes))
                    .collect();
                candidates.sort_unstable();
                let mut freed = 0;
                for (_, key, b) in candidates {
                    if freed >= need {
                        break;
                    }
                    freed += b;
                    victims.push(key);
                }
                if freed < need {
                    victims.clear();
                }
            }
            if need > 0 && victims.is_empty() {
                false
            } else {
                for v in victims {
                    if let Some(e) = g.entries.remove(&v) {
                        g.bytes -= e.bytes;
                        g.stats.evictions += 1;
                        evicted.push((v, e));
                    }
                }
                g.clock += 1;
                let last_use = g.clock;
                g.bytes += bytes;
                g.entries.insert(
                    k,
                    Entry {
                        block,
                        parent,
                        bytes,
                        last_use,
                    },
                );
                // Its ancestors are used more recently than it, the shallowest most: the LRU
                // order takes a prefix from its end.
                for a in chain {
                    g.clock += 1;
                    let now = g.clock;
                    if let Some(e) = g.entries.get_mut(&a) {
                        e.last_use = now;
                    }
                }
                true
            }
        };
        metrics::gauge!("ringbolt_context_cache_bytes").set(self.lock().bytes as f64);
        metrics::counter!("ringbolt_context_cache_evictions_total").increment(evicted.len() as u64);
        for (victim, e) in evicted {
            self.spill(victim, e);
        }
        kept
    }

    /// Sends an evicted entry to the spill directory (when there is one): the spill writer
    /// writes it, or this thread when the writer's queue is full.
    fn spill(&self, k: Key, e: Entry) {
        let Some(disk) = &self.disk else {
            return;
        };
        // What waits for the writer is memory beyond the budget: at most a quarter of it.
        let room = {
            let mut g = self.lock();
            let room = g.pending_bytes + e.bytes <= self.budget / 4;
            if let Some(old) = g.pending.insert(
                k,
                Pending {
                    parent: e.parent,
                    block: e.block,
                    bytes: e.bytes,
                    last_use: e.last_use,
                },
            ) {
                g.pending_bytes -= old.bytes;
            }
            g.pending_bytes += e.bytes;
            room
        };
        let queued = room
            && self
                .spiller
                .as_ref()
                .and_then(|s| s.sender())
                .is_some_and(|tx| tx.try_send(SpillJob::Write(k)).is_ok());
        if !queued {
            write_spill(&self.inner, disk, k);
        }
    }
}

fn put_u64(out: &mut Vec<u8>, x: u64) {
    out.extend_from_slice(&x.to_le_bytes());
}

fn put_floats(out: &mut Vec<u8>, v: &[f32]) {
    put_u64(out, v.len() as u64);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// A spill file's bytes.
fn encode(k: Key, parent: Key, b: &Block) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.bytes() + 128);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&k.to_le_bytes());
    out.extend_from_slice(&parent.to_le_bytes());
    put_u64(&mut out, b.tokens.len() as u64);
    for t in &b.tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    put_u64(&mut out, b.lightning.len() as u64);
    for s in &b.lightning {
        put_floats(&mut out, s);
    }
    put_u64(&mut out, b.kv.len() as u64);
    for (k, v) in &b.kv {
        put_floats(&mut out, k);
        put_floats(&mut out, v);
    }
    let sum = xxhash_rust::xxh3::xxh3_128(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Reads a spill file back: None unless it is whole, its checksum holds and it is entry `k`
/// after `parent`.
fn read_spill(path: &Path, k: Key, parent: Key) -> Option<Block> {
    let data = std::fs::read(path).ok()?;
    decode(&data, k, parent)
}

fn decode(data: &[u8], k: Key, parent: Key) -> Option<Block> {
    let (body, sum) = data.split_at_checked(data.len().checked_sub(16)?)?;
    if xxhash_rust::xxh3::xxh3_128(body) != u128::from_le_bytes(sum.try_into().ok()?) {
        return None;
    }
    let mut r = Reader(body);
    if r.take(8)? != MAGIC || r.u128()? != k || r.u128()? != parent {
        return None;
    }
    let n = r.len(4)?;
    let tokens = (0..n).map(|_| r.u32()).collect::<Option<Vec<_>>>()?;
    let n = r.len(8)?;
    let lightning = (0..n).map(|_| r.floats()).collect::<Option<Vec<_>>>()?;
    let n = r.len(16)?;
    let kv = (0..n)
        .map(|_| Some((r.floats()?, r.floats()?)))
        .collect::<Option<Vec<_>>>()?;
    r.0.is_empty().then_some(Block {
        tokens,
        lightning,
        kv,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = self.0.split_at_checked(n)?;
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u128(&mut self) -> Option<u128> {
        Some(u128::from_le_bytes(self.take(16)?.try_into().ok()?))
    }
    /// A count of items of at least `min_bytes` each that the rest can hold.
    fn len(&mut self, min_bytes: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n.checked_mul(min_bytes)? <= self.0.len()).then_some(n)
    }
    fn floats(&mut self) -> Option<Vec<f32>> {
        let n = self.len(4)?;
        let raw = self.take(n * 4)?;
        Some(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(tokens: &[u32], fill: f32, kv_len: usize) -> Block {
        Block {
            tokens: tokens.to_vec(),
            lightning: vec![vec![fill; 8], vec![fill + 1.0; 8]],
            kv: vec![(vec![fill; kv_len], vec![-fill; kv_len])],
        }
    }

    /// Caches the blocks of `prompt` in chunks of 2, as a prefill would.
    fn fill(c: &ContextCache, root: Key, prompt: &[u32]) {
        let mut parent = root;
        for (i, t) in prompt.chunks_exact(2).enumerate() {
            let k = key(parent, t);
            c.insert(k, parent, block(t, i as f32, 4));
            parent = k;
        }
    }

    #[test]
    fn the_longest_prefix_ending_before_the_last_token_is_found() {
        let c = ContextCache::new(1 << 20, None).unwrap();
        let r = root(b"model", 2);
        fill(&c, r, &[1, 2, 3, 4, 5, 6]);
        // Shares two blocks, then differs.
        let got = c.lookup(r, &[1, 2, 3, 4, 9, 9, 9], 2);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].tokens, vec![3, 4]);
        // The whole cached prompt: the last block must still run.
        assert_eq!(c.lookup(r, &[1, 2, 3, 4, 5, 6], 2).len(), 2);
        assert_eq!(c.lookup(r, &[1, 2, 3, 4, 5, 6, 7], 2).len(), 3);
        // Another chunk size or model is another root.
        assert!(
            c.lookup(root(b"model", 3), &[1, 2, 3, 4, 5, 6, 7], 3)
                .is_empty()
        );
        assert!(
            c.lookup(root(b"other", 2), &[1, 2, 3, 4, 5, 6, 7], 2)
                .is_empty()
        );
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.hit_tokens, s.entries), (3, 2, 14, 3));
    }

    #[test]
    fn the_budget_evicts_deepest_least_recent_first_and_spares_blocks_being_read() {
        let one = block(&[0, 0], 0.0, 4).bytes();
        let c = ContextCache::new(3 * one, None).unwrap();
        let r = root(b"m", 2);
        fill(&c, r, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(c.stats().entries, 3);
        // A fourth block (another prompt) evicts the least recently used: the first prompt's
        // deepest block, after a lookup touched the chain.
        c.lookup(r, &[1, 2, 3, 4, 5, 6, 7], 2);
        fill(&c, r, &[7, 8]);
        assert_eq!(c.stats().evictions, 1);
        assert_eq!(c.lookup(r, &[1, 2, 3, 4, 5, 6, 7], 2).len(), 2);
        // A block being read is not evicted.
        let held = c.lookup(r, &[1, 2, 3, 4, 0], 2);
        assert_eq!(held.len(), 2);
        fill(&c, r, &[9, 9, 8, 8]);
        assert_eq!(
            c.lookup(r, &[1, 2, 3, 4, 0], 2).len(),
            2,
            "held blocks stayed"
        );
        drop(held);
        // Larger than the whole budget: not kept.
        c.insert(1, 0, block(&[1; 2], 0.0, 4 * one));
        assert!(!c.contains(1));
    }

    #[test]
    fn spilled_entries_come_back_and_damaged_files_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let one = block(&[0, 0], 0.0, 4).bytes();
        let c = ContextCache::new(2 * one, Some(dir.path())).unwrap();
        let r = root(b"m", 2);
        let prompt = [1, 2, 3, 4, 5];
        fill(&c, r, &prompt[..4]);
        // A longer prefill than the budget keeps its first blocks.
        fill(&c, r, &[8, 8, 9, 9, 7, 7]);
        assert_eq!(c.lookup(r, &[8, 8, 9, 9, 7, 7, 0], 2).len(), 2);
        // Its first blocks evicted the other prompt's (deepest first, to disk).
        assert_eq!(c.stats().spilled, 2);
        // The spilled blocks come back, the same.
        let got = c.lookup(r, &prompt, 2);
        assert_eq!(got.len(), 2);
        assert_eq!(*got[0], block(&[1, 2], 0.0, 4));
        drop(got);
        drop(c);
        // A restarted process finds the spill files and uses them.
        let dir = tempfile::tempdir().unwrap();
        let first = ContextCache::new(one, Some(dir.path())).unwrap();
        fill(&first, r, &prompt[..2]);
        fill(&first, r, &[6, 6]);
        drop(first);
        let again = ContextCache::new(one, Some(dir.path())).unwrap();
        assert_eq!(again.stats().spilled, 1);
        assert_eq!(again.lookup(r, &prompt[..3], 2).len(), 1);
        // A damaged file is a miss (the prefix ends there), and is dropped.
        let first = ContextCache::new(one, Some(dir.path())).unwrap();
        fill(&first, r, &[4, 4]);
        fill(&first, r, &[5, 5]);
        drop(first);
        let again = ContextCache::new(one, Some(dir.path())).unwrap();
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let p = f.unwrap().path();
            let mut bytes = std::fs::read(&p).unwrap();
            let n = bytes.len();
            bytes[n / 2] ^= 0x40;
            std::fs::write(&p, &bytes).unwrap();
        }
        assert!(
            again.lookup(r, &[4, 4, 5], 2).is_empty(),
            "a damaged spill was used"
        );
        assert_eq!(again.stats().corrupt, 1);
        // Truncated files too.
        let b = block(&[1, 2], 0.0, 4);
        let full = encode(5, 6, &b);
        for cut in [0, 8, 40, full.len() - 1] {
            assert!(decode(&full[..cut], 5, 6).is_none());
        }
        assert_eq!(decode(&full, 5, 6), Some(b.clone()));
        assert!(decode(&full, 5, 7).is_none(), "another parent");
    }
    #[test]
    fn a_ranks_share_is_kept_by_prefix_group_and_rank_and_checked_when_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let one = block(&[0; 6], 0.0, 4).bytes();
        let c = ContextCache::new(2 * one, Some(dir.path())).unwrap();
        let r = root(b"m", 2);
        let prompt = [1, 2, 3, 4, 5, 6, 7, 8];
        let keys = prefix_keys(r, &prompt, 2, 7);
        assert_eq!(keys.iter().map(|(e, _)| *e).collect::<Vec<_>>(), [2, 4, 6]);
        assert_eq!(keys[2].1, prompt[..6].chunks(2).fold(r, key));
        let prefix = keys[2].1;
        let share = |fill: f32| block(&prompt[..6], fill, 4);
        assert!(c.insert_share(prefix, 2, 1, share(1.0)));
        assert!(c.has_share(prefix, 2, 1));
        // Another rank, group size or prefix is not it.
        assert!(!c.has_share(prefix, 2, 0) && !c.has_share(prefix, 3, 1));
        assert!(!c.has_share(keys[1].1, 2, 1));
        assert_eq!(*c.share(prefix, 2, 1, &prompt[..6]).unwrap(), share(1.0));
        assert!(
            c.share(prefix, 2, 1, &prompt[..5]).is_none(),
            "other tokens"
        );
        // Evicted to disk and read back, the same; damaged on disk, a miss.
        assert!(c.insert_share(prefix, 2, 0, share(2.0)));
        assert!(c.insert_share(keys[1].1, 2, 0, block(&prompt[..4], 3.0, 4)));
        assert!(c.has_share(prefix, 2, 1), "spilled, still there");
        assert_eq!(*c.share(prefix, 2, 1, &prompt[..6]).unwrap(), share(1.0));
        c.flush();
        let spilled = dir
            .path()
            .join(format!("{:032x}.ctx", share_key(prefix, 2, 0)));
        let mut bytes = std::fs::read(&spilled).expect("the share was spilled");
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&spilled, &bytes).unwrap();
        assert!(c.share(prefix, 2, 0, &prompt[..6]).is_none());
        assert_eq!(c.stats().corrupt, 1);
        assert!(!c.has_share(prefix, 2, 0), "the damaged file is dropped");
        c.count_lookup(6);
        c.count_lookup(0);
        assert_eq!(
            (c.stats().hits, c.stats().misses, c.stats().hit_tokens),
            (1, 1, 6)
        );
    }
    #[test]
    fn evictions_written_by_the_spill_thread_stay_readable_on_their_way() {
        let dir = tempfile::tempdir().unwrap();
        let one = block(&[0, 0], 0.0, 4).bytes();
        let c = ContextCache::new(3 * one, Some(dir.path())).unwrap();
        let r = root(b"m", 2);
        // Forty two-block prompts through a cache of three blocks: each lookup right after the
        // evictions finds its blocks in memory, on their way to disk, or on disk, the same.
        let prompt = |i: u32| [i, i + 1, i + 2, i + 3, 9];
        for i in 0..40 {
            fill(&c, r, &prompt(i)[..4]);
            for j in (0..=i).rev().take(2) {
                let got = c.lookup(r, &prompt(j), 2);
                assert_eq!(got.len(), 2, "prompt {j} after {i}");
                assert_eq!(*got[1], block(&prompt(j)[2..4], 1.0, 4));
            }
        }
        c.flush();
        let files = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".ctx")
            })
            .count();
        let s = c.stats();
        assert_eq!(files as u64, s.spilled, "{s:?}");
        assert_eq!(s.entries, 3);
        assert_eq!(s.corrupt, 0);
    }
}
