//! Device simulators for tests, the demo and benchmarks. They are real protocol peers on
//! loopback, not mocks: the gateway talks to them exactly as it talks to a plant floor.
//!
//! Behind the `sim` feature, with the server parts they need (async-opcua's OPC UA server,
//! tokio-modbus's TCP server, nix for ptys): a production build compiles none of it.

pub mod modbus;
pub mod opcua;
pub mod rtu;
