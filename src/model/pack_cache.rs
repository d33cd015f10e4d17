//! Packed-weight cache files: a model's packed matrices written once, then mapped on later loads
//! instead of read and packed again.
//!
//! Packing a 7B model's four gigabytes takes seconds, most of it spent by the kernel clearing
//! fresh pages; llama.cpp maps its file and clears nothing. So after the first CPU load of a
//! model (packed in memory as always), a background thread of low priority writes the packed
//! matrices to a cache file, flushes it to disk and renames it into place. Later loads of the
//! same file map the cache read-only: the pages come straight from the page cache (or the
//! disk), and nothing is cleared or packed.
//!
//! One cache file serves one model file: it is named after the model's path and records the
//! file's size, modification time and inode, and the packed layout's version
//! ([`packed::LAYOUT`]); any difference and the model is packed and written afresh. Files are
//! written under a temporary name and renamed whole, so llmgenie never writes or truncates a
//! cache file that is mapped.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use candle_core::quantized::GgmlDType;
use memmap2::MmapOptions;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::qdot::packed::{self, Packed};

/// The first bytes of a cache file; its first page holds them, then the index's offset and
/// length (little-endian u64s).
const MAGIC: &[u8; 8] = b"LGPACK\x00\x01";
/// The largest index a cache file may claim (a 7B model's is a few tens of kilobytes).
const MAX_INDEX: u64 = 64 << 20;

/// The model file a cache was written from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Identity {
    path: PathBuf,
    len: u64,
    modified_secs: u64,
    modified_nanos: u32,
    inode: u64,
    device: u64,
}

impl Identity {
    fn of(model: &Path) -> Option<Self> {
        let path = fs::canonicalize(model).ok()?;
        let meta = fs::metadata(&path).ok()?;
        let modified = meta
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        #[cfg(unix)]
        let (inode, device) = {
            use std::os::unix::fs::MetadataExt;
            (meta.ino(), meta.dev())
        };
        #[cfg(not(unix))]
        let (inode, device) = (0, 0);
        Some(Self {
            path,
            len: meta.len(),
            modified_secs: modified.as_secs(),
            modified_nanos: modified.subsec_nanos(),
            inode,
            device,
        })
    }

    /// The cache file's name: the first 64 bits of the SHA-256 of the model's path.
    fn file_name(&self) -> String {
        let digest = Sha256::digest(self.path.as_os_str().as_encoded_bytes());
        let head: [u8; 8] = std::array::from_fn(|i| digest[i]);
        format!("{:016x}.pack", u64::from_be_bytes(head))
    }
}

/// One packed matrix in a cache file.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Entry {
    /// The ggml type code the model file stores it as.
    code: u32,
    n: usize,
    k: usize,
    /// Where each array that is not empty starts, page-aligned, in the packer's order.
    offsets: Vec<u64>,
}

#[derive(Serialize, Deserialize, Debug)]
struct Index {
    layout: u32,
    model: Identity,
    tensors: HashMap<String, Entry>,
}

fn page_size() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf reads a constant of the system.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(p) = u64::try_from(p) {
            if p.is_power_of_two() {
                return p.max(4096);
            }
        }
    }
    4096
}

/// What a load did with the packed-weight cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PackCacheUse {
    /// No cache: turned off, a device other than the CPU, or a CPU without the packed kernel.
    Off,
    /// The packed weights were mapped from this cache file.
    Mapped(PathBuf),
    /// The weights were packed into a new cache file, which becomes this one once it is on disk
    /// (see [`wait_for_pack_caches`]).
    Written(PathBuf),
    /// The cache could not be read or written (the reason was logged); the weights were packed
    /// in memory.
    Failed,
}

/// A cache for one load: either a file to map matrices from, or one being written.
pub(super) enum PackCache {
    Reading(CacheFile),
    Writing(CacheWriter),
}

impl PackCache {
    /// The cache of `model` in `dir`: the existing file if it is valid for the model as it is
    /// now, else a new one to write; `None` when neither can be had (logged).
    pub(super) fn open(dir: &Path, model: &Path) -> Option<Self> {
        let Some(id) = Identity::of(model) else {
            tracing::warn!(model = %model.display(), "cannot read the model file's identity; packing without a cache");
            return None;
        };
        let dest = dir.join(id.file_name());
        match CacheFile::open(&dest, &id) {
            Ok(file) => return Some(Self::Reading(file)),
            Err(Invalid::Missing) => {}
            Err(Invalid::Stale(why)) => {
                tracing::info!(cache = %dest.display(), why, "packed-weight cache is out of date; packing again");
            }
        }
        Some(Self::Writing(CacheWriter::new(dest, id)))
    }
}

