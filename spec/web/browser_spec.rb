# frozen_string_literal: true

require "spec_helper"
require "timeout"

# The dashboard driven as a person uses it, in a real headless Chromium (Debian's chromium,
# chromium-driver and ruby-selenium-webdriver, which bin/setup installs). Set
# TASKER_SCREENSHOTS=docs/images to refresh the README's screenshots.
module BrowserSpecTools
  CHROMIUM = %w[/usr/bin/chromium /usr/bin/chromium-browser].find { |path| File.executable?(path) }
  CHROMEDRIVER = %w[/usr/bin/chromedriver].find { |path| File.executable?(path) }
  SELENIUM = begin
    require "selenium-webdriver"
    true
  rescue LoadError
    false
  end

  # The Debian packages not installed.
  def self.missing
    { "chromium" => CHROMIUM, "chromium-driver" => CHROMEDRIVER, "ruby-selenium-webdriver" => SELENIUM }
      .reject { |_, found| found }.keys
  end
end

RSpec.describe "The dashboard in a browser" do
  around do |example|
    missing = BrowserSpecTools.missing

    next skip("#{missing.join(", ")} not installed (bin/setup installs them)") unless missing.empty?

    # Bounded: a browser that hangs fails the example instead of the suite.
    Timeout.timeout(120) { example.run }
  end

  let(:screenshots) { ENV.fetch("TASKER_SCREENSHOTS", nil) }
  let(:driver) do
    options = Selenium::WebDriver::Chrome::Options.new(
      args: %w[--headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --window-size=1280,900]
    )
    options.binary = BrowserSpecTools::CHROMIUM
    service = Selenium::WebDriver::Service.chrome(path: BrowserSpecTools::CHROMEDRIVER)
    Selenium::WebDriver.for(:chrome, options: options, service: service).tap do |browser|
      browser.manage.timeouts.page_load = 20
      browser.manage.timeouts.script_timeout = 10
    end
  end
  let(:wait) { Selenium::WebDriver::Wait.new(timeout: 15, interval: 0.1) }

  after { driver.quit if BrowserSpecTools.missing.empty? }

  def text_of(css)
    driver.find_element(css: css).text
  rescue Selenium::WebDriver::Error::NoSuchElementError, Selenium::WebDriver::Error::StaleElementReferenceError
    nil
  end

  def screenshot(name)
    return unless screenshots

    FileUtils.mkdir_p(screenshots)
    driver.save_screenshot(File.join(screenshots, name))
  end

  # For a chart worth showing in a screenshot: steps in the background until the block returns
  # (the overview samples every 5 s, so it waits for a few samples first).
  def with_traffic
    return yield unless screenshots

    running = true
    traffic = Thread.new do
      while running
        uuids = Array.new(10) { TaskerCore.create_task(namespace: "web", name: "fulfillment", context: {}) }
        TaskerCore.wait_for_tasks(uuids, timeout: 10)
        sleep rand(0.01..0.2)
      end
    end
    sleep 22
    yield
  ensure
    running = false
    traffic&.join
  end

  it "shows the overview, filters to errored tasks, shows one's DAG and error, and retries it to completion" do
    TaskerCore::Worker::Bootstrap.start!(templates: [WEB_TEMPLATES], enable_web_api: true,
                                         web_api_bind: "127.0.0.1:0", web_api_actions: true)
    address = TaskerCore::FFI.worker_status.fetch(:web_api_bind)
    2.times { TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "web", name: "checkout"), timeout: 10) }
    errored = TaskerCore.create_task(namespace: "web", name: "checkout", context: { "decline_once" => true })
    expect(TaskerCore.wait_for_task(errored, timeout: 10)[:status]).to eq("error")

    with_traffic do
      driver.navigate.to("http://#{address}/")
      wait.until { text_of("#count-error")&.start_with?("1") }
      expect(text_of("#worker")).to include("running", "memory")
      expect(driver.find_element(css: "#throughput-chart")).to be_displayed
      screenshot("dashboard-overview.png")
    end

    driver.find_element(css: "#nav-tasks").click
    wait.until { driver.find_elements(css: "#status-filter").any? }
    Selenium::WebDriver::Support::Select.new(driver.find_element(css: "#status-filter")).select_by(:value, "error")
    driver.find_element(css: "#filter-apply").click
    wait.until { driver.current_url.include?("status=error") && driver.find_elements(css: ".task-row").size == 1 }
    expect(driver.find_element(css: ".task-row").attribute("data-task")).to eq(errored)
    driver.find_element(css: ".task-row .task-link").click

    wait.until { text_of("#task-status") == "error" }
    graph = driver.find_element(css: "#task-graph")
    wait.until { driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", graph) }
    charge = driver.find_element(css: '.step-row[data-step="charge"]')
    expect(charge.find_element(css: ".error-message").text).to include('card declined <once> & "retry"')
    expect(driver.find_element(css: '.step-row[data-step="ship"]').attribute("data-status")).to eq("skipped")
    expect(driver.find_elements(css: "#cancel-button")).to be_empty # a finished task cannot be cancelled
    screenshot("dashboard-task.png")

    driver.find_element(css: "#retry-button").click
    wait.until { text_of("#task-status") == "complete" }
    expect(driver.find_element(css: '.step-row[data-step="charge"]').attribute("data-status")).to eq("complete")
    expect(driver.find_elements(css: "#retry-button")).to be_empty
    expect(TaskerCore.task_status(errored)[:status]).to eq("complete")
  end

  it "hides the buttons when actions are off, and asks for the token at login" do
    TaskerCore::Worker::Bootstrap.start!(templates: [WEB_TEMPLATES], enable_web_api: true,
                                         web_api_bind: "127.0.0.1:0", web_api_token: "browser-token")
    address = TaskerCore::FFI.worker_status.fetch(:web_api_bind)
    errored = TaskerCore.create_task(namespace: "web", name: "checkout", context: { "fail" => true })
    TaskerCore.wait_for_task(errored, timeout: 10)

    driver.navigate.to("http://#{address}/#/task/#{errored}")
    wait.until { driver.current_url.include?("/login") }
    driver.find_element(css: "#token").send_keys("browser-token")
    driver.find_element(css: "#login-button").click
    wait.until { driver.find_elements(css: "#count-error").any? }
    driver.navigate.to("http://#{address}/#/task/#{errored}")
    wait.until { text_of("#task-status") == "error" }
    expect(driver.find_elements(css: "#retry-button")).to be_empty
  end
end
