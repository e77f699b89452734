//! Reading capture files for `replay`: pcap and pcapng with Ethernet frames.
//!
//! [`stream_packets`] parses on a thread of its own and hands over batches, so a
//! replay's kernel test runs overlap the parsing and only the batches in flight
//! are held in memory; [`read_packets`] reads a whole file at once.

use std::{
    fs::File,
    io::BufReader,
    path::Path,
    sync::mpsc::{Receiver, sync_channel},
    thread::JoinHandle,
};

use pcap_file::{
    DataLink,
    pcap::PcapReader,
    pcapng::{Block, PcapNgReader},
};

#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a pcap or pcapng file: {detail}")]
    Format { path: String, detail: String },
    #[error("{path}: link type {link:?} is not Ethernet; capture with an Ethernet link type")]
    LinkType { path: String, link: DataLink },
}

/// A captured packet: its capture time (unix nanoseconds) and bytes.
pub type Captured = (u64, Vec<u8>);

/// Packets per batch handed over by [`stream_packets`].
pub const BATCH: usize = 1024;
/// Batches parsed ahead of the consumer (about 64k packets).
const AHEAD: usize = 64;

/// Every packet with its capture time, in file order. A pcapng simple packet has
/// no time of its own: it gets the time of the packet before it.
pub fn read_packets(path: &Path) -> Result<Vec<Captured>, PcapError> {
    let mut out = Vec::new();
    open(path)?.walk(|p| {
        out.push(p);
        true
    })?;
    Ok(out)
}

/// The packets of `path` in file order, in batches of up to [`BATCH`], parsed by a
/// reader thread. A file that is no capture fails here, before any packet; an
/// error further in (a truncated file) comes after the packets before it, as the
/// stream's last item.
pub fn stream_packets(path: &Path) -> Result<PacketStream, PcapError> {
    let capture = open(path)?;
    let (tx, rx) = sync_channel(AHEAD);
    let reader = std::thread::Builder::new()
        .name("pcap".into())
        .spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            let walked = capture.walk(|p| {
                batch.push(p);
                batch.len() < BATCH
                    || tx
                        .send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))))
                        .is_ok()
            });
            if !batch.is_empty() {
                let _ = tx.send(Ok(batch));
            }
            if let Err(e) = walked {
                let _ = tx.send(Err(e));
            }
        })
        .map_err(|source| PcapError::Io {
            path: path.display().to_string(),
            source,
        })?;
    Ok(PacketStream {
        rx: Some(rx),
        reader: Some(reader),
    })
}

/// Batches of packets from [`stream_packets`]'s reader thread.
pub struct PacketStream {
    rx: Option<Receiver<Result<Vec<Captured>, PcapError>>>,
    reader: Option<JoinHandle<()>>,
}

