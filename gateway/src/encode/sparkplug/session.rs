//! The Sparkplug session of the edge node: what may go out when, and with which `seq`. Pure
//! state, no I/O: the publisher tells it what happened and does what it answers.
//!
//! Invariants:
//! - Every NBIRTH, DBIRTH, DDATA and DDEATH takes the next `seq`, 0..=255 and wrapping; an
//!   NBIRTH takes 0 and the rest of its births follow it. NDEATH (the will) has none.
//! - On a connection, only the subscriptions (NCMD, DCMD and the primary host's STATE) go out
//!   before the NBIRTH; with a primary host the NBIRTH waits for its STATE to say online.
//! - Data goes out only after the NBIRTH of the current connection (and, with a primary host,
//!   while it is online); before, records wait in the ledger and the buffer.
//! - A device's DDEATH goes out only when it was born in this session; its DBIRTH only when it
//!   was not: births and deaths alternate per device.
//! - The primary host going offline ends the connection (the broker then publishes the will,
//!   NDEATH); the next connection waits for the host again with a new `bdSeq`.
//! - A STATE with a timestamp older than the newest one seen is about an earlier session of
//!   the host (a late will, say) and changes nothing; one without a timestamp (the older text
//!   form) is taken as it says. Seen timestamps outlive connections.

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No connection.
    Down,
    /// Connected and subscribed, waiting for the primary host's STATE online.
    WaitingForHost,
    /// NBIRTH sent: data goes out.
    Up,
}

/// What the publisher must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Publish NBIRTH and a DBIRTH for every device that answers.
    Births,
    /// Drop the connection (the will announces the node's death).
    Disconnect,
}

/// A STATE older than one already taken: about an earlier session of the host, ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale;

/// The session state of one edge node.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    primary_host: bool,
    next: u8,
    bd_seq: u64,
    born: Vec<bool>,
    /// The newest STATE timestamp taken from the primary host.
    host_timestamp: Option<u64>,
}

