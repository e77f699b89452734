//! One DNS response, reduced to which names it mapped to which addresses.
//!
//! Decoding is hickory-proto's; this module only decides what an answer means:
//!
//! - Only responses (QR=1, opcode QUERY) with RCODE NOERROR (EDNS extended RCODE
//!   included) say anything: queries, NXDOMAIN, SERVFAIL etc. give `Ok` with an
//!   empty [`Response`], since they are normal traffic, not decoding failures. An
//!   `Err` means the header or question section could not be read.
//! - Addresses count only for names reachable from a question name (question
//!   name, CNAME targets, HTTPS/SVCB targets): unrelated records a server (or a
//!   forger) adds to a response attribute nothing. Links (CNAME, HTTPS, SVCB) are
//!   taken from the answer section; A/AAAA from the answer and additional
//!   sections (RFC 9460 section 4.2 lets resolvers put a target's addresses in
//!   the additional section).
//! - Every name along a chain gets an [`Answer`] for each address the chain ends
//!   in, with the smallest TTL along the way: the client may use any of them as
//!   SNI (the question name usually, a CDN name sometimes).
//! - HTTPS/SVCB: `ipv4hint`/`ipv6hint` are addresses of the record's owner;
//!   AliasMode (priority 0) and ServiceMode targets other than "." are followed
//!   like a CNAME (a client connects to the target's addresses for the owner's
//!   name); `ech` puts the owner and the names leading to it in
//!   [`Response::ech_names`].
//! - A copy cut short (the kernel copies at most 1536 bytes) gives what was
//!   read before the cut; a record hickory rejects is skipped by its RDLENGTH.
//! - Everything is bounded: [`MAX_ANSWERS`], [`MAX_ECH_NAMES`], chains of
//!   [`MAX_CHAIN_DEPTH`] links, [`MAX_RECORDS`] records kept per message.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_proto::op::{Header, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::svcb::{SVCB, SvcParamValue};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// Answers taken from one message.
pub const MAX_ANSWERS: usize = 64;
/// Names taken into [`Response::ech_names`] from one message.
pub const MAX_ECH_NAMES: usize = 16;
/// Links (CNAME, HTTPS/SVCB target) followed from a question name.
pub const MAX_CHAIN_DEPTH: usize = 8;
/// Records kept from one message (all sections); a 1536-byte copy holds fewer.
pub const MAX_RECORDS: usize = 256;
/// Question names used from one message (servers answer one question).
const MAX_QUESTIONS: usize = 4;
/// Names visited per question: HTTPS records may fan out, so depth alone does
/// not bound the walk.
const MAX_VISITS: usize = 64;

/// One address a response gave for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Lowercase ASCII (IDNs as `xn--` labels), no trailing dot.
    pub name: String,
    pub addr: IpAddr,
    /// Seconds; the smallest TTL along the chain that led to `addr`.
    pub ttl: u32,
}

/// What one response said. Answers for the same address are listed question
/// name first, then along the chain, so the name the client asked for comes
/// first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub answers: Vec<Answer>,
    /// Names for which an HTTPS/SVCB record announced an ECH config (`ech` SvcParam).
    pub ech_names: Vec<String>,
    /// Seconds: the smallest TTL of the records that announced ECH (0 when
    /// `ech_names` is empty), so a cache can expire the announcement.
    pub ech_ttl: u32,
}

/// Why a message could not be read at all. Responses that say nothing (queries,
/// NXDOMAIN) are not errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("DNS message shorter than its 12-byte header")]
    Header,
    #[error("DNS question section truncated or malformed")]
    Question,
}

