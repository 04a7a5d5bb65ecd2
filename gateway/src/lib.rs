//! The edge gateway: Modbus and OPC UA devices to MQTT, with a disk buffer that loses nothing committed.
//! See DESIGN.md for the data flow from poll to PUBACK.

pub mod bench;
pub mod broker;
pub mod browse;
pub mod buffer;
pub mod config;
pub mod demo;
pub mod ledger;
pub mod metrics;
pub mod publish;
pub mod read;
pub mod state;
pub mod topology;
pub mod writer;
