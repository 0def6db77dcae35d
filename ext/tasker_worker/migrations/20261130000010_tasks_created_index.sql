-- no-transaction
-- Task lists (TaskerCore.tasks, GET /api/tasks) of all tasks, newest first: each page is one range
-- scan of this index (keyset pagination on created_at, task_uuid). One statement per migration and
-- CONCURRENTLY, so that workers of older builds keep writing tasks while it builds. Additive.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasker_tasks_created ON tasker_tasks (created_at DESC, task_uuid DESC);
