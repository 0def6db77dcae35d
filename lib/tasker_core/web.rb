# frozen_string_literal: true

module TaskerCore
  # The dashboard and JSON API as a Rack app, the Sidekiq::Web convention:
  #
  #   # config/routes.rb
  #   mount TaskerCore::Web, at: "/tasker"
  #   # or, to show the cancel and retry buttons (put it behind your app's authentication):
  #   mount TaskerCore::Web.new(actions: true), at: "/tasker"
  #
  # It is not a second implementation: each request is handed, without the GVL, to the same Rust
  # router the worker serves at `web_api_bind` (`TaskerCore::FFI.web_call`), and the page reads the
  # JSON API by URLs relative to the mount. So this process must run a worker
  # (`Worker::Bootstrap.start!`) or a client (`Client.connect`): the app answers 503 otherwise.
  class Web
    # What the app reads of a request body (login form, action POSTs) at most.
    MAX_BODY = 64 * 1024

    # Request headers the routes look at (Rack spells them HTTP_*).
    FORWARDED = {
      "HTTP_AUTHORIZATION" => "authorization", "HTTP_COOKIE" => "cookie",
      "HTTP_X_CSRF_TOKEN" => "x-csrf-token", "CONTENT_TYPE" => "content-type",
      "HTTP_X_FORWARDED_PROTO" => "x-forwarded-proto"
    }.freeze

    class << self
      # `mount TaskerCore::Web`: read-only, no token of its own (the host app's authentication
      # protects the mount, as for Sidekiq::Web).
      def call(env)
        (@default ||= new).call(env)
      end
    end

    # @param actions [Boolean] show the cancel and retry buttons and answer their POSTs
    # @param token [String, nil] demand this bearer token (or the login form's cookie) on every route
    def initialize(actions: false, token: nil)
      unless [true, false].include?(actions)
        raise ArgumentError, "actions: must be true or false, got #{actions.inspect}"
      end
      unless token.nil? || (token.is_a?(String) && !token.empty?)
        raise ArgumentError, "token: must be a non-empty String or nil"
      end

      @actions = actions
      @token = token&.dup&.freeze
    end

    def call(env)
      path = env["PATH_INFO"].to_s
      # The page's relative URLs need the trailing slash of the mount.
      return redirect("#{env["SCRIPT_NAME"]}/") if path.empty?

      query = env["QUERY_STRING"].to_s
      status, headers, body = FFI.web_call(env["REQUEST_METHOD"], query.empty? ? path : "#{path}?#{query}",
                                           request_headers(env), read_body(env), @token, @actions)
      [status, response_headers(headers), [body]]
    rescue WorkerNotInitializedError
      json(503, "no tasker_core worker or client runs in this process: call TaskerCore::Worker::Bootstrap.start! " \
                "or TaskerCore::Client.connect before serving TaskerCore::Web")
    rescue ArgumentError => e
      json(400, e.message)
    end

    private

    def request_headers(env)
      headers = FORWARDED.filter_map { |key, name| [name, env[key].to_s] if env[key] }
      headers << ["x-tasker-script-name", env["SCRIPT_NAME"].to_s] unless env["SCRIPT_NAME"].to_s.empty?
      headers
    end

    def read_body(env)
      input = env["rack.input"]
      return "".b unless input

      body = input.read(MAX_BODY + 1).to_s.b
      raise ArgumentError, "request body: larger than #{MAX_BODY} bytes" if body.bytesize > MAX_BODY

      body
    end

    # Rack 2 joins repeated headers (Set-Cookie) with newlines.
    def response_headers(pairs)
      pairs.each_with_object({}) do |(name, value), headers|
        headers[name] = headers.key?(name) ? "#{headers[name]}\n#{value}" : value
      end
    end

    def redirect(location)
      [301, { "location" => location, "content-type" => "text/plain" }, ["moved to #{location}"]]
    end

    def json(status, message)
      [status, { "content-type" => "application/json" }, [JSON.generate(error: message)]]
    end
  end
end
