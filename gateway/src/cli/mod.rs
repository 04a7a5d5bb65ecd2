//! The command-line helpers beside `run`: `check` of a config file, one Modbus `read`, and
//! `browse` of an OPC UA server.

pub mod browse;
pub mod check;
pub mod read;
