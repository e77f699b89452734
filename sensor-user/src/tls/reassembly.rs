//! Bounded reassembly of a ClientHello split over TCP segments.
//!
//! The kernel sends the payload of the first data segment of a TLS flow (with the
//! sequence number of its first byte) and of the following segments while the
//! flow is pending. Segments may be reordered, retransmitted or overlap; bytes
//! before the first segment's sequence number are ignored (the kernel only
//! starts a flow on a segment that begins a TLS record).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use super::client_hello::{ClientHelloInfo, ParseError, parse_client_hello};

/// Outcome of feeding bytes to a reassembler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// Valid so far; wait for more bytes.
    NeedMore,
    /// The ClientHello is complete and parsed; the flow entry is released.
    Done(Box<ClientHelloInfo>),
    /// The stream does not start with a TLS handshake record (or the datagram
    /// is not a QUIC Initial); the flow entry is released.
    NotTls,
    /// Malformed ClientHello or undecryptable Initial; the flow entry is released.
    Failed(ParseError),
    /// A memory bound was hit (bytes or fragments per flow, or the table is
    /// full): the agent reports it as loss reason `reassembly_limit`.
    Limit,
    /// After the hello was parsed: bytes of its range arrived again with other
    /// values (a decoy the server ignored and the real hello, in either order).
    /// `names`: server names of complete hellos the rewritten bytes now form that
    /// were not reported before (empty: none complete yet). Reported at the first
    /// difference and at each new name; the flow stays watched.
    Contested { names: Vec<String> },
}

