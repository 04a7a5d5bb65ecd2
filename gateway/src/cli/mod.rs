//! The command-line helpers beside `run`: `check` of a config file, the `test` dry run of its
//! devices, one Modbus `read`, and `browse` of an OPC UA server.

pub mod audit;
pub mod browse;
pub mod check;
pub mod dry_run;
pub mod read;
