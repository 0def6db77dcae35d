//! Frozen `step_definition` Hashes, built once per template step and shared by every event of
//! that step (they are the same data each time, and were a third of an event's allocations).
//!
//! The Hashes live in one Ruby Hash, keyed by the address of the step's `Arc<StepDefinition>`,
//! that is a permanent GC root; lookups go through it, so GC compaction moving a Hash cannot
//! leave Rust a stale pointer. The Rust side keeps each `Arc` alive while its entry exists, so
//! an address is never reused by another definition. Only Ruby threads holding the GVL touch
//! either map, and the Mutex is never held across a Ruby call.

use crate::convert;
use magnus::{
    gc,
    rb_sys::{AsRawValue, FromRawValue},
    value::{Lazy, ReprValue},
    Error, RHash, Ruby, Value,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tasker_worker::template::StepDefinition;

/// Enough for every step of many templates; past it the cache starts over (workers restarted
/// many times in one process, with new templates each time).
const MAX_ENTRIES: usize = 4096;

static BY_ADDRESS: Lazy<RHash> = Lazy::new(|ruby| {
    let hash = ruby.hash_new();
    gc::register_mark_object(hash);
    hash
});

static KEPT: Mutex<Option<HashMap<usize, Arc<StepDefinition>>>> = Mutex::new(None);

fn kept() -> MutexGuard<'static, Option<HashMap<usize, Arc<StepDefinition>>>> {
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shared frozen Hash for `definition`, built on first use.
pub fn step_definition(ruby: &Ruby, definition: &Arc<StepDefinition>) -> Result<Value, Error> {
    let address = Arc::as_ptr(definition) as usize;
    let cache = ruby.get_inner(&BY_ADDRESS);
    let key = ruby.integer_from_u64(address as u64);
    // SAFETY: a lookup with an Integer key runs no Ruby code and cannot raise.
    let found = unsafe {
        rb_sys::rb_hash_lookup2(
            cache.as_raw(),
            key.as_raw(),
            rb_sys::Qundef as rb_sys::VALUE,
        )
    };
    if found != rb_sys::Qundef as rb_sys::VALUE {
        // SAFETY: a value stored in the rooted Hash.
        return Ok(unsafe { Value::from_raw(found) });
    }

    let hash = convert::step_definition_to_ruby(ruby, definition)?;
    let full = kept().as_ref().is_some_and(|k| k.len() >= MAX_ENTRIES);
    if full {
        cache.funcall::<_, _, Value>("clear", ())?;
        kept().take();
    }
    cache.aset(key, hash)?;
    kept()
        .get_or_insert_with(HashMap::new)
        .insert(address, Arc::clone(definition));
    Ok(hash.as_value())
}

/// Forget every definition (a new worker brings its own templates).
pub fn clear(ruby: &Ruby) -> Result<(), Error> {
    ruby.get_inner(&BY_ADDRESS)
        .funcall::<_, _, Value>("clear", ())?;
    kept().take();
    Ok(())
}
