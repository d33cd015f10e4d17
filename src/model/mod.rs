//! Loading a validated GGUF file into a [`Transformer`] on a device.
//!
//! The file is validated by [`crate::gguf`] first (candle trusts the header and can panic or
//! allocate wildly on a malformed one); only then does candle read the tensors.

mod cache;
mod decode_attn;
mod device;
mod fused;
#[doc(hidden)]
pub mod kernel_bench;
mod lanes;
mod linear;
mod pack_cache;
pub mod phases;
mod prompt_attn;
mod qdot;
mod step;
mod transformer;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::Device;

use crate::gguf::{Architecture, GgufError, GgufFile, ModelSpec, TensorInfo};
use pack_cache::PackCache;
use qdot::packed::{Packed, Packer};

pub use cache::{cache_type, set_cache_type, KvCache, KvCacheType};
pub use device::{select_device, DeviceChoice};
pub(crate) use fused::exp as fast_exp;
pub use linear::DENSE_MIN_ROWS;
pub use pack_cache::{
    default_pack_cache_dir, pack_cache_dir, pack_caches_pending, set_pack_cache_dir,
    wait_for_pack_caches, PackCacheUse,
};
pub use transformer::{Activation, Config, RopeStyle, TensorSource, Transformer};

/// Whether this CPU runs the packed int8 kernel (AVX2 or better), which computes every row of a
/// matmul alike whatever the number of rows.
pub fn packed_kernel() -> bool {
    qdot::packed::available()
}

/// A tensor's values as f32, flattened (a copy, whatever the view's layout).
pub(crate) fn f32_values(t: &candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// The largest absolute difference between two tensors' values (for tests).
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let (a, b) = (f32_values(a).unwrap(), f32_values(b).unwrap());
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Each of `items` handed to `f(index, item)` on candle's worker pool: the way to give the
/// pool's threads disjoint mutable pieces of work (each behind a lock of its own, never
/// contended). A single item runs on the calling thread: there is nothing to share.
pub(crate) fn par_each<T: Send>(items: Vec<T>, f: impl Fn(usize, &mut T) + Sync) {
    if items.len() <= 1 {
        for (i, mut item) in items.into_iter().enumerate() {
            f(i, &mut item);
        }
        return;
    }
    let slots: Vec<std::sync::Mutex<T>> = items.into_iter().map(std::sync::Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(slots.len(), |range| {
        for i in range {
            if let Ok(mut item) = slots[i].lock() {
                f(i, &mut item);
            }
        }
    });
}

/// `out` in pieces of `piece` elements (the last may be shorter), each filled by `f(index,
/// piece)` on candle's worker pool (piece `index` starts at element `index * piece`).
pub(crate) fn par_fill<T: Send>(out: &mut [T], piece: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    par_each(out.chunks_mut(piece.max(1)).collect(), |i, p| f(i, p));
}

/// What `make` computes from the input `x` for `key`, kept for the next call on this thread.
///
/// The Q, K and V projections (and the gate and up projections) multiply the same input
/// tensor, so its quantized form is computed once instead of three (two) times. Tensors are
/// immutable and their ids never reused, so the id identifies the values. One slot holds the
/// last result, whichever kind of value it was.
pub(crate) fn per_input<K, V>(
    x: &candle_core::Tensor,
    key: K,
    make: impl FnOnce() -> candle_core::Result<V>,
) -> candle_core::Result<std::sync::Arc<V>>
where
    K: PartialEq + 'static,
    V: 'static,
{
    type Last = Option<(candle_core::TensorId, Box<dyn std::any::Any>)>;
    thread_local! {
        static LAST: std::cell::RefCell<Last> = const { std::cell::RefCell::new(None) };
    }
    let hit = LAST.with(|last| match &*last.borrow() {
        Some((id, v)) if *id == x.id() => v
            .downcast_ref::<(K, std::sync::Arc<V>)>()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.clone()),
        _ => None,
    });
    if let Some(v) = hit {
        return Ok(v);
    }
    let v = std::sync::Arc::new(make()?);
    LAST.with(|last| *last.borrow_mut() = Some((x.id(), Box::new((key, v.clone())))));
    Ok(v)
}

/// Errors of loading and running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("tensor {name} has type {ty}, which this build cannot compute with")]
    UnsupportedType { name: String, ty: String },
    #[error("cannot read tensor {name} from {path}: {source}")]
    Read {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("model file lacks tensor '{0}'")]
    MissingTensor(String),
    #[error("the input is empty")]
    EmptyInput,
    #[error("sequence needs {needed} positions but the context holds {limit}")]
    ContextOverflow { needed: usize, limit: usize },
    #[error("device: {0}")]
    Device(String),
    #[error("internal error: {0}")]
    Internal(&'static str),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Forward-pass configuration for a validated spec.
///
/// # Errors
/// The architecture has no forward pass here.
pub fn config_for(spec: &ModelSpec) -> Result<Config, ModelError> {
    let head_dim = spec.key_length;
    let (rope_style, activation, scale_embeddings, sliding) = match spec.architecture {
        Architecture::Llama => (RopeStyle::Interleaved, Activation::Silu, false, None),
        Architecture::Qwen2 | Architecture::Qwen3 => {
            (RopeStyle::Neox, Activation::Silu, false, None)
        }
        // Five sliding layers, then one global (llama.cpp `set_swa_pattern(6)`).
        Architecture::Gemma3 => (
            RopeStyle::Neox,
            Activation::GeluTanh,
            true,
            spec.sliding_window.map(|w| (w, 6)),
        ),
    };
    let rope_base_local = match spec.architecture {
        Architecture::Gemma3 => Some(spec.rope_local_freq_base.unwrap_or(10_000.0)),
        _ => None,
    };
    Ok(Config {
        hidden: spec.embedding_length,
        n_layers: spec.block_count,
        n_heads: spec.head_count,
        n_kv_heads: spec.head_count_kv,
        head_dim,
        rms_eps: spec.rms_eps,
        rope_style,
        rope_base: spec.rope_freq_base,
        rope_base_local,
        rope_dims: spec.rope_dimension_count.unwrap_or(head_dim).min(head_dim),
        activation,
        scale_embeddings,
        sliding_window: sliding,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
        context_length: spec.context_length,
    })
}

/// Bytes of a matrix read and packed at a time.
const PACK_PIECE: usize = 8 << 20;

/// Tensors read from a validated GGUF file (its own parse: offsets, types and shapes), through
/// one reused buffer.
struct GgufTensors<'f> {
    file: &'f GgufFile,
    path: &'f Path,
    reader: File,
    buf: Vec<u8>,
    device: Device,
    /// The packed-weight cache being read or written, if any.
    cache: Option<PackCache>,
}

/// candle's name for a ggml type code, for the types candle reads.
fn candle_dtype(code: u32) -> Option<GgmlDType> {
    use GgmlDType::*;
    Some(match code {
        0 => F32,
        1 => F16,
        2 => Q4_0,
        3 => Q4_1,
        6 => Q5_0,
        7 => Q5_1,
        8 => Q8_0,
        9 => Q8_1,
        10 => Q2K,
        11 => Q3K,
        12 => Q4K,
        13 => Q5K,
        14 => Q6K,
        15 => Q8K,
        30 => BF16,
        _ => return None,
    })
}

/// A tensor's file entry, candle type and shape (outermost first).
type Stored<'f> = (&'f TensorInfo, GgmlDType, Vec<usize>);

