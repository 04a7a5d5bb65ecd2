//! Southbound adapters of the edge gateway: everything that talks to devices, and the normalized
//! tag model every adapter produces. This crate never depends on the gateway.

pub mod backoff;
pub mod driver;
pub mod histogram;
pub mod modbus;
pub mod model;
pub mod opcua;
#[cfg(feature = "sim")]
pub mod sim;
