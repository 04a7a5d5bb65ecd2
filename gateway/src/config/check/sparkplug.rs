//! The `[sparkplug]` section: the edge node's identity, with `[mqtt] format = "sparkplug_b"`.
//! Sparkplug ids become topic levels: none may be empty or hold `/`, `+` or `#`.

use super::Checker;
use crate::config::problem::FieldPath;
use crate::config::raw::RawSparkplug;
use crate::config::{Format, MqttSettings, SparkplugSettings};

/// Why a Sparkplug id cannot be used, if it cannot.
pub(crate) fn sparkplug_id_problem(id: &str) -> Option<String> {
    if id.is_empty() {
        return Some("must not be empty".into());
    }
    if let Some(c) = id.chars().find(|c| matches!(c, '/' | '+' | '#')) {
        return Some(format!(
            "`{id}` holds `{c}`: Sparkplug ids are single topic levels, without `/`, `+` or `#`"
        ));
    }
    if id.chars().any(char::is_control) {
        return Some("must not hold control characters".into());
    }
    None
}

impl Checker<'_> {
    pub(super) fn sparkplug(
        &mut self,
        value: Option<toml::Value>,
        mqtt: Option<&MqttSettings>,
        gateway_id: Option<&str>,
    ) -> Option<SparkplugSettings> {
        let path = FieldPath::top("sparkplug");
        let format = mqtt.map(|m| m.format);
        let Some(value) = value else {
            if format == Some(Format::SparkplugB) {
                let message =
                    "`format = \"sparkplug_b\"` needs a [sparkplug] section with `group_id`";
                self.report(&FieldPath::top("mqtt").key("format"), message);
            }
            return None;
        };
        let table = self.section(Some(value), &path, true)?;
        let (raw, _) = self.unit::<RawSparkplug>(table, &path, &[], None)?;
        if format == Some(Format::Json) {
            let message = "is only read with `[mqtt] format = \"sparkplug_b\"`: set the format, or remove the section";
            self.report(&path, message);
        }
        if let Some(message) = sparkplug_id_problem(&raw.group_id) {
            self.report(&path.key("group_id"), message);
        }
        let edge_node_id = match raw.edge_node_id {
            Some(id) => {
                if let Some(message) = sparkplug_id_problem(&id) {
                    self.report(&path.key("edge_node_id"), message);
                }
                id
            }
            None => {
                let id = gateway_id.unwrap_or("gateway").to_owned();
                if let Some(message) = sparkplug_id_problem(&id) {
                    let message = format!("the gateway id is the default edge_node_id: {message}");
                    self.report(&FieldPath::top("gateway").key("id"), message);
                }
                id
            }
        };
        if let Some(host) = &raw.primary_host_id {
            if let Some(message) = sparkplug_id_problem(host) {
                self.report(&path.key("primary_host_id"), message);
            }
        }
        (format == Some(Format::SparkplugB)).then_some(SparkplugSettings {
            group_id: raw.group_id,
            edge_node_id,
            primary_host_id: raw.primary_host_id,
        })
    }
}