impl<'f> GgufTensors<'f> {
    /// The named tensor's entry, candle type and shape (outermost first); `None` when the file
    /// lacks it.
    fn shape(&self, name: &str) -> Result<Option<Stored<'f>>, ModelError> {
        let Some(info) = self.file.tensor(name) else {
            return Ok(None);
        };
        let dtype = candle_dtype(info.dtype.code()).ok_or_else(|| ModelError::UnsupportedType {
            name: name.to_string(),
            ty: info.dtype.name().to_string(),
        })?;
        let dims = info.dims.iter().rev().map(|&d| d as usize).collect();
        Ok(Some((info, dtype, dims)))
    }

    /// Bytes `from..from + len` of the tensor's stored data into `buf`.
    fn read(&mut self, info: &TensorInfo, from: usize, len: usize) -> Result<(), ModelError> {
        let fail = |source| ModelError::Read {
            name: info.name.clone(),
            path: self.path.display().to_string(),
            source,
        };
        self.buf.resize(len, 0);
        self.reader
            .seek(SeekFrom::Start(info.offset + from as u64))
            .map_err(fail)?;
        self.reader.read_exact(&mut self.buf).map_err(fail)
    }

    /// The buffer is kept for the next tensor unless it holds a large one (a vocabulary): that
    /// would add its size to the peak memory of the rest of the load.
    fn release_large(&mut self) {
        const KEEP: usize = 32 << 20;
        if self.buf.capacity() > KEEP {
            self.buf = Vec::new();
        }
    }
}

/// A tensor's stored size as a `usize`.
fn stored_bytes(info: &TensorInfo) -> Result<usize, ModelError> {
    usize::try_from(info.n_bytes).map_err(|_| ModelError::Internal("tensor size"))
}

