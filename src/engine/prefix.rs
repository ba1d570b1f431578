//! The prefix cache: KV caches of finished sequences, kept so that a later prompt that starts
//! with the same tokens (a chat's earlier turns, a shared system prompt) copies their keys and
//! values instead of computing them again. Entries are evicted least recently used first,
//! whenever the engine needs their memory for running sequences.

/// Length of the longest common prefix of `a` and `b`.
pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct Entry<C> {
    id: u64,
    /// The tokens whose keys and values `cache` holds, in order from position 0.
    tokens: Vec<u32>,
    cache: C,
    bytes: u64,
    last_used: u64,
}

/// Kept KV caches, `C` being the engine's cache type.
pub(crate) struct PrefixStore<C> {
    entries: Vec<Entry<C>>,
    bytes: u64,
    clock: u64,
}

impl<C> Default for PrefixStore<C> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            bytes: 0,
            clock: 0,
        }
    }
}

/// A store entry that shares a prefix with a prompt (its id stays valid while other entries
/// come and go).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    pub id: u64,
    /// Tokens the entry and the prompt share from the start.
    pub common: usize,
}

impl<C> PrefixStore<C> {
    /// Bytes the kept caches take.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry sharing the longest prefix with `prompt`, if any shares one.
    pub fn best(&self, prompt: &[u32]) -> Option<Hit> {
        self.entries
            .iter()
            .map(|e| (common_prefix(&e.tokens, prompt), e.last_used, e.id))
            .filter(|(common, ..)| *common > 0)
            .max()
            .map(|(common, _, id)| Hit { id, common })
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.entries.iter().position(|e| e.id == id)
    }

    /// The cache of entry `id`, marked as just used.
    ///
    /// # Panics
    /// When no entry has that id.
    pub fn take_hit(&mut self, id: u64) -> &C {
        self.clock += 1;
        let index = self.position(id).expect("a prefix cache entry that exists");
        let entry = &mut self.entries[index];
        entry.last_used = self.clock;
        &entry.cache
    }

    /// Keeps `cache`, which holds the keys and values of `tokens` and takes `bytes`. An entry
    /// whose tokens start the new ones is dropped (the new one serves every prompt it served);
    /// when the new tokens start an existing entry's, that entry is kept instead and `cache` is
    /// returned unused.
    pub fn insert(&mut self, tokens: Vec<u32>, cache: C, bytes: u64) -> Option<C> {
        self.clock += 1;
        if let Some(longer) = self
            .entries
            .iter_mut()
            .find(|e| e.tokens.len() >= tokens.len() && e.tokens.starts_with(&tokens))
        {
            longer.last_used = self.clock;
            return Some(cache);
        }
        let mut i = 0;
        while i < self.entries.len() {
            if tokens.starts_with(&self.entries[i].tokens) {
                let gone = self.entries.swap_remove(i);
                self.bytes -= gone.bytes;
            } else {
                i += 1;
            }
        }
        self.bytes += bytes;
        self.entries.push(Entry {
            id: self.clock,
            tokens,
            cache,
            bytes,
            last_used: self.clock,
        });
        None
    }

    /// Drops the least recently used entry, except `keep`; returns the bytes it freed, or None
    /// when there is nothing to drop.
    pub fn evict_lru(&mut self, keep: Option<u64>) -> Option<u64> {
        let (index, _) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| Some(e.id) != keep)
            .min_by_key(|(_, e)| e.last_used)?;
        let gone = self.entries.swap_remove(index);
        self.bytes -= gone.bytes;
        Some(gone.bytes)
    }

    /// Drops entry `id`, if it is there.
    pub fn remove(&mut self, id: u64) {
        if let Some(index) = self.position(id) {
            let gone = self.entries.swap_remove(index);
            self.bytes -= gone.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_shared_prefix_wins_and_ties_go_to_the_most_recent() {
        let mut store = PrefixStore::default();
        store.insert(vec![1, 2, 3], "a", 30);
        store.insert(vec![1, 2, 9, 9], "b", 40);
        store.insert(vec![7, 7], "c", 20);
        assert_eq!(store.bytes(), 90);
        let hit = store.best(&[1, 2, 3, 4]).unwrap();
        assert_eq!(hit.common, 3);
        assert_eq!(*store.take_hit(hit.id), "a");
        // [1, 2] ties between a and b: b was used less recently than a.
        let hit = store.best(&[1, 2, 5]).unwrap();
        assert_eq!((hit.common, *store.take_hit(hit.id)), (2, "a"));
        assert_eq!(store.best(&[5, 1, 2]), None);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_and_spares_the_one_kept() {
        let mut store = PrefixStore::default();
        store.insert(vec![1], "a", 10);
        store.insert(vec![2], "b", 20);
        store.insert(vec![3], "c", 30);
        let a = store.best(&[1]).unwrap().id;
        store.take_hit(a);
        // b is now the oldest.
        let b = store.best(&[2]).unwrap().id;
        assert_eq!(store.evict_lru(Some(b)), Some(30));
        assert_eq!(store.evict_lru(None), Some(20));
        assert_eq!(store.bytes(), 10);
        assert_eq!(store.evict_lru(Some(a)), None);
        // Ids stay valid while others go.
        assert_eq!(*store.take_hit(a), "a");
        assert_eq!(store.evict_lru(None), Some(10));
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }

    #[test]
    fn a_longer_entry_supersedes_its_prefixes_and_a_prefix_of_one_is_not_kept() {
        let mut store = PrefixStore::default();
        store.insert(vec![1, 2], "short", 2);
        store.insert(vec![5], "other", 1);
        assert_eq!(store.insert(vec![1, 2, 3, 4], "long", 4), None);
        assert_eq!((store.len(), store.bytes()), (2, 5));
        assert_eq!(store.insert(vec![1, 2, 3], "dup", 3), Some("dup"));
        assert_eq!((store.len(), store.bytes()), (2, 5));
        let hit = store.best(&[1, 2, 3, 4, 5]).unwrap();
        assert_eq!((hit.common, *store.take_hit(hit.id)), (4, "long"));
    }

    #[test]
    fn common_prefix_lengths() {
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2]), 2);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 3]), 3);
        assert_eq!(common_prefix(&[4, 2, 3], &[1, 2, 3]), 0);
    }
}
