//! MQTT 5 topic aliases for the per-device topics. Pure state, no I/O.
//!
//! Invariants:
//! - Aliases live as long as one connection: [`Aliases::reset`] at every CONNACK, with the
//!   broker's `Topic Alias Maximum` (0: no aliases, every publish carries its topic).
//! - An alias is never above the broker's maximum, and names one topic for the whole
//!   connection: the first publish on a topic sends topic and alias, every later one the alias
//!   alone (an empty topic). Publishes on one connection reach the broker in order, so the
//!   broker always learns an alias before it is used alone.
//! - When the aliases run out, further topics go out in full: nothing is ever remapped.

use std::collections::HashMap;

use super::link::Outbound;

/// Topic-to-alias map of the current connection.
#[derive(Debug, Default)]
pub struct Aliases {
    maximum: u16,
    assigned: HashMap<String, u16>,
}

impl Aliases {
    /// A new connection whose broker keeps `maximum` aliases.
    pub fn reset(&mut self, maximum: u16) {
        self.maximum = maximum;
        self.assigned.clear();
    }

    /// How a (non-retained) publish on `topic` goes out.
    pub(crate) fn outbound(&mut self, topic: &str) -> Outbound {
        if let Some(&alias) = self.assigned.get(topic) {
            return Outbound {
                topic: String::new(),
                alias: Some(alias),
                retain: false,
            };
        }
        let next = self.assigned.len() + 1;
        let alias = u16::try_from(next).ok().filter(|&a| a <= self.maximum);
        if let Some(alias) = alias {
            self.assigned.insert(topic.to_owned(), alias);
        }
        Outbound {
            topic: topic.to_owned(),
            alias,
            retain: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_aliases_every_publish_carries_its_topic() {
        let mut a = Aliases::default();
        a.reset(0);
        for _ in 0..2 {
            let out = a.outbound("edge/gw/press7");
            assert_eq!((out.topic.as_str(), out.alias), ("edge/gw/press7", None));
        }
    }

    #[test]
    fn the_first_publish_on_a_topic_sets_its_alias_and_later_ones_use_it_alone() {
        let mut a = Aliases::default();
        a.reset(10);
        let first = a.outbound("edge/gw/press7");
        assert_eq!(
            (first.topic.as_str(), first.alias),
            ("edge/gw/press7", Some(1))
        );
        let other = a.outbound("edge/gw/oven");
        assert_eq!(
            (other.topic.as_str(), other.alias),
            ("edge/gw/oven", Some(2))
        );
        let again = a.outbound("edge/gw/press7");
        assert_eq!((again.topic.as_str(), again.alias), ("", Some(1)));
    }

    #[test]
    fn topics_beyond_the_brokers_maximum_go_out_in_full() {
        let mut a = Aliases::default();
        a.reset(1);
        assert_eq!(a.outbound("t/a").alias, Some(1));
        let b = a.outbound("t/b");
        assert_eq!((b.topic.as_str(), b.alias), ("t/b", None));
        let b = a.outbound("t/b");
        assert_eq!((b.topic.as_str(), b.alias), ("t/b", None));
        assert_eq!(a.outbound("t/a").alias, Some(1));
    }

    #[test]
    fn a_new_connection_forgets_every_alias() {
        let mut a = Aliases::default();
        a.reset(5);
        a.outbound("t/a");
        a.reset(5);
        let out = a.outbound("t/a");
        assert_eq!((out.topic.as_str(), out.alias), ("t/a", Some(1)));
    }
}
