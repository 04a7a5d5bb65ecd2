//! The edge gateway: Modbus and OPC UA devices to MQTT, with a disk buffer that loses nothing committed.
//! See `docs/ARCHITECTURE.md` for the data flow from poll to PUBACK, the durability contract and
//! which module owns which invariant.

pub mod api;
pub mod buffer;
pub mod cli;
pub mod commands;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod encode;
pub mod metrics;
pub mod pipeline;
pub mod preflight;
pub mod publish;
pub mod secret;
pub mod service;
