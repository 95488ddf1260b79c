//! Per-subject ordering of one group's messages within one bus: a state machine with no
//! I/O, driven by the group's delivery sources, settler and keep-alive task
//! (`consumer.rs`).
//!
//! JetStream hands out the next message of a subject while an earlier one is unsettled.
//! The sequencer holds such a message back (*parked*) until every earlier message of its
//! subject that this bus knows of is settled; messages of other subjects, and messages
//! without a subject, flow meanwhile. A message that left this bus without being settled
//! (nacked, or being settled) stays *away* and keeps its subject blocked until it comes
//! back, is settled, or has not come back within the time it was expected
//! ([`Sequencer::expire_away`]: another member of the group got it).

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What happened to an arriving message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Its turn came: it waits for a subscriber ([`Sequencer::take_ready`]).
    Ready,
    /// Parked behind an earlier message of its subject.
    Parked,
    /// A newer delivery of a message that was waiting here since delivery `was` (its
    /// keep-alive came too late): it still waits, and the deliveries after `was` were no
    /// attempts.
    Replaced {
        /// The delivery count it had.
        was: u64,
    },
    /// An older copy of a message delivered again already: ignore it.
    Stale,
}

#[derive(Debug)]
enum State<M> {
    /// Handed to a subscriber under `lease`; kept alive until `deadline` (its ack_wait).
    InFlight {
        lease: u64,
        message: M,
        deadline: Instant,
        touched: Instant,
    },
    /// Waits behind an earlier message of its subject.
    Parked {
        delivered: u64,
        message: M,
        touched: Instant,
    },
    /// Its turn came; waits for a subscriber.
    Ready {
        delivered: u64,
        message: M,
        touched: Instant,
    },
    /// Not held here (nacked, or being settled); blocks its subject until `until`.
    Away { until: Instant },
}

#[derive(Debug)]
struct Entry<M> {
    subject: Option<Arc<str>>,
    state: State<M>,
}

#[derive(Debug, Default)]
struct SubjectQueue {
    /// Unsettled sequences of the subject known here, oldest first.
    seqs: BTreeSet<u64>,
    /// How many of them are in flight.
    in_flight: usize,
}

/// Messages another process left unsettled, redelivered in whatever order they went back
/// to the server: none with a subject goes out until all of them are here.
#[derive(Debug)]
struct Hold {
    /// How many there are (the server's count of unsettled messages).
    expected: usize,
    seen: HashSet<u64>,
    /// Lifted at this time in any case (one of them went to another member).
    until: Instant,
}

/// The ordering state of one group in one bus. `M` is the held message.
///
/// Every delivery passes through it (an insert, a few lookups, a remove), so its maps
/// are hash maps with a fast hasher: a `BTreeMap` cost a tenth of the client's work per
/// consumed message, mostly moving entries inside its nodes (decision 0009, *Consume
/// path*). Where order matters (handing messages back) the sequences are sorted then.
#[derive(Debug)]
pub(crate) struct Sequencer<M> {
    entries: foldhash::HashMap<u64, Entry<M>>,
    subjects: foldhash::HashMap<Arc<str>, SubjectQueue>,
    ready: VecDeque<u64>,
    hold: Option<Hold>,
    /// A time to put in an entry's state while it is being moved (never read as one).
    placeholder: Instant,
}

impl<M> Default for Sequencer<M> {
    fn default() -> Self {
        Sequencer {
            entries: Default::default(),
            subjects: Default::default(),
            ready: VecDeque::new(),
            hold: None,
            placeholder: Instant::now(),
        }
    }
}

impl<M> Sequencer<M> {
    /// `expected` messages were left unsettled by another process and are being
    /// redelivered: messages with a subject wait until all of them are here, a first
    /// delivery arrives (the server hands out redeliveries first, so none is left), or
    /// `until`.
    pub(crate) fn hold_inherited(&mut self, expected: usize, until: Instant) {
        if expected > 0 {
            self.hold = Some(Hold {
                expected,
                seen: HashSet::new(),
                until,
            });
        }
    }

