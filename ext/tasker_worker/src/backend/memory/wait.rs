//! The task table as a caller's thread uses it: a thread of Ruby or Python works on it directly,
//! never blocking while it holds its interpreter's lock (Ruby's GVL, Python's GIL). What differs
//! between the two bridges (how a blocking wait releases that lock, how an interrupt or an engine
//! error becomes the language's error) is a [`CallerThread`]; the rest is here, once.

use super::{GroupWait, LocalTasks, TaskTable};
use crate::error::EngineError;
use crate::events::TaskSnapshot;
use crossbeam_channel::Receiver;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Tasks looked up (or waited for) per lock section: a long list never holds the table long.
const WAIT_CHUNK: usize = 64;

/// A bridge's thread, as [`LocalTasks::access_from`] and [`LocalTasks::wait_for_tasks`] need it.
pub trait CallerThread {
    /// The bridge's error: an interrupt, or an [`EngineError`] made the language's.
    type Error;

    /// Run `work` (it blocks on the table's lock) with the interpreter's lock released. `work`
    /// runs once, or not at all when an interrupt comes first (that is the `Err`).
    fn released<R: Send>(&self, work: impl FnOnce() -> R + Send) -> Result<R, Self::Error>;

    /// Wait, with the interpreter's lock released, for `done` to receive (every task of a group
    /// answered): `Ok(true)`; `Ok(false)` past `timeout`. An interrupt that raises, and a
    /// disconnect (the engine stopped first), are the `Err`.
    fn await_group(
        &self,
        done: &Receiver<()>,
        timeout: Option<Duration>,
    ) -> Result<bool, Self::Error>;

    /// The bridge's error for a task's answer that is an engine error (an unknown uuid, the
    /// engine stopped).
    fn engine_error(&self, error: EngineError) -> Self::Error;
}

impl LocalTasks {
    /// Run `work` on the table: at once if its lock is free, else waiting for the lock with the
    /// caller's interpreter lock released (another thread, or the engine, holds it for a moment;
    /// blocking on it with the GVL or GIL held would stall every thread of the language behind it).
    pub fn access_from<C: CallerThread, R: Send>(
        &self,
        caller: &C,
        work: impl FnOnce(&mut TaskTable) -> R + Send,
    ) -> Result<R, C::Error> {
        match self.try_access(work) {
            Ok(result) => Ok(result),
            Err(work) => caller.released(|| self.access(work)),
        }
    }

    /// The final statuses of `uuids`, in order (a uuid listed twice answered twice), or `None`
    /// past `timeout`. Finished tasks answer from the table at once; the unfinished ones are told
    /// to answer one [`GroupWait`] when they finish (no engine round trip), which wakes the caller
    /// once, when the last answers. A uuid never created (or the engine stopped) is the caller's
    /// [`CallerThread::engine_error`], before anything is waited for. A wait that ends without
    /// its answers (timed out, interrupted, refused) makes the tasks it waited for forget its
    /// group.
    pub fn wait_for_tasks<C: CallerThread>(
        &self,
        caller: &C,
        uuids: &[Uuid],
        timeout: Option<Duration>,
    ) -> Result<Option<Vec<TaskSnapshot>>, C::Error> {
        let mut found: Vec<Option<TaskSnapshot>> = vec![None; uuids.len()];
        // Made at the first unfinished task: a wait on finished tasks allocates nothing for it.
        let mut group: Option<Arc<GroupWait>> = None;
        let mut awaited: Vec<usize> = Vec::new();
        for (chunk_index, chunk) in uuids.chunks(WAIT_CHUNK).enumerate() {
            let answers = self.access_from(caller, |table| {
                chunk
                    .iter()
                    .map(|&uuid| match table.snapshot_if_finished(uuid) {
                        Some(answer) => Some(answer),
                        None => {
                            let group = group.get_or_insert_with(GroupWait::new);
                            table.wait_in_group(uuid, group)
                        }
                    })
                    .collect::<Vec<_>>()
            })?;
            // Every position of the chunk registered with the group is noted before an error is
            // acted on, so that all of them forget it (not only those before the unknown uuid).
            let mut refused = None;
            for (offset, answer) in answers.into_iter().enumerate() {
                let index = chunk_index * WAIT_CHUNK + offset;
                match answer {
                    Some(Ok(snapshot)) => found[index] = Some(snapshot),
                    Some(Err(e)) => refused = refused.or(Some(e)),
                    None => awaited.push(index),
                }
            }
            if let Some(e) = refused {
                self.forget_group(caller, uuids, &awaited, group.as_ref())?;
                return Err(caller.engine_error(e));
            }
        }
        let Some(group) = group else {
            return Ok(Some(found.into_iter().flatten().collect()));
        };
        group.registered();
        match caller.await_group(group.done(), timeout) {
            Ok(true) => {}
            Ok(false) => {
                self.forget_group(caller, uuids, &awaited, Some(&group))?;
                return Ok(None);
            }
            Err(interrupt) => {
                self.forget_group(caller, uuids, &awaited, Some(&group))?;
                return Err(interrupt);
            }
        }
        // Each awaited position takes its task's answer (a uuid listed twice answered twice).
        let mut by_task: HashMap<Uuid, Vec<TaskSnapshot>> = HashMap::new();
        for snapshot in group.take_answers() {
            by_task
                .entry(snapshot.task_uuid)
                .or_default()
                .push(snapshot);
        }
        for index in awaited {
            found[index] = by_task.get_mut(&uuids[index]).and_then(Vec::pop);
        }
        Ok(Some(found.into_iter().flatten().collect()))
    }

