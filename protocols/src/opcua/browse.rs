//! Browsing a server's address space for the `browse` command: a tree of objects and
//! variables with data type and access level, and ready-to-paste `[[devices.tags]]` entries.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use opcua::client::{Session, SessionPollResult};
use opcua::types::{
    AttributeId, DataTypeId, NodeClass, NodeId, QualifiedName, ReadValueId, StatusCode,
    TimestampsToReturn, Variant,
};
use tokio::sync::watch;

use super::client::{self, OpcUaError};
use super::OpcUaSettings;

/// Deepest level browsed, whatever `--depth` asks for.
const MAX_DEPTH: usize = 32;

/// One node found while browsing.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// How deep below the start node (1 = a child of it).
    pub depth: usize,
    /// The node id.
    pub node_id: NodeId,
    /// Browse name, with a `ns:` prefix outside namespace 0.
    pub browse_name: String,
    /// Browse names from the start node down to this one.
    pub path: Vec<String>,
    /// Object or Variable.
    pub class: NodeClass,
    /// Variables: the data type's name (`Double`, `Int32[]`, ...).
    pub data_type: Option<String>,
    /// Variables: whether the current value can be read by this session's user.
    pub readable: bool,
    /// Variables: whether the current value can be written by this session's user.
    pub writable: bool,
}

/// Connects with `settings` (security, identity, PKI), browses from `start` down to `depth`
/// levels, and closes the session. Waits at most `settings.timeout` for the session.
pub async fn browse(
    settings: &OpcUaSettings,
    start: &NodeId,
    depth: usize,
) -> Result<Vec<Node>, OpcUaError> {
    let mut client = client::build_client(settings)?;
    let (session, event_loop, endpoint) = client::open_session(&mut client, settings).await?;
    // The event loop runs in its own task; the first connect result comes back on a watch.
    let (state_tx, mut state_rx) = watch::channel::<Option<Result<(), StatusCode>>>(None);
    let looped = session.clone();
    let runner = tokio::spawn(async move {
        let stream = event_loop.enter();
        tokio::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(SessionPollResult::Reconnected(_)) => {
                    let _ = state_tx.send(Some(Ok(())));
                }
                Ok(SessionPollResult::ReconnectFailed(status)) | Err(status) => {
                    looped.disable_reconnects();
                    let _ = state_tx.send(Some(Err(status)));
                }
                Ok(_) => {}
            }
        }
    });
    let connected = tokio::time::timeout(settings.timeout, state_rx.wait_for(|s| s.is_some()))
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|s| *s));
    let result = match connected {
        Some(Ok(())) => walk(&session, start, depth).await,
        Some(Err(status)) if client::is_certificate_problem(status) => Err(OpcUaError::Setup(
            client::untrusted_server_advice(&settings.pki_dir, &endpoint.server_certificate),
        )),
        Some(Err(status)) => Err(OpcUaError::Service(status)),
        None => Err(OpcUaError::Unreachable {
            endpoint: settings.endpoint.clone(),
            status: format!("no session within {:?}", settings.timeout),
        }),
    };
    session.disable_reconnects();
    let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
    runner.abort();
    result
}

/// Walks the hierarchy breadth-first per level and fills in variable attributes.
async fn walk(
    session: &Arc<Session>,
    start: &NodeId,
    depth: usize,
) -> Result<Vec<Node>, OpcUaError> {
    let mut out = Vec::new();
    let mut visited = HashMap::new();
    visited.insert(start.to_string(), 0);
    let depth = depth.min(MAX_DEPTH);
    walk_below(session, start, &[], 1, depth, &mut visited, &mut out).await?;
    describe_variables(session, &mut out).await?;
    Ok(out)
}

