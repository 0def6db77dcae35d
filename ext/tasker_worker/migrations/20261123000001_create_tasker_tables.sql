-- Templates, so that any process can create tasks of them.
CREATE TABLE IF NOT EXISTS tasker_templates (
    namespace   text NOT NULL,
    name        text NOT NULL,
    version     text NOT NULL,
    yaml        text NOT NULL,
    source      text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name, version)
);

CREATE TABLE IF NOT EXISTS tasker_tasks (
    task_uuid         uuid PRIMARY KEY,
    namespace         text NOT NULL,
    name              text NOT NULL,
    version           text NOT NULL,
    context           jsonb NOT NULL,
    status            text NOT NULL CHECK (status IN ('pending', 'in_progress', 'complete', 'error')),
    incomplete_steps  integer NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
);
CREATE INDEX IF NOT EXISTS tasker_tasks_finished_at ON tasker_tasks (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS tasker_steps (
    step_uuid      uuid PRIMARY KEY,
    task_uuid      uuid NOT NULL REFERENCES tasker_tasks (task_uuid) ON DELETE CASCADE,
    step_index     integer NOT NULL,
    name           text NOT NULL,
    status         text NOT NULL
                   CHECK (status IN ('pending', 'enqueued', 'in_progress', 'complete', 'error', 'waiting_for_retry')),
    attempts       integer NOT NULL DEFAULT 0,
    waiting_on     integer NOT NULL,
    result         jsonb,
    error_message  text,
    ready_at       timestamptz,
    UNIQUE (task_uuid, step_index)
);

-- The hot table: one row per step that is ready, waiting for a retry, or claimed. Rows leave
-- when the step completes or fails for good, so it stays as small as the work in progress.
CREATE TABLE IF NOT EXISTS tasker_ready_steps (
    step_uuid    uuid PRIMARY KEY REFERENCES tasker_steps (step_uuid) ON DELETE CASCADE,
    task_uuid    uuid NOT NULL,
    namespace    text NOT NULL,
    -- Claimable once visible_at <= now(); a claim pushes it forward by the step's timeout, so a
    -- step whose worker died becomes claimable again once its claim is that old.
    visible_at   timestamptz NOT NULL DEFAULT now(),
    timeout_ms   integer NOT NULL,
    claimed_by   text
);
CREATE INDEX IF NOT EXISTS tasker_ready_steps_claim ON tasker_ready_steps (namespace, visible_at);
