-- Step records a person can read: when each step's latest attempt started and ended, and the
-- metadata of its completion. Additive (nullable columns, wider CHECKs): older builds run on.
ALTER TABLE tasker_steps
    ADD COLUMN IF NOT EXISTS started_at    timestamptz,
    ADD COLUMN IF NOT EXISTS completed_at  timestamptz,
    ADD COLUMN IF NOT EXISTS metadata      jsonb;

-- Statuses for cancelled tasks and skipped steps. NOT VALID: every existing row satisfied the
-- narrower check this replaces, so nothing needs the full-table scan (under an exclusive lock,
-- stalling every worker) that validating would take; new and updated rows are checked as usual.
ALTER TABLE tasker_steps
    DROP CONSTRAINT tasker_steps_status_check,
    ADD CONSTRAINT tasker_steps_status_check CHECK (status IN (
        'pending', 'enqueued', 'in_progress', 'complete', 'error', 'waiting_for_retry', 'skipped', 'cancelled'
    )) NOT VALID;

ALTER TABLE tasker_tasks
    DROP CONSTRAINT tasker_tasks_status_check,
    ADD CONSTRAINT tasker_tasks_status_check CHECK (status IN (
        'pending', 'in_progress', 'complete', 'error', 'cancelled'
    )) NOT VALID;
