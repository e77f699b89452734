//! What DNS told each client: `(client, name, address)` entries that expire.
//!
//! Time is the caller's (`now_ns`, the capture's in replay): nothing here reads
//! a clock. An entry lives its answer's TTL, clamped to
//! `[ttl_floor_s, ttl_cap_s]`: the floor because clients keep using an address
//! a little past a short TTL (and connect after the answer, not at it), the cap
//! so that a year-long TTL does not pin an entry. An expired entry is treated as
//! absent by every query, and removed lazily: each [`DnsCache::learn`] first
//! purges up to [`PURGE_BATCH`] expired entries, more than one call can add, so
//! a long-running agent does not accumulate them.
//!
//! Memory is bounded by [`DnsLimits::max_entries`] entries (and as many ECH
//! announcements, kept apart): when full, the entry expiring soonest goes (the
//! oldest learned among equals), counted in [`DnsCache::evicted`] unless it had
//! expired anyway. Names are interned, so a name costs one allocation however
//! many clients and addresses it has.
//!
//! Every entry is in a hash table by `(client, name, addr)`, a list per
//! `(client, addr)` (newest first) and three ordered indexes (by expiry; by
//! name; by name and address), all updated together on insert, refresh, expiry
//! and eviction, so each operation is O(log n) (plus, for `name_for`, the
//! expired entries of that client and address not yet purged).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Arc;

use hashbrown::HashTable;

use super::message::{MAX_ANSWERS, MAX_ECH_NAMES, Response};

/// Default [`DnsLimits::max_entries`]: 14 to 22 MiB when full (more distinct
/// names take more).
pub const DEFAULT_MAX_ENTRIES: usize = 65_536;
/// Default [`DnsLimits::ttl_floor_s`].
pub const DEFAULT_TTL_FLOOR_S: u32 = 60;
/// Default [`DnsLimits::ttl_cap_s`]: one day.
pub const DEFAULT_TTL_CAP_S: u32 = 86_400;
/// Expired entries removed per [`DnsCache::learn`] at most (it adds at most
/// [`MAX_ANSWERS`]), so one call never stalls on a mass expiry.
pub const PURGE_BATCH: usize = 4 * MAX_ANSWERS;

const NS_PER_S: u64 = 1_000_000_000;

/// Bounds of a [`DnsCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsLimits {
    /// `(client, name, address)` entries kept at most (ECH announcements,
    /// `(client, name)`, are bounded by the same number separately).
    pub max_entries: usize,
    /// Shortest lifetime of an entry, seconds (a TTL of 0 lives this long).
    pub ttl_floor_s: u32,
    /// Longest lifetime of an entry, seconds (wins over the floor if smaller).
    pub ttl_cap_s: u32,
}

impl Default for DnsLimits {
    fn default() -> Self {
        DnsLimits {
            max_entries: DEFAULT_MAX_ENTRIES,
            ttl_floor_s: DEFAULT_TTL_FLOOR_S,
            ttl_cap_s: DEFAULT_TTL_CAP_S,
        }
    }
}

/// The name a client's DNS answers gave for an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved<'a> {
    pub name: &'a str,
    /// An unexpired HTTPS/SVCB answer to the same client announced ECH for
    /// `name`: an outer SNI other than `name` is then expected, not forged.
    pub ech_announced: bool,
}

/// Whether DNS gave an address for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolves {
    /// No unexpired answer for the name was seen (by any client): nothing to
    /// compare against.
    Unseen,
    /// An unexpired answer gave the address.
    Yes,
    /// Unexpired answers for the name were seen, none gave the address.
    No,
}

/// An address as a map key: IPv4 as its IPv4-mapped IPv6 form (after
/// `to_canonical`, so both spellings of an IPv4 address meet), 16 bytes
/// against `IpAddr`'s 17 and without its padding in tuples.
type Addr = [u8; 16];

fn addr_key(ip: IpAddr) -> Addr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// No slot (list ends).
const NIL: u32 = u32::MAX;

/// One `(client, name, addr)` entry. Slots of one `(client, addr)` form a list,
/// newest learned first, that `name_for` walks.
#[derive(Debug, Clone, Copy)]
struct Slot {
    client: Addr,
    addr: Addr,
    /// Index into `name_slots`; `NIL` while the slot is free.
    name: u32,
    expires_ns: u64,
    /// Unique, increasing: when the entry was (last) learned.
    seq: u64,
    newer: u32,
    older: u32,
}

#[derive(Debug)]
struct NameSlot {
    text: Arc<str>,
    /// Entries and ECH announcements using the name; 0: the slot is free.
    refs: u32,
}

#[derive(Debug, Clone, Copy)]
struct Stamp {
    expires_ns: u64,
    seq: u64,
}