async fn walk_below(
    session: &Session,
    parent: &NodeId,
    path: &[String],
    level: usize,
    depth: usize,
    visited: &mut HashMap<String, usize>,
    out: &mut Vec<Node>,
) -> Result<(), OpcUaError> {
    if level > depth {
        return Ok(());
    }
    for r in client::children(session, parent).await? {
        let node_id = r.node_id.node_id.clone();
        // A node reachable over two references or two parents, or through a cycle, is listed
        // once (the first path found names it), but its children are walked again when a
        // shorter path reaches it, so the depth limit does not cut its subtree short.
        let key = node_id.to_string();
        let browse_name = qualified(&r.browse_name);
        let mut child_path = path.to_vec();
        child_path.push(browse_name.clone());
        match visited.get(&key) {
            Some(&seen_at) if seen_at <= level => continue,
            Some(_) => {}
            None => out.push(Node {
                depth: level,
                node_id: node_id.clone(),
                browse_name,
                path: child_path.clone(),
                class: r.node_class,
                data_type: None,
                readable: false,
                writable: false,
            }),
        }
        visited.insert(key, level);
        // Server diagnostics and type definitions are noise for a tag list.
        if node_id == opcua::types::ObjectId::Server {
            continue;
        }
        Box::pin(walk_below(
            session,
            &node_id,
            &child_path,
            level + 1,
            depth,
            visited,
            out,
        ))
        .await?;
    }
    Ok(())
}

fn qualified(name: &QualifiedName) -> String {
    if name.namespace_index == 0 {
        name.name.to_string()
    } else {
        format!("{}:{}", name.namespace_index, name.name)
    }
}

/// Reads DataType, ValueRank and AccessLevel of every variable, then the data types' names.
async fn describe_variables(session: &Session, nodes: &mut [Node]) -> Result<(), OpcUaError> {
    let variables: Vec<usize> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.class == NodeClass::Variable)
        .map(|(i, _)| i)
        .collect();
    if variables.is_empty() {
        return Ok(());
    }
    let attributes = [
        AttributeId::DataType,
        AttributeId::ValueRank,
        AttributeId::UserAccessLevel,
    ];
    let mut reads = Vec::with_capacity(variables.len() * attributes.len());
    for &i in &variables {
        for a in attributes {
            reads.push(ReadValueId {
                node_id: nodes[i].node_id.clone(),
                attribute_id: a as u32,
                ..Default::default()
            });
        }
    }
    let values = read(session, &reads).await?;
    let mut type_ids: HashMap<usize, (NodeId, bool)> = HashMap::new();
    for (k, &i) in variables.iter().enumerate() {
        let base = k * attributes.len();
        let data_type = match values.get(base).and_then(|v| v.value.as_ref()) {
            Some(Variant::NodeId(id)) => Some((**id).clone()),
            _ => None,
        };
        let array = matches!(values.get(base + 1).and_then(|v| v.value.as_ref()), Some(Variant::Int32(r)) if *r >= 0);
        let access = match values.get(base + 2).and_then(|v| v.value.as_ref()) {
            Some(Variant::Byte(b)) => *b,
            _ => 0,
        };
        nodes[i].readable = access & 1 != 0;
        nodes[i].writable = access & 2 != 0;
        if let Some(t) = data_type {
            type_ids.insert(i, (t, array));
        }
    }
    // Names of the data types, one Read for all distinct ones.
    let mut distinct: Vec<NodeId> = Vec::new();
    for (t, _) in type_ids.values() {
        if !distinct.contains(t) {
            distinct.push(t.clone());
        }
    }
    let reads: Vec<ReadValueId> = distinct
        .iter()
        .map(|t| ReadValueId {
            node_id: t.clone(),
            attribute_id: AttributeId::BrowseName as u32,
            ..Default::default()
        })
        .collect();
    let names = read(session, &reads).await?;
    let mut by_id = HashMap::new();
    for (t, v) in distinct.iter().zip(names) {
        let name = match v.value {
            Some(Variant::QualifiedName(q)) => q.name.to_string(),
            _ => builtin_name(t).unwrap_or_else(|| t.to_string()),
        };
        by_id.insert(t.clone(), name);
    }
    for (i, (t, array)) in type_ids {
        let name = by_id.get(&t).cloned().unwrap_or_else(|| t.to_string());
        nodes[i].data_type = Some(if array { format!("{name}[]") } else { name });
    }
    Ok(())
}

fn builtin_name(id: &NodeId) -> Option<String> {
    let n = id.as_u32()?;
    if id.namespace != 0 {
        return None;
    }
    DataTypeId::try_from(n).ok().map(|t| format!("{t:?}"))
}

/// Reads in chunks so a large address space does not hit the server's per-call limit.
async fn read(
    session: &Session,
    reads: &[ReadValueId],
) -> Result<Vec<opcua::types::DataValue>, OpcUaError> {
    client::read_chunked(session, reads, 1000, TimestampsToReturn::Neither, || {})
        .await
        .map_err(OpcUaError::Call)
}

