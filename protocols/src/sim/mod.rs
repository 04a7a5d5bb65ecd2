//! Device simulators for tests, the demo and benchmarks. They are real protocol peers on
//! loopback, not mocks: the gateway talks to them exactly as it talks to a plant floor.

pub mod modbus;
pub mod opcua;
pub mod rtu;