/// Per-client DNS answers; see the module docs.
///
/// Entries live in a slab (`slots`, 64 bytes each) and are reached by a hash
/// table of slot numbers keyed by `(client, name, addr)`; names are interned
/// as `u32`s. The ordered indexes hold only numbers, so a full cache of
/// 65,536 entries takes 14 to 22 MiB (measured with a counting allocator: 223
/// bytes per entry with 10 names, 346 with a distinct name per entry).
#[derive(Debug)]
pub struct DnsCache {
    limits: DnsLimits,
    next_seq: u64,
    evicted: u64,
    /// Keyed by attacker-influenced names and addresses: std's seeded SipHash.
    hasher: RandomState,
    names: HashMap<Arc<str>, u32>,
    name_slots: Vec<NameSlot>,
    free_names: Vec<u32>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    live: usize,
    /// Slot numbers by `(client, name, addr)`.
    by_key: HashTable<u32>,
    /// The newest slot of each `(client, addr)` list.
    heads: HashTable<u32>,
    /// `(expires_ns, seq, slot)`: purging and eviction take from the front.
    by_expiry: BTreeSet<(u64, u64, u32)>,
    /// `(name, expires_ns, slot)`: the last one for a name tells whether any of
    /// its entries is unexpired.
    by_name: BTreeSet<(u32, u64, u32)>,
    /// `(name, addr, expires_ns, slot)`: the same for one address.
    by_name_addr: BTreeSet<(u32, Addr, u64, u32)>,
    /// `(client, name)` that an HTTPS/SVCB answer announced ECH for.
    ech: HashMap<(Addr, u32), Stamp>,
    ech_by_expiry: BTreeMap<(u64, u64), (Addr, u32)>,
}

impl Default for DnsCache {
    fn default() -> Self {
        Self::new(DnsLimits::default())
    }
}

impl DnsCache {
    pub fn new(limits: DnsLimits) -> Self {
        DnsCache {
            limits,
            next_seq: 0,
            evicted: 0,
            hasher: RandomState::new(),
            names: HashMap::new(),
            name_slots: Vec::new(),
            free_names: Vec::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            live: 0,
            by_key: HashTable::new(),
            heads: HashTable::new(),
            by_expiry: BTreeSet::new(),
            by_name: BTreeSet::new(),
            by_name_addr: BTreeSet::new(),
            ech: HashMap::new(),
            ech_by_expiry: BTreeMap::new(),
        }
    }

    /// Learns what `resp` told `client` at `now_ns` (ttl clamped to [floor, cap]).
    ///
    /// An answer already known for `(client, name, addr)` is refreshed: its new
    /// TTL replaces the old, and it becomes the latest learned. Within one
    /// response the first answer listed for an address is learned last, so the
    /// question name (listed before its CNAME targets) wins in `name_for`. At
    /// most [`MAX_ANSWERS`] answers and [`MAX_ECH_NAMES`] ECH names are taken.
    pub fn learn(&mut self, client: IpAddr, resp: &Response, now_ns: u64) {
        let client = addr_key(client);
        self.purge(now_ns);
        if self.limits.max_entries == 0 {
            return;
        }
        for answer in resp.answers.iter().take(MAX_ANSWERS).rev() {
            let name = normalize(&answer.name);
            if name.is_empty() {
                continue;
            }
            let expires_ns = self.expiry(answer.ttl, now_ns);
            self.insert(client, &name, addr_key(answer.addr), expires_ns, now_ns);
        }
        if !resp.ech_names.is_empty() {
            let expires_ns = self.expiry(resp.ech_ttl, now_ns);
            for name in resp.ech_names.iter().take(MAX_ECH_NAMES) {
                let name = normalize(name);
                if !name.is_empty() {
                    self.mark_ech(client, &name, expires_ns, now_ns);
                }
            }
        }
    }