impl TensorSource for GgufTensors<'_> {
    fn load(&mut self, name: &str) -> Result<Option<QTensor>, ModelError> {
        let Some((info, dtype, dims)) = self.shape(name)? else {
            return Ok(None);
        };
        self.read(info, 0, stored_bytes(info)?)?;
        let t = qtensor_from_ggml(dtype, &self.buf, dims, &self.device);
        self.release_large();
        Ok(Some(t?))
    }

    fn packed(&mut self, name: &str) -> Result<Option<Arc<Packed>>, ModelError> {
        let Some((info, dtype, dims)) = self.shape(name)? else {
            return Ok(None);
        };
        if !self.device.is_cpu() || dims.len() != 2 {
            return Ok(None);
        }
        let (n, k) = (dims[0], dims[1]);
        let code = info.dtype.code();
        if let Some(PackCache::Reading(c)) = &self.cache {
            if let Some(p) = c.packed(name, code, dtype, (n, k)) {
                return Ok(Some(Arc::new(p)));
            }
            tracing::warn!(cache = %c.path().display(), tensor = name, "packed-weight cache lacks a matrix; packing it in memory");
        }
        let Some(mut packer) = Packer::new(dtype, n, k) else {
            return Ok(None);
        };
        if !self.fill(info, &mut packer)? {
            return Ok(None);
        }
        let packed = Arc::new(packer.finish());
        if let Some(PackCache::Writing(w)) = &mut self.cache {
            w.add(name, code, packed.clone());
        }
        Ok(Some(packed))
    }
}

impl GgufTensors<'_> {
    /// Pack the tensor's rows, read in pieces of whole groups through the reused buffer: no
    /// buffer (nor rewritten copy) the size of the matrix. `false` when the packer refuses them.
    fn fill(&mut self, info: &TensorInfo, packer: &mut Packer) -> Result<bool, ModelError> {
        let row_bytes = packer.row_bytes();
        let n = packer.n();
        if stored_bytes(info)? != n * row_bytes {
            return Ok(false);
        }
        let rows = (PACK_PIECE / row_bytes.max(1)).max(1).next_multiple_of(16);
        for first in (0..n).step_by(rows) {
            let count = rows.min(n - first);
            self.read(info, first * row_bytes, count * row_bytes)?;
            if packer.rows(first, &self.buf).is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A validated file, its spec and its weights on a device.
pub struct LoadedModel {
    pub file: GgufFile,
    pub spec: ModelSpec,
    pub weights: Transformer,
    /// Whether the packed weights came from (or went into) a cache file.
    pub pack_cache: PackCacheUse,
}

/// Validate `path` and load its weights onto `device`, with the packed-weight cache in
/// [`pack_cache_dir`] if one is set.
///
/// # Errors
/// The file is malformed ([`ModelError::Gguf`]), its architecture is unsupported, or loading fails.
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel, ModelError> {
    load_with_cache(path, device, pack_cache_dir().as_deref())
}

/// [`load`] with the packed-weight cache in `cache_dir` (`None`: no cache).
///
/// # Errors
/// As [`load`]; a cache that cannot be read or written is not an error (the weights are
/// packed in memory, and a warning logged).
pub fn load_with_cache(
    path: &Path,
    device: &Device,
    cache_dir: Option<&Path>,
) -> Result<LoadedModel, ModelError> {
    keep_freed_memory();
    let file = GgufFile::open(path)?;
    let spec = ModelSpec::from_gguf(&file)?;
    let cfg = config_for(&spec)?;
    let open = |e| ModelError::Open {
        path: path.display().to_string(),
        source: e,
    };
    let cache = cache_dir
        .filter(|_| device.is_cpu() && qdot::packed::available())
        .map(|dir| PackCache::open(dir, path));
    let cached = cache.is_some();
    let mut src = GgufTensors {
        file: &file,
        path,
        reader: File::open(path).map_err(open)?,
        buf: Vec::new(),
        device: device.clone(),
        cache: cache.flatten(),
    };
    let weights = Transformer::load(cfg, &mut src, device)?;
    let pack_cache = match (cached, src.cache.take()) {
        (false, _) => PackCacheUse::Off,
        (true, None) => PackCacheUse::Failed,
        (true, Some(PackCache::Reading(c))) => PackCacheUse::Mapped(c.path().to_path_buf()),
        (true, Some(PackCache::Writing(w))) => match w.finish() {
            Some(dest) => PackCacheUse::Written(dest),
            None => PackCacheUse::Failed,
        },
    };
    drop(src);
    Ok(LoadedModel {
        file,
        spec,
        weights,
        pack_cache,
    })
}

/// Let the allocator keep blocks of up to 32 MiB for reuse instead of mapping each one afresh.
///
/// glibc's malloc serves every block over its mmap threshold (128 KiB to begin with) as a new
/// mapping, which the kernel clears page by page on first touch and which goes back to the
/// system when freed; it raises the threshold only after freeing such a block. A prompt's
/// intermediate results (megabytes per layer) were therefore page faults, 7% of a 512-token
/// SmolLM2 prefill, once the loader stopped freeing large buffers (which used to raise the
/// threshold by accident): prefill went from 530-600 to 350-410 tokens/s. The packed weights
/// have mappings of their own and are not affected.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        #[allow(unsafe_code)]
        ONCE.call_once(|| {
            // SAFETY: `mallopt` only sets allocator parameters (glibc serialises it with
            // allocations); any value is valid for these two.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
            }
        });
    }
}