impl Iterator for PacketStream {
    type Item = Result<Vec<Captured>, PcapError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for PacketStream {
    fn drop(&mut self) {
        // Closing the channel stops a reader that is still ahead.
        self.rx = None;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// A capture file whose header has been read.
struct Capture {
    name: String,
    reader: Reader,
}

enum Reader {
    Pcap(PcapReader<BufReader<File>>),
    PcapNg(PcapNgReader<BufReader<File>>),
}

fn open(path: &Path) -> Result<Capture, PcapError> {
    let name = path.display().to_string();
    let io = |source| PcapError::Io {
        path: name.clone(),
        source,
    };
    let mut magic = [0u8; 4];
    {
        use std::io::Read as _;
        File::open(path)
            .map_err(io)?
            .read_exact(&mut magic)
            .map_err(io)?;
    }
    let file = BufReader::with_capacity(1 << 20, File::open(path).map_err(io)?);
    let format = |e: pcap_file::PcapError| PcapError::Format {
        path: name.clone(),
        detail: e.to_string(),
    };
    let reader = if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        Reader::PcapNg(PcapNgReader::new(file).map_err(format)?)
    } else {
        let reader = PcapReader::new(file).map_err(format)?;
        let link = reader.header().datalink;
        if link != DataLink::ETHERNET {
            return Err(PcapError::LinkType { path: name, link });
        }
        Reader::Pcap(reader)
    };
    Ok(Capture { name, reader })
}

impl Capture {
    /// Calls `f` with every packet in file order until it returns false.
    fn walk(self, mut f: impl FnMut(Captured) -> bool) -> Result<(), PcapError> {
        let name = self.name;
        let format = |e: pcap_file::PcapError| PcapError::Format {
            path: name.clone(),
            detail: e.to_string(),
        };
        match self.reader {
            Reader::PcapNg(mut reader) => {
                let mut last = 0;
                while let Some(block) = reader.next_block() {
                    let packet = match block.map_err(format)? {
                        Block::EnhancedPacket(p) => {
                            last = nanos(p.timestamp);
                            (last, p.data.into_owned())
                        }
                        Block::SimplePacket(p) => (last, p.data.into_owned()),
                        Block::InterfaceDescription(i) if i.linktype != DataLink::ETHERNET => {
                            return Err(PcapError::LinkType {
                                path: name,
                                link: i.linktype,
                            });
                        }
                        _ => continue,
                    };
                    if !f(packet) {
                        break;
                    }
                }
            }
            Reader::Pcap(mut reader) => {
                while let Some(packet) = reader.next_packet() {
                    let packet = packet.map_err(format)?;
                    if !f((nanos(packet.timestamp), packet.data.into_owned())) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

fn nanos(since_epoch: std::time::Duration) -> u64 {
    u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]

    use std::time::Duration;

    use pcap_file::pcap::{PcapPacket, PcapWriter};

    use super::*;

    /// A pcap of `n` packets, packet `i` at second `i` with `i` as its bytes.
    fn capture(dir: &Path, n: u32) -> std::path::PathBuf {
        let path = dir.join(format!("{n}.pcap"));
        let mut w = PcapWriter::new(File::create(&path).unwrap()).unwrap();
        for i in 0..n {
            let data = i.to_be_bytes();
            w.write_packet(&PcapPacket::new(
                Duration::from_secs(u64::from(i)),
                4,
                &data,
            ))
            .unwrap();
        }
        path
    }

    #[test]
    fn the_stream_gives_every_packet_in_order_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3 * BATCH as u32 + 5;
        let path = capture(dir.path(), n);
        let batches: Vec<Vec<Captured>> =
            stream_packets(&path).unwrap().map(Result::unwrap).collect();
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            [BATCH, BATCH, BATCH, 5]
        );
        let streamed: Vec<Captured> = batches.concat();
        assert_eq!(streamed, read_packets(&path).unwrap());
        assert_eq!(streamed.len(), n as usize);
        assert_eq!(streamed[7], (7_000_000_000, 7u32.to_be_bytes().to_vec()));
    }

    #[test]
    fn an_empty_capture_streams_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = capture(dir.path(), 0);
        assert_eq!(stream_packets(&path).unwrap().count(), 0);
    }

    #[test]
    fn no_capture_fails_before_any_packet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("text");
        std::fs::write(&path, "not a capture at all").unwrap();
        assert!(matches!(
            stream_packets(&path).err(),
            Some(PcapError::Format { .. })
        ));
    }

    #[test]
    fn a_truncated_capture_ends_with_its_error_after_the_packets_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = capture(dir.path(), 10);
        let bytes = std::fs::read(&path).unwrap();
        // Cut into the last packet's header.
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let items: Vec<_> = stream_packets(&path).unwrap().collect();
        let (last, before) = items.split_last().unwrap();
        assert!(matches!(last, Err(PcapError::Format { .. })), "{last:?}");
        let packets: usize = before.iter().map(|b| b.as_ref().unwrap().len()).sum();
        assert_eq!(packets, 9);
    }

    #[test]
    fn dropping_the_stream_early_stops_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = capture(dir.path(), (AHEAD as u32 + 8) * BATCH as u32);
        let mut stream = stream_packets(&path).unwrap();
        assert!(stream.next().is_some());
        drop(stream); // joins the reader: it must not block on a full channel
    }
}