/// Why a cache file cannot serve.
enum Invalid {
    Missing,
    Stale(&'static str),
}

/// A cache file that matches the model: matrices are mapped from it.
pub(super) struct CacheFile {
    file: File,
    path: PathBuf,
    len: u64,
    tensors: HashMap<String, Entry>,
}

impl CacheFile {
    fn open(path: &Path, id: &Identity) -> Result<Self, Invalid> {
        let mut file = File::open(path).map_err(|_| Invalid::Missing)?;
        let len = file
            .metadata()
            .map_err(|_| Invalid::Stale("unreadable"))?
            .len();
        let mut head = [0u8; 24];
        file.read_exact(&mut head)
            .map_err(|_| Invalid::Stale("too short"))?;
        if &head[..8] != MAGIC {
            return Err(Invalid::Stale("not a cache file"));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let (at, size) = (word(8), word(16));
        if size > MAX_INDEX || at.checked_add(size).is_none_or(|end| end > len) {
            return Err(Invalid::Stale("index out of bounds"));
        }
        let mut raw = vec![0u8; usize::try_from(size).map_err(|_| Invalid::Stale("index"))?];
        read_at(&file, at, &mut raw).map_err(|_| Invalid::Stale("unreadable index"))?;
        let index: Index =
            serde_json::from_slice(&raw).map_err(|_| Invalid::Stale("malformed index"))?;
        if index.layout != packed::LAYOUT {
            return Err(Invalid::Stale("written for another packed layout"));
        }
        if index.model != *id {
            return Err(Invalid::Stale("the model file changed"));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            len,
            tensors: index.tensors,
        })
    }

    /// The named matrix mapped from the file, or `None` when the cache lacks it (or holds it in
    /// another type or shape, or its pages lie outside the file).
    pub(super) fn packed(
        &self,
        name: &str,
        code: u32,
        dtype: GgmlDType,
        dims: (usize, usize),
    ) -> Option<Packed> {
        let e = self.tensors.get(name)?;
        if (e.code, e.n, e.k) != (code, dims.0, dims.1) {
            return None;
        }
        let page = page_size();
        let mut offsets = e.offsets.iter();
        let p = Packed::mapped(dtype, e.n, e.k, |bytes| {
            let at = *offsets.next()?;
            let end = at.checked_add(u64::try_from(bytes).ok()?)?;
            if !at.is_multiple_of(page) || end > self.len {
                return None;
            }
            // SAFETY: a read-only mapping of pages inside the file (checked just above, so no
            // access past its end); the file is only ever replaced whole by renaming, never
            // written in place, so the pages do not change under the mapping.
            unsafe {
                MmapOptions::new()
                    .offset(at)
                    .len(bytes)
                    .populate()
                    .map(&self.file)
                    .ok()
            }
        })?;
        offsets.next().is_none().then_some(p)
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

/// `buf.len()` bytes of `file` from `at`.
fn read_at(mut file: &File, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(buf)
}

/// `buf` into `file` at `at`.
fn write_at(mut file: &File, at: u64, buf: &[u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(at))?;
    file.write_all(buf)
}

/// A cache file to be written: the matrices packed in memory during the load, written out after
/// it on a background thread.
pub(super) struct CacheWriter {
    /// Where the file goes, in the cache directory.
    dest: PathBuf,
    model: Identity,
    tensors: Vec<(String, u32, Arc<Packed>)>,
}

impl CacheWriter {
    fn new(dest: PathBuf, model: Identity) -> Self {
        Self {
            dest,
            model,
            tensors: Vec::new(),
        }
    }

    /// A matrix packed during the load, stored in the model file as ggml type `code`.
    pub(super) fn add(&mut self, name: &str, code: u32, packed: Arc<Packed>) {
        self.tensors.push((name.to_string(), code, packed));
    }

    /// Start writing the file on a background thread of low priority (it holds the matrices
    /// until it is done; [`wait_for_pack_caches`] waits for it). Returns where the file will be.
    pub(super) fn finish(self) -> Option<PathBuf> {
        let dest = self.dest.clone();
        let flush = std::thread::Builder::new()
            .name("pack-cache".into())
            .spawn(move || {
                lower_priority();
                let started = std::time::Instant::now();
                match self.write() {
                    Ok(bytes) => tracing::info!(
                        cache = %self.dest.display(),
                        mib = bytes >> 20,
                        secs = started.elapsed().as_secs_f64(),
                        "packed-weight cache written; later loads map it"
                    ),
                    Err(e) => tracing::warn!(
                        cache = %self.dest.display(),
                        error = %e,
                        "cannot write a packed-weight cache; later loads pack again"
                    ),
                }
            });
        match flush {
            Ok(handle) => {
                PENDING
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(handle);
                Some(dest)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start writing the packed-weight cache");
                None
            }
        }
    }

    /// Write the file under a temporary name, flush it to disk and rename it into place; the
    /// file's length.
    fn write(&self) -> std::io::Result<u64> {
        let dir = self.dest.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        remove_abandoned(dir);
        // Unique to this writer: `<hash>.<pid>-<n>.tmp`.
        static WRITERS: AtomicU64 = AtomicU64::new(0);
        let n = WRITERS.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dest
            .with_extension(format!("{}-{n}.tmp", std::process::id()));
        let written = self.write_to(&tmp).and_then(|len| {
            fs::rename(&tmp, &self.dest)?;
            Ok(len)
        });
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    fn write_to(&self, tmp: &Path) -> std::io::Result<u64> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)?;
        let page = page_size();
        let mut end = page;
        let mut index = Index {
            layout: packed::LAYOUT,
            model: self.model.clone(),
            tensors: HashMap::new(),
        };
        for (name, code, p) in &self.tensors {
            let mut offsets = Vec::new();
            for bytes in p.arrays() {
                let at = end.next_multiple_of(page);
                write_at(&file, at, bytes)?;
                offsets.push(at);
                end = at + bytes.len() as u64;
            }
            let (n, k) = p.dims();
            let entry = Entry {
                code: *code,
                n,
                k,
                offsets,
            };
            index.tensors.insert(name.clone(), entry);
        }
        let raw = serde_json::to_vec(&index).map_err(std::io::Error::other)?;
        write_at(&file, end, &raw)?;
        let mut head = Vec::with_capacity(24);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&end.to_le_bytes());
        head.extend_from_slice(&(raw.len() as u64).to_le_bytes());
        write_at(&file, 0, &head)?;
        // On disk before it is renamed into place: a crash must not leave a complete-looking
        // file with pages that never reached the disk.
        file.sync_all()?;
        Ok(end + raw.len() as u64)
    }
}

/// Run this thread at the lowest priority: writing the cache must not slow the requests the
/// model is answering.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on this thread (Linux gives threads their own nice value) with a
    // valid `which` and value; failure leaves the priority as it was.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

/// Remove temporary files that processes which no longer run left behind: files named for a
/// process that is not running here, untouched for ten minutes (a writer in another PID
/// namespace keeps its file's time fresh).
fn remove_abandoned(dir: &Path) {
    const IDLE: std::time::Duration = std::time::Duration::from_secs(600);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit('.').next())
            .and_then(|w| w.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let idle = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > IDLE));
        let running = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if idle && !running {
            let _ = fs::remove_file(path);
        }
    }
}

