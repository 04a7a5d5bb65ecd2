//! Encoders: a record's payload from a device scan. The writer encodes each scan once; the
//! publisher never parses a payload.

pub mod json;
pub mod meta;
pub mod schema;
pub mod sparkplug;

use protocols::model::Batch;

use crate::buffer::Record;
use json::JsonEncoder;
use sparkplug::{SparkplugEncoder, Verdict};

/// The encoder of the configured format, chosen once at start.
#[derive(Debug)]
pub enum Encoder {
    Json(JsonEncoder),
    Sparkplug(SparkplugEncoder),
}

impl Encoder {
    /// Encodes later records with boot number `boot`.
    pub fn set_boot(&mut self, boot: u64) {
        match self {
            Encoder::Json(e) => e.set_boot(boot),
            Encoder::Sparkplug(e) => e.set_boot(boot),
        }
    }

    /// What becomes of a scan: in JSON every scan is a record; in Sparkplug a device's liveness
    /// decides (see [`SparkplugEncoder::verdict`]).
    pub fn verdict(&mut self, batch: &Batch) -> Verdict {
        match self {
            Encoder::Json(_) => Verdict {
                born: false,
                record: true,
                died: false,
            },
            Encoder::Sparkplug(e) => e.verdict(batch),
        }
    }

    /// Encodes one batch as the record with sequence number `seq`.
    pub fn encode(&mut self, seq: u64, batch: &Batch) -> Record {
        match self {
            Encoder::Json(e) => e.encode(seq, batch),
            Encoder::Sparkplug(e) => e.encode(seq, batch),
        }
    }
}
