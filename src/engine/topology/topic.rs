//! An input topic's name as the topology keeps it: one allocation shared by every mention
//! (see `Topology::meet`), equal to itself without its text being read. Each record's task
//! and watermark lookups compare these several times, and before this they compared the
//! names byte by byte (memcmp was 3% of a filter pipeline's instructions).

use std::cmp::Ordering;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub(super) struct Topic(Arc<str>);

impl Topic {
    pub(super) fn new(name: &str) -> Topic {
        Topic(Arc::from(name))
    }

    pub(super) fn is(&self, name: &str) -> bool {
        &*self.0 == name
    }
}

impl std::ops::Deref for Topic {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq for Topic {
    fn eq(&self, other: &Topic) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for Topic {}

impl Ord for Topic {
    fn cmp(&self, other: &Topic) -> Ordering {
        match Arc::ptr_eq(&self.0, &other.0) {
            true => Ordering::Equal,
            false => self.0.cmp(&other.0),
        }
    }
}

impl PartialOrd for Topic {
    fn partial_cmp(&self, other: &Topic) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::Topic;

    #[test]
    fn topics_order_by_name_whether_shared_or_not() {
        let bids = Topic::new("bids");
        assert_eq!(bids, bids.clone());
        assert_eq!(bids, Topic::new("bids"));
        assert_eq!(bids.cmp(&Topic::new("bids")), std::cmp::Ordering::Equal);
        assert!(Topic::new("asks") < bids && bids < Topic::new("bids2"));
    }
}
