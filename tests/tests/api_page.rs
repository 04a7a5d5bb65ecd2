//! The status page in a real browser: Debian's `chromium`, headless, loads the page from a
//! gateway polling demo simulators; the DOM it renders (after the page's own script has
//! fetched the JSON endpoints) must show the simulators' values, a value changing, and a
//! device shown bad once its simulator stops.
//!
//! Chromium is required (`.ci/run` installs it): the test fails, never skips, without it.
//! `STATUS_PAGE_SCREENSHOT=FILE` also saves a screenshot of the page there.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use edge_gateway::config::ApiSettings;
use gateway_tests::GatewayRig;

const WAIT: Duration = Duration::from_secs(60);

/// Runs headless chromium on the page at `addr` with `mode` (`--dump-dom` or
/// `--screenshot=FILE`); the page's script gets a few seconds (of virtual time) to fetch and
/// render. Returns chromium's standard output.
async fn chromium(addr: SocketAddr, profile: &Path, mode: &str) -> String {
    chromium_for(addr, profile, mode, 3000).await
}

/// [`chromium`] with `budget_ms` of virtual time for the page's script.
async fn chromium_for(addr: SocketAddr, profile: &Path, mode: &str, budget_ms: u32) -> String {
    let run = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1100,900",
        ])
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(mode)
        .arg(format!("http://{addr}/"))
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(WAIT, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            panic!("cannot run chromium (Debian's `chromium` package; .ci/run installs it): {e}")
        }
        Err(_) => panic!("chromium did not finish within {WAIT:?}"),
    };
    assert!(
        output.status.success(),
        "chromium failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The text of the value cell of tag `key` (`device/tag`) in the rendered DOM.
fn shown_value(dom: &str, key: &str) -> Option<String> {
    let row = dom.find(&format!("data-tag=\"{key}\""))?;
    let rest = &dom[row..];
    let end = rest.find("</tr>")?;
    let cell = rest[..end].find("class=\"value\">")? + "class=\"value\">".len();
    let text = &rest[cell..end];
    Some(text[..text.find('<')?].to_owned())
}

/// How many points the sparkline of tag `key` holds (from the gateway's history).
fn shown_points(dom: &str, key: &str) -> Option<usize> {
    let row = dom.find(&format!("data-tag=\"{key}\""))?;
    let rest = &dom[row..];
    let end = rest.find("</tr>")?;
    let at = rest[..end].find("data-points=\"")? + "data-points=\"".len();
    rest[at..at + rest[at..].find('"')?].parse().ok()
}

/// The state a device card shows (`ok` or `bad`).
fn shown_state(dom: &str, device: &str) -> Option<String> {
    let card = dom.find(&format!("data-device=\"{device}\""))?;
    let rest = &dom[card..];
    let state = rest.find("data-state=\"")? + "data-state=\"".len();
    Some(rest[state..state + rest[state..].find('"')?].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_live_values_that_change_and_a_stopped_device_as_bad() {
    let mut rig = GatewayRig::new("api-browser", 2, Duration::from_millis(100), None).await;
    rig.config.api = Some(ApiSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        auth: None,
        tls: None,
    });
    let (_sub, gw) = rig.start_live().await;
    let addr = gw.api_addr().unwrap();
    let profile = tempfile::tempdir().unwrap();

    // The simulators' values on screen: every press's counter is a number, the broker shown.
    let dom = chromium(addr, profile.path(), "--dump-dom").await;
    assert!(
        dom.contains(">api-browser<"),
        "the gateway's id is shown:\n{dom}"
    );
    assert!(
        dom.contains(">connected<"),
        "the broker is shown connected:\n{dom}"
    );
    let first = shown_value(&dom, "press1/counter").expect("press1's counter is shown");
    first
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("a number, not {first:?}"));
    assert_eq!(shown_state(&dom, "press1").as_deref(), Some("ok"));
    assert_eq!(shown_state(&dom, "press2").as_deref(), Some("ok"));
    assert!(
        dom.contains("<svg class=\"spark\""),
        "each tag has its sparkline:\n{dom}"
    );
    // The sparkline comes from the gateway's history, not only from what this page saw: a
    // page opened once holds a point already.
    assert!(
        shown_points(&dom, "press1/counter").is_some_and(|n| n >= 1),
        "press1's counter has a history point on a page just opened:\n{dom}"
    );

    // A value that changes on screen (the simulator's counter counts every 100 ms).
    let deadline = Instant::now() + WAIT;
    loop {
        let dom = chromium(addr, profile.path(), "--dump-dom").await;
        if shown_value(&dom, "press1/counter").is_some_and(|v| v != first) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "press1's counter stayed at {first} on screen"
        );
    }

    // A device shown bad once its simulator stops, the other still ok.
    rig.stop_sim(1).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let dom = chromium(addr, profile.path(), "--dump-dom").await;
        if shown_state(&dom, "press2").as_deref() == Some("bad") {
            assert_eq!(shown_state(&dom, "press1").as_deref(), Some("ok"), "{dom}");
            break;
        }
        assert!(Instant::now() < deadline, "press2 never shown bad:\n{dom}");
    }

    if let Some(file) = std::env::var_os("STATUS_PAGE_SCREENSHOT") {
        let file = std::path::PathBuf::from(file);
        // A longer run, so that the sparklines hold some history.
        let shot = format!("--screenshot={}", file.display());
        chromium_for(addr, profile.path(), &shot, 30_000).await;
        let png = std::fs::read(&file).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    }
    gw.shutdown().await;
}
