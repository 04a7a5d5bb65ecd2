//! Encoders: a record's payload from a device scan. The writer encodes each scan once; the
//! publisher never parses a payload.

pub mod json;
pub mod meta;
pub mod schema;
