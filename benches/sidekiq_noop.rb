# frozen_string_literal: true

# Loaded by the Sidekiq server that benches/api.rb starts (`sidekiq -r benches/sidekiq_noop.rb`):
# the no-op job Sidekiq's figure is measured with, and a quiet logger.
require "sidekiq"

Sidekiq.configure_server { |config| config.logger.level = Logger::WARN }

# Does nothing, like Bench::Noop on the tasker_core side.
class TaskerBenchNoopJob
  include Sidekiq::Worker

  def perform; end
end
