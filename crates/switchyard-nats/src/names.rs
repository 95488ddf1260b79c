//! Topic and group names to JetStream stream, consumer and subject names.
//!
//! Stream and consumer names may not contain `.`, so names are escaped one to one
//! (`_` → `__`, `.` → `_d`, `$` → `_s`): two topics never share a stream.

/// The naming scheme of one bus (its optional namespace included).
#[derive(Debug, Clone)]
pub(crate) struct Names {
    stream_prefix: String,
    subject_prefix: String,
    partition_prefix: String,
    transient_prefix: String,
}

/// FNV-1a (32 bit) of `s`: the partition hash every publisher and consumer agrees on
/// (decision 0013). Stable across versions and platforms, unlike `std`'s hasher.
pub(crate) fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The partition of ordering key `subject` among `partitions` (at least 1).
pub(crate) fn partition_of(subject: &str, partitions: u32) -> u32 {
    fnv1a(subject) % partitions.max(1)
}

fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            '_' => out.push_str("__"),
            '.' => out.push_str("_d"),
            '$' => out.push_str("_s"),
            c => out.push(c),
        }
    }
    out
}

impl Names {
    pub(crate) fn new(namespace: Option<&str>) -> Self {
        match namespace {
            Some(ns) => Names {
                stream_prefix: format!("SY_{}_", escape(ns)),
                subject_prefix: format!("sy.{ns}."),
                partition_prefix: format!("syp.{ns}."),
                transient_prefix: format!("syt.{ns}."),
            },
            None => Names {
                stream_prefix: "SY_".into(),
                subject_prefix: "sy.".into(),
                partition_prefix: "syp.".into(),
                transient_prefix: "syt.".into(),
            },
        }
    }

    /// The stream holding `topic`.
    pub(crate) fn stream(&self, topic: &str) -> String {
        format!("{}{}", self.stream_prefix, escape(topic))
    }

    /// The one subject of `topic`'s stream.
    pub(crate) fn subject(&self, topic: &str) -> String {
        format!("{}{topic}", self.subject_prefix)
    }

    /// The subject of partition `p` of `topic` (`syp.<topic>.<p>`): a prefix of its own,
    /// so `syp.<topic>.*` never overlaps another topic's subjects (`sy.orders.dlq`).
    pub(crate) fn partition_subject(&self, topic: &str, p: u32) -> String {
        format!("{}{topic}.{p}", self.partition_prefix)
    }

    /// The subjects of all partitions of `topic` (one stream subject).
    pub(crate) fn partition_wildcard(&self, topic: &str) -> String {
        format!("{}{topic}.*", self.partition_prefix)
    }

    /// The durable consumer of partition `p` of `group`. Escaped names never hold `_`
    /// followed by `p`, so no group's own consumer has this name.
    pub(crate) fn partition_consumer(&self, group: &str, p: u32) -> String {
        format!("{}_p{p}", escape(group))
    }

    /// The stream of partition leases and group members (`lease.rs`).
    pub(crate) fn lease_stream(&self) -> String {
        format!("{}_Leases", self.stream_prefix)
    }

    /// The subject prefix of the lease stream's keys.
    pub(crate) fn lease_subjects(&self) -> String {
        match self.transient_prefix.strip_prefix("syt.") {
            Some(rest) => format!("syk.{rest}lease"),
            None => "syk.lease".into(),
        }
    }

    /// The stream of deliveries that were no attempts (`ledger.rs`). No topic's stream
    /// has this name: escaped names never hold `_` followed by `L`.
    pub(crate) fn ledger_stream(&self) -> String {
        format!("{}_Ledger", self.stream_prefix)
    }

    /// The subject prefix of the ledger's keys (apart from topics' `sy.` and `syt.`).
    pub(crate) fn ledger_subjects(&self) -> String {
        match self.transient_prefix.strip_prefix("syt.") {
            Some(rest) => format!("syl.{rest}ledger"),
            None => "syl.ledger".into(),
        }
    }

    /// The durable consumer of `group`.
    pub(crate) fn consumer(&self, group: &str) -> String {
        escape(group)
    }

    /// The core NATS subject of the transient topic `topic`.
    pub(crate) fn transient(&self, topic: &str) -> String {
        format!("{}{topic}", self.transient_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_one_to_one() {
        let n = Names::new(None);
        assert_ne!(n.stream("a.b"), n.stream("a_b"));
        assert_ne!(n.stream("a_d"), n.stream("a.d"));
        assert_eq!(n.stream("orders.dlq"), "SY_orders_ddlq");
        assert_eq!(n.subject("orders"), "sy.orders");
        let n = Names::new(Some("x1"));
        assert_eq!(n.stream("t"), "SY_x1_t");
        assert_eq!(n.transient("t"), "syt.x1.t");
        assert_eq!(n.ledger_stream(), "SY_x1__Ledger");
        assert_ne!(n.ledger_stream(), n.stream("_Ledger"));
        assert_eq!(n.ledger_subjects(), "syl.x1.ledger");
        assert_eq!(Names::new(None).ledger_subjects(), "syl.ledger");
        assert_eq!(n.partition_subject("t", 3), "syp.x1.t.3");
        assert_eq!(n.partition_wildcard("t"), "syp.x1.t.*");
        assert_eq!(n.lease_subjects(), "syk.x1.lease");
        assert_eq!(n.lease_stream(), "SY_x1__Leases");
        assert_ne!(n.partition_consumer("g", 1), n.consumer("g_p1"));
    }

    #[test]
    fn the_partition_hash_is_fnv1a() {
        // Reference values of 32-bit FNV-1a.
        assert_eq!(fnv1a(""), 0x811c_9dc5);
        assert_eq!(fnv1a("a"), 0xe40c_292c);
        assert_eq!(fnv1a("foobar"), 0xbf9c_f968);
        assert_eq!(partition_of("a", 16), 0xe40c_292c % 16);
        assert_eq!(partition_of("a", 0), 0);
    }
}