    /// Ends the hold if its time passed; returns whether a message became ready.
    pub(crate) fn lift_if_due(&mut self, now: Instant) -> bool {
        match &self.hold {
            Some(h) if h.until <= now => self.lift(),
            _ => false,
        }
    }

    fn lift(&mut self) -> bool {
        self.hold = None;
        let heads: Vec<u64> = self
            .subjects
            .values()
            .filter_map(|q| q.seqs.first().copied())
            .collect();
        let mut woke = false;
        for seq in heads {
            woke |= self.promote(seq);
        }
        woke
    }

    /// Whether messages left by another process are still being waited for.
    pub(crate) fn holding(&self) -> bool {
        self.hold.is_some()
    }

    /// Counts an arrival against the hold, and ends it when it is complete.
    fn note_for_hold(&mut self, seq: u64, delivered: u64) {
        let Some(h) = &mut self.hold else {
            return;
        };
        if delivered <= 1 {
            self.lift();
            return;
        }
        h.seen.insert(seq);
        if h.seen.len() >= h.expected {
            self.lift();
        }
    }

    /// Takes in a delivery of `seq` (the server's `delivered` count) with its subject.
    /// Deliveries must arrive in the order the server made them.
    pub(crate) fn arrive(
        &mut self,
        seq: u64,
        delivered: u64,
        subject: Option<&str>,
        message: M,
        now: Instant,
    ) -> Arrival {
        let arrival = self.take_in(seq, delivered, subject, message, now);
        if arrival != Arrival::Stale {
            self.note_for_hold(seq, delivered);
        }
        match self.entries.get(&seq) {
            Some(Entry {
                state: State::Ready { .. },
                ..
            }) if arrival == Arrival::Parked => Arrival::Ready,
            _ => arrival,
        }
    }

    fn take_in(
        &mut self,
        seq: u64,
        delivered: u64,
        subject: Option<&str>,
        message: M,
        now: Instant,
    ) -> Arrival {
        match self.entries.get_mut(&seq) {
            Some(e) => match &mut e.state {
                State::InFlight { lease, .. } if *lease >= delivered => return Arrival::Stale,
                State::Parked { delivered: d, .. } | State::Ready { delivered: d, .. }
                    if *d >= delivered =>
                {
                    return Arrival::Stale;
                }
                // Redelivered after its ack_wait: this copy replaces the old lease.
                State::InFlight { .. } => {
                    e.state = State::Parked {
                        delivered,
                        message,
                        touched: now,
                    };
                    if let Some(s) = &e.subject
                        && let Some(q) = self.subjects.get_mut(s)
                    {
                        q.in_flight = q.in_flight.saturating_sub(1);
                    }
                }
                // A newer copy of a waiting message (its keep-alive came too late).
                State::Parked {
                    delivered: d,
                    message: m,
                    ..
                }
                | State::Ready {
                    delivered: d,
                    message: m,
                    ..
                } => {
                    let was = std::mem::replace(d, delivered);
                    *m = message;
                    return Arrival::Replaced { was };
                }
                // Back from a nack: it is the head of its subject again.
                State::Away { .. } => {
                    e.state = State::Parked {
                        delivered,
                        message,
                        touched: now,
                    };
                }
            },
            None => {
                let subject: Option<Arc<str>> = subject.map(Arc::from);
                if let Some(s) = &subject {
                    self.subjects.entry(s.clone()).or_default().seqs.insert(seq);
                }
                self.entries.insert(
                    seq,
                    Entry {
                        subject,
                        state: State::Parked {
                            delivered,
                            message,
                            touched: now,
                        },
                    },
                );
            }
        }
        if self.promote(seq) {
            Arrival::Ready
        } else {
            Arrival::Parked
        }
    }

    /// Whether `seq` is known here (held, or away).
    pub(crate) fn contains(&self, seq: u64) -> bool {
        self.entries.contains_key(&seq)
    }

    /// The oldest unsettled sequence of `seq`'s subject known here, when older than `seq`
    /// (what `seq` waits behind).
    pub(crate) fn blocker(&self, seq: u64) -> Option<u64> {
        let s = self.entries.get(&seq)?.subject.as_ref()?;
        let first = *self.subjects.get(s)?.seqs.first()?;
        (first < seq).then_some(first)
    }

