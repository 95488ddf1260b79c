//! Topic and group names to JetStream stream, consumer and subject names.
//!
//! Stream and consumer names may not contain `.`, so names are escaped one to one
//! (`_` → `__`, `.` → `_d`, `$` → `_s`): two topics never share a stream.

/// The naming scheme of one bus (its optional namespace included).
#[derive(Debug, Clone)]
pub(crate) struct Names {
    stream_prefix: String,
    subject_prefix: String,
    transient_prefix: String,
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
                transient_prefix: format!("syt.{ns}."),
            },
            None => Names {
                stream_prefix: "SY_".into(),
                subject_prefix: "sy.".into(),
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
    }
}
