# frozen_string_literal: true

# TaskerCore.configure: settings of the Ruby layer.
module TaskerCore
  # Process-wide settings of the Ruby layer (the engine's own settings are `start!`'s config).
  #
  #   TaskerCore.configure do |c|
  #     c.handler_middleware.add(MyApm)
  #   end
  class Configuration
    # @return [Middleware::Chain] run around every handler call (see Middleware::Chain)
    attr_reader :handler_middleware

    # The application's worker config (the Hash Worker::Bootstrap.start! takes), for what starts a
    # worker on the application's behalf (the Railtie's `tasker:worker`) and for test mode's
    # templates. Set by the Railtie from config.tasker_core; `{}` otherwise.
    attr_reader :worker_config

    def initialize
      @handler_middleware = Middleware::Chain.new
      @worker_config = {}.freeze
    end

    def worker_config=(config)
      @worker_config = config.to_h.dup.freeze
    end
  end

  @configuration = Configuration.new

  class << self
    # @return [Configuration]
    attr_reader :configuration

    # Yields the Configuration; returns it.
    def configure
      yield configuration if block_given?
      configuration
    end
  end
end
