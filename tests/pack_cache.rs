//! Packed-weight cache files: written after a first load, mapped by later ones, and never
//! trusted when they do not match the model file.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Device;
use llmgenie::model::{self, wait_for_pack_caches, LoadedModel, PackCacheUse};

use crate::util::{model_path, GEMMA3, SMOLLM2};

fn load(model: &Path, cache: Option<&Path>) -> LoadedModel {
    model::load_with_cache(model, &Device::Cpu, cache).unwrap()
}

/// The logits of a five-token prompt and of one decode step after it, as bits.
fn logits(m: &LoadedModel) -> Vec<u32> {
    let w = &m.weights;
    let mut cache = w.new_cache();
    let mut bits: Vec<u32> = Vec::new();
    for tokens in [&[1u32, 520, 2710, 314, 1012][..], &[330]] {
        let l = w.forward(tokens, &mut cache).unwrap();
        let l: Vec<f32> = l.flatten_all().unwrap().to_vec1().unwrap();
        bits.extend(l.iter().map(|v| v.to_bits()));
    }
    bits
}

/// Where a load set out to write its cache file, once the writing has ended.
fn after_writing(m: &LoadedModel) -> PathBuf {
    let PackCacheUse::Written(p) = &m.pack_cache else {
        panic!("expected a cache to be written, got {:?}", m.pack_cache);
    };
    wait_for_pack_caches();
    p.clone()
}

/// The cache file a load wrote, once it is on disk.
fn written(m: &LoadedModel) -> PathBuf {
    let p = after_writing(m);
    assert!(p.is_file(), "{} was not written", p.display());
    p
}

#[test]
fn a_second_load_maps_what_the_first_packed_with_the_same_results() {
    for file in [SMOLLM2, GEMMA3] {
        let path = model_path(file);
        let dir = tempfile::tempdir().unwrap();
        let plain = load(&path, None);
        assert_eq!(plain.pack_cache, PackCacheUse::Off);
        let first = load(&path, Some(dir.path()));
        if !model::packed_kernel() {
            assert_eq!(first.pack_cache, PackCacheUse::Off);
            return;
        }
        let cache = written(&first);
        // About the packed weights' size: the model file's less what is not packed (norms) and
        // more the rows' padding and Q4_K's rewriting.
        let (cache_len, model_len) = (fs::metadata(&cache).unwrap().len(), plain.file.file_size);
        assert!(
            cache_len > model_len / 2 && cache_len < model_len * 2,
            "{cache_len} bytes of cache for {model_len} of model"
        );
        let second = load(&path, Some(dir.path()));
        assert_eq!(
            second.pack_cache,
            PackCacheUse::Mapped(cache.clone()),
            "{file}"
        );
        let want = logits(&plain);
        assert!(want == logits(&first), "{file}: first load differs");
        assert!(want == logits(&second), "{file}: mapped load differs");
        // One file per model file: loading again writes nothing new.
        drop(second);
        let third = load(&path, Some(dir.path()));
        assert!(matches!(third.pack_cache, PackCacheUse::Mapped(_)));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

/// The header's index offset and length, and the index.
fn index_of(cache: &Path) -> (u64, serde_json::Value) {
    let bytes = fs::read(cache).unwrap();
    let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
    let (at, len) = (word(8), word(16));
    let raw = &bytes[at as usize..(at + len) as usize];
    (at, serde_json::from_slice(raw).unwrap())
}

/// A cache file that is damaged, cut short, wrong about its matrices or older than its model
/// is not mapped (or not for the matrices it is wrong about): the load packs again, with the
/// same results, and a whole cache replaces a damaged one.
#[test]
fn damaged_or_stale_caches_are_packed_again() {
    if !model::packed_kernel() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    fs::copy(model_path(SMOLLM2), &model).unwrap();
    let caches = dir.path().join("packed");
    let cache = written(&load(&model, Some(&caches)));
    let want = logits(&load(&model, None));

    // Damaged: not a cache file at all.
    let mut bytes = fs::read(&cache).unwrap();
    bytes[..8].copy_from_slice(b"garbage!");
    fs::write(&cache, &bytes).unwrap();
    let m = load(&model, Some(&caches));
    assert_eq!(written(&m), cache);
    assert!(logits(&m) == want);

    // Cut short: the index lies past the end.
    let len = fs::metadata(&cache).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&cache)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let m = load(&model, Some(&caches));
    assert_eq!(written(&m), cache);
    assert!(logits(&m) == want);
    assert_eq!(fs::metadata(&cache).unwrap().len(), len);

    // One matrix said to lie past the end of the file, another to be another shape: those two
    // are packed in memory, the rest mapped.
    let (at, mut index) = index_of(&cache);
    let tensors = index["tensors"].as_object_mut().unwrap();
    tensors["blk.3.ffn_down.weight"]["offsets"][0] = serde_json::json!(1u64 << 40);
    tensors["blk.7.attn_q.weight"]["n"] = serde_json::json!(64);
    let raw = serde_json::to_vec(&index).unwrap();
    let mut bytes = fs::read(&cache).unwrap();
    bytes.truncate(at as usize);
    bytes.extend_from_slice(&raw);
    bytes[16..24].copy_from_slice(&(raw.len() as u64).to_le_bytes());
    fs::write(&cache, &bytes).unwrap();
    let m = load(&model, Some(&caches));
    assert_eq!(m.pack_cache, PackCacheUse::Mapped(cache.clone()));
    assert!(logits(&m) == want);

    // Stale: the model file changed after the cache was written.
    let f = fs::OpenOptions::new().write(true).open(&model).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(f);
    let m = load(&model, Some(&caches));
    assert_eq!(written(&m), cache);
    let m = load(&model, Some(&caches));
    assert_eq!(m.pack_cache, PackCacheUse::Mapped(cache.clone()));
    assert!(logits(&m) == want);
}

/// A cache directory that cannot be made is no reason to fail a load: the weights are packed
/// in memory, and no file appears.
#[test]
fn an_unwritable_cache_directory_only_costs_the_cache() {
    if !model::packed_kernel() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    fs::write(&blocker, b"not a directory").unwrap();
    let caches = blocker.join("packed");
    let path = model_path(SMOLLM2);
    let m = load(&path, Some(&caches));
    assert!(!after_writing(&m).exists());
    assert!(logits(&m) == logits(&load(&path, None)));
    assert!(!matches!(
        load(&path, Some(&caches)).pack_cache,
        PackCacheUse::Mapped(_)
    ));
}