/// Bounds for a reassembly table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Flows tracked at once; new flows beyond it get [`Push::Limit`].
    pub max_flows: usize,
    /// Bytes buffered per flow (window from the first byte).
    pub max_bytes_per_flow: usize,
    /// Disjoint byte ranges per flow (bounds work against tiny-segment floods).
    pub max_fragments: usize,
    /// Bytes buffered by all flows together.
    pub max_total_bytes: usize,
    /// Lifetime of an incomplete entry.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_flows: 1024,
            // A 64 KiB ClientHello in records of at most 16 KiB, with their headers.
            max_bytes_per_flow: 65 * 1024,
            max_fragments: 64,
            max_total_bytes: 8 << 20,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Result of inserting bytes into a [`RangeBuf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Insert {
    Ok,
    /// Some bytes fell beyond the window or the fragment limit was hit.
    Limit,
}

/// Bytes at offsets `0..cap`, possibly with holes; first write wins on overlap
/// (a retransmission must not rewrite bytes that were already parsed).
#[derive(Debug, Clone, Default)]
pub(crate) struct RangeBuf {
    data: Vec<u8>,
    /// Sorted, disjoint, non-adjacent filled ranges `[start, end)`.
    ranges: Vec<(usize, usize)>,
    cap: usize,
    max_fragments: usize,
    /// Some byte arrived twice with different values (a retransmission that
    /// rewrites what was sent: two hellos claiming the same sequence range).
    pub(crate) conflict: bool,
}

impl RangeBuf {
    pub(crate) fn new(cap: usize, max_fragments: usize) -> Self {
        RangeBuf {
            data: Vec::new(),
            ranges: Vec::new(),
            cap,
            max_fragments: max_fragments.max(1),
            conflict: false,
        }
    }

    pub(crate) fn insert(&mut self, off: u64, bytes: &[u8]) -> Insert {
        self.write(off, bytes, false).0
    }

    /// Like [`RangeBuf::insert`], but every byte is written (the last write wins);
    /// also returns whether a byte already held changed.
    pub(crate) fn overlay(&mut self, off: u64, bytes: &[u8]) -> (Insert, bool) {
        self.write(off, bytes, true)
    }

    fn write(&mut self, off: u64, bytes: &[u8], overwrite: bool) -> (Insert, bool) {
        let before = self.conflict;
        self.conflict = false;
        let inserted = self.write_ranges(off, bytes, overwrite);
        let differed = self.conflict;
        self.conflict |= before;
        (inserted, differed)
    }

    fn write_ranges(&mut self, off: u64, bytes: &[u8], overwrite: bool) -> Insert {
        if bytes.is_empty() {
            return Insert::Ok;
        }
        let Ok(start) = usize::try_from(off) else {
            return Insert::Limit;
        };
        if start >= self.cap {
            return Insert::Limit;
        }
        let want_end = start.saturating_add(bytes.len());
        let end = want_end.min(self.cap);
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        // Copy only into the holes of [start, end); compare what overlaps.
        let mut cursor = start;
        for &(s, e) in &self.ranges {
            if e <= cursor {
                continue;
            }
            if s >= end {
                break;
            }
            let (from, to) = (s.max(start), e.min(end));
            if from < to
                && self.data.get(from..to)
                    != bytes.get(from.saturating_sub(start)..to.saturating_sub(start))
            {
                self.conflict = true;
            }
            if s > cursor {
                copy_part(&mut self.data, bytes, start, cursor, s);
            }
            cursor = cursor.max(e);
        }
        if overwrite {
            copy_part(&mut self.data, bytes, start, start, end);
        } else if cursor < end {
            copy_part(&mut self.data, bytes, start, cursor, end);
        }
        // Merge [start, end) into the range list.
        let mut merged = (start, end);
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        let mut placed = false;
        for &(s, e) in &self.ranges {
            if e < merged.0 {
                out.push((s, e));
            } else if s > merged.1 {
                if !placed {
                    out.push(merged);
                    placed = true;
                }
                out.push((s, e));
            } else {
                merged = (merged.0.min(s), merged.1.max(e));
            }
        }
        if !placed {
            out.push(merged);
        }
        self.ranges = out;
        if self.ranges.len() > self.max_fragments || want_end > self.cap {
            return Insert::Limit;
        }
        Insert::Ok
    }

    /// The filled prefix starting at offset 0.
    pub(crate) fn contiguous(&self) -> &[u8] {
        match self.ranges.first() {
            Some(&(0, e)) => self.data.get(..e).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// Whether the contiguous prefix fills the whole window.
    pub(crate) fn is_full(&self) -> bool {
        self.contiguous().len() >= self.cap
    }

    pub(crate) fn buffered(&self) -> usize {
        self.data.len()
    }
}

/// Copy `bytes` (which start at stream offset `base`) for offsets `[from, to)`.
fn copy_part(data: &mut [u8], bytes: &[u8], base: usize, from: usize, to: usize) {
    let (Some(dst), Some(src)) = (
        data.get_mut(from..to),
        bytes.get(from.saturating_sub(base)..to.saturating_sub(base)),
    ) else {
        return;
    };
    if dst.len() == src.len() {
        dst.copy_from_slice(src);
    }
}

/// Reassembles one TCP flow's ClientHello.
#[derive(Debug, Clone)]
pub struct ClientHelloAssembler {
    first_seq: u32,
    /// Each byte as first sent: what is parsed.
    buf: RangeBuf,
    /// From the first conflict on, each byte as last sent: what a rival hello
    /// (the one the server may have taken instead) is read from.
    latest: Option<RangeBuf>,
    parsed_len: usize,
}

/// `payload` of the segment at `seq`, as (offset from `first_seq`, bytes), bytes
/// before `first_seq` cut off; the signed distance handles wrap-around.
fn relative(first_seq: u32, seq: u32, payload: &[u8]) -> (u64, &[u8]) {
    let rel = seq.wrapping_sub(first_seq) as i32;
    if rel < 0 {
        let skip = usize::try_from(rel.unsigned_abs()).unwrap_or(usize::MAX);
        (0, payload.get(skip..).unwrap_or(&[]))
    } else {
        (u64::from(rel.unsigned_abs()), payload)
    }
}

/// The server name of the complete ClientHello at the start of `buf`, if one is
/// there (`Some(None)`: a hello without one).
fn hello_name(buf: &RangeBuf) -> Option<Option<String>> {
    parse_client_hello(buf.contiguous())
        .ok()
        .map(|info| info.sni)
}

impl ClientHelloAssembler {
    /// `first_seq`: sequence number of the first payload byte of the flow.
    pub fn new(first_seq: u32, limits: &Limits) -> Self {
        ClientHelloAssembler {
            first_seq,
            buf: RangeBuf::new(limits.max_bytes_per_flow, limits.max_fragments),
            latest: None,
            parsed_len: 0,
        }
    }

    /// Bytes buffered (memory accounting).
    pub fn buffered(&self) -> usize {
        self.buf.buffered() + self.latest.as_ref().map_or(0, RangeBuf::buffered)
    }

    /// Feed one segment's payload.
    pub fn push(&mut self, seq: u32, payload: &[u8]) -> Push {
        let (off, bytes) = relative(self.first_seq, seq, payload);
        let (inserted, differed) = self.buf.write(off, bytes, false);
        if differed && self.latest.is_none() {
            self.latest = Some(self.buf.clone());
        }
        if let Some(latest) = &mut self.latest {
            latest.overlay(off, bytes);
        }
        let data = self.buf.contiguous();
        if let Some(&first) = data.first()
            && first != 0x16
        {
            return Push::NotTls;
        }
        if data.len() > self.parsed_len {
            self.parsed_len = data.len();
            match parse_client_hello(data) {
                Ok(mut info) => {
                    info.conflicting_retransmission = self.buf.conflict;
                    if let Some(Some(name)) = self.latest.as_ref().and_then(hello_name)
                        && info.sni.as_ref() != Some(&name)
                    {
                        info.rival_server_names.push(name);
                    }
                    return Push::Done(Box::new(info));
                }
                Err(ParseError::Incomplete { .. }) => {}
                Err(ParseError::NotHandshake(_)) => return Push::NotTls,
                Err(ParseError::TooLarge(_)) => return Push::Limit,
                Err(e) => return Push::Failed(e),
            }
        }
        if inserted == Insert::Limit || self.buf.is_full() {
            return Push::Limit;
        }
        Push::NeedMore
    }

    /// What is watched once the hello is parsed: its bytes as last sent.
    fn into_watch(self, info: &ClientHelloInfo) -> HelloWatch {
        let mut names: Vec<String> = info.sni.iter().cloned().collect();
        names.extend(info.rival_server_names.iter().cloned());
        HelloWatch {
            first_seq: self.first_seq,
            contested: self.buf.conflict,
            bytes: self.latest.unwrap_or(self.buf),
            names,
        }
    }
}

/// A parsed ClientHello's sequence range, watched until the server speaks: a TCP
/// client sends nothing else before then, so bytes of that range sent again with
/// other values are a second hello (see [`Push::Contested`]).
#[derive(Debug, Clone)]
pub struct HelloWatch {
    first_seq: u32,
    /// The hello's bytes as last sent.
    bytes: RangeBuf,
    /// Server names reported so far (the parsed hello's first).
    names: Vec<String>,
    /// A difference was reported.
    contested: bool,
}

impl HelloWatch {
    /// A later segment.
    pub fn push(&mut self, seq: u32, payload: &[u8]) -> Push {
        let (off, bytes) = relative(self.first_seq, seq, payload);
        let (_, differed) = self.bytes.overlay(off, bytes);
        if !differed {
            return Push::NeedMore;
        }
        let new_name = hello_name(&self.bytes)
            .flatten()
            .filter(|name| !self.names.contains(name));
        if self.contested && new_name.is_none() {
            return Push::NeedMore;
        }
        self.contested = true;
        let names: Vec<String> = new_name.into_iter().collect();
        self.names.extend(names.iter().cloned());
        Push::Contested { names }
    }

    fn buffered(&self) -> usize {
        self.bytes.buffered()
    }
}

/// What a table entry holds in memory, for the table's byte bound.
pub(crate) trait Buffered {
    fn buffered(&self) -> usize;
}

impl Buffered for ClientHelloAssembler {
    fn buffered(&self) -> usize {
        ClientHelloAssembler::buffered(self)
    }
}

impl Buffered for HelloWatch {
    fn buffered(&self) -> usize {
        HelloWatch::buffered(self)
    }
}

#[derive(Debug)]
struct Entry<T> {
    state: T,
    created: Instant,
}

/// Bounded map of in-progress flows (shared by the TCP and QUIC tables).
#[derive(Debug)]
pub(crate) struct BoundedTable<K, T> {
    flows: HashMap<K, Entry<T>>,
    pub(crate) limits: Limits,
    /// Keys of entries expired while making room, reported by the next `expire`.
    expired_pending: Vec<K>,
    /// The entries' buffered bytes together, kept as they change (the byte bound is
    /// checked on every packet: a sum over the table would cost O(flows)).
    bytes: usize,
}

impl<K: Hash + Eq + Clone, T: Buffered> BoundedTable<K, T> {
    pub(crate) fn new(limits: Limits) -> Self {
        BoundedTable {
            flows: HashMap::new(),
            limits,
            expired_pending: Vec::new(),
            bytes: 0,
        }
    }

    /// The entries' buffered bytes together.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Run `f` on the flow's state (created by `make` if new); the entry is
    /// removed unless the result is [`Push::NeedMore`]. A flow that takes the table
    /// past its byte bound (all pending flows together: a flood of large hellos must
    /// not take the agent's memory) gives up: [`Push::Limit`].
    pub(crate) fn with_entry(
        &mut self,
        key: K,
        now: Instant,
        make: impl FnOnce() -> T,
        f: impl FnOnce(&mut T) -> Push,
    ) -> Push {
        let pushed = self.apply(key.clone(), now, make, f);
        if pushed == Push::NeedMore && self.bytes > self.limits.max_total_bytes {
            self.remove(&key);
            return Push::Limit;
        }
        pushed
    }

    fn apply(
        &mut self,
        key: K,
        now: Instant,
        make: impl FnOnce() -> T,
        f: impl FnOnce(&mut T) -> Push,
    ) -> Push {
        if !self.flows.contains_key(&key) && self.flows.len() >= self.limits.max_flows {
            self.expire_now(now);
            if self.flows.len() >= self.limits.max_flows {
                // Refuse the newcomer rather than evict: a flood of new flows
                // must not push out flows that are about to complete.
                return Push::Limit;
            }
        }
        match self.flows.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                let state = &mut o.get_mut().state;
                let before = state.buffered();
                let r = f(state);
                self.bytes -= before;
                if r == Push::NeedMore {
                    self.bytes += state.buffered();
                } else {
                    o.remove();
                }
                r
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                let mut state = make();
                let r = f(&mut state);
                if r == Push::NeedMore {
                    self.bytes += state.buffered();
                    v.insert(Entry {
                        state,
                        created: now,
                    });
                }
                r
            }
        }
    }

    /// Runs `f` on an existing entry's state, keeping the byte count; None if there
    /// is no entry.
    pub(crate) fn update<R>(&mut self, key: &K, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let state = &mut self.flows.get_mut(key)?.state;
        let before = state.buffered();
        let r = f(state);
        self.bytes = self.bytes - before + state.buffered();
        Some(r)
    }

    /// Moves the keys of entries past their lifetime to `expired_pending`.
    fn expire_now(&mut self, now: Instant) {
        let timeout = self.limits.timeout;
        let gone = &mut self.expired_pending;
        let bytes = &mut self.bytes;
        self.flows.retain(|k, e| {
            let keep = now.saturating_duration_since(e.created) < timeout;
            if !keep {
                gone.push(k.clone());
                *bytes -= e.state.buffered();
            }
            keep
        });
    }

    /// The keys of the entries that gave up (past their lifetime) since the last call.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<K> {
        self.expire_now(now);
        std::mem::take(&mut self.expired_pending)
    }

    /// Adds an entry if there is room (after expiring stale ones); false if not.
    fn insert(&mut self, key: K, state: T, now: Instant) -> bool {
        if !self.flows.contains_key(&key) && self.flows.len() >= self.limits.max_flows {
            self.expire_now(now);
            self.expired_pending.clear();
            if self.flows.len() >= self.limits.max_flows {
                return false;
            }
        }
        self.bytes += state.buffered();
        let old = self.flows.insert(
            key,
            Entry {
                state,
                created: now,
            },
        );
        if let Some(old) = old {
            self.bytes -= old.state.buffered();
        }
        true
    }

    pub(crate) fn remove(&mut self, key: &K) -> bool {
        let Some(old) = self.flows.remove(key) else {
            return false;
        };
        self.bytes -= old.state.buffered();
        true
    }

    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }
}

/// Per-flow TCP ClientHello reassembly with bounded memory and time, and the
/// watch of each parsed hello's range until the server speaks.
#[derive(Debug)]
pub struct ReassemblyTable<K> {
    table: BoundedTable<K, ClientHelloAssembler>,
    watching: BoundedTable<K, HelloWatch>,
    /// Parsed hellos not watched: the watch table was full.
    watch_refused: u64,
}

impl<K: Hash + Eq + Clone> ReassemblyTable<K> {
    pub fn new(limits: Limits) -> Self {
        ReassemblyTable {
            table: BoundedTable::new(limits),
            watching: BoundedTable::new(limits),
            watch_refused: 0,
        }
    }

    /// Feed a segment. The first push for a key fixes the flow's first sequence
    /// number. A result other than [`Push::NeedMore`] releases the entry; after
    /// [`Push::Done`] the hello's range is watched ([`ReassemblyTable::watches`]),
    /// and later segments give [`Push::Contested`] or `NeedMore`.
    pub fn push(&mut self, key: K, seq: u32, payload: &[u8], now: Instant) -> Push {
        if let Some(pushed) = self.watching.update(&key, |w| w.push(seq, payload)) {
            return pushed;
        }
        let limits = self.table.limits;
        let mut finished = None;
        let pushed = self.table.with_entry(
            key.clone(),
            now,
            || ClientHelloAssembler::new(seq, &limits),
            |asm| {
                let pushed = asm.push(seq, payload);
                if let Push::Done(info) = &pushed {
                    finished = Some(
                        std::mem::replace(asm, ClientHelloAssembler::new(0, &limits))
                            .into_watch(info),
                    );
                }
                pushed
            },
        );
        if let Some(watch) = finished {
            self.watch(key, watch, now);
        }
        pushed
    }

    /// Watches a parsed hello, within the table's bounds (both flows and bytes).
    fn watch(&mut self, key: K, watch: HelloWatch, now: Instant) {
        if self.watching.bytes() + watch.buffered() > self.watching.limits.max_total_bytes
            || !self.watching.insert(key, watch, now)
        {
            self.watch_refused += 1;
        }
    }

    /// Whether the flow's parsed hello is watched.
    pub fn watches(&self, key: &K) -> bool {
        self.watching.flows.contains_key(key)
    }

    /// The server spoke: nothing the client sends now is a hello.
    pub fn answered(&mut self, key: &K) {
        self.watching.remove(key);
    }

    /// Parsed hellos left unwatched because the watch table was full.
    pub fn watch_refused(&self) -> u64 {
        self.watch_refused
    }

    /// The flows whose ClientHello gave up (past the timeout, or dropped to make room)
    /// since the last call. Watches past the timeout end quietly.
    pub fn expire(&mut self, now: Instant) -> Vec<K> {
        self.watching.expire(now);
        self.table.expire(now)
    }

    /// Forget a flow (e.g. it ended).
    pub fn remove(&mut self, key: &K) -> bool {
        self.watching.remove(key);
        self.table.remove(key)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::client_hello::tests::{records, rfc_client_hello};

    fn stream() -> Vec<u8> {
        records(&rfc_client_hello(), 100)
    }

    fn done_sni(p: &Push) -> Option<&str> {
        match p {
            Push::Done(info) => info.sni.as_deref(),
            _ => None,
        }
    }

    #[test]
    fn range_buf_overlaps() {
        let mut b = RangeBuf::new(32, 8);
        assert_eq!(b.insert(4, b"efgh"), Insert::Ok);
        assert_eq!(b.contiguous(), b"");
        assert_eq!(b.insert(2, b"XXXXXXij"), Insert::Ok); // overlap keeps "efgh"
        assert_eq!(b.insert(0, b"ab"), Insert::Ok);
        assert_eq!(b.contiguous(), b"abXXefghij");
        assert_eq!(b.insert(30, b"0123"), Insert::Limit);
        assert_eq!(b.contiguous(), b"abXXefghij");
    }

    #[test]
    fn in_order_segments() {
        let s = stream();
        let mut t = ReassemblyTable::new(Limits::default());
        let now = Instant::now();
        let isn = 1000u32;
        let mut last = Push::NeedMore;
        for (i, chunk) in s.chunks(60).enumerate() {
            last = t.push(7u32, isn + (i * 60) as u32, chunk, now);
        }
        assert_eq!(done_sni(&last), Some("example.com"));
        assert!(t.is_empty());
    }

    #[test]
    fn out_of_order_retransmit_overlap_and_wrap() {
        let s = stream();
        let isn = u32::MAX - 50; // sequence numbers wrap inside the hello
        let mut t = ReassemblyTable::new(Limits::default());
        let now = Instant::now();
        // First segment (the kernel's), then the rest reversed with duplicates
        // and overlapping ranges.
        assert_eq!(t.push(1u8, isn, &s[..40], now), Push::NeedMore);
        let mut segs: Vec<(usize, usize)> = Vec::new();
        let mut off = 40;
        while off < s.len() {
            let end = (off + 37).min(s.len());
            segs.push((off, end));
            off = end;
        }
        segs.reverse();
        let last = segs.pop().unwrap_or((40, 40));
        for &(a, b) in &segs {
            assert_eq!(
                t.push(1u8, isn.wrapping_add(a as u32), &s[a..b], now),
                Push::NeedMore
            );
            // Retransmission overlapping the previous segment start.
            let a2 = a.saturating_sub(10).max(40);
            assert_eq!(
                t.push(1u8, isn.wrapping_add(a2 as u32), &s[a2..b], now),
                Push::NeedMore
            );
        }
        // Old retransmission reaching back before the first byte.
        let p = t.push(1u8, isn.wrapping_sub(5), &[0u8; 5], now);
        assert_eq!(p, Push::NeedMore);
        let p = t.push(
            1u8,
            isn.wrapping_add(last.0 as u32),
            &s[last.0..last.1],
            now,
        );
        assert_eq!(done_sni(&p), Some("example.com"));
    }

    #[test]
    fn not_tls_and_failed() {
        let mut t = ReassemblyTable::new(Limits::default());
        let now = Instant::now();
        assert_eq!(t.push(1u8, 5, b"SSH-2.0-OpenSSH", now), Push::NotTls);
        // ServerHello is a handshake, but not a ClientHello.
        let p = t.push(2u8, 5, &[0x16, 3, 3, 0, 4, 2, 0, 0, 0], now);
        assert_eq!(p, Push::Failed(ParseError::NotClientHello(2)));
        assert!(t.is_empty());
    }

    #[test]
    fn a_retransmission_with_other_bytes_is_a_conflict_and_the_first_copy_stays() {
        let mut b = RangeBuf::new(64, 8);
        assert_eq!(b.insert(0, b"abcdef"), Insert::Ok);
        // The same bytes again (an honest retransmission): no conflict.
        assert_eq!(b.insert(2, b"cd"), Insert::Ok);
        assert!(!b.conflict);
        // Other bytes for the same range: flagged; the first write wins.
        assert_eq!(b.insert(3, b"XYZ"), Insert::Ok);
        assert!(b.conflict);
        assert_eq!(b.contiguous(), b"abcdef");
    }

    fn hello(name: &str) -> Vec<u8> {
        let mut info = rfc_client_hello();
        // The RFC hello names example.com; a same-length name keeps its framing.
        let at = info
            .windows(11)
            .position(|w| w == b"example.com")
            .unwrap_or_default();
        info[at..at + 11].copy_from_slice(name.as_bytes());
        records(&info, 100)
    }

    #[test]
    fn a_decoy_then_the_real_hello_at_the_same_sequence_is_contested_with_its_name() {
        let (decoy, real) = (hello("harmless.or"), hello("openai.test"));
        let mut t = ReassemblyTable::new(Limits::default());
        let now = Instant::now();
        assert_eq!(
            done_sni(&t.push(1u8, 100, &decoy, now)),
            Some("harmless.or")
        );
        assert!(t.watches(&1) && t.is_empty());
        // A plain retransmission of the decoy: nothing.
        assert_eq!(t.push(1u8, 100, &decoy, now), Push::NeedMore);
        // The real hello over two segments: its head over the decoy's tail already
        // forms a whole hello, so the name comes at once; the tail is no news.
        let (head, tail) = real.split_at(real.len() - 60);
        assert_eq!(
            t.push(1u8, 100, head, now),
            Push::Contested {
                names: vec!["openai.test".into()]
            }
        );
        assert_eq!(
            t.push(1u8, 100 + head.len() as u32, tail, now),
            Push::NeedMore
        );
        // A rewrite that forms no whole hello (a longer record header) after the
        // first report: nothing new to say.
        let mut longer = real.clone();
        longer[4] = longer[4].wrapping_add(50);
        assert_eq!(t.push(1u8, 100, &longer[..5], now), Push::NeedMore);
        // Both again: nothing new.
        assert_eq!(t.push(1u8, 100, &decoy, now), Push::NeedMore);
        assert_eq!(t.push(1u8, 100, &real, now), Push::NeedMore);
        // A first difference alone, with no whole hello, is reported too.
        let mut t2 = ReassemblyTable::new(Limits::default());
        assert!(matches!(t2.push(3u8, 0, &decoy, now), Push::Done(_)));
        assert_eq!(
            t2.push(3u8, 0, &longer[..5], now),
            Push::Contested { names: vec![] }
        );
        // The server spoke: the watch ends.
        t.answered(&1);
        assert!(!t.watches(&1));
    }

    #[test]
    fn rival_bytes_before_the_hello_completes_name_the_rival() {
        let (decoy, real) = (hello("harmless.or"), hello("openai.test"));
        let mut t = ReassemblyTable::new(Limits::default());
        let now = Instant::now();
        // A decoy prefix, then the whole real hello: the first copy is parsed, the
        // rewritten bytes name the rival.
        let cut = decoy.len() - 3;
        assert_eq!(t.push(2u8, 7, &decoy[..cut], now), Push::NeedMore);
        let Push::Done(info) = t.push(2u8, 7, &real, now) else {
            panic!("not done");
        };
        assert!(info.conflicting_retransmission);
        assert_eq!(info.sni.as_deref(), Some("harmless.or"));
        assert_eq!(info.rival_server_names, vec!["openai.test".to_owned()]);
        // Watched from the bytes as last sent: the real hello again is no news.
        assert_eq!(t.push(2u8, 7, &real, now), Push::NeedMore);
    }

    #[test]
    fn watches_are_bounded_and_end_quietly() {
        let limits = Limits {
            max_flows: 1,
            timeout: Duration::from_secs(5),
            ..Limits::default()
        };
        let mut t = ReassemblyTable::new(limits);
        let now = Instant::now();
        let h = hello("harmless.or");
        assert!(matches!(t.push(1u8, 0, &h, now), Push::Done(_)));
        assert!(matches!(t.push(2u8, 0, &h, now), Push::Done(_)));
        assert_eq!(t.watch_refused(), 1);
        assert!(t.watches(&1) && !t.watches(&2));
        // Past the timeout the watch ends and is not reported as a hello that
        // gave up.
        assert!(t.expire(now + Duration::from_secs(6)).is_empty());
        assert!(!t.watches(&1));
    }

    #[test]
    fn pending_hellos_share_one_memory_bound() {
        let limits = Limits {
            max_bytes_per_flow: 4096,
            max_total_bytes: 5000,
            ..Limits::default()
        };
        let mut t = ReassemblyTable::new(limits);
        let now = Instant::now();
        // A record header announcing a 4000-byte hello, and 3000 of its bytes.
        let mut part = vec![0x16, 0x03, 0x01, 0x0f, 0xa0, 0x01, 0x00, 0x0f, 0x9c];
        part.resize(3000, 0);
        assert_eq!(t.push(1u8, 0, &part, now), Push::NeedMore);
        assert_eq!(t.push(2u8, 0, &part, now), Push::Limit);
        assert_eq!(t.len(), 1);
    }

    /// The running byte counts equal the sums over the entries after every kind of
    /// change: growth, completion (the hello moves to the watch table), a watched
    /// range sent again, removal, expiry.
    #[test]
    fn byte_counts_follow_every_change() {
        let mut t = ReassemblyTable::new(Limits::default());
        let sums = |t: &ReassemblyTable<u8>| {
            let sum = |flows: &HashMap<u8, Entry<_>>| -> usize {
                flows
                    .values()
                    .map(|e: &Entry<ClientHelloAssembler>| e.state.buffered())
                    .sum()
            };
            let watched: usize = t.watching.flows.values().map(|e| e.state.buffered()).sum();
            assert_eq!(t.table.bytes(), sum(&t.table.flows));
            assert_eq!(t.watching.bytes(), watched);
            (t.table.bytes(), t.watching.bytes())
        };
        let now = Instant::now();
        let h = hello("a.openai.co");
        let (head, tail) = h.split_at(40);
        assert_eq!(t.push(1u8, 0, head, now), Push::NeedMore);
        assert_eq!(t.push(2u8, 0, head, now), Push::NeedMore);
        assert!(sums(&t).0 > 0);
        assert!(matches!(t.push(1u8, 40, tail, now), Push::Done(_)));
        assert!(sums(&t).1 > 0);
        let decoy = hello("harmless.or");
        assert!(matches!(
            t.push(1u8, 0, &decoy, now),
            Push::Contested { .. }
        ));
        sums(&t);
        assert!(t.remove(&2));
        assert_eq!(sums(&t).0, 0);
        assert_eq!(t.push(3u8, 0, head, now), Push::NeedMore);
        assert!(t.expire(now + Duration::from_secs(3600)).contains(&3));
        assert_eq!(sums(&t), (0, 0));
    }

    #[test]
    fn limits_and_expiry() {
        let limits = Limits {
            max_flows: 2,
            max_bytes_per_flow: 64,
            max_fragments: 4,
            max_total_bytes: 1 << 20,
            timeout: Duration::from_secs(5),
        };
        let mut t = ReassemblyTable::new(limits);
        let now = Instant::now();
        let s = stream();
        assert_eq!(t.push(1u8, 0, &s[..10], now), Push::NeedMore);
        assert_eq!(t.push(2u8, 0, &s[..10], now), Push::NeedMore);
        assert_eq!(t.push(3u8, 0, &s[..10], now), Push::Limit);
        // Window overflow: the hello is larger than 64 bytes.
        assert_eq!(t.push(1u8, 10, &s[10..100], now), Push::Limit);
        // Fragment flood.
        for i in 0..4u32 {
            let _ = t.push(2u8, 20 + i * 3, &s[20..21], now);
        }
        assert_eq!(t.len(), 0);
        assert_eq!(t.push(4u8, 0, &s[..10], now), Push::NeedMore);
        let later = now + Duration::from_secs(6);
        assert_eq!(t.push(5u8, 0, &s[..10], later), Push::NeedMore);
        // Full table: the stale entry is expired to admit the new one.
        assert_eq!(t.push(6u8, 0, &s[..10], later), Push::NeedMore);
        // The keys come back, so each flow that gave up is recorded as such.
        assert_eq!(t.expire(later), vec![4u8]);
        let mut rest = t.expire(later + Duration::from_secs(6));
        rest.sort_unstable();
        assert_eq!(rest, vec![5u8, 6]);
        assert!(t.is_empty());
    }

    #[test]
    fn random_segments_never_panic() {
        let s = stream();
        let mut t = ReassemblyTable::new(Limits::default());
        let now = Instant::now();
        let mut state = 0x9e37_79b9_u32;
        for flow in 0..200u32 {
            for _ in 0..20 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let a = state as usize % s.len();
                let b = (a + (state >> 20) as usize % 200).min(s.len());
                let seq = if state & 1 == 0 { a as u32 } else { state };
                let _ = t.push(flow, seq, &s[a..b], now);
            }
        }
        assert!(t.len() <= Limits::default().max_flows);
    }
}
