# frozen_string_literal: true

namespace :tasker do
  desc "Start a tasker_core worker with config.tasker_core; runs until INT or TERM (graceful shutdown)"
  task worker: :environment do
    TaskerCore::Railtie.run_worker
  end
end