    /// The name `client`'s own unexpired answers gave for `addr` (latest learned wins).
    pub fn name_for(&self, client: IpAddr, addr: IpAddr, now_ns: u64) -> Option<Resolved<'_>> {
        let (client, addr) = (addr_key(client), addr_key(addr));
        let slots = &self.slots;
        let mut at = *self.heads.find(self.hash_pair(&client, &addr), |&s| {
            slots[s as usize].client == client && slots[s as usize].addr == addr
        })?;
        // Newest first; expired entries not yet purged are stepped over.
        while let Some(slot) = slots.get(at as usize) {
            if slot.expires_ns > now_ns {
                let ech_announced = self
                    .ech
                    .get(&(client, slot.name))
                    .is_some_and(|s| s.expires_ns > now_ns);
                return Some(Resolved {
                    name: self.name_slots.get(slot.name as usize)?.text.as_ref(),
                    ech_announced,
                });
            }
            at = slot.older;
        }
        None
    }

    /// Whether unexpired answers (to any client) were seen for `name` and, if so, whether any gave `addr`.
    pub fn resolves(&self, name: &str, addr: IpAddr, now_ns: u64) -> Resolves {
        let addr = addr_key(addr);
        let Some(&id) = self.names.get(&*normalize(name)) else {
            return Resolves::Unseen;
        };
        let alive = |expires: Option<u64>| expires.is_some_and(|e| e > now_ns);
        let any = self
            .by_name
            .range((id, 0, 0)..=(id, u64::MAX, u32::MAX))
            .next_back()
            .map(|&(_, e, _)| e);
        if !alive(any) {
            return Resolves::Unseen;
        }
        let this = self
            .by_name_addr
            .range((id, addr, 0, 0)..=(id, addr, u64::MAX, u32::MAX))
            .next_back()
            .map(|&(_, _, e, _)| e);
        if alive(this) {
            Resolves::Yes
        } else {
            Resolves::No
        }
    }

    /// `(client, name, addr)` entries held, expired ones not yet purged included.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Entries dropped to stay within max_entries since creation (for a metric).
    /// ECH announcements dropped to stay within their own bound count too;
    /// what had expired when dropped does not.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn expiry(&self, ttl: u32, now_ns: u64) -> u64 {
        // max then min: a floor above the cap gives the cap, never a panic.
        let ttl = ttl.max(self.limits.ttl_floor_s).min(self.limits.ttl_cap_s);
        now_ns.saturating_add(u64::from(ttl) * NS_PER_S)
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn hash_key(&self, client: &Addr, name: u32, addr: &Addr) -> u64 {
        self.hasher.hash_one((client, name, addr))
    }

    fn hash_pair(&self, client: &Addr, addr: &Addr) -> u64 {
        self.hasher.hash_one((client, addr))
    }

    /// The number of `name`, interned if new, with one more reference.
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.names.get(name) {
            if let Some(n) = self.name_slots.get_mut(id as usize) {
                n.refs += 1;
            }
            return id;
        }
        let text: Arc<str> = Arc::from(name);
        let id = match self.free_names.pop() {
            Some(id) => {
                self.name_slots[id as usize] = NameSlot {
                    text: text.clone(),
                    refs: 1,
                };
                id
            }
            None => {
                // At most 2 * max_entries names are in use: fits u32 for any
                // max_entries a machine can hold.
                let id = u32::try_from(self.name_slots.len()).unwrap_or(NIL);
                self.name_slots.push(NameSlot {
                    text: text.clone(),
                    refs: 1,
                });
                id
            }
        };
        self.names.insert(text, id);
        id
    }

    /// Drops one reference to a name; the last one frees it.
    fn release(&mut self, id: u32) {
        let Some(n) = self.name_slots.get_mut(id as usize) else {
            return;
        };
        n.refs -= 1;
        if n.refs == 0 {
            let text = std::mem::replace(&mut n.text, Arc::from(""));
            self.names.remove(&text);
            self.free_names.push(id);
        }
    }

    fn find(&self, client: &Addr, name: &str, addr: &Addr) -> Option<u32> {
        let &id = self.names.get(name)?;
        let slots = &self.slots;
        self.by_key
            .find(self.hash_key(client, id, addr), |&s| {
                let e = &slots[s as usize];
                e.name == id && e.client == *client && e.addr == *addr
            })
            .copied()
    }

    fn insert(&mut self, client: Addr, name: &str, addr: Addr, expires_ns: u64, now_ns: u64) {
        if let Some(s) = self.find(&client, name, &addr) {
            // Refresh: new expiry, newest of its list.
            self.unindex(s);
            self.unlink(s);
            let seq = self.next_seq();
            let slot = &mut self.slots[s as usize];
            slot.expires_ns = expires_ns;
            slot.seq = seq;
            self.index(s);
            self.link_front(s);
            return;
        }
        if self.live >= self.limits.max_entries {
            // Before interning: eviction may free the name's number.
            self.evict_one(now_ns);
        }
        let name = self.intern(name);
        let seq = self.next_seq();
        let slot = Slot {
            client,
            addr,
            name,
            expires_ns,
            seq,
            newer: NIL,
            older: NIL,
        };
        let s = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s as usize] = slot;
                s
            }
            None => {
                // live <= max_entries, and a slot number must not be NIL.
                let Ok(s) = u32::try_from(self.slots.len()) else {
                    self.release(name);
                    return;
                };
                if s == NIL {
                    self.release(name);
                    return;
                }
                self.slots.push(slot);
                s
            }
        };
        self.live += 1;
        let hash = self.hash_key(&client, name, &addr);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_key.insert_unique(hash, s, |&x| {
            let e = &slots[x as usize];
            hasher.hash_one((&e.client, e.name, &e.addr))
        });
        self.index(s);
        self.link_front(s);
    }

    /// Adds a slot to the ordered indexes.
    fn index(&mut self, s: u32) {
        let e = self.slots[s as usize];
        self.by_expiry.insert((e.expires_ns, e.seq, s));
        self.by_name.insert((e.name, e.expires_ns, s));
        self.by_name_addr.insert((e.name, e.addr, e.expires_ns, s));
    }

    /// Removes a slot from the ordered indexes.
    fn unindex(&mut self, s: u32) {
        let e = self.slots[s as usize];
        self.by_expiry.remove(&(e.expires_ns, e.seq, s));
        self.by_name.remove(&(e.name, e.expires_ns, s));
        self.by_name_addr.remove(&(e.name, e.addr, e.expires_ns, s));
    }

    /// Makes `s` the newest of its `(client, addr)` list.
    fn link_front(&mut self, s: u32) {
        let Slot { client, addr, .. } = self.slots[s as usize];
        let hash = self.hash_pair(&client, &addr);
        let (slots, hasher) = (&mut self.slots, &self.hasher);
        let head = self.heads.find_mut(hash, |&x| {
            slots[x as usize].client == client && slots[x as usize].addr == addr
        });
        match head {
            Some(head) => {
                let old = std::mem::replace(head, s);
                slots[old as usize].newer = s;
                slots[s as usize].older = old;
            }
            None => {
                slots[s as usize].older = NIL;
                self.heads.insert_unique(hash, s, |&x| {
                    let e = &slots[x as usize];
                    hasher.hash_one((&e.client, &e.addr))
                });
            }
        }
        slots[s as usize].newer = NIL;
    }

    /// Takes `s` out of its `(client, addr)` list.
    fn unlink(&mut self, s: u32) {
        let Slot {
            client,
            addr,
            newer,
            older,
            ..
        } = self.slots[s as usize];
        if older != NIL {
            self.slots[older as usize].newer = newer;
        }
        if newer != NIL {
            self.slots[newer as usize].older = older;
            return;
        }
        // `s` was the head.
        let hash = self.hash_pair(&client, &addr);
        if let Ok(head) = self.heads.find_entry(hash, |&x| x == s) {
            if older == NIL {
                head.remove();
            } else {
                *head.into_mut() = older;
            }
        }
    }

    /// Removes the entry in slot `s` from everything and frees the slot.
    fn remove(&mut self, s: u32) {
        let e = self.slots[s as usize];
        self.unindex(s);
        self.unlink(s);
        let hash = self.hash_key(&e.client, e.name, &e.addr);
        if let Ok(entry) = self.by_key.find_entry(hash, |&x| x == s) {
            entry.remove();
        }
        self.release(e.name);
        self.slots[s as usize].name = NIL;
        self.free_slots.push(s);
        self.live -= 1;
    }

    /// Removes the entry expiring soonest; returns its expiry.
    fn pop_soonest(&mut self) -> Option<u64> {
        let &(expires_ns, _, s) = self.by_expiry.first()?;
        self.remove(s);
        Some(expires_ns)
    }

    fn evict_one(&mut self, now_ns: u64) {
        if self
            .pop_soonest()
            .is_some_and(|expires_ns| expires_ns > now_ns)
        {
            self.evicted += 1;
        }
    }

    fn mark_ech(&mut self, client: Addr, name: &str, expires_ns: u64, now_ns: u64) {
        let old = self
            .names
            .get(name)
            .and_then(|&id| self.ech.get(&(client, id)).map(|s| (id, *s)));
        let id = match old {
            Some((id, old)) => {
                self.ech_by_expiry.remove(&(old.expires_ns, old.seq));
                id
            }
            None => {
                if self.ech.len() >= self.limits.max_entries {
                    self.evict_one_ech(now_ns);
                }
                self.intern(name)
            }
        };
        let seq = self.next_seq();
        self.ech_by_expiry.insert((expires_ns, seq), (client, id));
        self.ech.insert((client, id), Stamp { expires_ns, seq });
    }

    fn pop_soonest_ech(&mut self) -> Option<u64> {
        let ((expires_ns, _), (client, id)) = self.ech_by_expiry.pop_first()?;
        self.ech.remove(&(client, id));
        self.release(id);
        Some(expires_ns)
    }

    fn evict_one_ech(&mut self, now_ns: u64) {
        if self
            .pop_soonest_ech()
            .is_some_and(|expires_ns| expires_ns > now_ns)
        {
            self.evicted += 1;
        }
    }

    /// Removes up to [`PURGE_BATCH`] expired entries and as many expired ECH
    /// announcements.
    fn purge(&mut self, now_ns: u64) {
        for _ in 0..PURGE_BATCH {
            match self.by_expiry.first() {
                Some(&(expires_ns, _, _)) if expires_ns <= now_ns => {
                    self.pop_soonest();
                }
                _ => break,
            }
        }
        for _ in 0..PURGE_BATCH {
            match self.ech_by_expiry.first_key_value() {
                Some(((expires_ns, _), _)) if *expires_ns <= now_ns => {
                    self.pop_soonest_ech();
                }
                _ => break,
            }
        }
    }
}

