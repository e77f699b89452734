//! The stream's codec: prost, with a cheap wire scan before decoding so that a
//! message cannot make the decoder allocate much more than its own size
//! (a batch of millions of empty frames is refused from its byte count alone).

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf as _;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, ProstCodec};

use crate::limits::MAX_BATCH_FRAMES;

/// Why a message was refused before decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireRefusal {
    Malformed,
    TooManyFrames(usize),
}

impl From<WireRefusal> for Status {
    fn from(r: WireRefusal) -> Status {
        match r {
            WireRefusal::Malformed => Status::invalid_argument("malformed stream message"),
            WireRefusal::TooManyFrames(n) => Status::resource_exhausted(format!(
                "batch of {n} frames; at most {MAX_BATCH_FRAMES} are accepted"
            )),
        }
    }
}

/// A message type's check of its raw bytes before decoding.
pub trait WireCheck {
    /// Ok when decoding `bytes` stays within the type's limits.
    fn check_wire(_bytes: &[u8]) -> Result<(), WireRefusal> {
        Ok(())
    }
}

impl WireCheck for crate::v1::CollectorMessage {}

impl WireCheck for crate::v1::SensorMessage {
    /// A `Batch` (field 2) may hold at most [`MAX_BATCH_FRAMES`] frames.
    fn check_wire(bytes: &[u8]) -> Result<(), WireRefusal> {
        let frames = count_batch_frames(bytes).ok_or(WireRefusal::Malformed)?;
        if frames > MAX_BATCH_FRAMES {
            return Err(WireRefusal::TooManyFrames(frames));
        }
        Ok(())
    }
}

/// Frames (field 1 of every `Batch`, field 2 of `SensorMessage`) in the encoded
/// message; None when the wire format is broken.
pub fn count_batch_frames(mut bytes: &[u8]) -> Option<usize> {
    let mut frames = 0usize;
    while !bytes.is_empty() {
        let (field, value) = next_field(&mut bytes)?;
        if field == 2
            && let Some(mut batch) = value
        {
            while !batch.is_empty() {
                let (f, _) = next_field(&mut batch)?;
                frames += usize::from(f == 1);
            }
        }
    }
    Some(frames)
}

/// Reads one field: its number and, if length-delimited, its bytes.
fn next_field<'a>(bytes: &mut &'a [u8]) -> Option<(u64, Option<&'a [u8]>)> {
    let key = prost::encoding::decode_varint(bytes).ok()?;
    let (field, wire) = (key >> 3, key & 7);
    let value = match wire {
        0 => {
            prost::encoding::decode_varint(bytes).ok()?;
            None
        }
        1 | 5 => {
            let n = if wire == 1 { 8 } else { 4 };
            if bytes.len() < n {
                return None;
            }
            bytes.advance(n);
            None
        }
        2 => {
            let len = usize::try_from(prost::encoding::decode_varint(bytes).ok()?).ok()?;
            if bytes.len() < len {
                return None;
            }
            let (v, rest) = bytes.split_at(len);
            *bytes = rest;
            Some(v)
        }
        _ => return None,
    };
    Some((field, value))
}

/// [`ProstCodec`] with [`WireCheck`] before every decode.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + WireCheck + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder { _pd: PhantomData }
    }
}

#[derive(Debug)]
pub struct BoundedDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default + WireCheck> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::check_wire(buf.chunk())?;
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::{WireCheck as _, WireRefusal, count_batch_frames};
    use crate::limits::MAX_BATCH_FRAMES;
    use crate::v1::{Batch, Frame, Hello, SensorMessage, sensor_message::Msg};

    fn batch(n: usize) -> Vec<u8> {
        SensorMessage {
            msg: Some(Msg::Batch(Batch {
                frames: vec![Frame::default(); n],
                signature: Vec::new(),
                gap: None,
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn counts_frames_without_decoding() {
        assert_eq!(count_batch_frames(&batch(0)), Some(0));
        assert_eq!(count_batch_frames(&batch(3)), Some(3));
        let hello = SensorMessage {
            msg: Some(Msg::Hello(Hello {
                sensor_id: "gw".to_owned(),
                ..Default::default()
            })),
        };
        assert_eq!(count_batch_frames(&hello.encode_to_vec()), Some(0));
        assert_eq!(count_batch_frames(&[0x12, 0x05, 0x0a]), None);
    }

    #[test]
    fn refuses_a_batch_over_the_frame_cap() {
        assert!(SensorMessage::check_wire(&batch(MAX_BATCH_FRAMES)).is_ok());
        assert_eq!(
            SensorMessage::check_wire(&batch(MAX_BATCH_FRAMES + 1)),
            Err(WireRefusal::TooManyFrames(MAX_BATCH_FRAMES + 1))
        );
    }
}
