//! Final statuses of memory-backend tasks whose full records were dropped.

use super::table::Task;
use crate::events::{TaskSnapshot, TaskStatus};
use crate::template::TaskTemplate;
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// Final statuses of tasks whose full records were dropped: two generations of at most
/// `capacity / 2` entries each, the older dropped whole when the newer fills up (no per-entry
/// bookkeeping). Between `capacity / 2` and `capacity` of the most recent are known.
pub(super) struct FinalStatusIndex {
    current: HashMap<Uuid, CompactFinal>,
    previous: HashMap<Uuid, CompactFinal>,
    generation: usize,
    /// Templates by id, so an entry is 3 bytes beside its key.
    templates: Vec<Arc<TaskTemplate>>,
    template_ids: HashMap<usize, u16>,
}

#[derive(Clone, Copy)]
struct CompactFinal {
    template: u16,
    status: u8,
}

impl FinalStatusIndex {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            generation: capacity / 2,
            templates: Vec::new(),
            template_ids: HashMap::new(),
        }
    }

    pub(super) fn insert(&mut self, task: &Task) {
        if self.generation == 0 {
            return;
        }
        let key = Arc::as_ptr(&task.template) as usize;
        let template = match self.template_ids.get(&key) {
            Some(&id) => id,
            None => {
                let Ok(id) = u16::try_from(self.templates.len()) else {
                    return;
                };
                self.templates.push(Arc::clone(&task.template));
                self.template_ids.insert(key, id);
                id
            }
        };
        if self.current.len() >= self.generation {
            self.previous = std::mem::take(&mut self.current);
        }
        let status = match task.status {
            TaskStatus::Complete => 0,
            TaskStatus::Error => 1,
            _ => 2,
        };
        self.current
            .insert(task.info.task_uuid, CompactFinal { template, status });
    }

    pub(super) fn get(&self, task_uuid: Uuid) -> Option<TaskSnapshot> {
        let entry = self
            .current
            .get(&task_uuid)
            .or_else(|| self.previous.get(&task_uuid))?;
        let template = &self.templates[entry.template as usize];
        Some(TaskSnapshot {
            task_uuid,
            namespace: template.namespace.clone(),
            name: template.name.clone(),
            version: template.version.clone(),
            status: match entry.status {
                0 => TaskStatus::Complete,
                1 => TaskStatus::Error,
                _ => TaskStatus::Cancelled,
            },
            created_at_ns: None,
            completed_at_ns: None,
            steps: Vec::new(),
            steps_retained: false,
        })
    }
}
