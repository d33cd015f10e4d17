//! The prefix cache: KV caches of finished sequences, kept so that a request whose prompt starts
//! with the same tokens (a chat that continues, a system prompt many requests share) starts from
//! them instead of evaluating those tokens again.
//!
//! An entry that a new prompt extends completely is handed over (the chat moved on); one that
//! it shares only a part of is copied up to the shared part, so it stays for others. Entries are
//! evicted least recently used first when there are too many or they hold too many bytes.

use crate::model::{KvCache, DENSE_MIN_ROWS};

/// Fewer shared tokens than this are not worth a lookup's copy.
pub const MIN_REUSE: usize = 16;

struct Entry {
    /// The tokens whose keys and values the cache holds, in order.
    tokens: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

/// A reused cache and how many of the prompt's tokens it already holds.
pub struct Hit {
    pub cache: KvCache,
    pub reused: usize,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    max_entries: usize,
    max_bytes: usize,
    clock: u64,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// `max_bytes == 0` turns the cache off.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: Vec::new(),
            max_entries,
            max_bytes,
            clock: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_bytes > 0 && self.max_entries > 0
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.cache.bytes()).sum()
    }

    /// Keep a finished sequence's cache; `tokens` are the positions it holds.
    pub fn insert(&mut self, tokens: Vec<u32>, cache: KvCache) {
        if !self.enabled() || tokens.len() < MIN_REUSE || tokens.len() != cache.len() {
            return;
        }
        if cache.bytes() > self.max_bytes {
            return;
        }
        // An entry the new one extends is superseded by it.
        self.entries
            .retain(|e| common_prefix(&e.tokens, &tokens) < e.tokens.len());
        self.clock += 1;
        self.entries.push(Entry {
            tokens,
            cache,
            last_used: self.clock,
        });
        while self.entries.len() > self.max_entries || self.bytes() > self.max_bytes {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            self.entries.swap_remove(oldest);
        }
    }

    /// The cache to start `prompt` from: the entry sharing the longest prefix with it (at least
    /// [`MIN_REUSE`] tokens). At least the prompt's last [`DENSE_MIN_ROWS`] tokens are left to
    /// evaluate, so that they go through the same (dense) matmul path as in a run without the
    /// cache: a repeated request gets the same answer as the first time, not one that differs in
    /// the last bits of its logits.
    pub fn take(&mut self, prompt: &[u32]) -> Option<Hit> {
        let limit = prompt.len().saturating_sub(DENSE_MIN_ROWS);
        let (i, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|(_, n)| *n)?;
        if shared < MIN_REUSE {
            return None;
        }
        self.clock += 1;
        if shared == self.entries[i].tokens.len() {
            let mut e = self.entries.swap_remove(i);
            e.cache.truncate(shared);
            return Some(Hit {
                cache: e.cache,
                reused: shared,
            });
        }
        let e = &mut self.entries[i];
        e.last_used = self.clock;
        let cache = e.cache.copy_prefix(shared).ok()?;
        Some(Hit {
            cache,
            reused: shared,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// A one-layer cache holding `tokens.len()` positions whose keys are the token ids.
    fn cache_of(tokens: &[u32]) -> KvCache {
        let mut c = KvCache::new(1);
        let n = tokens.len();
        let k = Tensor::from_vec(
            tokens.iter().map(|t| *t as f32).collect::<Vec<_>>(),
            (1, 1, n, 1),
            &Device::Cpu,
        )
        .unwrap();
        c.append(0, &k, &k).unwrap();
        c.advance(n);
        c
    }

    fn keys(c: &mut KvCache) -> Vec<f32> {
        let one = Tensor::zeros((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let (k, _) = c.append(0, &one, &one).unwrap();
        let k = k.to_dtype(DType::F32).unwrap();
        let mut v: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
        v.pop();
        v
    }

    #[test]
    fn a_continued_prompt_takes_the_whole_entry_and_a_shared_prefix_copies_it() {
        let mut pc = PrefixCache::new(4, 1 << 20);
        let first: Vec<u32> = (0..40).collect();
        pc.insert(first.clone(), cache_of(&first));
        // The chat goes on: all 40 tokens are reused and the entry is handed over.
        let mut next = first.clone();
        next.extend(100..120);
        let mut hit = pc.take(&next).unwrap();
        assert_eq!(hit.reused, 40);
        assert!(pc.is_empty());
        assert_eq!(
            keys(&mut hit.cache),
            (0..40).map(|t| t as f32).collect::<Vec<_>>()
        );

        // Another prompt shares 20 tokens: a copy of those 20; the entry stays.
        pc.insert(first.clone(), cache_of(&first));
        let mut other: Vec<u32> = (0..20).collect();
        other.extend(500..530);
        let mut hit = pc.take(&other).unwrap();
        assert_eq!(hit.reused, 20);
        assert_eq!(hit.cache.len(), 20);
        assert_eq!(
            keys(&mut hit.cache),
            (0..20).map(|t| t as f32).collect::<Vec<_>>()
        );
        assert_eq!(pc.len(), 1);

        // The same prompt again: all but its last 16 tokens.
        let hit = pc.take(&first).unwrap();
        assert_eq!(hit.reused, 40 - DENSE_MIN_ROWS);
        // Too little in common, or nothing cached.
        assert!(pc.take(&(1000..1100).collect::<Vec<_>>()).is_none());
    }

    #[test]
    fn least_recently_used_entries_go_first_and_zero_bytes_disables() {
        let mut pc = PrefixCache::new(2, 1 << 20);
        for base in [0u32, 1000, 2000] {
            let t: Vec<u32> = (base..base + 20).collect();
            pc.insert(t.clone(), cache_of(&t));
        }
        assert_eq!(pc.len(), 2);
        assert!(pc.take(&(0..40).collect::<Vec<_>>()).is_none());
        assert!(pc.take(&(2000..2040).collect::<Vec<_>>()).is_some());
        let mut off = PrefixCache::new(2, 0);
        let t: Vec<u32> = (0..20).collect();
        off.insert(t.clone(), cache_of(&t));
        assert!(off.is_empty());
    }
}