/// Parses one DNS message (a UDP/53 payload, possibly truncated).
pub fn parse_response(msg: &[u8]) -> Result<Response, DnsError> {
    // hickory's decoder addresses the buffer with u16 offsets; no DNS message is
    // longer, and the bytes past it could not be referenced anyway.
    let msg = msg.get(..usize::from(u16::MAX)).unwrap_or(msg);
    let mut dec = BinDecoder::new(msg);
    let header = Header::read(&mut dec).map_err(|_| DnsError::Header)?;
    let meta = header.metadata;
    if meta.message_type != MessageType::Response
        || meta.op_code != OpCode::Query
        || meta.response_code != ResponseCode::NoError
    {
        return Ok(Response::default());
    }
    let mut questions = Vec::new();
    for _ in 0..header.counts.queries {
        // The answers start after the last question: without it nothing follows.
        let q = Query::read(&mut dec).map_err(|_| DnsError::Question)?;
        if q.query_class == DNSClass::IN && questions.len() < MAX_QUESTIONS {
            let name = name_text(&q.name);
            if !name.is_empty() && !questions.contains(&name) {
                questions.push(name);
            }
        }
    }
    let mut graph = Graph::default();
    let sections = [
        (header.counts.answers, Section::Answer),
        (header.counts.authorities, Section::Authority),
        (header.counts.additionals, Section::Additional),
    ];
    let mut kept = 0usize;
    'sections: for (count, section) in sections {
        for _ in 0..count {
            let Some(record) = next_record(&mut dec) else {
                break 'sections;
            };
            if let Some(record) = record
                && kept < MAX_RECORDS
            {
                kept += 1;
                if graph.add(&record, section) == Added::ExtendedError {
                    return Ok(Response::default());
                }
            }
        }
    }
    let mut out = Builder::default();
    for q in &questions {
        let mut path = Vec::new();
        let mut visits = 0;
        graph.walk(q, u32::MAX, &mut path, &mut visits, &mut out);
    }
    Ok(out.finish())
}

/// The name as an SNI would carry it: lowercase, no trailing dot ("" for the root).
fn name_text(name: &Name) -> String {
    let mut s = name.to_ascii();
    s.make_ascii_lowercase();
    // A decoded name is fully qualified: its text ends in the root's ".".
    if name.is_fqdn() && s.ends_with('.') {
        s.pop();
    }
    s
}

/// The next record: `Some(None)` when hickory rejected its data and it was
/// stepped over by its RDLENGTH; `None` when the message ends (or is cut) here.
fn next_record(dec: &mut BinDecoder<'_>) -> Option<Option<Record>> {
    // `index` is below u16::MAX: `parse_response` caps the message.
    let start = u16::try_from(dec.index()).ok()?;
    let mut probe = dec.clone(start);
    match Record::read(&mut probe) {
        Ok(record) => {
            *dec = probe;
            Some(Some(record))
        }
        Err(_) => skip_record(dec).map(|()| None),
    }
}

