//! The Sparkplug DCMD decoder on arbitrary bytes:
//! `edge_gateway::encode::sparkplug::command::device_writes` must never panic, and the writes
//! it gives keep its promises (at most `MAX_WRITES`).

#![no_main]

use edge_gateway::encode::sparkplug::command::{device_writes, MAX_WRITES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(writes) = device_writes(data, |_| Some(3)) {
        assert!(writes.len() <= MAX_WRITES);
    }
});
