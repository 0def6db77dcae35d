# frozen_string_literal: true

module TaskerCore
  module Middleware
    # Runs each handler call inside the Rails application's reloader (which runs the executor): in
    # development, edited handler classes are loaded again before the step runs; in every
    # environment, what the executor sets up per unit of work (the query cache, Active Record
    # connections returned to the pool afterwards, CurrentAttributes reset) is done around each
    # step, as Sidekiq does around each job. The Railtie puts it first in the chain.
    class RailsExecutor
      def initialize(app)
        @app = app
      end

      def call(_step_event, &)
        @app.reloader.wrap(&)
      end
    end
  end
end