/// Names compare lowercase without the trailing dot; borrowed when already so
/// (as [`super::parse_response`] gives them).
fn normalize(name: &str) -> std::borrow::Cow<'_, str> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(trimmed)
    }
}

#[cfg(test)]
impl DnsCache {
    /// Every live slot is in every index and in its `(client, addr)` list
    /// (newest first), nothing else is, and name references add up.
    fn check_invariants(&self) {
        use std::collections::HashSet;
        let live: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&s| self.slots[s as usize].name != NIL)
            .collect();
        assert_eq!(live.len(), self.live);
        assert_eq!(live.len() + self.free_slots.len(), self.slots.len());
        assert!(self.live <= self.limits.max_entries);
        for idx in [self.by_key.len(), self.by_expiry.len(), self.by_name.len()] {
            assert_eq!(idx, self.live);
        }
        assert_eq!(self.by_name_addr.len(), self.live);
        let mut refs = vec![0u32; self.name_slots.len()];
        let mut listed = HashSet::new();
        for &s in &live {
            let e = self.slots[s as usize];
            assert_eq!(
                self.find(&e.client, &self.name_slots[e.name as usize].text, &e.addr),
                Some(s)
            );
            assert!(self.by_expiry.contains(&(e.expires_ns, e.seq, s)));
            assert!(self.by_name.contains(&(e.name, e.expires_ns, s)));
            assert!(
                self.by_name_addr
                    .contains(&(e.name, e.addr, e.expires_ns, s))
            );
            refs[e.name as usize] += 1;
            if e.newer == NIL {
                // A head: its list holds its pair's slots, seq decreasing.
                let head = self
                    .heads
                    .find(self.hash_pair(&e.client, &e.addr), |&x| x == s);
                assert_eq!(head, Some(&s));
                let (mut at, mut prev_seq, mut prev) = (s, u64::MAX, NIL);
                while at != NIL {
                    let x = self.slots[at as usize];
                    assert_eq!((x.client, x.addr, x.newer), (e.client, e.addr, prev));
                    assert!(x.seq < prev_seq);
                    assert!(listed.insert(at));
                    (prev_seq, prev, at) = (x.seq, at, x.older);
                }
            }
        }
        assert_eq!(listed.len(), self.live);
        assert!(self.ech.len() <= self.limits.max_entries);
        assert_eq!(self.ech_by_expiry.len(), self.ech.len());
        for (&(client, id), st) in &self.ech {
            assert_eq!(
                self.ech_by_expiry.get(&(st.expires_ns, st.seq)),
                Some(&(client, id))
            );
            refs[id as usize] += 1;
        }
        for (id, n) in self.name_slots.iter().enumerate() {
            assert_eq!(n.refs, refs[id]);
            if n.refs > 0 {
                assert_eq!(self.names.get(&n.text), Some(&(id as u32)));
            }
        }
        assert_eq!(self.names.len(), refs.iter().filter(|&&r| r > 0).count());
    }
}

