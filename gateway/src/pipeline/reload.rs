//! What a reload changes: the pure difference between the running config and a new one.
//!
//! Invariants:
//! - Devices are matched by name. A device whose settings (its link, scan, tags, anything in
//!   its `[[devices]]` table) are equal is *unchanged*: its driver task, its connection and its
//!   schedule are left alone. One whose settings differ is *changed* (its driver is stopped,
//!   then started again with the new settings), one only in the new config is *added*, one only
//!   in the running config is *removed*. A renamed device is one removed and one added.
//! - Every device of either config is in exactly one of the four lists; the lists keep the
//!   order of the config they come from (the new one, for removed devices the running one).
//! - `[gateway] id`, `data_dir` and `[buffer]` are never applied live: the id is in every record
//!   and status message of this boot, the data directory holds the lock, the state file and the
//!   buffer, and the buffer's settings shaped the open store. [`Plan::effective`] is the new
//!   config with the running values of these kept; they take effect at the next start, and
//!   [`Plan::not_live`] names them for a log line.
//! - A device's catalog entry (its `DeviceId`) is never reused: the running pipeline adds new
//!   entries for changed and added devices (see `Running::reload`), so a record still in flight
//!   from a stopped driver is encoded with the names it was read with.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::config::{Config, DeviceSettings};

/// A part of the config that a reload does not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotLive {
    /// `[gateway] id`.
    GatewayId,
    /// `[gateway] data_dir`.
    DataDir,
    /// The `[buffer]` table.
    Buffer,
}

impl fmt::Display for NotLive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotLive::GatewayId => "gateway.id",
            NotLive::DataDir => "gateway.data_dir",
            NotLive::Buffer => "buffer",
        })
    }
}

/// What a reload does, device by device.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Devices left running as they are.
    pub unchanged: Vec<Arc<str>>,
    /// Devices stopped and started again with new settings.
    pub changed: Vec<Arc<str>>,
    /// Devices started.
    pub added: Vec<Arc<str>>,
    /// Devices stopped.
    pub removed: Vec<Arc<str>>,
    /// Whether the `[mqtt]` table changed: the publisher reconnects with the new settings.
    pub mqtt_changed: bool,
    /// Changes kept for the next start, in the order gateway id, data directory, buffer.
    pub not_live: Vec<NotLive>,
}

impl Plan {
    /// The difference between the `running` config and a `new` one.
    pub fn new(running: &Config, new: &Config) -> Plan {
        let old: HashMap<&str, &DeviceSettings> =
            running.devices.iter().map(|d| (&*d.name, d)).collect();
        let mut plan = Plan {
            unchanged: Vec::new(),
            changed: Vec::new(),
            added: Vec::new(),
            removed: Vec::new(),
            mqtt_changed: running.mqtt != new.mqtt,
            not_live: Vec::new(),
        };
        for d in &new.devices {
            match old.get(&*d.name) {
                Some(before) if *before == d => plan.unchanged.push(d.name.clone()),
                Some(_) => plan.changed.push(d.name.clone()),
                None => plan.added.push(d.name.clone()),
            }
        }
        let kept: std::collections::HashSet<&str> = new.devices.iter().map(|d| &*d.name).collect();
        plan.removed = running
            .devices
            .iter()
            .filter(|d| !kept.contains(&*d.name))
            .map(|d| d.name.clone())
            .collect();
        if running.gateway.id != new.gateway.id {
            plan.not_live.push(NotLive::GatewayId);
        }
        if running.gateway.data_dir != new.gateway.data_dir {
            plan.not_live.push(NotLive::DataDir);
        }
        if running.buffer != new.buffer {
            plan.not_live.push(NotLive::Buffer);
        }
        plan
    }

