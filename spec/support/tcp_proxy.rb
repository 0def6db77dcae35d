# frozen_string_literal: true

require "socket"

# A TCP proxy in front of PostgreSQL for the partition specs. #silence! makes every connection
# open at that moment go quiet the way a NAT or firewall drops it: bytes are no longer passed in
# either direction, and neither side gets a FIN or RST (the sockets stay open). Connections made
# afterwards pass normally.
class SilenceableTcpProxy
  attr_reader :port

  def initialize(upstream_host, upstream_port)
    @upstream = [upstream_host, Integer(upstream_port)]
    @server = TCPServer.new("127.0.0.1", 0)
    @port = @server.addr[1]
    @mutex = Mutex.new
    @links = []
    @acceptor = Thread.new { accept_loop }
  end

  # Connections open now stop passing bytes, silently.
  def silence!
    @mutex.synchronize { @links.each { |link| link[:silent] = true } }
  end

  # Connections currently passing bytes.
  def live_connections
    @mutex.synchronize { @links.count { |link| !link[:silent] && !link[:closed] } }
  end

  def close
    @acceptor.kill
    @server.close
    @mutex.synchronize do
      @links.each do |link|
        link[:threads].each(&:kill)
        link[:sockets].each { |s| s.close unless s.closed? }
      end
    end
  end

  private

  def accept_loop
    loop do
      client = @server.accept
      upstream = TCPSocket.new(*@upstream)
      link = { silent: false, closed: false, sockets: [client, upstream], threads: [] }
      link[:threads] = [pump(client, upstream, link), pump(upstream, client, link)]
      @mutex.synchronize { @links << link }
    end
  rescue IOError, Errno::EBADF
    nil
  end

  # Copies from -> to until either side closes; once silenced, it reads and drops nothing: it
  # just stops (unread bytes stay in the kernel buffers, as with a dead route).
  def pump(from, to, link)
    Thread.new do
      loop do
        break if link[:silent]

        to.write(from.readpartial(65_536)) if from.wait_readable(0.05) && !link[:silent]
      end
    rescue IOError, SystemCallError # EOFError is an IOError
      close_link(link)
    end
  end

  # One side closed: close the other (a silenced link stays open, as a dead route does).
  def close_link(link)
    link[:closed] = true
    link[:sockets].each { |s| s.close unless s.closed? } unless link[:silent]
  end
end