#[cfg(test)]
mod tests {
    use super::super::message::Answer;
    use super::*;

    const S: u64 = NS_PER_S;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn resp(answers: &[(&str, &str, u32)]) -> Response {
        Response {
            answers: answers
                .iter()
                .map(|&(name, addr, ttl)| Answer {
                    name: name.to_owned(),
                    addr: ip(addr),
                    ttl,
                })
                .collect(),
            ..Response::default()
        }
    }

    fn name_of(c: &DnsCache, client: &str, addr: &str, now: u64) -> Option<String> {
        c.name_for(ip(client), ip(addr), now)
            .map(|r| r.name.to_owned())
    }

    const CLIENT: &str = "10.0.0.5";

    #[test]
    fn defaults() {
        let l = DnsLimits::default();
        assert_eq!(
            (l.max_entries, l.ttl_floor_s, l.ttl_cap_s),
            (65_536, 60, 86_400)
        );
    }

    #[test]
    fn ttl_floor_and_expiry() {
        let mut c = DnsCache::default();
        let t0 = 1_000 * S;
        c.learn(ip(CLIENT), &resp(&[("short.example", "192.0.2.1", 0)]), t0);
        c.learn(ip(CLIENT), &resp(&[("long.example", "192.0.2.2", 300)]), t0);
        let short = |now| name_of(&c, CLIENT, "192.0.2.1", now);
        assert_eq!(short(t0 + 60 * S - 1).as_deref(), Some("short.example"));
        assert_eq!(short(t0 + 60 * S), None);
        let long = |now| name_of(&c, CLIENT, "192.0.2.2", now);
        assert_eq!(long(t0 + 300 * S - 1).as_deref(), Some("long.example"));
        assert_eq!(long(t0 + 300 * S), None);
        c.check_invariants();
    }

    #[test]
    fn ttl_cap() {
        let mut c = DnsCache::default();
        c.learn(
            ip(CLIENT),
            &resp(&[("x.example", "192.0.2.1", u32::MAX)]),
            0,
        );
        let cap = u64::from(DEFAULT_TTL_CAP_S) * S;
        assert!(c.name_for(ip(CLIENT), ip("192.0.2.1"), cap - 1).is_some());
        assert!(c.name_for(ip(CLIENT), ip("192.0.2.1"), cap).is_none());
        // A floor above the cap: the cap wins, nothing panics.
        let mut c = DnsCache::new(DnsLimits {
            max_entries: 4,
            ttl_floor_s: 100,
            ttl_cap_s: 10,
        });
        c.learn(ip(CLIENT), &resp(&[("x.example", "192.0.2.1", 50)]), 0);
        assert!(c.name_for(ip(CLIENT), ip("192.0.2.1"), 10 * S).is_none());
        // Near the end of the clock: saturates.
        c.learn(
            ip(CLIENT),
            &resp(&[("x.example", "192.0.2.1", 50)]),
            u64::MAX - 1,
        );
        assert!(
            c.name_for(ip(CLIENT), ip("192.0.2.1"), u64::MAX - 1)
                .is_some()
        );
    }

