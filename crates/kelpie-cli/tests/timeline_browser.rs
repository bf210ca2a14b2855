//! The timeline page in a real browser: headless Chromium (Debian's `chromium`, which
//! `.ci/run` installs) loads the page from disk with networking off, and the test reads the
//! DOM the browser built and a screenshot it rendered, not just the HTML text the CLI wrote.
//! Without Chromium the test says it was skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

const ACTORS_COUNT: usize = 4;

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn headless(browser: &Path, profile: &Path, extra: &[&str], page: &Path) -> std::process::Output {
    let mut command = Command::new(browser);
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,900",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command
        .args(extra)
        .arg(format!("file://{}", page.display()));
    command.output().expect("chromium runs")
}

#[test]
fn the_rendered_timeline_has_one_row_per_actor() {
    let Some(browser) = chromium() else {
        kelpie_core::testing::missing_requirement(
            "the_rendered_timeline_has_one_row_per_actor",
            "chromium not found",
            "apt-get install chromium",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("timeline.html");
    let actors = ACTORS_COUNT.to_string();
    let status = assert_cmd::Command::cargo_bin("kelpie")
        .unwrap()
        .env_remove("DST_SEED")
        .args(["sim", "--seed", "7", "--actors", &actors, "--timeline"])
        .arg(&page)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    let dom = headless(
        &browser,
        &dir.path().join("profile-dom"),
        &["--dump-dom"],
        &page,
    );
    let dom = String::from_utf8(dom.stdout).expect("the DOM is UTF-8");
    assert!(
        dom.contains("<svg"),
        "the browser built an SVG element: {dom:.300}"
    );
    assert_eq!(
        dom.matches("class=\"actor-row\"").count(),
        ACTORS_COUNT,
        "rows in the DOM"
    );
    for index in 0..ACTORS_COUNT {
        assert!(
            dom.contains(&format!("data-actor=\"actor-{index}\"")),
            "row for actor-{index}"
        );
    }

    let shot = dir.path().join("shot.png");
    let screenshot = format!("--screenshot={}", shot.display());
    headless(
        &browser,
        &dir.path().join("profile-shot"),
        &[&screenshot],
        &page,
    );
    let png = std::fs::read(&shot).expect("chromium wrote a screenshot");
    assert_eq!(&png[1..4], b"PNG", "a PNG image");
    // A blank page compresses to a few kilobytes; a drawn timeline does not.
    assert!(
        png.len() > 10_000,
        "the screenshot shows a drawing ({} bytes)",
        png.len()
    );
}
