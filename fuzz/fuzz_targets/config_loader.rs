//! The config loader on arbitrary text: `edge_gateway::config::parse` (the checks of `load`
//! without the file system) must never panic; any list of problems is fine, and rendering it
//! (as the CLI does) must not panic either.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match edge_gateway::config::parse(src, "fuzz.toml") {
        Ok(config) => {
            let _ = config.devices.iter().map(|d| d.tag_count()).sum::<usize>();
        }
        Err(errors) => {
            assert!(!errors.problems.is_empty(), "an error without problems");
            // Lines as the loader counts them: one more than the newlines.
            let lines = src.matches('\n').count() + 1;
            for problem in &errors.problems {
                if let Some(line) = problem.line {
                    assert!(
                        (1..=lines).contains(&line),
                        "problem on line {line} of {lines}: {problem}"
                    );
                }
            }
            let _ = errors.render();
        }
    }
});