/// Steps over one resource record without decoding its data.
fn skip_record(dec: &mut BinDecoder<'_>) -> Option<()> {
    Name::read(dec).ok()?;
    dec.read_u16().ok()?; // type
    dec.read_u16().ok()?; // class
    dec.read_u32().ok()?; // ttl
    let len = dec.read_u16().ok()?.unverified(/* bounds-checked by read_slice */);
    dec.read_slice(usize::from(len)).ok()?;
    Some(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Answer,
    Authority,
    Additional,
}

#[derive(Debug, PartialEq, Eq)]
enum Added {
    Ok,
    /// An OPT record carried a non-zero extended RCODE: not a NOERROR response.
    ExtendedError,
}

/// What a response says about one owner name.
#[derive(Debug, Default)]
struct Node {
    /// A/AAAA records and HTTPS/SVCB address hints, with their TTLs.
    addrs: Vec<(IpAddr, u32)>,
    /// CNAME and HTTPS/SVCB targets, with the TTL of the record naming them.
    links: Vec<(String, u32)>,
    /// Smallest TTL of an HTTPS/SVCB record with an `ech` SvcParam.
    ech_ttl: Option<u32>,
}

#[derive(Debug, Default)]
struct Graph {
    nodes: HashMap<String, Node>,
}

impl Graph {
    fn add(&mut self, record: &Record, section: Section) -> Added {
        if record.record_type() == RecordType::OPT {
            // RFC 6891: the OPT TTL's top byte is the RCODE's upper 8 bits.
            return if record.ttl >> 24 == 0 {
                Added::Ok
            } else {
                Added::ExtendedError
            };
        }
        if record.dns_class != DNSClass::IN || section == Section::Authority {
            return Added::Ok;
        }
        let owner = name_text(&record.name);
        if owner.is_empty() {
            return Added::Ok;
        }
        let ttl = record.ttl;
        match (&record.data, section) {
            (RData::A(a), _) => self.node(owner).addrs.push((IpAddr::V4(a.0), ttl)),
            (RData::AAAA(a), _) => self.node(owner).addrs.push((IpAddr::V6(a.0), ttl)),
            (RData::CNAME(target), Section::Answer) => {
                let target = name_text(&target.0);
                if !target.is_empty() {
                    self.node(owner).links.push((target, ttl));
                }
            }
            (RData::HTTPS(https), Section::Answer) => self.add_svcb(owner, &https.0, ttl),
            (RData::SVCB(svcb), Section::Answer) => self.add_svcb(owner, svcb, ttl),
            _ => {}
        }
        Added::Ok
    }

    fn add_svcb(&mut self, owner: String, svcb: &SVCB, ttl: u32) {
        let node = self.node(owner);
        // Target "." means the owner itself (ServiceMode) or "no service" (AliasMode).
        let target = name_text(&svcb.target_name);
        if !target.is_empty() {
            node.links.push((target, ttl));
        }
        if svcb.svc_priority == 0 {
            // AliasMode carries no SvcParams (RFC 9460 section 2.4.2).
            return;
        }
        for (_, value) in &svcb.svc_params {
            match value {
                SvcParamValue::Ipv4Hint(hint) => {
                    let addrs = hint.0.iter().map(|a| (IpAddr::V4(a.0), ttl));
                    node.addrs.extend(addrs.take(MAX_ANSWERS));
                }
                SvcParamValue::Ipv6Hint(hint) => {
                    let addrs = hint.0.iter().map(|a| (IpAddr::V6(a.0), ttl));
                    node.addrs.extend(addrs.take(MAX_ANSWERS));
                }
                SvcParamValue::EchConfigList(_) => {
                    node.ech_ttl = Some(node.ech_ttl.map_or(ttl, |t| t.min(ttl)));
                }
                _ => {}
            }
        }
    }

    fn node(&mut self, owner: String) -> &mut Node {
        self.nodes.entry(owner).or_default()
    }

    /// Depth-first from `name`: `path` holds the names that led here (question
    /// name first), `ttl` the smallest TTL along it. A name already on the path
    /// ends that branch, so loops terminate.
    fn walk<'g>(
        &'g self,
        name: &'g str,
        ttl: u32,
        path: &mut Vec<&'g str>,
        visits: &mut usize,
        out: &mut Builder,
    ) {
        if *visits >= MAX_VISITS {
            return;
        }
        *visits += 1;
        path.push(name);
        if let Some(node) = self.nodes.get(name) {
            for &(addr, addr_ttl) in &node.addrs {
                for n in path.iter() {
                    out.answer(n, addr, ttl.min(addr_ttl));
                }
            }
            if let Some(ech_ttl) = node.ech_ttl {
                for n in path.iter() {
                    out.ech(n, ttl.min(ech_ttl));
                }
            }
            if path.len() <= MAX_CHAIN_DEPTH {
                for (target, link_ttl) in &node.links {
                    if !path.contains(&target.as_str()) {
                        self.walk(target, ttl.min(*link_ttl), path, visits, out);
                    }
                }
            }
        }
        path.pop();
    }
}

#[derive(Debug, Default)]
struct Builder {
    response: Response,
    ech_ttl: Option<u32>,
}

impl Builder {
    /// Adds `(name, addr)` once; reached twice (two paths), it lives as long as
    /// the longer-lived path.
    fn answer(&mut self, name: &str, addr: IpAddr, ttl: u32) {
        let answers = &mut self.response.answers;
        if let Some(a) = answers
            .iter_mut()
            .find(|a| a.addr == addr && a.name == name)
        {
            a.ttl = a.ttl.max(ttl);
        } else if answers.len() < MAX_ANSWERS {
            answers.push(Answer {
                name: name.to_owned(),
                addr,
                ttl,
            });
        }
    }

    fn ech(&mut self, name: &str, ttl: u32) {
        self.ech_ttl = Some(self.ech_ttl.map_or(ttl, |t| t.min(ttl)));
        let names = &mut self.response.ech_names;
        if names.len() < MAX_ECH_NAMES && !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }

