# frozen_string_literal: true

require "tasker_core/jobs"

module ActiveJob
  module QueueAdapters
    # `config.active_job.queue_adapter = :tasker_core`: each job becomes a one-step task of the
    # job's queue (see TaskerCore::Jobs). Jobs are created with TaskerCore.create_task, so where
    # they go is where this process's tasks go: its own worker, or (config.tasker_core.client_only)
    # the workers' PostgreSQL database through a client connection.
    class TaskerCoreAdapter
      def enqueue(job)
        job.provider_job_id = TaskerCore::Jobs.enqueue(job)
      end

      # `timestamp`: seconds since the epoch (Active Job's `scheduled_at`).
      def enqueue_at(job, timestamp)
        job.provider_job_id = TaskerCore::Jobs.enqueue(job, timestamp)
      end
    end
  end
end
