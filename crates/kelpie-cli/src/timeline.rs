//! `kelpie sim --seed S --timeline FILE.html`: one self-contained HTML page with an SVG
//! timeline of the run, drawn from its [`LeaseEvent`](kelpie_dst::LeaseEvent)s.
//!
//! One row per actor. Its top lane is the store's truth: a bar per holder tenure, coloured by
//! holder and labelled with the fencing token, ending at release, takeover or expiry. Under
//! it, one lane per node shows what that node believed it held, in the same colour; any part
//! of a belief the store did not back (another holder, another token, or expired) is hatched
//! red, which is exactly what the safety invariants forbid. Fault windows are shaded across
//! the rows, point faults are ticks on the axis, and violations are red lines.
//!
//! The page has no scripts, fonts, images or links, so it opens offline.

mod model;
mod svg;

use std::fmt::Write;

use kelpie_sim::SimError;

use crate::sim::{RunSettings, SeedRun};

pub use model::Model;

/// The page for one run.
pub fn render(settings: &RunSettings, run: &SeedRun) -> String {
    let model = Model::build(&run.events, end_ms(run));
    let mut page = String::new();
    let title = format!("kelpie sim: seed {}", run.seed);
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        escape(&title),
        escape(&title)
    );
    let _ = writeln!(
        page,
        "<p class=\"meta\">{}</p>",
        escape(&summary(settings, run))
    );
    let _ = writeln!(
        page,
        "<p class=\"meta\">replay: <code>{}</code></p>",
        escape(&run.replay)
    );
    if let Err(error) = &run.result {
        let _ = writeln!(
            page,
            "<p class=\"failure\">{}</p>",
            escape(&error.to_string())
        );
    }
    let _ = writeln!(page, "<p class=\"help\">{}</p>", HOW_TO_READ);
    page.push_str("<div class=\"scroll\">\n");
    page.push_str(&svg::render(&model));
    page.push_str("</div>\n</body>\n</html>\n");
    page
}

/// When the run ended: its report's time, the failure's time, or the last event.
fn end_ms(run: &SeedRun) -> u64 {
    let last_event_ms = run.events.last().map_or(0, |e| e.at_ms);
    let reported_ms = match &run.result {
        Ok(report) => report.sim.sim_time_ms,
        Err(SimError::InvariantViolated { sim_time_ms, .. })
        | Err(SimError::ScenarioFailed { sim_time_ms, .. })
        | Err(SimError::Panicked { sim_time_ms, .. })
        | Err(SimError::Deadlock { sim_time_ms, .. })
        | Err(SimError::StepLimit { sim_time_ms, .. }) => *sim_time_ms,
        Err(_) => 0,
    };
    reported_ms.max(last_event_ms).max(1)
}

fn summary(settings: &RunSettings, run: &SeedRun) -> String {
    let outcome = match &run.result {
        Ok(_) => "passed".to_string(),
        Err(error) => format!("FAILED ({})", error.kind()),
    };
    format!(
        "{} nodes, {} actors, lease {} ms, {} s simulated, faults {}; {}",
        settings.nodes,
        settings.actors,
        settings.lease_ms,
        settings.sim_secs,
        crate::faults::describe(&run.faults),
        outcome
    )
}

/// Escapes text for HTML and SVG content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const HOW_TO_READ: &str = "Each actor has a row. Its top lane is the store's truth: one bar \
     per holder, coloured by node and labelled with its fencing token (#n), ending when the \
     lease is released, taken over or expires. The lanes below show what each node believed \
     it held; red hatching marks belief the store did not back. Shaded bands are fault \
     windows, ticks under the axis are point faults, red lines are violations. Hover over \
     anything for details.";

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:16px;color:#222}\
h1{font-size:18px;margin:0 0 6px}p{margin:4px 0;font-size:13px}\
.failure{color:#b00020;font-weight:600}.help{color:#555;max-width:70em}\
code{background:#f3f3f3;padding:1px 4px}.scroll{overflow-x:auto;margin-top:10px}\
svg text{font-family:system-ui,sans-serif}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
    }
}
