//! The command-line helpers beside `run`: `check` of a config file, the `test` dry run of its
//! devices, one Modbus `read`, `browse` of an OPC UA server, and `audit` of what a consumer
//! receives.

pub mod audit;
pub mod browse;
pub mod check;
pub mod dry_run;
pub mod read;