    /// Whether `seq` (parked) may go out: it is the oldest known message of its subject
    /// and none of its subject is in flight.
    fn may_hand_out(&self, seq: u64) -> bool {
        let Some(e) = self.entries.get(&seq) else {
            return false;
        };
        let Some(s) = &e.subject else {
            return true;
        };
        if self.hold.is_some() {
            return false;
        }
        self.subjects
            .get(s)
            .is_some_and(|q| q.in_flight == 0 && q.seqs.first() == Some(&seq))
    }

    /// Moves a ready `seq` in flight; returns its lease.
    fn hand_out(&mut self, seq: u64, now: Instant, ack_wait: Duration) -> Option<u64> {
        let e = self.entries.get_mut(&seq)?;
        let state = std::mem::replace(&mut e.state, State::Away { until: now });
        let (delivered, message) = match state {
            State::Ready {
                delivered, message, ..
            } => (delivered, message),
            other => {
                e.state = other;
                return None;
            }
        };
        e.state = State::InFlight {
            lease: delivered,
            message,
            deadline: now + ack_wait,
            touched: now,
        };
        if let Some(s) = &e.subject
            && let Some(q) = self.subjects.get_mut(s)
        {
            q.in_flight += 1;
        }
        Some(delivered)
    }

    /// The next message whose turn came, moved in flight: `(seq, lease, message)`.
    pub(crate) fn take_ready(
        &mut self,
        now: Instant,
        ack_wait: Duration,
    ) -> Option<(u64, u64, &M)> {
        let (seq, lease) = loop {
            let seq = self.ready.pop_front()?;
            if let Some(lease) = self.hand_out(seq, now, ack_wait) {
                break (seq, lease);
            }
        };
        match self.entries.get(&seq) {
            Some(Entry {
                state: State::InFlight { message, .. },
                ..
            }) => Some((seq, lease, message)),
            _ => None,
        }
    }

