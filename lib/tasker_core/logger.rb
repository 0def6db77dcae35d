# frozen_string_literal: true

require "logger"

module TaskerCore
  # A ::Logger whose lines go through the engine's tracing subscriber (TaskerCore::FFI.log_*),
  # so Ruby and Rust logs share one stream, one format and the worker's log_level.
  #
  #   logger = TaskerCore::Logger.new
  #   logger.info("charged card") ; logger.warn { "slow: #{ms}ms" }
  #   logger.info("charged", user_id: 7)   # context rendered as fields
  #   TaskerCore::Logger.new("myapp")       # every line carries progname=myapp
  class Logger < ::Logger
    FFI_METHODS = {
      ::Logger::DEBUG => :log_debug,
      ::Logger::INFO => :log_info,
      ::Logger::WARN => :log_warn,
      ::Logger::ERROR => :log_error,
      ::Logger::FATAL => :log_error,
      ::Logger::UNKNOWN => :log_error
    }.freeze
    FFI_LEVELS = { log_debug: "debug", log_info: "info", log_warn: "warn", log_error: "error" }.freeze

    def initialize(progname = nil, level: ::Logger::DEBUG)
      super(nil, progname: progname, level: level)
    end

    # ::Logger's entry point; everything (info, warn, blocks, <<) arrives here.
    def add(severity, message = nil, progname = nil, context = nil)
      severity ||= ::Logger::UNKNOWN
      return true if severity < level

      method = FFI_METHODS.fetch(severity, :log_error)
      return true unless TaskerCore::FFI.log_enabled?(FFI_LEVELS.fetch(method))

      message = resolve_message(message, progname) { yield if block_given? }
      TaskerCore::FFI.public_send(method, message.to_s, with_progname(context))
      true
    end
    alias log add

    %i[debug info warn error fatal unknown].each do |name|
      severity = ::Logger.const_get(name.upcase)
      define_method(name) do |message = nil, context = nil, &block|
        add(severity, nil, message, context, &block)
      end
    end

    # Logger#<< writes raw text: log it at info.
    def <<(message)
      TaskerCore::FFI.log_info(message.to_s.chomp, with_progname(nil))
    end

    private

    def with_progname(context)
      return context || {} if progname.nil?

      { progname: progname }.merge(context || {})
    end

    def resolve_message(message, progname)
      return message unless message.nil?

      from_block = yield
      return from_block unless from_block.nil?

      progname || self.progname
    end
  end
end
