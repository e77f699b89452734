//! Reading capture files for `replay`: pcap and pcapng with Ethernet frames.

use std::{fs::File, io::BufReader, path::Path};

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

/// Every packet with its capture time, in file order. A pcapng simple packet has
/// no time of its own: it gets the time of the packet before it.
pub fn read_packets(path: &Path) -> Result<Vec<Captured>, PcapError> {
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
    let file = BufReader::new(File::open(path).map_err(io)?);
    let format = |e: pcap_file::PcapError| PcapError::Format {
        path: name.clone(),
        detail: e.to_string(),
    };
    let mut out = Vec::new();
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        let mut reader = PcapNgReader::new(file).map_err(format)?;
        while let Some(block) = reader.next_block() {
            match block.map_err(format)? {
                Block::EnhancedPacket(p) => out.push((nanos(p.timestamp), p.data.into_owned())),
                Block::SimplePacket(p) => {
                    let t = out.last().map_or(0, |(t, _)| *t);
                    out.push((t, p.data.into_owned()));
                }
                Block::InterfaceDescription(i) if i.linktype != DataLink::ETHERNET => {
                    return Err(PcapError::LinkType {
                        path: name,
                        link: i.linktype,
                    });
                }
                _ => {}
            }
        }
    } else {
        let mut reader = PcapReader::new(file).map_err(format)?;
        let link = reader.header().datalink;
        if link != DataLink::ETHERNET {
            return Err(PcapError::LinkType { path: name, link });
        }
        while let Some(packet) = reader.next_packet() {
            let packet = packet.map_err(format)?;
            out.push((nanos(packet.timestamp), packet.data.into_owned()));
        }
    }
    Ok(out)
}

fn nanos(since_epoch: std::time::Duration) -> u64 {
    u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX)
}
