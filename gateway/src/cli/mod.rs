//! The command-line helpers beside `run`: one Modbus `read`, and `browse` of an OPC UA server.

pub mod browse;
pub mod read;
