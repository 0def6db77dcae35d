# frozen_string_literal: true

# A strict parser of the OpenMetrics text format (what /metrics serves), for the specs: no Ruby
# gem for it is packaged here. Anything the format does not allow raises ParseError naming the
# line, so a malformed exposition fails the spec instead of parsing into nonsense.
module OpenMetricsParser
  class ParseError < StandardError; end

  Family = Struct.new(:name, :type, :help, :unit, :samples)
  Sample = Struct.new(:name, :labels, :value)

  NAME = /[a-zA-Z_:][a-zA-Z0-9_:]*/
  LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"/
  VALUE = /[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|Inf|NaN)/
  TYPES = %w[counter gauge histogram gaugehistogram summary info stateset unknown].freeze
  SUFFIXES = {
    "counter" => %w[_total _created],
    "histogram" => %w[_bucket _sum _count _created],
    "gauge" => [""],
    "info" => ["_info"],
    "unknown" => [""]
  }.freeze

  module_function

  # Hash of family name → Family.
  def parse(text)
    raise ParseError, "exposition does not end with \"# EOF\\n\"" unless text.end_with?("# EOF\n")

    families = {}
    current = nil
    lines = text.split("\n")
    lines.each_with_index do |line, index|
      where = "line #{index + 1}: #{line.inspect}"
      next check_eof(index, lines.size, where) if line == "# EOF"

      current = line.start_with?("#") ? metadata(line, families, current, where) : sample(line, current, where)
    end
    families.each_value { |family| check_histogram(family) if family.type == "histogram" }
    families
  end

  def check_eof(index, count, where)
    raise ParseError, "#{where}: # EOF before the end" unless index == count - 1
  end

  # @return [Family] the family the comment is about (later samples belong to it)
  def metadata(line, families, current, where)
    match = /\A# (HELP|TYPE|UNIT) (#{NAME})(?: (.*))?\z/o.match(line) or raise ParseError, "#{where}: bad comment"
    kind, name, rest = match.captures
    family = families[name]
    if family.nil?
      family = families[name] = Family.new(name, "unknown", nil, nil, [])
    elsif !current.equal?(family)
      raise ParseError, "#{where}: metadata of #{name} after another family"
    end

    describe(family, kind, rest.to_s, where)
    family
  end

  def describe(family, kind, rest, where)
    case kind
    when "TYPE"
      raise ParseError, "#{where}: unknown type #{rest.inspect}" unless TYPES.include?(rest)

      family.type = rest
    when "HELP" then family.help = rest
    when "UNIT"
      raise ParseError, "#{where}: the name must end with _#{rest}" unless family.name.end_with?("_#{rest}")

      family.unit = rest
    end
  end

  # @return [Family] the family the sample was added to
  def sample(line, family, where)
    raise ParseError, "#{where}: a sample before any # TYPE" if family.nil?

    match = /\A(#{NAME})(?:\{(.*)\})? (#{VALUE})(?: \d+(?:\.\d+)?)?\z/o.match(line)
    raise ParseError, "#{where}: not a sample" unless match

    name, label_text, value = match.captures
    suffix = name.delete_prefix(family.name)
    unless name.start_with?(family.name) && SUFFIXES.fetch(family.type, [""]).include?(suffix)
      raise ParseError, "#{where}: #{name} is not a sample of #{family.type} #{family.name}"
    end

    family.samples << Sample.new(name, labels(label_text.to_s, where), parse_value(value))
    family
  end

  def labels(text, where)
    labels = {}
    rest = text
    until rest.empty?
      match = /\A#{LABEL}(,|\z)/o.match(rest) or raise ParseError, "#{where}: bad labels #{rest.inspect}"
      key, raw = match.captures
      raise ParseError, "#{where}: label #{key} twice" if labels.key?(key)

      labels[key] = raw.gsub(/\\(.)/) { Regexp.last_match(1) == "n" ? "\n" : Regexp.last_match(1) }
      rest = match.post_match
    end
    labels
  end

  def parse_value(text)
    case text
    when "+Inf", "Inf" then Float::INFINITY
    when "-Inf" then -Float::INFINITY
    when "NaN" then Float::NAN
    else Float(text)
    end
  end

  # Buckets are cumulative, end with +Inf, and +Inf equals _count.
  def check_histogram(family)
    family.samples.group_by { |s| s.labels.except("le") }.each do |labels, samples|
      series = "#{family.name}#{labels}"
      buckets = samples.select { |s| s.name.end_with?("_bucket") }
      count = samples.find { |s| s.name.end_with?("_count") } or raise ParseError, "#{series}: no _count"
      check_buckets(series, buckets)
      raise ParseError, "#{series}: +Inf bucket != _count" unless buckets.last.value == count.value
    end
  end

  def check_buckets(series, buckets)
    raise ParseError, "#{series}: last bucket is not +Inf" unless buckets.any? && buckets.last.labels["le"] == "+Inf"
    raise ParseError, "#{series}: bucket bounds not increasing" unless increasing?(buckets.map { |b| b.labels["le"] })
    raise ParseError, "#{series}: buckets not cumulative" unless non_decreasing?(buckets.map(&:value))
  end

  def increasing?(bounds)
    bounds.map { |b| parse_value(b) }.each_cons(2).all? { |a, b| a < b }
  end

  def non_decreasing?(values)
    values.each_cons(2).all? { |a, b| a <= b }
  end

  # The value of the one sample `name` with exactly `labels`, or nil.
  def value(families, name, labels = {})
    families.each_value do |family|
      found = family.samples.find { |s| s.name == name && s.labels == labels }
      return found.value if found
    end
    nil
  end
end
