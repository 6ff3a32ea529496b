//! A cache of database reads with a time to live, that never keeps a value read
//! before an invalidation: every invalidation bumps a generation (under a lock,
//! together with the removal), and a value is stored only if no invalidation
//! happened since its read began.

use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug)]
pub struct ReadThrough<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    entries: moka::sync::Cache<K, V>,
    generation: Mutex<u64>,
}

/// Where a read began, for [`ReadThrough::put`].
#[derive(Clone, Copy, Debug)]
pub struct ReadStart(Option<u64>);

impl<K, V> ReadThrough<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        ReadThrough {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            generation: Mutex::new(0),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.entries.get(key)
    }

    /// Call before reading the value from the database.
    pub fn begin(&self) -> ReadStart {
        ReadStart(self.generation.lock().map(|g| *g).ok())
    }

    /// Stores what a read that began at `start` found, unless an invalidation came since.
    pub fn put(&self, start: ReadStart, key: K, value: V) {
        if let (Some(before), Ok(now)) = (start.0, self.generation.lock()) {
            if *now == before {
                self.entries.insert(key, value);
            }
        }
    }

    /// Forgets every entry `drop` names.
    pub fn invalidate_if(&self, drop: impl Fn(&K, &V) -> bool) {
        let mut generation = self
            .generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *generation += 1;
        for (key, value) in self.entries.iter() {
            if drop(&key, &value) {
                self.entries.invalidate(key.as_ref());
            }
        }
    }

    pub fn invalidate(&self, key: &K) {
        let mut generation = self
            .generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *generation += 1;
        self.entries.invalidate(key);
    }

    pub fn clear(&self) {
        self.invalidate_if(|_, _| true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_began_before_an_invalidation_is_not_kept() {
        let c: ReadThrough<String, u32> = ReadThrough::new(10, Duration::from_secs(60));
        let start = c.begin();
        c.invalidate(&"a".to_string());
        c.put(start, "a".into(), 1);
        assert_eq!(c.get(&"a".to_string()), None);
        let start = c.begin();
        c.put(start, "a".into(), 2);
        assert_eq!(c.get(&"a".to_string()), Some(2));
        c.invalidate_if(|k, _| k == "a");
        assert_eq!(c.get(&"a".to_string()), None);
    }
}