    /// Whether a message waits for a subscriber.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Messages handed to a subscriber and not settled yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e.state, State::InFlight { .. }))
            .count()
    }

    /// The held message of `seq` (in flight under `lease`): taken out to be settled. Its
    /// subject stays blocked until [`done`](Self::done), or until `until` if it is never
    /// called. `None` when the lease is not the current one (a stale settle).
    pub(crate) fn begin_settle(&mut self, seq: u64, lease: u64, until: Instant) -> Option<M> {
        let e = self.entries.get_mut(&seq)?;
        if !matches!(e.state, State::InFlight { lease: l, .. } if l == lease) {
            return None;
        }
        let State::InFlight { message, .. } =
            std::mem::replace(&mut e.state, State::Away { until })
        else {
            return None;
        };
        if let Some(s) = &e.subject
            && let Some(q) = self.subjects.get_mut(s)
        {
            q.in_flight = q.in_flight.saturating_sub(1);
        }
        Some(message)
    }

    /// Takes out a just-arrived message that is handled here (dead-lettered on arrival):
    /// it blocks its subject like [`begin_settle`](Self::begin_settle) until `done`.
    pub(crate) fn take(&mut self, seq: u64, until: Instant) -> Option<M> {
        let e = self.entries.get_mut(&seq)?;
        let was_in_flight = matches!(e.state, State::InFlight { .. });
        let message = match std::mem::replace(&mut e.state, State::Away { until }) {
            State::InFlight { message, .. }
            | State::Parked { message, .. }
            | State::Ready { message, .. } => message,
            State::Away { .. } => return None,
        };
        if was_in_flight
            && let Some(s) = &e.subject
            && let Some(q) = self.subjects.get_mut(s)
        {
            q.in_flight = q.in_flight.saturating_sub(1);
        }
        Some(message)
    }

    /// `seq` is settled for good (acked or dead-lettered): forget it and let the next
    /// message of its subject go. Returns whether a message became ready.
    pub(crate) fn done(&mut self, seq: u64) -> bool {
        let Some(e) = self.entries.get(&seq) else {
            return false;
        };
        if !matches!(e.state, State::Away { .. }) {
            // Handed out again meanwhile (a redelivery raced the settle): keep it.
            return false;
        }
        self.forget(seq)
    }

    fn forget(&mut self, seq: u64) -> bool {
        let Some(e) = self.entries.remove(&seq) else {
            return false;
        };
        let Some(s) = e.subject else {
            return false;
        };
        let next = match self.subjects.get_mut(&s) {
            Some(q) => {
                q.seqs.remove(&seq);
                if q.seqs.is_empty() {
                    self.subjects.remove(&s);
                    return false;
                }
                q.seqs.first().copied()
            }
            None => None,
        };
        next.is_some_and(|n| self.promote(n))
    }

    /// Makes a parked `seq` ready if its turn came.
    fn promote(&mut self, seq: u64) -> bool {
        if !self.may_hand_out(seq) {
            return false;
        }
        let Some(e) = self.entries.get_mut(&seq) else {
            return false;
        };
        let state = std::mem::replace(
            &mut e.state,
            State::Away {
                until: self.placeholder,
            },
        );
        match state {
            State::Parked {
                delivered,
                message,
                touched,
            } => {
                e.state = State::Ready {
                    delivered,
                    message,
                    touched,
                };
                self.ready.push_back(seq);
                true
            }
            other => {
                e.state = other;
                false
            }
        }
    }

    /// Marks the held messages due for a keep-alive (untouched for `every`; in-flight
    /// ones only until their deadline) as touched, and passes each to `f`.
    pub(crate) fn keep_alive(&mut self, now: Instant, every: Duration, mut f: impl FnMut(&M)) {
        for e in self.entries.values_mut() {
            match &mut e.state {
                State::InFlight {
                    message,
                    deadline,
                    touched,
                    ..
                } => {
                    if now < *deadline && now.duration_since(*touched) >= every {
                        *touched = now;
                        f(message);
                    }
                }
                State::Parked {
                    message, touched, ..
                }
                | State::Ready {
                    message, touched, ..
                } => {
                    if now.duration_since(*touched) >= every {
                        *touched = now;
                        f(message);
                    }
                }
                State::Away { .. } => {}
            }
        }
    }

    /// Forgets away messages that did not come back by their time (another member got
    /// them, or their settle was lost); returns whether a message became ready.
    pub(crate) fn expire_away(&mut self, now: Instant) -> bool {
        let expired: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Away { until } if until <= now))
            .map(|(s, _)| *s)
            .collect();
        let mut woke = false;
        for seq in expired {
            woke |= self.forget(seq);
        }
        woke
    }

    /// Takes every held message that is not in flight (parked or ready) out, forgetting
    /// them: they go back to the group.
    pub(crate) fn drain_waiting(&mut self) -> Vec<M> {
        let mut waiting: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Parked { .. } | State::Ready { .. }))
            .map(|(s, _)| *s)
            .collect();
        waiting.sort_unstable();
        let mut out = Vec::with_capacity(waiting.len());
        for seq in waiting {
            if let Some(e) = self.entries.get_mut(&seq) {
                let state = std::mem::replace(
                    &mut e.state,
                    State::Away {
                        until: Instant::now(),
                    },
                );
                if let State::Parked { message, .. } | State::Ready { message, .. } = state {
                    out.push(message);
                }
            }
            self.forget(seq);
        }
        self.ready.clear();
        out
    }

    /// Takes every held message out and forgets everything (the bus closes), oldest
    /// first: each with whether it was waiting (parked or ready) rather than in flight.
    pub(crate) fn drain_all(&mut self) -> Vec<(M, bool)> {
        let entries = std::mem::take(&mut self.entries);
        self.subjects.clear();
        self.ready.clear();
        let mut held: Vec<(u64, M, bool)> = entries
            .into_iter()
            .filter_map(|(seq, e)| match e.state {
                State::InFlight { message, .. } => Some((seq, message, false)),
                State::Parked { message, .. } | State::Ready { message, .. } => {
                    Some((seq, message, true))
                }
                State::Away { .. } => None,
            })
            .collect();
        held.sort_unstable_by_key(|(seq, ..)| *seq);
        held.into_iter().map(|(_, m, w)| (m, w)).collect()
    }

    /// Messages held here: in flight, parked or ready.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.entries
            .values()
            .filter(|e| !matches!(e.state, State::Away { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(30);

    fn seqr() -> (Sequencer<u64>, Instant) {
        (Sequencer::default(), Instant::now())
    }

    fn next(s: &mut Sequencer<u64>, now: Instant) -> Option<(u64, u64)> {
        s.take_ready(now, WAIT).map(|(q, l, _)| (q, l))
    }

    #[test]
    fn a_subject_goes_one_at_a_time_in_order_and_others_flow() {
        let (mut s, now) = seqr();
        assert_eq!(s.arrive(1, 1, Some("a"), 1, now), Arrival::Ready);
        assert_eq!(s.arrive(2, 1, Some("a"), 2, now), Arrival::Parked);
        assert_eq!(s.arrive(3, 1, Some("b"), 3, now), Arrival::Ready);
        assert_eq!(s.arrive(4, 1, None, 4, now), Arrival::Ready);
        assert_eq!(s.arrive(5, 1, Some("a"), 5, now), Arrival::Parked);
        assert_eq!(next(&mut s, now), Some((1, 1)));
        assert_eq!(next(&mut s, now), Some((3, 1)));
        assert_eq!(next(&mut s, now), Some((4, 1)));
        assert_eq!(next(&mut s, now), None);
        assert_eq!(s.begin_settle(1, 1, now + WAIT), Some(1));
        assert!(!s.has_ready(), "still blocked until the settle is done");
        assert!(s.done(1));
        assert_eq!(
            s.take_ready(now, WAIT).map(|(q, l, m)| (q, l, *m)),
            Some((2, 1, 2))
        );
        assert_eq!(next(&mut s, now), None, "5 waits for 2");
        assert_eq!(s.begin_settle(2, 1, now + WAIT), Some(2));
        assert!(s.done(2));
        assert_eq!(next(&mut s, now), Some((5, 1)));
    }

    #[test]
    fn a_nacked_head_blocks_its_subject_until_it_comes_back() {
        let (mut s, now) = seqr();
        s.arrive(1, 1, Some("a"), 1, now);
        s.arrive(2, 1, Some("a"), 2, now);
        assert_eq!(next(&mut s, now), Some((1, 1)));
        assert_eq!(s.begin_settle(1, 1, now + WAIT), Some(1));
        // Nacked: not done. The next of the subject must wait.
        assert_eq!(next(&mut s, now), None);
        assert_eq!(s.arrive(1, 2, Some("a"), 10, now), Arrival::Ready);
        assert_eq!(next(&mut s, now), Some((1, 2)));
        assert_eq!(
            s.begin_settle(1, 1, now + WAIT),
            None,
            "the old lease is stale"
        );
        assert_eq!(s.begin_settle(1, 2, now + WAIT), Some(10));
        assert!(s.done(1));
        assert_eq!(next(&mut s, now), Some((2, 1)));
    }

    #[test]
    fn an_ack_timeout_redelivery_replaces_the_lease_and_old_copies_are_stale() {
        let (mut s, now) = seqr();
        s.arrive(1, 1, Some("a"), 1, now);
        s.arrive(2, 1, Some("a"), 2, now);
        assert_eq!(next(&mut s, now), Some((1, 1)));
        assert_eq!(s.arrive(1, 2, Some("a"), 1, now), Arrival::Ready);
        assert_eq!(s.arrive(1, 2, Some("a"), 1, now), Arrival::Stale);
        assert_eq!(
            next(&mut s, now),
            Some((1, 2)),
            "not 2: 1 is still unsettled"
        );
        assert_eq!(s.begin_settle(1, 1, now), None);
        assert!(s.begin_settle(1, 2, now).is_some());
    }

    #[test]
    fn a_newer_copy_of_a_waiting_message_replaces_it_and_says_since_when() {
        let (mut s, now) = seqr();
        s.arrive(1, 1, Some("a"), 1, now);
        assert_eq!(s.arrive(5, 1, Some("a"), 5, now), Arrival::Parked);
        assert_eq!(s.blocker(5), Some(1));
        assert_eq!(s.blocker(1), None);
        assert_eq!(
            s.arrive(5, 3, Some("a"), 50, now),
            Arrival::Replaced { was: 1 }
        );
        assert_eq!(next(&mut s, now), Some((1, 1)));
        s.begin_settle(1, 1, now);
        s.done(1);
        assert_eq!(
            s.take_ready(now, WAIT).map(|(q, l, m)| (q, l, *m)),
            Some((5, 3, 50))
        );
    }

    #[test]
    fn messages_left_by_another_process_wait_until_all_are_back() {
        let (mut s, now) = seqr();
        s.hold_inherited(3, now + WAIT);
        // Redelivered out of order: 2 and 3 first.
        assert_eq!(s.arrive(2, 2, Some("a"), 2, now), Arrival::Parked);
        assert_eq!(
            s.arrive(3, 2, None, 3, now),
            Arrival::Ready,
            "no subject: no order"
        );
        assert_eq!(next(&mut s, now), Some((3, 2)));
        assert_eq!(
            s.arrive(1, 2, Some("a"), 1, now),
            Arrival::Ready,
            "all back"
        );
        assert_eq!(next(&mut s, now), Some((1, 2)));
        assert_eq!(next(&mut s, now), None);
    }

    #[test]
    fn a_first_delivery_or_the_time_ends_the_hold() {
        let (mut s, now) = seqr();
        s.hold_inherited(3, now + WAIT);
        s.arrive(2, 2, Some("a"), 2, now);
        assert!(s.holding());
        s.arrive(9, 1, Some("b"), 9, now);
        assert!(!s.holding(), "the server had no redelivery left");
        let mut ready = vec![next(&mut s, now), next(&mut s, now)];
        ready.sort();
        assert_eq!(ready, vec![Some((2, 2)), Some((9, 1))]);
        let (mut s, now) = seqr();
        s.hold_inherited(3, now + WAIT);
        s.arrive(2, 2, Some("a"), 2, now);
        assert!(!s.lift_if_due(now));
        assert!(s.lift_if_due(now + WAIT));
        assert_eq!(next(&mut s, now), Some((2, 2)));
    }

    #[test]
    fn an_away_message_that_never_comes_back_stops_blocking_at_its_time() {
        let (mut s, now) = seqr();
        s.arrive(1, 1, Some("a"), 1, now);
        s.arrive(2, 1, Some("a"), 2, now);
        next(&mut s, now);
        s.begin_settle(1, 1, now + Duration::from_secs(5));
        assert!(!s.expire_away(now + Duration::from_secs(4)));
        assert!(s.expire_away(now + Duration::from_secs(5)));
        assert_eq!(next(&mut s, now), Some((2, 1)));
    }

    #[test]
    fn a_message_taken_on_arrival_blocks_its_subject_until_done() {
        let (mut s, now) = seqr();
        assert_eq!(s.arrive(1, 9, Some("a"), 1, now), Arrival::Ready);
        s.arrive(2, 1, Some("a"), 2, now);
        assert_eq!(s.take(1, now + WAIT), Some(1));
        assert_eq!(next(&mut s, now), None);
        assert!(s.done(1));
        assert_eq!(next(&mut s, now), Some((2, 1)));
    }

    #[test]
    fn keep_alives_cover_waiting_messages_and_in_flight_ones_until_their_deadline() {
        let (mut s, now) = seqr();
        s.arrive(1, 1, Some("a"), 1, now);
        s.arrive(2, 1, Some("a"), 2, now);
        assert!(s.take_ready(now, Duration::from_secs(2)).is_some());
        let mut touched = Vec::new();
        s.keep_alive(now + Duration::from_secs(1), Duration::from_secs(1), |m| {
            touched.push(*m)
        });
        // In no particular order (a keep-alive is one `+WPI` per message).
        touched.sort_unstable();
        assert_eq!(touched, vec![1, 2]);
        touched.clear();
        s.keep_alive(now + Duration::from_secs(3), Duration::from_secs(1), |m| {
            touched.push(*m)
        });
        assert_eq!(touched, vec![2], "the in-flight one passed its ack_wait");
        assert_eq!(s.held(), 2);
        assert_eq!(s.drain_waiting(), vec![2]);
        assert_eq!(s.drain_all(), vec![(1, false)]);
        assert_eq!(s.held(), 0);
    }
}