impl Session {
    /// A session of an edge node, with or without a primary host to wait for.
    pub fn new(primary_host: bool) -> Self {
        Session {
            phase: Phase::Down,
            primary_host,
            next: 0,
            bd_seq: 0,
            born: Vec::new(),
            host_timestamp: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The `bdSeq` of the current connection (its will's).
    pub fn bd_seq(&self) -> u64 {
        self.bd_seq
    }

    /// A connection was made with a will carrying `bd_seq` (the subscriptions go out now).
    pub fn connected(&mut self, bd_seq: u64) -> Option<Step> {
        self.bd_seq = bd_seq;
        self.born.clear();
        if self.primary_host {
            self.phase = Phase::WaitingForHost;
            None
        } else {
            Some(Step::Births)
        }
    }

    /// The connection is gone.
    pub fn lost(&mut self) {
        self.phase = Phase::Down;
        self.born.clear();
    }

    /// The primary host's STATE said `online`, for its session that began at `timestamp`:
    /// what to do, or [`Stale`] when the STATE is older than one already taken.
    pub fn host_state(
        &mut self,
        online: bool,
        timestamp: Option<u64>,
    ) -> Result<Option<Step>, Stale> {
        if let Some(t) = timestamp {
            if self.host_timestamp.is_some_and(|seen| t < seen) {
                return Err(Stale);
            }
            self.host_timestamp = Some(t);
        }
        Ok(match (self.phase, online) {
            (Phase::WaitingForHost, true) => Some(Step::Births),
            (Phase::Up, false) if self.primary_host => {
                self.lost();
                Some(Step::Disconnect)
            }
            _ => None,
        })
    }

    /// An NCMD asked for a rebirth: honoured once the node is up.
    pub fn rebirth(&mut self) -> Option<Step> {
        (self.phase == Phase::Up).then_some(Step::Births)
    }

    /// The NBIRTH goes out now: its `seq` (0). Every device is unborn until its DBIRTH.
    pub fn nbirth(&mut self) -> u8 {
        self.phase = Phase::Up;
        self.born.clear();
        self.next = 1;
        0
    }

    /// Whether data goes out.
    pub fn up(&self) -> bool {
        self.phase == Phase::Up
    }

    /// The `seq` of the next DBIRTH, DDATA or DDEATH.
    pub fn next_seq(&mut self) -> u8 {
        let seq = self.next;
        self.next = self.next.wrapping_add(1);
        seq
    }

    /// Whether `device` was born in this session.
    pub fn is_born(&self, device: usize) -> bool {
        self.born.get(device).copied().unwrap_or(false)
    }

    /// `device`'s DBIRTH goes out now, if it may: its `seq`.
    pub fn dbirth(&mut self, device: usize) -> Option<u8> {
        if !self.up() || self.is_born(device) {
            return None;
        }
        if self.born.len() <= device {
            self.born.resize(device + 1, false);
        }
        self.born[device] = true;
        Some(self.next_seq())
    }

    /// `device`'s DDEATH goes out now, if it may: its `seq`.
    pub fn ddeath(&mut self, device: usize) -> Option<u8> {
        if !self.up() || !self.is_born(device) {
            return None;
        }
        self.born[device] = false;
        Some(self.next_seq())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_primary_host_the_births_go_out_right_after_connecting() {
        let mut s = Session::new(false);
        assert_eq!(s.connected(7), Some(Step::Births));
        assert_eq!(s.bd_seq(), 7);
        assert!(!s.up(), "no data before the NBIRTH itself");
        assert_eq!(s.nbirth(), 0);
        assert!(s.up());
    }

    #[test]
    fn nbirth_takes_seq_zero_and_every_later_message_the_next_one_wrapping_after_255() {
        let mut s = Session::new(false);
        s.connected(0);
        assert_eq!(s.nbirth(), 0);
        assert_eq!(s.dbirth(0), Some(1));
        let seqs: Vec<u8> = (0..300).map(|_| s.next_seq()).collect();
        assert_eq!(seqs[0], 2);
        assert_eq!(seqs[253], 255);
        assert_eq!(seqs[254], 0, "wraps to 0 after 255");
        assert_eq!(s.ddeath(0), Some(seqs[299].wrapping_add(1)));
    }

    #[test]
    fn a_rebirth_starts_the_seq_again_at_zero_and_rebirths_every_device() {
        let mut s = Session::new(false);
        s.connected(1);
        s.nbirth();
        s.dbirth(0);
        s.next_seq();
        assert_eq!(s.rebirth(), Some(Step::Births));
        assert_eq!(s.nbirth(), 0);
        assert!(!s.is_born(0));
        assert_eq!(s.dbirth(0), Some(1));
    }

    #[test]
    fn a_rebirth_request_before_the_node_is_up_asks_for_nothing() {
        let mut s = Session::new(true);
        assert_eq!(s.rebirth(), None);
        s.connected(1);
        assert_eq!(s.rebirth(), None);
    }

    #[test]
    fn with_a_primary_host_births_and_data_wait_for_its_state_online() {
        let mut s = Session::new(true);
        assert_eq!(s.connected(3), None);
        assert_eq!(s.phase(), Phase::WaitingForHost);
        assert!(!s.up());
        assert_eq!(s.dbirth(0), None, "no DBIRTH before the NBIRTH");
        assert_eq!(s.host_state(false, None), Ok(None));
        assert_eq!(s.host_state(true, None), Ok(Some(Step::Births)));
        s.nbirth();
        assert!(s.up());
    }

    #[test]
    fn the_primary_host_going_offline_drops_the_connection_and_stops_data() {
        let mut s = Session::new(true);
        s.connected(3);
        s.host_state(true, None).unwrap();
        s.nbirth();
        assert_eq!(s.host_state(false, None), Ok(Some(Step::Disconnect)));
        assert!(!s.up());
        assert_eq!(s.phase(), Phase::Down);
    }

    #[test]
    fn a_device_is_born_once_and_dies_once_per_life() {
        let mut s = Session::new(false);
        s.connected(0);
        s.nbirth();
        assert_eq!(s.ddeath(2), None, "a device never born cannot die");
        assert_eq!(s.dbirth(2), Some(1));
        assert_eq!(s.dbirth(2), None, "born already");
        assert_eq!(s.ddeath(2), Some(2));
        assert_eq!(s.ddeath(2), None, "dead already");
        assert_eq!(s.dbirth(2), Some(3), "comes back");
    }

    #[test]
    fn a_lost_connection_forgets_the_births() {
        let mut s = Session::new(false);
        s.connected(0);
        s.nbirth();
        s.dbirth(0);
        s.lost();
        assert!(!s.up());
        assert!(!s.is_born(0));
        assert_eq!(s.connected(1), Some(Step::Births));
        assert_eq!(s.bd_seq(), 1);
    }

    #[test]
    fn an_offline_state_older_than_the_online_one_is_a_late_will_and_keeps_the_session() {
        let mut s = Session::new(true);
        s.connected(1);
        assert_eq!(s.host_state(true, Some(2_000)), Ok(Some(Step::Births)));
        s.nbirth();
        assert_eq!(s.host_state(false, Some(1_000)), Err(Stale));
        assert!(
            s.up(),
            "still up: that death was of the host's earlier session"
        );
        assert_eq!(
            s.host_state(false, Some(2_000)),
            Ok(Some(Step::Disconnect)),
            "the death of the session it was online for (same timestamp) counts"
        );
    }

    #[test]
    fn an_online_state_older_than_one_seen_does_not_start_a_session_even_after_a_reconnect() {
        let mut s = Session::new(true);
        s.connected(1);
        assert_eq!(s.host_state(false, Some(5_000)), Ok(None));
        s.lost();
        s.connected(2);
        assert_eq!(s.host_state(true, Some(4_000)), Err(Stale));
        assert!(!s.up());
        assert_eq!(s.host_state(true, Some(6_000)), Ok(Some(Step::Births)));
    }

    #[test]
    fn a_state_without_a_timestamp_is_taken_as_it_says() {
        let mut s = Session::new(true);
        s.connected(1);
        s.host_state(true, Some(9_000)).unwrap();
        s.nbirth();
        assert_eq!(s.host_state(false, None), Ok(Some(Step::Disconnect)));
    }
}
