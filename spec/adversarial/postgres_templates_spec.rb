# frozen_string_literal: true

require "tmpdir"

# Issue F2, defect 5: two different templates under one namespace/name/version.
RSpec.describe "PostgreSQL backend (adversarial): a template changed without a new version" do
  include_context "postgres database"

  around do |example|
    Dir.mktmpdir("tasker-f2-templates") do |dir|
      @dir = dir
      example.run
    end
  end

  def template_dir(name, yaml)
    path = File.join(@dir, name)
    Dir.mkdir(path)
    File.write(File.join(path, "versioned.yml"), yaml)
    path
  end

  let(:two_steps) do
    template_dir("two_steps", <<~YAML)
      namespace: pg
      name: versioned
      version: 1.0.0
      steps:
        - { name: a, handler: { callable: PgSpec::Step } }
        - { name: b, dependencies: [a], handler: { callable: PgSpec::Step } }
    YAML
  end

  it "refuses to boot a worker whose template differs from the stored one of the same version, naming it; " \
     "tasks run with the template they were created with (defect 5)" do
    start_pg_worker(db, templates: two_steps)
    start_client(db)
    first = TaskerCore.create_task(namespace: "pg", name: "versioned", context: { "value" => 0 })

    one_step = template_dir("one_step", <<~YAML)
      namespace: pg
      name: versioned
      version: 1.0.0
      steps:
        - { name: only, handler: { callable: PgSpec::Step } }
    YAML
    expect { start_pg_worker(db, templates: one_step) }.to raise_error(RuntimeError) { |error|
      expect(error.message).to include("TaskerCore::ConfigurationError", "pg/versioned@1.0.0", "new `version`")
    }
    expect(psql("SELECT yaml FROM tasker_templates WHERE name = 'versioned'", db: db)).to include("name: b")

    # The same template with other formatting and comments is the same template.
    reformatted = template_dir("reformatted", <<~YAML)
      # Reformatted: same steps.
      version: 1.0.0
      name: versioned
      namespace: pg
      steps:
        - name: a
          handler: { callable: PgSpec::Step }
        - name: b
          dependencies: [a]
          handler: { callable: PgSpec::Step }
    YAML
    start_pg_worker(db, templates: reformatted)

    second = TaskerCore.create_task(namespace: "pg", name: "versioned", context: { "value" => 0 })
    [first, second].each do |uuid|
      result = TaskerCore.wait_for_task(uuid, timeout: 10)
      expect(result && result[:status]).to eq("complete")
      expect(result[:steps].map { |s| [s[:name], s[:result]["value"]] }).to eq([["a", 1], ["b", 2]])
    end
  end
end
