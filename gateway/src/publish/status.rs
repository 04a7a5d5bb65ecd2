//! The gateway's own status for the cloud: `{topic_prefix}/status`, retained, QoS 1.
//!
//! `{"gateway":"edge-01","boot":3,"state":"online","ts":1764190000123}` goes out after each
//! CONNACK; the same document with `"state":"offline"` is the connection's last will (so the
//! broker publishes it when the gateway vanishes: 1.5 keep-alive intervals without a packet)
//! and is published by the gateway itself at a clean shutdown, before its DISCONNECT. `ts` is
//! when the document was made, in milliseconds since the Unix epoch: for the will, when the
//! connection it guards was attempted.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::encode::json::write_str;

/// The status document.
pub fn document(gateway: &str, boot: u64, online: bool, now: SystemTime) -> Bytes {
    let ts = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut out = Vec::with_capacity(96);
    out.extend_from_slice(b"{\"gateway\":");
    write_str(&mut out, gateway);
    let state = if online { "online" } else { "offline" };
    out.extend_from_slice(
        format!(",\"boot\":{boot},\"state\":\"{state}\",\"ts\":{ts}}}").as_bytes(),
    );
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_status_document_names_gateway_boot_state_and_time() {
        let at = UNIX_EPOCH + Duration::from_millis(1_764_190_000_123);
        let doc = document("edge-\"01", 3, true, at);
        let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"gateway":"edge-\"01","boot":3,"state":"online","ts":1_764_190_000_123u64})
        );
        let v: serde_json::Value = serde_json::from_slice(&document("g", 1, false, at)).unwrap();
        assert_eq!(v["state"], "offline");
    }
}
