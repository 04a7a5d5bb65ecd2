//! A record: one device scan, encoded once, with the sequence number that identifies it from the
//! writer to the broker's PUBACK and, when it had to be committed, on disk.
//!
//! On disk a record is `[version][crc32 of the rest][seq][flag offset][topic length][topic]
//! [payload]`, so a torn or foreign value is detected instead of published.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

const VERSION: u8 = 1;
const HEADER: usize = 1 + 4 + 8 + 4 + 2;
/// Marks a payload without a `historical` flag to patch.
pub const NO_FLAG: u32 = u32::MAX;

/// One encoded device scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The gateway-wide sequence number.
    pub seq: u64,
    /// The MQTT topic.
    pub topic: Arc<str>,
    /// The MQTT payload, as sent live.
    pub payload: Bytes,
    /// Byte offset of the 5-byte `false` literal of the `historical` field, [`NO_FLAG`], or
    /// [`SPARKPLUG_FLAG`](crate::encode::sparkplug::SPARKPLUG_FLAG) (re-encoded when replayed).
    pub flag_offset: u32,
}

/// Why a stored value is not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Too short, or a length field points past the end.
    #[error("truncated record")]
    Truncated,
    /// Written by an unknown version.
    #[error("unknown record version {0}")]
    Version(u8),
    /// The checksum does not match: the value is damaged.
    #[error("checksum mismatch")]
    Checksum,
    /// The topic is not UTF-8.
    #[error("topic is not UTF-8")]
    Topic,
}

impl Record {
    /// The payload as it goes out when replayed: the same bytes with `historical` set to true.
    pub fn historical_payload(&self) -> Bytes {
        if self.flag_offset == crate::encode::sparkplug::SPARKPLUG_FLAG {
            return crate::encode::sparkplug::historical(&self.payload);
        }
        let at = self.flag_offset as usize;
        match self.payload.get(at..at + 5) {
            Some(b"false") => {
                let mut p = BytesMut::from(&self.payload[..]);
                // `true ` keeps the length, so no offset in the payload moves.
                p[at..at + 5].copy_from_slice(b"true ");
                p.freeze()
            }
            _ => self.payload.clone(),
        }
    }

    /// Bytes this record takes on disk.
    pub fn stored_len(&self) -> usize {
        HEADER + self.topic.len() + self.payload.len()
    }

    /// The on-disk form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.stored_len());
        out.push(VERSION);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.flag_offset.to_be_bytes());
        let topic = self.topic.as_bytes();
        let topic_len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&topic_len.to_be_bytes());
        out.extend_from_slice(&topic[..usize::from(topic_len)]);
        out.extend_from_slice(&self.payload);
        let crc = crc32fast::hash(&out[5..]);
        out[1..5].copy_from_slice(&crc.to_be_bytes());
        out
    }

    /// Parses the on-disk form, checking version and checksum.
    pub fn from_bytes(b: &[u8]) -> Result<Record, RecordError> {
        if b.len() < HEADER {
            return Err(RecordError::Truncated);
        }
        if b[0] != VERSION {
            return Err(RecordError::Version(b[0]));
        }
        let crc = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
        if crc32fast::hash(&b[5..]) != crc {
            return Err(RecordError::Checksum);
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[5..13]);
        let flag_offset = u32::from_be_bytes([b[13], b[14], b[15], b[16]]);
        let topic_len = usize::from(u16::from_be_bytes([b[17], b[18]]));
        let topic = b
            .get(HEADER..HEADER + topic_len)
            .ok_or(RecordError::Truncated)?;
        let topic = std::str::from_utf8(topic).map_err(|_| RecordError::Topic)?;
        Ok(Record {
            seq: u64::from_be_bytes(seq),
            topic: topic.into(),
            payload: Bytes::copy_from_slice(&b[HEADER + topic_len..]),
            flag_offset,
        })
    }
}

/// A record whose payload does not compress: `size` pseudo-random bytes (for tests that need
/// chunks to take their size on disk).
#[cfg(test)]
pub(crate) fn incompressible(seq: u64, size: usize) -> Arc<Record> {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let payload: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    Arc::new(Record {
        seq,
        topic: "edge/gw/noise".into(),
        payload: Bytes::from(payload),
        flag_offset: NO_FLAG,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Record {
        let payload = br#"{"seq":7,"historical":false,"samples":[]}"#;
        Record {
            seq: 7,
            topic: "edge/gw/press7".into(),
            payload: Bytes::from_static(payload),
            flag_offset: 22,
        }
    }

    #[test]
    fn round_trips_through_its_stored_form() {
        let r = sample();
        assert_eq!(Record::from_bytes(&r.to_bytes()), Ok(r));
    }

    #[test]
    fn a_flipped_bit_is_caught_by_the_checksum() {
        let mut b = sample().to_bytes();
        let last = b.len() - 1;
        b[last] ^= 1;
        assert_eq!(Record::from_bytes(&b), Err(RecordError::Checksum));
    }

    #[test]
    fn replayed_payload_is_flagged_historical_and_still_json() {
        let r = sample();
        let p = r.historical_payload();
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["historical"], serde_json::Value::Bool(true));
        assert_eq!(p.len(), r.payload.len());
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_stored_bytes(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Record::from_bytes(&b);
        }
    }
}