    #[test]
    fn per_client() {
        let mut c = DnsCache::default();
        c.learn(ip(CLIENT), &resp(&[("a.example", "192.0.2.1", 300)]), 0);
        c.learn(ip("10.0.0.6"), &resp(&[("b.example", "192.0.2.1", 300)]), 0);
        assert_eq!(
            name_of(&c, CLIENT, "192.0.2.1", S).as_deref(),
            Some("a.example")
        );
        assert_eq!(
            name_of(&c, "10.0.0.6", "192.0.2.1", S).as_deref(),
            Some("b.example")
        );
        assert_eq!(name_of(&c, "10.0.0.7", "192.0.2.1", S), None);
        // `resolves` is across clients.
        assert_eq!(c.resolves("b.example", ip("192.0.2.1"), S), Resolves::Yes);
    }

    #[test]
    fn canonical_addresses_and_names() {
        let mut c = DnsCache::default();
        let mapped = resp(&[("API.Example.COM.", "::ffff:192.0.2.9", 300)]);
        c.learn(ip("::ffff:10.0.0.5"), &mapped, 0);
        assert_eq!(
            name_of(&c, CLIENT, "192.0.2.9", S).as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            c.resolves("api.example.com.", ip("::ffff:192.0.2.9"), S),
            Resolves::Yes
        );
        assert_eq!(
            c.resolves("API.EXAMPLE.COM", ip("192.0.2.9"), S),
            Resolves::Yes
        );
    }

    #[test]
    fn resolves_unseen_yes_no() {
        let mut c = DnsCache::default();
        let t0 = 5 * S;
        assert_eq!(
            c.resolves("a.example", ip("192.0.2.1"), t0),
            Resolves::Unseen
        );
        c.learn(ip(CLIENT), &resp(&[("a.example", "192.0.2.1", 100)]), t0);
        c.learn(
            ip("10.0.0.6"),
            &resp(&[("a.example", "192.0.2.2", 200)]),
            t0,
        );
        assert_eq!(c.resolves("a.example", ip("192.0.2.1"), t0), Resolves::Yes);
        assert_eq!(c.resolves("a.example", ip("192.0.2.2"), t0), Resolves::Yes);
        assert_eq!(c.resolves("a.example", ip("192.0.2.3"), t0), Resolves::No);
        assert_eq!(
            c.resolves("b.example", ip("192.0.2.1"), t0),
            Resolves::Unseen
        );
        // 192.0.2.1's answer expired, 192.0.2.2's not: a flow to .1 is now a "No".
        let t1 = t0 + 150 * S;
        assert_eq!(c.resolves("a.example", ip("192.0.2.1"), t1), Resolves::No);
        assert_eq!(c.resolves("a.example", ip("192.0.2.2"), t1), Resolves::Yes);
        // All expired: no false alarm.
        let t2 = t0 + 200 * S;
        assert_eq!(
            c.resolves("a.example", ip("192.0.2.1"), t2),
            Resolves::Unseen
        );
        assert_eq!(
            c.resolves("a.example", ip("192.0.2.2"), t2),
            Resolves::Unseen
        );
    }

    #[test]
    fn latest_answer_wins() {
        let mut c = DnsCache::default();
        c.learn(ip(CLIENT), &resp(&[("a.example", "192.0.2.1", 300)]), 0);
        c.learn(ip(CLIENT), &resp(&[("b.example", "192.0.2.1", 300)]), S);
        assert_eq!(
            name_of(&c, CLIENT, "192.0.2.1", 2 * S).as_deref(),
            Some("b.example")
        );
        c.learn(ip(CLIENT), &resp(&[("a.example", "192.0.2.1", 300)]), 3 * S);
        assert_eq!(
            name_of(&c, CLIENT, "192.0.2.1", 4 * S).as_deref(),
            Some("a.example")
        );
        // The latest expired, the earlier one not: the earlier one answers.
        c.learn(ip(CLIENT), &resp(&[("c.example", "192.0.2.1", 60)]), 5 * S);
        assert_eq!(
            name_of(&c, CLIENT, "192.0.2.1", 6 * S).as_deref(),
            Some("c.example")
        );
        assert_eq!(
            name_of(&c, CLIENT, "192.0.2.1", 5 * S + 60 * S).as_deref(),
            Some("a.example")
        );
        // Within one response the first answer listed (the question name) wins.
        c.learn(
            ip(CLIENT),
            &resp(&[
                ("api.openai.com", "104.18.33.45", 300),
                ("x.cdn.cloudflare.net", "104.18.33.45", 300),
            ]),
            100 * S,
        );
        assert_eq!(
            name_of(&c, CLIENT, "104.18.33.45", 101 * S).as_deref(),
            Some("api.openai.com")
        );
        c.check_invariants();
    }