/// Flushes of cache files still running.
static PENDING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

/// Whether a packed-weight cache this process started writing is still being written.
pub fn pack_caches_pending() -> bool {
    PENDING
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .any(|h| !h.is_finished())
}

/// Wait until every packed-weight cache this process started writing is on disk and in place
/// (or given up). Call before exiting: a cache whose flush is cut short is not kept.
pub fn wait_for_pack_caches() {
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(PoisonError::into_inner));
    for h in pending {
        let _ = h.join();
    }
}

/// The default cache directory: `$XDG_CACHE_HOME/llmgenie/packed`, else
/// `~/.cache/llmgenie/packed`.
pub fn default_pack_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("llmgenie").join("packed"))
}

static DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Where loads keep packed-weight caches from now on (`None`: nowhere, the default).
pub fn set_pack_cache_dir(dir: Option<PathBuf>) {
    *DIR.lock().unwrap_or_else(PoisonError::into_inner) = dir;
}

/// Where loads keep packed-weight caches.
pub fn pack_cache_dir() -> Option<PathBuf> {
    DIR.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_idle_files_of_processes_gone_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        // No process has a pid this large (Linux's limit is 2^22).
        let gone = 4_000_000_000u32;
        let ours = std::process::id();
        let file = |name: &str, idle: bool| {
            let p = dir.path().join(name);
            let f = File::create(&p).unwrap();
            if idle {
                f.set_modified(old).unwrap();
            }
            p
        };
        let abandoned = file(&format!("00ab.{gone}-0.tmp"), true);
        let fresh = file(&format!("00ab.{gone}-1.tmp"), false);
        let running = file(&format!("00ab.{ours}-0.tmp"), true);
        let cache = file("00ab.pack", true);
        remove_abandoned(dir.path());
        assert!(!abandoned.exists());
        assert!(fresh.exists() && running.exists() && cache.exists());
    }
}
