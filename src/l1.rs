//! The per-process L1: decoded entries in memory, weighted by bytes, each expiring no later than its
//! copy in the store.
//!
//! Expiry is checked against tokio's clock on every read (so paused-time tests see it), and moka's own
//! per-entry expiry frees the memory. Deletes and purges on any replica reach every L1 through the bus;
//! a store read that started before such an invalidation is not inserted (the flight checks).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moka::sync::Cache;
use tokio::time::Instant;

use crate::envelope::Entry;
use crate::key::KeyHash;
use crate::metrics::Metrics;

/// Bytes one header costs beyond its name and value: its `(String, Bytes)` slot in the entry, the
/// name's own allocation (the name is counted twice: copied out of the envelope, which keeps it
/// too, as it keeps the value) and its two length prefixes in the envelope.
const HEADER_OVERHEAD: usize = size_of::<(String, Bytes)>() + ALLOCATION_OVERHEAD + 6;

/// What an allocation costs beyond its bytes: the allocator's own header and rounding, on average.
const ALLOCATION_OVERHEAD: usize = 16;

/// Bytes an entry costs beyond its body and headers: the `Arc<Entry>`, the envelope's fixed part,
/// the shared handle through which the body and values keep the envelope, the allocations of
/// those three and of the header slots, and moka's own bookkeeping for the slot.
const ENTRY_OVERHEAD: usize = size_of::<Entry>()
    + 2 * size_of::<usize>()
    + ENVELOPE_FIXED
    + 3 * size_of::<usize>()
    + 4 * ALLOCATION_OVERHEAD
    + MOKA_ENTRY;

/// The envelope's bytes around the headers and body: its fixed part and the body's length prefix
/// (89), rounded up.
const ENVELOPE_FIXED: usize = 96;

/// moka's bookkeeping per entry (its hash-table bucket, the key's `Arc`, the access-order and
/// expiry-timer nodes), which no type here shows: measured with `benches/l1_memory.rs`. A small
/// entry (100 B body, 3 headers) cost about 1,260 B of resident memory with the system
/// allocator, of which the allocations counted above are about 830 B; with this, the weight
/// tracks resident memory within a few percent (docs/performance.md, "L1 memory").
const MOKA_ENTRY: usize = 400;

#[derive(Clone)]
struct Slot {
    /// The decoded entry, shared with every caller it answers.
    entry: Arc<Entry>,
    /// When this copy stops being served, by tokio's clock.
    expires_at: Instant,
    /// moka's own expiry for the slot, so memory is freed without a read.
    ttl: Duration,
    /// Bytes this slot is weighted at.
    weight: u32,
}

/// The L1; cheap to clone.
#[derive(Clone)]
pub struct L1 {
    /// `None` when the L1 is turned off (`max_bytes: 0`).
    cache: Option<Cache<KeyHash, Slot>>,
    metrics: Metrics,
}

struct SlotExpiry;

// moka hands its own clock's instants to this trait; corral's reads check tokio's clock separately.
#[allow(clippy::disallowed_types)]
impl moka::Expiry<KeyHash, Slot> for SlotExpiry {
    fn expire_after_create(
        &self,
        _key: &KeyHash,
        slot: &Slot,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(slot.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &KeyHash,
        slot: &Slot,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.ttl)
    }
}