    #[test]
    fn parsed_chain_end_to_end() {
        use hickory_proto::op::{Message, OpCode, Query};
        use hickory_proto::rr::rdata::{A, CNAME};
        use hickory_proto::rr::{Name as DnsName, RData, Record, RecordType};
        let n = |s: &str| DnsName::from_ascii(s).expect("test name");
        let mut m = Message::response(7, OpCode::Query);
        m.add_query(Query::query(n("api.openai.com."), RecordType::A));
        m.add_answer(Record::from_rdata(
            n("api.openai.com."),
            300,
            RData::CNAME(CNAME(n("x.cdn.cloudflare.net."))),
        ));
        m.add_answer(Record::from_rdata(
            n("x.cdn.cloudflare.net."),
            300,
            RData::A(A([104, 18, 33, 45].into())),
        ));
        let r = super::super::parse_response(&m.to_vec().expect("encode")).expect("parses");
        let mut c = DnsCache::default();
        c.learn(ip(CLIENT), &r, 0);
        assert_eq!(
            name_of(&c, CLIENT, "104.18.33.45", S).as_deref(),
            Some("api.openai.com")
        );
        assert_eq!(
            c.resolves("x.cdn.cloudflare.net", ip("104.18.33.45"), S),
            Resolves::Yes
        );
    }

    #[test]
    fn ech_announcement() {
        let mut c = DnsCache::default();
        let https = Response {
            ech_names: vec!["crypto.example".into()],
            ech_ttl: 120,
            ..resp(&[("crypto.example", "192.0.2.1", 120)])
        };
        c.learn(ip(CLIENT), &https, 0);
        // A separate A answer with another address: the announcement still holds.
        c.learn(
            ip(CLIENT),
            &resp(&[("crypto.example", "192.0.2.2", 600)]),
            S,
        );
        // Another client was not told.
        c.learn(
            ip("10.0.0.6"),
            &resp(&[("crypto.example", "192.0.2.2", 600)]),
            S,
        );
        let at = |addr, now| c.name_for(ip(CLIENT), ip(addr), now);
        let r = at("192.0.2.2", 2 * S).expect("known");
        assert_eq!((r.name, r.ech_announced), ("crypto.example", true));
        assert!(at("192.0.2.1", 2 * S).is_some_and(|r| r.ech_announced));
        assert!(
            c.name_for(ip("10.0.0.6"), ip("192.0.2.2"), 2 * S)
                .is_some_and(|r| !r.ech_announced)
        );
        // The announcement expires with its TTL.
        let r = at("192.0.2.2", 120 * S).expect("known");
        assert!(!r.ech_announced);
        c.check_invariants();
    }

    #[test]
    fn eviction_soonest_expiring_first() {
        let mut c = DnsCache::new(DnsLimits {
            max_entries: 3,
            ttl_floor_s: 1,
            ttl_cap_s: 1_000,
        });
        c.learn(ip(CLIENT), &resp(&[("a.example", "192.0.2.1", 300)]), 0);
        c.learn(ip(CLIENT), &resp(&[("b.example", "192.0.2.2", 100)]), 0);
        c.learn(ip(CLIENT), &resp(&[("c.example", "192.0.2.3", 200)]), 0);
        assert_eq!((c.len(), c.evicted()), (3, 0));
        // A refresh does not evict.
        c.learn(ip(CLIENT), &resp(&[("c.example", "192.0.2.3", 250)]), 0);
        assert_eq!((c.len(), c.evicted()), (3, 0));
        c.learn(ip(CLIENT), &resp(&[("d.example", "192.0.2.4", 300)]), 0);
        assert_eq!((c.len(), c.evicted()), (3, 1));
        assert_eq!(name_of(&c, CLIENT, "192.0.2.2", S), None);
        assert_eq!(
            c.resolves("b.example", ip("192.0.2.2"), S),
            Resolves::Unseen
        );
        assert_eq!(c.resolves("c.example", ip("192.0.2.3"), S), Resolves::Yes);
        c.check_invariants();
        // An expired entry making room is not an eviction.
        c.learn(
            ip(CLIENT),
            &resp(&[("e.example", "192.0.2.5", 300)]),
            260 * S,
        );
        assert_eq!(c.evicted(), 1);
        c.check_invariants();
    }

    #[test]
    fn expired_entries_are_purged() {
        let mut c = DnsCache::default();
        for i in 0..100u32 {
            let addr = std::net::Ipv4Addr::from(0xc000_0200 + i).to_string();
            c.learn(ip(CLIENT), &resp(&[("x.example", &addr, 60)]), 0);
        }
        assert_eq!(c.len(), 100);
        c.learn(ip(CLIENT), &resp(&[("y.example", "192.0.2.1", 60)]), 61 * S);
        assert_eq!(c.len(), 1);
        assert_eq!(c.evicted(), 0);
        c.check_invariants();
        // A mass expiry is purged a batch per call.
        let mut c = DnsCache::default();
        for i in 0..(3 * PURGE_BATCH as u32) {
            let addr = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            c.learn(ip(CLIENT), &resp(&[("x.example", &addr, 60)]), 0);
        }
        c.learn(ip(CLIENT), &resp(&[]), 61 * S);
        assert_eq!(c.len(), 2 * PURGE_BATCH);
        c.learn(ip(CLIENT), &resp(&[]), 61 * S);
        c.learn(ip(CLIENT), &resp(&[]), 61 * S);
        assert!(c.is_empty());
        c.check_invariants();
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut c = DnsCache::new(DnsLimits {
            max_entries: 0,
            ..DnsLimits::default()
        });
        let r = Response {
            ech_names: vec!["a.example".into()],
            ech_ttl: 60,
            ..resp(&[("a.example", "192.0.2.1", 60)])
        };
        c.learn(ip(CLIENT), &r, 0);
        assert!(c.is_empty());
        assert_eq!(c.name_for(ip(CLIENT), ip("192.0.2.1"), 0), None);
        c.check_invariants();
    }