    fn finish(mut self) -> Response {
        self.response.ech_ttl = self.ech_ttl.unwrap_or(0);
        self.response
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::op::Message;
    use hickory_proto::rr::rdata::svcb::{Alpn, EchConfigList, IpHint, SvcParamKey};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS, SOA};

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("test name")
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().expect("test v4"))
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().expect("test v6"))
    }

    fn a(owner: &str, ttl: u32, ip: &str) -> Record {
        let ip: Ipv4Addr = ip.parse().expect("test v4");
        Record::from_rdata(name(owner), ttl, RData::A(A(ip)))
    }

    fn aaaa(owner: &str, ttl: u32, ip: &str) -> Record {
        let ip: Ipv6Addr = ip.parse().expect("test v6");
        Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip)))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn https(
        owner: &str,
        ttl: u32,
        priority: u16,
        target: &str,
        params: Vec<(SvcParamKey, SvcParamValue)>,
    ) -> Record {
        let svcb = SVCB::new(priority, name(target), params);
        Record::from_rdata(name(owner), ttl, RData::HTTPS(HTTPS(svcb)))
    }

    fn message(qname: &str, qtype: RecordType, answers: Vec<Record>) -> Message {
        let mut m = Message::response(0x1234, OpCode::Query);
        m.add_query(Query::query(name(qname), qtype));
        m.add_answers(answers);
        m
    }

    fn wire(m: &Message) -> Vec<u8> {
        m.to_vec().expect("encode test message")
    }

    fn parse(m: &Message) -> Response {
        parse_response(&wire(m)).expect("parses")
    }

    fn answer(name: &str, addr: IpAddr, ttl: u32) -> Answer {
        Answer {
            name: name.to_owned(),
            addr,
            ttl,
        }
    }

    #[test]
    fn a_and_aaaa() {
        let m = message(
            "WWW.Example.COM.",
            RecordType::A,
            vec![
                a("www.example.com.", 300, "93.184.216.34"),
                aaaa("WWW.EXAMPLE.com.", 120, "2606:2800:220:1::248"),
            ],
        );
        let r = parse(&m);
        assert_eq!(
            r.answers,
            vec![
                answer("www.example.com", v4("93.184.216.34"), 300),
                answer("www.example.com", v6("2606:2800:220:1::248"), 120),
            ]
        );
        assert!(r.ech_names.is_empty());
        assert_eq!(r.ech_ttl, 0);
    }

    /// dig example.com A, as a server sends it (name compression included).
    #[test]
    fn hand_written_bytes() {
        #[rustfmt::skip]
        let msg: &[u8] = &[
            0x12, 0x34, 0x81, 0x80, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
            7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0,
            0x00, 0x01, 0x00, 0x01,
            0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x0e, 0x10, 0x00, 0x04,
            93, 184, 216, 34,
        ];
        let r = parse_response(msg).expect("parses");
        assert_eq!(
            r.answers,
            vec![answer("example.com", v4("93.184.216.34"), 3600)]
        );
        // The same bytes as a query (QR=0) say nothing.
        let mut query = msg.to_vec();
        query[2] &= 0x7f;
        assert_eq!(parse_response(&query), Ok(Response::default()));
    }

    /// An HTTPS record hickory cannot decode (its target name runs past RDLENGTH)
    /// is stepped over; the A record after it still counts.
    #[test]
    fn undecodable_record_is_skipped() {
        #[rustfmt::skip]
        let msg: &[u8] = &[
            0x12, 0x34, 0x81, 0x80, 0x00, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00,
            7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0,
            0x00, 0x01, 0x00, 0x01,
            // HTTPS, priority 1, target label of 0x3f bytes in a 3-byte RDATA.
            0xc0, 0x0c, 0x00, 0x41, 0x00, 0x01, 0x00, 0x00, 0x01, 0x2c, 0x00, 0x03,
            0x00, 0x01, 0x3f,
            0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x01, 0x2c, 0x00, 0x04,
            192, 0, 2, 7,
        ];
        let r = parse_response(msg).expect("parses");
        assert_eq!(r.answers, vec![answer("example.com", v4("192.0.2.7"), 300)]);
    }

    /// An OPT record whose extended RCODE is not 0 (here BADVERS) turns a
    /// header RCODE of NOERROR into an error response.
    #[test]
    fn edns_extended_rcode() {
        let m = message(
            "example.com.",
            RecordType::A,
            vec![a("example.com.", 60, "192.0.2.1")],
        );
        let mut bytes = wire(&m);
        // Additional: root name, OPT, class 1232, TTL with rcode_high 1, no data.
        bytes[11] = 1;
        bytes.extend_from_slice(&[0, 0x00, 0x29, 0x04, 0xd0, 0x01, 0, 0, 0, 0, 0]);
        assert_eq!(parse_response(&bytes), Ok(Response::default()));
        let rcode_high = bytes.len() - 6;
        bytes[rcode_high] = 0; // NOERROR after all
        assert_eq!(parse_response(&bytes).expect("parses").answers.len(), 1);
    }

    fn openai_chain() -> Message {
        message(
            "api.openai.com.",
            RecordType::A,
            vec![
                cname("api.openai.com.", 300, "api.openai.com.cdn.cloudflare.net."),
                cname(
                    "api.openai.com.cdn.cloudflare.net.",
                    250,
                    "x.cdn.cloudflare.net.",
                ),
                a("x.cdn.cloudflare.net.", 60, "104.18.33.45"),
                a("x.cdn.cloudflare.net.", 600, "172.64.154.211"),
                // Not reachable from the question: ignored.
                a("evil.example.", 600, "203.0.113.66"),
            ],
        )
    }

    #[test]
    fn cname_chain() {
        let r = parse(&openai_chain());
        let names = [
            "api.openai.com",
            "api.openai.com.cdn.cloudflare.net",
            "x.cdn.cloudflare.net",
        ];
        let mut want = Vec::new();
        for (addr, ttl) in [(v4("104.18.33.45"), 60), (v4("172.64.154.211"), 250)] {
            for n in names {
                want.push(answer(n, addr, ttl));
            }
        }
        assert_eq!(r.answers, want);
    }

    #[test]
    fn cname_loop_terminates() {
        let m = message(
            "a.example.",
            RecordType::A,
            vec![
                cname("a.example.", 60, "b.example."),
                cname("b.example.", 60, "a.example."),
            ],
        );
        assert!(parse(&m).answers.is_empty());
        // A loop with an address on it: both names get it, once each.
        let m = message(
            "a.example.",
            RecordType::A,
            vec![
                cname("a.example.", 60, "b.example."),
                cname("b.example.", 60, "a.example."),
                a("b.example.", 90, "192.0.2.2"),
            ],
        );
        assert_eq!(
            parse(&m).answers,
            vec![
                answer("a.example", v4("192.0.2.2"), 60),
                answer("b.example", v4("192.0.2.2"), 60),
            ]
        );
    }

    #[test]
    fn chain_depth_is_bounded() {
        let chain = |links: usize| {
            let mut records: Vec<Record> = (0..links)
                .map(|i| {
                    cname(
                        &format!("n{i}.example."),
                        60,
                        &format!("n{}.example.", i + 1),
                    )
                })
                .collect();
            records.push(a(&format!("n{links}.example."), 60, "192.0.2.3"));
            message("n0.example.", RecordType::A, records)
        };
        assert_eq!(
            parse(&chain(MAX_CHAIN_DEPTH)).answers.len(),
            MAX_CHAIN_DEPTH + 1
        );
        assert!(parse(&chain(MAX_CHAIN_DEPTH + 1)).answers.is_empty());
    }

    fn ech_params() -> Vec<(SvcParamKey, SvcParamValue)> {
        vec![
            (
                SvcParamKey::Alpn,
                SvcParamValue::Alpn(Alpn(vec!["h3".into(), "h2".into()])),
            ),
            (
                SvcParamKey::Ipv4Hint,
                SvcParamValue::Ipv4Hint(IpHint(vec![
                    A(Ipv4Addr::new(162, 159, 137, 85)),
                    A(Ipv4Addr::new(162, 159, 138, 85)),
                ])),
            ),
            (
                SvcParamKey::EchConfigList,
                SvcParamValue::EchConfigList(EchConfigList(vec![0x00, 0x45, 0xfe, 0x0d, 0x00])),
            ),
            (
                SvcParamKey::Ipv6Hint,
                SvcParamValue::Ipv6Hint(IpHint(vec![AAAA(
                    "2606:4700:7::a29f:8955".parse().expect("test v6"),
                )])),
            ),
        ]
    }

    #[test]
    fn https_ech_and_hints() {
        let m = message(
            "crypto.cloudflare.com.",
            RecordType::HTTPS,
            vec![https("crypto.cloudflare.com.", 300, 1, ".", ech_params())],
        );
        let r = parse(&m);
        assert_eq!(
            r.answers,
            vec![
                answer("crypto.cloudflare.com", v4("162.159.137.85"), 300),
                answer("crypto.cloudflare.com", v4("162.159.138.85"), 300),
                answer("crypto.cloudflare.com", v6("2606:4700:7::a29f:8955"), 300),
            ]
        );
        assert_eq!(r.ech_names, vec!["crypto.cloudflare.com".to_owned()]);
        assert_eq!(r.ech_ttl, 300);
    }

    #[test]
    fn https_behind_cname() {
        let m = message(
            "www.example.com.",
            RecordType::HTTPS,
            vec![
                cname("www.example.com.", 120, "example.cdn.net."),
                https("example.cdn.net.", 300, 1, ".", ech_params()),
            ],
        );
        let r = parse(&m);
        assert_eq!(r.answers.len(), 6);
        assert!(r.answers.iter().all(|a| a.ttl == 120));
        assert_eq!(
            r.answers[0],
            answer("www.example.com", v4("162.159.137.85"), 120)
        );
        assert_eq!(
            r.answers[1],
            answer("example.cdn.net", v4("162.159.137.85"), 120)
        );
        assert_eq!(
            r.ech_names,
            vec!["www.example.com".to_owned(), "example.cdn.net".to_owned()]
        );
        assert_eq!(r.ech_ttl, 120);
    }

    #[test]
    fn https_alias_mode() {
        let alias = https("example.com.", 3600, 0, "svc.example.net.", vec![]);
        // The target's address in the message: followed like a CNAME.
        let mut m = message("example.com.", RecordType::HTTPS, vec![alias.clone()]);
        m.add_additional(a("svc.example.net.", 30, "192.0.2.4"));
        assert_eq!(
            parse(&m).answers,
            vec![
                answer("example.com", v4("192.0.2.4"), 30),
                answer("svc.example.net", v4("192.0.2.4"), 30),
            ]
        );
        // Not in the message: nothing.
        let m = message("example.com.", RecordType::HTTPS, vec![alias]);
        assert!(parse(&m).answers.is_empty());
    }

    #[test]
    fn nxdomain_says_nothing() {
        let mut m = message("nope.example.", RecordType::A, vec![]);
        m.metadata.response_code = ResponseCode::NXDomain;
        m.add_authority(Record::from_rdata(
            name("example."),
            900,
            RData::SOA(SOA::new(
                name("ns.example."),
                name("hostmaster.example."),
                1,
                7200,
                900,
                1_209_600,
                86_400,
            )),
        ));
        assert_eq!(parse(&m), Response::default());
        // Even with an (odd) address in it.
        m.add_answer(a("nope.example.", 60, "192.0.2.5"));
        assert_eq!(parse(&m), Response::default());
    }

    #[test]
    fn query_is_ignored() {
        let mut m = Message::query();
        m.add_query(Query::query(name("example.com."), RecordType::A));
        m.add_answer(a("example.com.", 60, "192.0.2.6"));
        assert_eq!(parse(&m), Response::default());
    }

    #[test]
    fn answers_are_bounded() {
        let records = (0..200u32)
            .map(|i| {
                a(
                    "many.example.",
                    60,
                    &Ipv4Addr::from(0xc000_0200 + i).to_string(),
                )
            })
            .collect();
        let r = parse(&message("many.example.", RecordType::A, records));
        assert_eq!(r.answers.len(), MAX_ANSWERS);
    }

    #[test]
    fn every_prefix_of_a_response() {
        let mut m = openai_chain();
        m.add_answer(https("api.openai.com.", 300, 1, ".", ech_params()));
        m.add_additional(aaaa("x.cdn.cloudflare.net.", 60, "2606:4700::6812:212d"));
        let full = wire(&m);
        let complete = parse_response(&full).expect("parses");
        let mut seen_partial = false;
        for len in 0..=full.len() {
            match parse_response(&full[..len]) {
                Err(DnsError::Header) => assert!(len < 12),
                Err(DnsError::Question) => assert!(len >= 12),
                Ok(r) => {
                    // What a cut copy gives is part of what the whole gives.
                    for answer in &r.answers {
                        assert!(
                            complete.answers.iter().any(|c| c.name == answer.name
                                && c.addr == answer.addr
                                && c.ttl <= answer.ttl),
                            "{len}: {answer:?}"
                        );
                    }
                    seen_partial |=
                        !r.answers.is_empty() && r.answers.len() < complete.answers.len();
                }
            }
        }
        assert!(seen_partial, "some prefix holds part of the answers");
        assert_eq!(parse_response(&full[..]).expect("parses"), complete);
    }

    #[test]
    fn oversized_and_garbage_input() {
        let mut big = wire(&openai_chain());
        big.resize(100_000, 0xc0);
        assert!(parse_response(&big).is_ok());
        // Counts claiming 65535 of everything, and nothing behind them.
        let header = [
            0, 0, 0x81, 0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert_eq!(parse_response(&header), Err(DnsError::Question));
        // A compression pointer to itself.
        #[rustfmt::skip]
        let looped: &[u8] = &[
            0, 0, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0,
            1, b'a', 0, 0, 1, 0, 1,
            0xc0, 19, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 1, 2, 3, 4,
        ];
        assert_eq!(parse_response(looped), Ok(Response::default()));
    }
}
