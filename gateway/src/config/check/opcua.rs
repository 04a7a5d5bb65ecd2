//! The rules of an OPC UA device: endpoint, security, user identity, subscription settings,
//! and its tags, each reading one node (by id or browse path), no node twice.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use protocols::opcua::{
    check_endpoint, check_security, parse_browse_path, parse_node_id, Identity, Mode, NodeRef,
    OpcUaSettings, OpcUaTag, SecurityMode, SecurityPolicy,
};

use crate::config::problem::FieldPath;
use crate::config::raw::{RawMode, RawOpcUaDevice, RawOpcUaTag};
use crate::config::values::{MAX_DURATION, NONZERO};
use crate::config::DeviceKind;

use super::devices::{
    Common, DeviceOutcome, Foreign, Protocol, TagEntries, TagMetaText, TagSource, Timing,
};
use super::Checker;

/// Largest server-side queue of an OPC UA monitored item.
const MAX_QUEUE_SIZE: i64 = 10_000;

impl Checker<'_> {
    pub(super) fn opcua_device(
        &mut self,
        path: &FieldPath,
        table: toml::Table,
        tags: TagSource<'_>,
        names: &mut HashMap<String, usize>,
        data_dir: &Path,
    ) -> DeviceOutcome {
        let foreign = Foreign::new(Protocol::OpcUa, Protocol::device_keys);
        let device = self
            .unit::<RawOpcUaDevice>(table, path, &[], Some(&foreign))
            .map(|(raw, dropped)| self.opcua_settings(path, raw, &dropped, names, data_dir));
        let publishing_interval = device.as_ref().map_or_else(
            || OpcUaSettings::new("", Vec::new()).publishing_interval,
            |(_, settings)| settings.publishing_interval,
        );
        let enabled = device.as_ref().is_none_or(|(common, _)| common.enabled);
        let tags_path = path.key("tags");
        let missing = enabled.then_some(
            "an enabled device needs at least one [[devices.tags]] entry (or enabled = false)",
        );
        let entries = self.tag_entries(&tags_path, tags, "[[devices.tags]]", missing);
        let tags = self.opcua_tags(&tags_path, entries, publishing_interval);
        match (device, tags) {
            (Some((common, mut settings)), Some(tags)) => {
                settings.tags = tags.into();
                common.outcome(DeviceKind::OpcUa(settings))
            }
            _ => DeviceOutcome::Invalid,
        }
    }

    /// Checks an OPC UA device's own keys; returns its settings without tags. Defaults are
    /// those of [`OpcUaSettings::new`], except `pki_dir`, which lives in the data directory.
    fn opcua_settings(
        &mut self,
        path: &FieldPath,
        raw: RawOpcUaDevice,
        dropped: &BTreeSet<String>,
        names: &mut HashMap<String, usize>,
        data_dir: &Path,
    ) -> (Common, OpcUaSettings) {
        self.device_name(path, &raw.name, names);
        if let Err(message) = check_endpoint(&raw.endpoint) {
            self.report(&path.key("endpoint"), message);
        }
        let identity = self.identity(path, &raw, dropped);
        let mut settings = OpcUaSettings::new(raw.endpoint, Vec::new());
        settings.identity = identity;

        let policy = match raw.security_policy {
            _ if dropped.contains("security_policy") => None,
            None => Some(settings.security_policy),
            Some(text) => text
                .parse::<SecurityPolicy>()
                .map_err(|message| self.report(&path.key("security_policy"), message))
                .ok(),
        };
        let mode = match raw.security_mode {
            _ if dropped.contains("security_mode") => None,
            None => Some(settings.security_mode),
            Some(text) => text
                .parse::<SecurityMode>()
                .map_err(|message| self.report(&path.key("security_mode"), message))
                .ok(),
        };
        if let (Some(policy), Some(mode)) = (policy, mode) {
            if let Err(message) = check_security(policy, mode) {
                self.report(&path.key("security_mode"), message);
            }
            settings.security_policy = policy;
            settings.security_mode = mode;
        }

        settings.pki_dir = match raw.pki_dir {
            Some(text) => self.path(&path.key("pki_dir"), &text),
            None => data_dir.join("pki"),
        };
        settings.trust_server_cert = raw.trust_server_cert.unwrap_or(settings.trust_server_cert);
        settings.publishing_interval = self.duration(
            &path.key("publishing_interval"),
            raw.publishing_interval,
            settings.publishing_interval,
            NONZERO,
            MAX_DURATION,
        );
        settings.mode = match raw.mode {
            None => settings.mode,
            Some(RawMode::Subscribe) => Mode::Subscribe,
            Some(RawMode::Poll) => Mode::Poll,
        };
        let timing = self.timing(
            path,
            Timing {
                scan_interval: raw.scan_interval,
                timeout: raw.timeout,
                backoff_min: raw.backoff_min,
                backoff_max: raw.backoff_max,
            },
            dropped,
            Timing {
                scan_interval: settings.scan_interval,
                timeout: settings.timeout,
                backoff_min: settings.backoff_min,
                backoff_max: settings.backoff_max,
            },
        );
        settings.scan_interval = timing.scan_interval;
        settings.timeout = timing.timeout;
        settings.backoff_min = timing.backoff_min;
        settings.backoff_max = timing.backoff_max;
        let common = Common {
            name: raw.name.into(),
            scan_interval: timing.scan_interval,
            enabled: raw.enabled.unwrap_or(true),
        };
        (common, settings)
    }

    /// The user identity: anonymous, a user name with a password file, or a user certificate
    /// with its key; each file goes with its partner, and one identity at most.
    fn identity(
        &mut self,
        path: &FieldPath,
        raw: &RawOpcUaDevice,
        dropped: &BTreeSet<String>,
    ) -> Identity {
        if let Some(username) = &raw.username {
            if username.is_empty() {
                let message = "must not be empty: leave `username` out for an anonymous session";
                self.report(&path.key("username"), message);
            } else if username.contains('\0') {
                self.report(&path.key("username"), "must not contain NUL");
            }
        }
        let mut file = |key: &str, text: &Option<String>| {
            text.as_deref()
                .map(|text| self.credential_file(&path.key(key), text))
        };
        let password_file = file("password_file", &raw.password_file);
        let cert_file = file("user_cert_file", &raw.user_cert_file);
        let key_file = file("user_key_file", &raw.user_key_file);

        // A key dropped for a bad value was given: it is reported already.
        let given = |key: &str, set: bool| set || dropped.contains(key);
        let user = given("username", raw.username.is_some());
        let password = given("password_file", password_file.is_some());
        let cert = given("user_cert_file", cert_file.is_some());
        let key = given("user_key_file", key_file.is_some());
        let needs = [
            (
                user && !password,
                "username",
                "`username` needs `password_file`, the file holding the password",
            ),
            (
                password && !user,
                "password_file",
                "`password_file` needs `username`",
            ),
            (
                cert && !key,
                "user_cert_file",
                "`user_cert_file` needs `user_key_file`, the file holding the user's private key",
            ),
            (
                key && !cert,
                "user_key_file",
                "`user_key_file` needs `user_cert_file`, the user certificate",
            ),
            (
                user && cert,
                "user_cert_file",
                "a device has one user identity: `username` with `password_file`, or \
                 `user_cert_file` with `user_key_file`, not both",
            ),
        ];
        for (problem, key, message) in needs {
            if problem {
                self.report(&path.key(key), message);
            }
        }
        match (&raw.username, password_file, cert_file, key_file) {
            (Some(user), Some(password_file), None, None) => Identity::UserName {
                user: user.clone(),
                password_file,
            },
            (None, None, Some(cert_file), Some(key_file)) => Identity::X509 {
                cert_file,
                key_file,
            },
            _ => Identity::Anonymous,
        }
    }

    /// Checks an OPC UA device's tags, each on its own and then against each other (names,
    /// nodes).
    fn opcua_tags(
        &mut self,
        path: &FieldPath,
        entries: TagEntries<'_>,
        publishing_interval: Duration,
    ) -> Option<Vec<OpcUaTag>> {
        let foreign = Foreign::new(Protocol::OpcUa, Protocol::tag_keys);
        let mut tags: Vec<OpcUaTag> = Vec::new();
        let mut complete = true;
        let mut names: HashMap<String, usize> = HashMap::new();
        // The node's text form -> the first tag reading it, as (index in `tags`, its path).
        let mut nodes: HashMap<String, (usize, FieldPath)> = HashMap::new();
        for (index, entry) in entries.enumerate() {
            let Some(entry) = entry else {
                self.whole_text_needed = true;
                return None;
            };
            let tag_path = path.index(index);
            let Some(table) = self.entry(entry, &tag_path, "[[devices.tags]]") else {
                complete = false;
                continue;
            };
            let Some((raw, dropped)) =
                self.unit::<RawOpcUaTag>(table, &tag_path, &[], Some(&foreign))
            else {
                complete = false;
                continue;
            };
            self.tag_name(path, index, &raw.name, &mut names);
            let Some((tag, node_key)) =
                self.opcua_tag(&tag_path, raw, &dropped, publishing_interval)
            else {
                complete = false;
                continue;
            };
            let node_path = tag_path.key(node_key);
            match nodes.get(&tag.node.to_string()) {
                Some((first, first_path))
                    if tags.get(*first).is_some_and(|t| t.node == tag.node) =>
                {
                    let other = tags.get(*first).map_or("", |t| &*t.name);
                    let message = match self.line_of(first_path) {
                        Some(line) => format!(
                            "duplicate node `{}`: tag `{other}` on line {line} reads it already",
                            tag.node
                        ),
                        None => format!(
                            "duplicate node `{}`: tag `{other}` reads it already",
                            tag.node
                        ),
                    };
                    self.report(&node_path, message);
                }
                Some(_) => {}
                None => {
                    nodes.insert(tag.node.to_string(), (tags.len(), node_path));
                }
            }
            tags.push(tag);
        }
        complete.then_some(tags)
    }

    /// Checks one OPC UA tag; returns it when its node is known, with the key that names the
    /// node (`node_id` or `browse_path`).
    fn opcua_tag(
        &mut self,
        path: &FieldPath,
        raw: RawOpcUaTag,
        dropped: &BTreeSet<String>,
        publishing_interval: Duration,
    ) -> Option<(OpcUaTag, &'static str)> {
        let by_id = raw.node_id.as_deref().map(|text| {
            parse_node_id(text)
                .map(NodeRef::Id)
                .map_err(|message| self.report(&path.key("node_id"), message))
                .ok()
        });
        let by_path = raw.browse_path.as_deref().map(|text| {
            parse_browse_path(text)
                .map(NodeRef::BrowsePath)
                .map_err(|message| self.report(&path.key("browse_path"), message))
                .ok()
        });
        let node = match (by_id, by_path) {
            (Some(node), None) => node.map(|node| (node, "node_id")),
            (None, Some(node)) => node.map(|node| (node, "browse_path")),
            (Some(_), Some(_)) => {
                let message = "set either `node_id` or `browse_path`, not both";
                self.report(&path.key("browse_path"), message);
                None
            }
            (None, None) => {
                if !dropped.contains("node_id") && !dropped.contains("browse_path") {
                    let message = "a tag needs `node_id` (e.g. \"ns=2;s=Oven.Temp\") or \
                                   `browse_path` (e.g. \"Objects/Oven/Temp\")";
                    self.report(&path.key("node_id"), message);
                }
                None
            }
        };
        // Zero asks the server for its fastest practical rate.
        let sampling_interval = self.duration(
            &path.key("sampling_interval"),
            raw.sampling_interval,
            publishing_interval,
            Duration::ZERO,
            MAX_DURATION,
        );
        if let Some(deadband) = raw.deadband {
            if !deadband.is_finite() {
                self.report(&path.key("deadband"), "must be a finite number");
            } else if deadband < 0.0 {
                self.report(&path.key("deadband"), "must not be negative");
            }
        }
        let queue_size = self.integer(
            &path.key("queue_size"),
            raw.queue_size,
            10u32,
            1,
            MAX_QUEUE_SIZE,
        );
        let meta = self.tag_meta(
            path,
            TagMetaText {
                unit: raw.unit,
                description: raw.description,
                min: raw.min,
                max: raw.max,
            },
        );
        // The node's data type is the server's: any bound is checked against numbers only
        // when a write comes.
        let write = self.write_bounds(
            path,
            raw.writable.unwrap_or(false),
            None,
            raw.write_min,
            raw.write_max,
        );
        let (node, node_key) = node?;
        let tag = OpcUaTag {
            write,
            meta: meta.shared(),
            name: raw.name.into(),
            node,
            sampling_interval,
            deadband: raw.deadband,
            queue_size,
        };
        Some((tag, node_key))
    }
}
