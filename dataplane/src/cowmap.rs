//! A string-keyed hash map split into shards, each behind an `Arc`: a copy shares every
//! shard, and a write clones only the shard it touches.
//!
//! The published routing state is shared by every connection while the next one is
//! built: updating a copy of a 100,000-entry index for a one-user change then costs one
//! shard's entries (a few hundred), not the whole index, and lookups stay one hash
//! lookup.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

const SHARDS: usize = 256;

pub struct CowMap<V> {
    shards: Box<[Arc<HashMap<String, V>>]>,
    /// Picks a key's shard (each shard hashes with its own state too).
    state: RandomState,
    len: usize,
}

impl<V> Default for CowMap<V> {
    fn default() -> Self {
        CowMap {
            shards: (0..SHARDS).map(|_| Arc::new(HashMap::new())).collect(),
            state: RandomState::new(),
            len: 0,
        }
    }
}

impl<V> Clone for CowMap<V> {
    /// Shares every shard.
    fn clone(&self) -> Self {
        CowMap {
            shards: self.shards.clone(),
            state: self.state.clone(),
            len: self.len,
        }
    }
}

impl<V> std::fmt::Debug for CowMap<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowMap").field("len", &self.len).finish()
    }
}

impl<V: Clone> CowMap<V> {
    fn shard(&self, key: &str) -> usize {
        (self.state.hash_one(key) % SHARDS as u64) as usize
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.shards[self.shard(key)].get(key)
    }

    /// Inserts, cloning the key's shard first if a copy shares it.
    pub fn insert(&mut self, key: String, value: V) -> Option<V> {
        let i = self.shard(&key);
        let old = Arc::make_mut(&mut self.shards[i]).insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes, cloning the key's shard first if a copy shares it (and only if the key
    /// is there).
    pub fn remove(&mut self, key: &str) -> Option<V> {
        let i = self.shard(key);
        if !self.shards[i].contains_key(key) {
            return None;
        }
        let old = Arc::make_mut(&mut self.shards[i]).remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_unchanged_by_writes_to_the_original_and_shares_what_they_leave() {
        let mut a: CowMap<u32> = CowMap::default();
        for i in 0..10_000 {
            a.insert(format!("k{i}"), i);
        }
        let b = a.clone();
        assert_eq!(a.insert("k1".into(), 7), Some(1));
        assert_eq!(a.remove("k2"), Some(2));
        assert_eq!(a.remove("absent"), None);
        a.insert("new".into(), 9);
        assert_eq!((a.len(), b.len()), (10_000, 10_000));
        assert_eq!((a.get("k1"), b.get("k1")), (Some(&7), Some(&1)));
        assert_eq!((a.get("k2"), b.get("k2")), (None, Some(&2)));
        assert_eq!((a.get("new"), b.get("new")), (Some(&9), None));
        // At most three shards were copied; the rest are the same allocation.
        let shared = a
            .shards
            .iter()
            .zip(b.shards.iter())
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert!(shared >= SHARDS - 3, "{shared}");
        assert_eq!(a.values().count(), 10_000);
    }
}