impl L1 {
    /// An L1 holding at most `max_bytes` (0 turns it off).
    pub fn new(max_bytes: u64, metrics: Metrics) -> Self {
        let cache = (max_bytes > 0).then(|| {
            Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_key: &KeyHash, slot: &Slot| slot.weight)
                .expire_after(SlotExpiry)
                .build()
        });
        Self { cache, metrics }
    }

    /// A fresh copy, if there is one.
    pub fn get(&self, key: &KeyHash) -> Option<Arc<Entry>> {
        self.get_with_ttl(key).map(|(entry, _)| entry)
    }

    /// A fresh copy and how long it stays fresh here, if there is one.
    pub fn get_with_ttl(&self, key: &KeyHash) -> Option<(Arc<Entry>, Duration)> {
        let cache = self.cache.as_ref()?;
        let now = Instant::now();
        match cache.get(key) {
            Some(slot) if slot.expires_at > now => {
                self.metrics.l1_hits.inc();
                Some((slot.entry, slot.expires_at - now))
            }
            Some(_) => {
                cache.invalidate(key);
                self.metrics.l1_misses.inc();
                None
            }
            None => {
                self.metrics.l1_misses.inc();
                None
            }
        }
    }

    /// Keeps `entry` for `ttl` (never longer than the store's remaining freshness: the caller's job).
    pub fn insert(&self, key: KeyHash, entry: Arc<Entry>, ttl: Duration) {
        let Some(cache) = &self.cache else { return };
        if ttl.is_zero() {
            return;
        }
        let slot = Slot {
            weight: weight(&entry),
            entry,
            expires_at: Instant::now() + ttl,
            ttl,
        };
        cache.insert(key, slot);
    }

    pub fn invalidate(&self, key: &KeyHash) {
        if let Some(cache) = &self.cache {
            cache.invalidate(key);
        }
    }

    /// Whether a copy is held (fresh or not yet evicted); for tests and status.
    pub fn contains(&self, key: &KeyHash) -> bool {
        self.cache.as_ref().is_some_and(|cache| {
            cache
                .get(key)
                .is_some_and(|slot| slot.expires_at > Instant::now())
        })
    }

    /// Entries held, after pending maintenance.
    pub fn entry_count(&self) -> u64 {
        self.cache.as_ref().map_or(0, |cache| {
            cache.run_pending_tasks();
            cache.entry_count()
        })
    }

    /// Bytes held, after pending maintenance.
    pub fn weighted_size(&self) -> u64 {
        self.cache.as_ref().map_or(0, |cache| {
            cache.run_pending_tasks();
            cache.weighted_size()
        })
    }
}

/// Bytes `entry` is counted as in the L1: what it holds in memory, as far as lengths tell (a body
/// sliced from a larger buffer keeps that buffer alive, which no length shows).
fn weight(entry: &Entry) -> u32 {
    let headers = entry
        .headers
        .iter()
        .map(|(name, value)| 2 * name.len() + value.len() + HEADER_OVERHEAD)
        .fold(0usize, usize::saturating_add);
    let bytes = entry
        .body
        .len()
        .saturating_add(headers)
        .saturating_add(ENTRY_OVERHEAD);
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyBuilder;
    use bytes::Bytes;

    fn entry(body: &'static [u8]) -> Arc<Entry> {
        Arc::new(Entry {
            status: 0,
            headers: vec![],
            body: Bytes::from_static(body),
            stored_at_ms: 0,
            ttl: Duration::from_secs(60),
            stale: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            fetch_time: Duration::ZERO,
            key: KeyBuilder::new().part("k").finish().hash,
            form: crate::envelope::Form::Answer,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn copies_expire_by_tokio_time() {
        let l1 = L1::new(1 << 20, Metrics::new());
        let key = KeyBuilder::new().part("k").finish().hash;
        l1.insert(key, entry(b"v"), Duration::from_secs(5));
        assert!(l1.get(&key).is_some());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(l1.get(&key).is_none());
    }

    #[test]
    fn off_when_max_bytes_is_zero() {
        let l1 = L1::new(0, Metrics::new());
        let key = KeyBuilder::new().part("k").finish().hash;
        l1.insert(key, entry(b"v"), Duration::from_secs(5));
        assert!(l1.get(&key).is_none());
    }

    #[test]
    fn weight_counts_every_byte_and_more_for_each_header_and_entry() {
        let plain = entry(b"");
        assert!(weight(&plain) as usize >= size_of::<Entry>() + 2 * size_of::<usize>());
        let mut full = (*entry(&[7u8; 1000])).clone();
        full.headers = (0..10)
            .map(|i| (format!("x-header-{i}"), Bytes::from(vec![b'v'; 50])))
            .collect();
        let lengths: usize = full.body.len()
            + full
                .headers
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>();
        let slots = full.headers.len() * size_of::<(String, Bytes)>();
        assert!(weight(&full) as usize >= lengths + slots + weight(&plain) as usize);
        let huge = Entry {
            body: Bytes::from(vec![0u8; 1 << 20]),
            ..full
        };
        assert!(weight(&huge) as usize >= (1 << 20) + weight(&plain) as usize);
    }

    #[test]
    fn weight_is_bounded_by_max_bytes() {
        let l1 = L1::new(4096, Metrics::new());
        for i in 0..100u32 {
            let key = KeyBuilder::new().part(i.to_be_bytes()).finish().hash;
            l1.insert(key, entry(&[0u8; 512]), Duration::from_secs(60));
        }
        assert!(l1.weighted_size() <= 4096);
    }
}
