//! The local store as the steps that read through it see it: one task's view of one step's
//! committed state and timers (see [`crate::operators::committed`]).

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use rocksdb::{Direction, IteratorMode, ReadOptions, DB};

use super::key_filter::KeyFilters;
use super::{changelog_key, family, partition_prefix, time_bytes, time_of, timer_family, push_timer_owner};
use crate::operators::committed::{CommittedState, StateBacking};

/// [`StateStore::backing`].
pub(super) struct Backing {
    pub(super) db: Arc<DB>,
    pub(super) failure: Arc<Mutex<Option<String>>>,
    pub(super) filters: Arc<KeyFilters>,
}

impl StateBacking for Backing {
    fn view(&self, step: usize, partition: i32, owner: Option<&str>) -> Box<dyn CommittedState> {
        // `["owner",""]` less its `""]`.
        let empty = changelog_key(owner, "");
        let mut state_prefix = partition_prefix(partition);
        state_prefix.extend_from_slice(&empty[..empty.len() - 3]);
        let mut timer_prefix = partition_prefix(partition);
        push_timer_owner(&mut timer_prefix, owner);
        Box::new(StoreView {
            db: self.db.clone(),
            step,
            filters: self.filters.clone(),
            state: family(step),
            timers: timer_family(step),
            state_prefix,
            timer_prefix,
            scratch: RefCell::new(Vec::new()),
            failure: self.failure.clone(),
        })
    }
}

/// One task's view of one step's state and timers in the store.
pub struct StoreView {
    db: Arc<DB>,
    step: usize,
    /// Asked before each read: most keys a dedup looks up are new.
    filters: Arc<KeyFilters>,
    state: String,
    timers: String,
    /// `0000000003/["owner",` : a state key follows as a JSON string, then `]`.
    state_prefix: Vec<u8>,
    /// `0000000003/"owner"\0` : a timer's time and key follow.
    timer_prefix: Vec<u8>,
    /// The key being looked up, built in place.
    scratch: RefCell<Vec<u8>>,
    failure: Arc<Mutex<Option<String>>>,
}

impl StoreView {
    fn failed(&self, what: &str, error: impl std::fmt::Display) {
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert_with(|| format!("{what} of the state store: {error}"));
        }
    }

    fn family(&self, name: &str) -> Option<&rocksdb::ColumnFamily> {
        let handle = self.db.cf_handle(name);
        if handle.is_none() {
            self.failed("reading", format!("it has no column family {name}"));
        }
        handle
    }
}

impl CommittedState for StoreView {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let handle = self.family(&self.state)?;
        let mut full = self.scratch.borrow_mut();
        full.clear();
        full.extend_from_slice(&self.state_prefix);
        crate::codec::json::write_string(&mut full, key);
        full.push(b']');
        if !self.filters.may_contain(self.step, &full) {
            return None;
        }
        match self.db.get_pinned_cf(handle, &*full) {
            Ok(value) => value.map(|value| value.to_vec()),
            Err(error) => {
                self.failed("reading", error);
                None
            }
        }
    }

    fn due_timers(&self, after: i64, until: i64, each: &mut dyn FnMut(i64, &str, &[u8])) -> Option<i64> {
        let handle = self.family(&self.timers)?;
        let mut start = self.timer_prefix.clone();
        start.extend_from_slice(&time_bytes(after.saturating_add(1)));
        // Every time of this owner: up to its NUL plus one.
        let mut end = self.timer_prefix.clone();
        end.pop();
        end.push(1);
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(end);
        for item in self.db.iterator_cf_opt(handle, options, IteratorMode::From(&start, Direction::Forward)) {
            let (key, value) = match item {
                Ok(entry) => entry,
                Err(error) => {
                    self.failed("reading the timers", error);
                    return None;
                }
            };
            let Some(rest) = key.strip_prefix(self.timer_prefix.as_slice()) else { break };
            let (Some(time), Ok(state_key)) = (rest.get(..8).and_then(time_of), std::str::from_utf8(rest.get(8..).unwrap_or_default())) else {
                continue;
            };
            if time > until {
                return Some(time);
            }
            each(time, state_key, &value);
        }
        None
    }

    fn scan(&self, prefix: &str, each: &mut dyn FnMut(&str, &[u8])) {
        let Some(handle) = self.family(&self.state) else { return };
        // The store key is the state key as a JSON string: a prefix of the key is the
        // prefix's JSON string less its closing quote.
        let mut start = self.state_prefix.clone();
        let _ = serde_json::to_writer(&mut start, prefix);
        start.pop();
        // No byte of UTF-8 text is 0xFF: every key with the prefix sorts below this.
        let mut end = start.clone();
        end.push(0xFF);
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(end);
        for item in self.db.iterator_cf_opt(handle, options, IteratorMode::From(&start, Direction::Forward)) {
            let (key, value) = match item {
                Ok(entry) => entry,
                Err(error) => {
                    self.failed("reading", error);
                    return;
                }
            };
            let Some(quoted) = key.get(self.state_prefix.len()..key.len().saturating_sub(1)) else { continue };
            // A key that does not read back as a string is not a state entry of this view.
            let Ok(state_key) = serde_json::from_slice::<String>(quoted) else { continue };
            each(&state_key, &value);
        }
    }
}
