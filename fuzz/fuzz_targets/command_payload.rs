//! The command parser on arbitrary bytes: `edge_gateway::commands::parse` (and the lenient id
//! read for a reply) must never panic; a parsed command must keep the parser's promises, and
//! the checks must take it without panicking.

#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use edge_gateway::commands::{lenient_id, parse, Checks, MAX_ID_CHARS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lenient_id(data);
    if let Ok(command) = parse(data) {
        let chars = command.id.chars().count();
        assert!((1..=MAX_ID_CHARS).contains(&chars), "id of {chars} characters");
        let mut checks = Checks::new(true, Duration::from_secs(1), HashMap::new());
        let _ = checks.check("press1", &command, Instant::now());
    }
});