    /// Whether the reload changes nothing that runs (kept-for-restart changes aside).
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && !self.mqtt_changed
    }

    /// The config the gateway runs after the reload: `new`, with the running gateway id, data
    /// directory and buffer settings.
    pub fn effective(running: &Config, new: Config) -> Config {
        Config {
            gateway: running.gateway.clone(),
            buffer: running.buffer.clone(),
            ..new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn device(name: &str, port: u16, tag: &str) -> String {
        format!(
            "[[devices]]\nname = \"{name}\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:{port}\"\n\n  [[devices.tags]]\n  name = \"{tag}\"\n  address = \"hr:0\"\n\n"
        )
    }

    fn config(head: &str, devices: &[String]) -> Config {
        let src = format!("{head}\n{}", devices.concat());
        match parse(&src, "test.toml") {
            Ok(c) => c,
            Err(e) => panic!("unexpected problems:\n{e}"),
        }
    }

    const HEAD: &str = "[gateway]\nid = \"edge-01\"\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n";

    fn names(list: &[Arc<str>]) -> Vec<&str> {
        list.iter().map(|n| &**n).collect()
    }

    #[test]
    fn the_same_config_changes_nothing() {
        let c = config(HEAD, &[device("a", 1, "t"), device("b", 2, "t")]);
        let plan = Plan::new(&c, &c.clone());
        assert!(plan.is_empty());
        assert_eq!(names(&plan.unchanged), ["a", "b"]);
        assert!(plan.not_live.is_empty());
    }

    #[test]
    fn a_device_with_another_address_or_tag_is_restarted_and_the_others_are_left_alone() {
        let old = config(
            HEAD,
            &[
                device("a", 1, "t"),
                device("b", 2, "t"),
                device("c", 3, "t"),
            ],
        );
        let new = config(
            HEAD,
            &[
                device("a", 1, "t"),
                device("b", 9, "t"),
                device("c", 3, "u"),
            ],
        );
        let plan = Plan::new(&old, &new);
        assert_eq!(names(&plan.unchanged), ["a"]);
        assert_eq!(names(&plan.changed), ["b", "c"]);
        assert!(plan.added.is_empty() && plan.removed.is_empty());
        assert!(!plan.mqtt_changed);
    }

    #[test]
    fn a_device_only_in_the_new_config_is_added_and_one_only_in_the_old_is_removed() {
        let old = config(HEAD, &[device("a", 1, "t"), device("gone", 2, "t")]);
        let new = config(HEAD, &[device("new", 3, "t"), device("a", 1, "t")]);
        let plan = Plan::new(&old, &new);
        assert_eq!(names(&plan.unchanged), ["a"]);
        assert_eq!(names(&plan.added), ["new"]);
        assert_eq!(names(&plan.removed), ["gone"]);
        assert!(!plan.is_empty());
    }

    #[test]
    fn a_renamed_device_is_one_removed_and_one_added() {
        let old = config(HEAD, &[device("a", 1, "t")]);
        let new = config(HEAD, &[device("b", 1, "t")]);
        let plan = Plan::new(&old, &new);
        assert_eq!(names(&plan.removed), ["a"]);
        assert_eq!(names(&plan.added), ["b"]);
    }

    #[test]
    fn devices_in_another_order_are_unchanged() {
        let old = config(HEAD, &[device("a", 1, "t"), device("b", 2, "t")]);
        let new = config(HEAD, &[device("b", 2, "t"), device("a", 1, "t")]);
        let plan = Plan::new(&old, &new);
        assert!(plan.is_empty());
        assert_eq!(names(&plan.unchanged), ["b", "a"]);
    }

    #[test]
    fn a_new_topic_prefix_or_broker_port_is_an_mqtt_change() {
        let old = config(HEAD, &[device("a", 1, "t")]);
        for head in [
            HEAD.replace("1883", "1884"),
            format!("{HEAD}topic_prefix = \"plant/x\"\n"),
        ] {
            let plan = Plan::new(&old, &config(&head, &[device("a", 1, "t")]));
            assert!(plan.mqtt_changed, "{head}");
            assert_eq!(names(&plan.unchanged), ["a"]);
        }
    }

    #[test]
    fn gateway_id_data_dir_and_buffer_changes_are_kept_until_a_restart() {
        // The client id and topic prefix default to the gateway id: set here, they stay.
        let mqtt =
            "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nclient_id = \"c\"\ntopic_prefix = \"p\"\n";
        let old = config(
            &format!("[gateway]\nid = \"edge-01\"\n\n{mqtt}"),
            &[device("a", 1, "t")],
        );
        let head = format!("[gateway]\nid = \"edge-02\"\ndata_dir = \"/elsewhere\"\n\n[buffer]\nmax_size = \"1MiB\"\n\n{mqtt}");
        let new = config(&head, &[device("a", 1, "t")]);
        let plan = Plan::new(&old, &new);
        assert_eq!(
            plan.not_live,
            [NotLive::GatewayId, NotLive::DataDir, NotLive::Buffer]
        );
        assert!(plan.is_empty(), "nothing that runs changes");
        let effective = Plan::effective(&old, new.clone());
        assert_eq!(effective.gateway, old.gateway);
        assert_eq!(effective.buffer, old.buffer);
        assert_eq!(effective.devices, new.devices);
        assert_eq!(
            plan.not_live
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["gateway.id", "gateway.data_dir", "buffer"]
        );
    }
}
