-- Honest endings, cancel and retry on PostgreSQL. Additive (a nullable column, a defaulted one, a
-- NOT VALID check that every existing row satisfies): older builds run on.
--
-- tasker_tasks.ending: set once the task starts no new step (a step failed for good: 'error'; it
-- was cancelled: 'cancelled'). The task's status becomes its ending once none of its steps is
-- in progress.
ALTER TABLE tasker_tasks ADD COLUMN IF NOT EXISTS ending text;
ALTER TABLE tasker_tasks
    ADD CONSTRAINT tasker_tasks_ending_check CHECK (ending IN ('error', 'cancelled')) NOT VALID;

-- tasker_steps.attempt_base: `attempts` when the task was last retried; the step's retry budget
-- (max_attempts) counts from here, while attempts go on counting.
ALTER TABLE tasker_steps ADD COLUMN IF NOT EXISTS attempt_base integer NOT NULL DEFAULT 0;