    /// The caller stopped waiting: the tasks it waited for (`uuids` at the `awaited` positions)
    /// forget its group.
    fn forget_group<C: CallerThread>(
        &self,
        caller: &C,
        uuids: &[Uuid],
        awaited: &[usize],
        group: Option<&Arc<GroupWait>>,
    ) -> Result<(), C::Error> {
        let Some(group) = group else {
            return Ok(());
        };
        for chunk in awaited.chunks(WAIT_CHUNK) {
            self.access_from(caller, |table| {
                for &index in chunk {
                    table.forget_group(uuids[index], group);
                }
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::new_tasks;
    use super::*;
    use crate::events::TaskStatus;
    use crossbeam_channel::RecvTimeoutError;
    use std::cell::RefCell;

    /// What a [`Plain`] caller does just before its group wait (the tasks are registered by
    /// then); an `Err` is an interrupt the wait ends with.
    type BeforeWait<'a> = Box<dyn FnOnce() -> Result<(), String> + 'a>;

    /// A plain thread as the caller: nothing to release.
    struct Plain<'a> {
        before_wait: RefCell<Option<BeforeWait<'a>>>,
    }

    impl<'a> Plain<'a> {
        fn new() -> Self {
            Self {
                before_wait: RefCell::new(None),
            }
        }

        fn then(before_wait: impl FnOnce() -> Result<(), String> + 'a) -> Self {
            Self {
                before_wait: RefCell::new(Some(Box::new(before_wait))),
            }
        }
    }

    impl CallerThread for Plain<'_> {
        type Error = String;

        fn released<R: Send>(&self, work: impl FnOnce() -> R + Send) -> Result<R, String> {
            Ok(work())
        }

        fn await_group(
            &self,
            done: &Receiver<()>,
            timeout: Option<Duration>,
        ) -> Result<bool, String> {
            if let Some(before_wait) = self.before_wait.borrow_mut().take() {
                before_wait()?;
            }
            match done.recv_timeout(timeout.unwrap_or(Duration::from_secs(10))) {
                Ok(()) => Ok(true),
                Err(RecvTimeoutError::Timeout) if timeout.is_some() => Ok(false),
                Err(e) => Err(e.to_string()),
            }
        }

        fn engine_error(&self, error: EngineError) -> String {
            format!("engine: {error}")
        }
    }

    fn local() -> LocalTasks {
        let (ends, _) = crossbeam_channel::unbounded();
        LocalTasks::new(1000, 1000, ends)
    }

    fn cancel(local: &LocalTasks, uuids: &[Uuid]) {
        for &uuid in uuids {
            assert_eq!(
                local.access(|table| table.cancel_task(uuid)).ok(),
                Some(true)
            );
        }
    }

    fn waiters(local: &LocalTasks, uuids: &[Uuid]) -> usize {
        local.access(|table| uuids.iter().map(|&u| table.waiter_count(u)).sum())
    }

    fn answered(list: &[TaskSnapshot]) -> Vec<Uuid> {
        list.iter().map(|s| s.task_uuid).collect()
    }

    #[test]
    fn finished_tasks_answer_at_once_in_order_a_uuid_listed_twice_twice() {
        let local = local();
        let uuids = new_tasks(&local, 3);
        cancel(&local, &uuids);
        let asked = [uuids[2], uuids[0], uuids[2], uuids[1]];

        let list = local
            .wait_for_tasks(&Plain::new(), &asked, Some(Duration::ZERO))
            .unwrap()
            .unwrap();

        assert_eq!(answered(&list), asked);
        assert!(list.iter().all(|s| s.status == TaskStatus::Cancelled));
    }

    #[test]
    fn unfinished_tasks_answer_through_one_group_in_the_order_asked() {
        let local = local();
        // More than one lock section's worth, finished and unfinished mixed, one listed twice.
        let uuids = new_tasks(&local, 2 * WAIT_CHUNK + 3);
        let (finished, running) = uuids.split_at(WAIT_CHUNK + 1);
        cancel(&local, finished);
        let mut asked: Vec<Uuid> = uuids.iter().rev().copied().collect();
        asked.push(running[0]);
        let caller = Plain::then(|| {
            assert_eq!(waiters(&local, running), running.len() + 1);
            cancel(&local, running);
            Ok(())
        });

        let list = local
            .wait_for_tasks(&caller, &asked, None)
            .unwrap()
            .unwrap();

        assert_eq!(answered(&list), asked);
        assert_eq!(waiters(&local, &uuids), 0);
    }

    #[test]
    fn a_wait_that_times_out_answers_none_and_its_tasks_forget_the_group() {
        let local = local();
        let uuids = new_tasks(&local, WAIT_CHUNK + 2);
        cancel(&local, &uuids[..1]);

        let outcome = local.wait_for_tasks(&Plain::new(), &uuids, Some(Duration::from_millis(1)));

        assert!(matches!(outcome, Ok(None)), "{outcome:?}");
        assert_eq!(waiters(&local, &uuids), 0);
    }

    #[test]
    fn an_interrupted_wait_is_the_callers_error_and_its_tasks_forget_the_group() {
        let local = local();
        let uuids = new_tasks(&local, 2);
        let caller = Plain::then(|| Err("interrupted".to_owned()));

        let outcome = local.wait_for_tasks(&caller, &uuids, None);

        assert!(
            matches!(outcome, Err(ref e) if e == "interrupted"),
            "{outcome:?}"
        );
        assert_eq!(waiters(&local, &uuids), 0);
    }

    #[test]
    fn an_unknown_uuid_is_an_engine_error_before_any_wait() {
        let local = local();
        let uuids = new_tasks(&local, WAIT_CHUNK + 1);
        let mut asked = uuids.clone();
        asked.push(Uuid::new_v4());
        asked.push(uuids[0]);
        let caller = Plain::then(|| panic!("no wait expected"));

        let outcome = local.wait_for_tasks(&caller, &asked, None);

        assert!(
            matches!(outcome, Err(ref e) if e.starts_with("engine: ")),
            "{outcome:?}"
        );
        assert_eq!(waiters(&local, &uuids), 0);
    }

    #[test]
    fn the_tasks_listed_after_an_unknown_uuid_forget_the_group_too() {
        let local = local();
        let uuids = new_tasks(&local, 3);
        let mut asked = vec![Uuid::new_v4()];
        asked.extend(&uuids);
        let caller = Plain::then(|| panic!("no wait expected"));

        let outcome = local.wait_for_tasks(&caller, &asked, None);

        assert!(
            matches!(outcome, Err(ref e) if e.starts_with("engine: ")),
            "{outcome:?}"
        );
        assert_eq!(waiters(&local, &uuids), 0);
    }
}