    /// The obvious implementation, to compare against: a list, scanned.
    #[derive(Default)]
    struct Model {
        entries: Vec<(IpAddr, String, IpAddr, u64, u64)>,
        seq: u64,
        evicted: u64,
    }

    impl Model {
        fn learn(&mut self, limits: DnsLimits, client: IpAddr, r: &Response, now: u64) {
            self.entries.retain(|e| e.3 > now);
            for a in r.answers.iter().rev() {
                let ttl = a.ttl.max(limits.ttl_floor_s).min(limits.ttl_cap_s);
                let exp = now + u64::from(ttl) * S;
                let pos = self
                    .entries
                    .iter()
                    .position(|e| e.0 == client && e.1 == a.name && e.2 == a.addr);
                if let Some(p) = pos {
                    self.entries.remove(p);
                } else if self.entries.len() >= limits.max_entries {
                    let soonest = (0..self.entries.len())
                        .min_by_key(|&i| (self.entries[i].3, self.entries[i].4))
                        .expect("full, so not empty");
                    if self.entries[soonest].3 > now {
                        self.evicted += 1;
                    }
                    self.entries.remove(soonest);
                }
                self.entries
                    .push((client, a.name.clone(), a.addr, exp, self.seq));
                self.seq += 1;
            }
        }

        fn name_for(&self, client: IpAddr, addr: IpAddr, now: u64) -> Option<&str> {
            self.entries
                .iter()
                .filter(|e| e.0 == client && e.2 == addr && e.3 > now)
                .max_by_key(|e| e.4)
                .map(|e| e.1.as_str())
        }

        fn resolves(&self, name: &str, addr: IpAddr, now: u64) -> Resolves {
            let live = || self.entries.iter().filter(|e| e.1 == name && e.3 > now);
            if live().next().is_none() {
                Resolves::Unseen
            } else if live().any(|e| e.2 == addr) {
                Resolves::Yes
            } else {
                Resolves::No
            }
        }
    }

    proptest::proptest! {
        /// Random learns over few clients, names and addresses in a small cache
        /// (so eviction and expiry happen all the time): the indexes stay
        /// consistent and every query agrees with the model.
        #[test]
        fn agrees_with_model(
            max_entries in 1usize..8,
            steps in proptest::collection::vec(
                (0u64..40, 0u8..3, proptest::collection::vec((0u8..4, 0u8..4, 0u32..120), 0..5)),
                1..60,
            ),
        ) {
            let limits = DnsLimits { max_entries, ttl_floor_s: 5, ttl_cap_s: 60 };
            let mut cache = DnsCache::new(limits);
            let mut model = Model::default();
            let clients = [ip("10.0.0.1"), ip("10.0.0.2"), ip("::ffff:10.0.0.3")];
            let addrs = [ip("192.0.2.1"), ip("192.0.2.2"), ip("2001:db8::1"), ip("::ffff:192.0.2.4")];
            let names = ["a.example", "b.example", "c.example", "d.example"];
            let mut now = 0u64;
            for (dt, client, answers) in steps {
                now += dt * S;
                let r = Response {
                    answers: answers
                        .iter()
                        .map(|&(n, a, ttl)| Answer {
                            name: names[usize::from(n)].to_owned(),
                            addr: addrs[usize::from(a)].to_canonical(),
                            ttl,
                        })
                        .collect(),
                    ..Response::default()
                };
                let client = clients[usize::from(client)].to_canonical();
                cache.learn(client, &r, now);
                model.learn(limits, client, &r, now);
                cache.check_invariants();
                proptest::prop_assert_eq!(cache.evicted(), model.evicted);
                for probe in [now, now + 10 * S, now + 30 * S] {
                    for &c in &clients {
                        for &a in &addrs {
                            proptest::prop_assert_eq!(
                                cache.name_for(c, a, probe).map(|r| r.name),
                                model.name_for(c.to_canonical(), a.to_canonical(), probe)
                            );
                        }
                    }
                    for n in names {
                        for &a in &addrs {
                            proptest::prop_assert_eq!(
                                cache.resolves(n, a, probe),
                                model.resolves(n, a.to_canonical(), probe)
                            );
                        }
                    }
                }
            }
        }
    }
}
