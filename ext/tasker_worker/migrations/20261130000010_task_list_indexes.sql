-- Task lists (TaskerCore.tasks, GET /api/tasks) newest first: all tasks, tasks of one status, or of
-- one namespace (and template name). Each page is one range scan of one of these indexes (keyset
-- pagination on created_at, task_uuid). Additive: older builds run on.
-- Not CONCURRENTLY: sqlx holds an advisory lock while it migrates, and a concurrent index build
-- waits for every open transaction, including those of workers waiting for that lock (a deadlock
-- when processes bootstrap at once). The build blocks writes to tasker_tasks while it runs (about
-- a second per million tasks).
CREATE INDEX IF NOT EXISTS tasker_tasks_created
    ON tasker_tasks (created_at DESC, task_uuid DESC);
-- INCLUDE namespace: /metrics counts unfinished tasks by namespace and status from this index alone.
CREATE INDEX IF NOT EXISTS tasker_tasks_status_created
    ON tasker_tasks (status, created_at DESC, task_uuid DESC) INCLUDE (namespace);
CREATE INDEX IF NOT EXISTS tasker_tasks_namespace_name_created
    ON tasker_tasks (namespace, name, created_at DESC, task_uuid DESC);