/// Renders nodes as an indented tree: browse name, node id, data type, access.
pub fn render_tree(nodes: &[Node]) -> String {
    let mut out = String::new();
    for n in nodes {
        let indent = "  ".repeat(n.depth.saturating_sub(1));
        let _ = write!(out, "{indent}{}  [{}]", n.browse_name, n.node_id);
        if n.class == NodeClass::Variable {
            let access = match (n.readable, n.writable) {
                (true, true) => "read/write",
                (true, false) => "read",
                (false, true) => "write",
                (false, false) => "no access",
            };
            let _ = write!(out, "  {}  {access}", n.data_type.as_deref().unwrap_or("?"));
        }
        out.push('\n');
    }
    out
}

/// Renders readable variables as `[[devices.tags]]` entries. Tag names are the browse path
/// below the start node joined with `.`, without namespace prefixes, made unique.
pub fn render_toml(nodes: &[Node]) -> String {
    let mut out = String::new();
    let mut used = BTreeSet::new();
    for n in nodes
        .iter()
        .filter(|n| n.class == NodeClass::Variable && n.readable)
    {
        let base = tag_name(&n.path);
        let mut name = base.clone();
        let mut k = 2;
        while !used.insert(name.clone()) {
            name = format!("{base}_{k}");
            k += 1;
        }
        let _ = writeln!(out, "[[devices.tags]]");
        let _ = writeln!(out, "name = {}", toml_string(&name));
        let _ = writeln!(out, "node_id = {}", toml_string(&n.node_id.to_string()));
        if let Some(t) = &n.data_type {
            let access = if n.writable { ", writable" } else { "" };
            let _ = writeln!(out, "# {t}{access}");
        }
        out.push('\n');
    }
    out
}

/// A tag name from a browse path: names without `ns:` prefixes joined by `.`, with the
/// characters MQTT reserves replaced by `_`, at most 128 characters.
pub fn tag_name(path: &[String]) -> String {
    let joined = path
        .iter()
        .map(|p| match p.split_once(':') {
            Some((ns, rest)) if ns.parse::<u16>().is_ok() => rest,
            _ => p.as_str(),
        })
        .collect::<Vec<_>>()
        .join(".");
    let cleaned: String = joined
        .chars()
        .map(|c| match c {
            '/' | '+' | '#' | '\0' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    let trimmed = cleaned.trim();
    let name: String = trimmed.chars().take(128).collect();
    if name.is_empty() {
        "tag".to_owned()
    } else {
        name.trim_end().to_owned()
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(path: &[&str], id: &str, writable: bool) -> Node {
        Node {
            depth: path.len(),
            node_id: id.parse().unwrap(),
            browse_name: path.last().unwrap().to_string(),
            path: path.iter().map(|s| s.to_string()).collect(),
            class: NodeClass::Variable,
            data_type: Some("Double".into()),
            readable: true,
            writable,
        }
    }

    #[test]
    fn tag_names_drop_namespace_prefixes_and_mqtt_wildcards() {
        assert_eq!(tag_name(&["2:Oven".into(), "2:Temp".into()]), "Oven.Temp");
        assert_eq!(tag_name(&["a/b+c#".into()]), "a_b_c_");
        assert_eq!(tag_name(&["  ".into()]), "tag");
        assert_eq!(tag_name(&["x".repeat(300)]).chars().count(), 128);
    }

    #[test]
    fn toml_output_is_valid_and_names_are_unique() {
        let nodes = vec![
            var(&["2:Sim", "2:Double"], "ns=2;s=Sim.Double", false),
            var(&["3:Sim", "3:Double"], "ns=3;s=\"quoted\"", true),
        ];
        let text = render_toml(&nodes);
        let parsed: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let tags = parsed["devices"]["tags"].as_array().unwrap();
        assert_eq!(tags.len(), 2);
        assert_eq!(tags[0]["name"].as_str(), Some("Sim.Double"));
        assert_eq!(tags[1]["name"].as_str(), Some("Sim.Double_2"));
        assert_eq!(tags[1]["node_id"].as_str(), Some("ns=3;s=\"quoted\""));
    }

    #[test]
    fn the_tree_shows_type_and_access() {
        let text = render_tree(&[var(&["2:Sim", "2:Setpoint"], "ns=2;s=Sim.Setpoint", true)]);
        assert!(
            text.contains("2:Setpoint  [ns=2;s=Sim.Setpoint]  Double  read/write"),
            "{text}"
        );
    }
}
