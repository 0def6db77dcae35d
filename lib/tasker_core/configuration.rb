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

    def initialize
      @handler_middleware = Middleware::Chain.new
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
