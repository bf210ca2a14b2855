//! Drawing a [`Model`] as inline SVG (no namespace URL is needed inside HTML, so the page
//! carries no link at all).

use std::fmt::Write;

use kelpie_core::NodeId;

use super::escape;
use super::model::{BeliefSpan, Model, Tenure};

/// Width of the row labels on the left.
const LABEL_WIDTH_PX: f64 = 170.0;
/// Space above the rows for the axis, point faults and violation labels.
const AXIS_HEIGHT_PX: f64 = 46.0;
/// Height of an actor's truth lane.
const TRUTH_LANE_PX: f64 = 22.0;
/// Height of one node's belief lane.
const BELIEF_LANE_PX: f64 = 12.0;
/// Gap between lanes of one row.
const LANE_GAP_PX: f64 = 3.0;
/// Gap between rows.
const ROW_GAP_PX: f64 = 14.0;
/// Space right of the plot.
const RIGHT_MARGIN_PX: f64 = 24.0;
/// Plot width bounds; within them the plot gets one pixel per [`MS_PER_PX`].
const PLOT_WIDTH_PX_MIN: f64 = 900.0;
const PLOT_WIDTH_PX_MAX: f64 = 16_000.0;
const MS_PER_PX: f64 = 16.0;
/// Height of the strip below the rows that names the fault windows (three staggered lines).
const FAULT_LABELS_PX: f64 = 36.0;
/// Height of the legend below that.
const LEGEND_HEIGHT_PX: f64 = 64.0;
/// Narrowest belief or unbacked mark, so that an instant is still visible.
const MARK_WIDTH_PX_MIN: f64 = 3.0;
/// Room a violation's label needs right of its line; nearer the edge it goes left.
const VIOLATION_LABEL_PX: f64 = 260.0;
/// Narrowest bar that gets a token label, and the narrowest that also names its holder.
const LABEL_TOKEN_MIN_PX: f64 = 22.0;
const LABEL_HOLDER_MIN_PX: f64 = 90.0;
/// Most axis ticks.
const TICKS_MAX: u64 = 14;

/// Node colours, distinguishable and none of them the red kept for violations.
const PALETTE: [&str; 9] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7",
    "#bab0ac",
];
const VIOLATION_RED: &str = "#d62728";

/// Where things go.
struct Layout<'a> {
    model: &'a Model,
    /// The plot's right edge: a little past the run's end, so that what happens in its
    /// last instant (often the violation) is not drawn on the border.
    domain_ms: u64,
    px_per_ms: f64,
    plot_width_px: f64,
    rows_height_px: f64,
}

impl<'a> Layout<'a> {
    fn new(model: &'a Model) -> Self {
        let domain_ms = model.end_ms + (model.end_ms / 40).max(1);
        let plot_width_px =
            (domain_ms as f64 / MS_PER_PX).clamp(PLOT_WIDTH_PX_MIN, PLOT_WIDTH_PX_MAX);
        let rows_height_px = model.actors.len() as f64 * row_height_px(model.nodes.len());
        Self {
            model,
            domain_ms,
            px_per_ms: plot_width_px / domain_ms as f64,
            plot_width_px,
            rows_height_px,
        }
    }

    fn x(&self, at_ms: u64) -> f64 {
        LABEL_WIDTH_PX + at_ms.min(self.domain_ms) as f64 * self.px_per_ms
    }

    fn width_px(&self) -> f64 {
        LABEL_WIDTH_PX + self.plot_width_px + RIGHT_MARGIN_PX
    }

    fn row_top(&self, row: usize) -> f64 {
        AXIS_HEIGHT_PX + row as f64 * row_height_px(self.model.nodes.len())
    }

    fn rows_bottom(&self) -> f64 {
        AXIS_HEIGHT_PX + self.rows_height_px
    }

    fn height_px(&self) -> f64 {
        self.rows_bottom() + FAULT_LABELS_PX + LEGEND_HEIGHT_PX
    }

    fn colour(&self, node: &NodeId) -> &'static str {
        let index = self.model.nodes.iter().position(|n| n == node).unwrap_or(0);
        PALETTE[index % PALETTE.len()]
    }
}

fn row_height_px(nodes_count: usize) -> f64 {
    TRUTH_LANE_PX + nodes_count as f64 * (BELIEF_LANE_PX + LANE_GAP_PX) + ROW_GAP_PX
}

/// The `<svg>` element.
pub fn render(model: &Model) -> String {
    let layout = Layout::new(model);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {w:.0} {h:.0}\" role=\"img\" \
         aria-label=\"lease timeline\">",
        w = layout.width_px(),
        h = layout.height_px()
    );
    out.push_str(
        "<defs><pattern id=\"unbacked\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" \
         patternTransform=\"rotate(45)\"><rect width=\"3\" height=\"6\" fill=\"#d62728\"/>\
         </pattern></defs>\n",
    );
    out.push_str("<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n");
    draw_fault_windows(&mut out, &layout);
    draw_axis(&mut out, &layout);
    for (row, actor) in model.actors.iter().enumerate() {
        draw_row(&mut out, &layout, row, actor);
    }
    draw_point_faults(&mut out, &layout);
    draw_violations(&mut out, &layout);
    draw_legend(&mut out, &layout);
    out.push_str("</svg>\n");
    out
}

/// Tick spacing: 1, 2 or 5 times a power of ten ms, giving at most [`TICKS_MAX`] ticks.
fn tick_step_ms(end_ms: u64) -> u64 {
    let mut step = 1;
    loop {
        for factor in [1, 2, 5] {
            if end_ms / (step * factor) <= TICKS_MAX {
                return step * factor;
            }
        }
        step *= 10;
    }
}

fn tick_label(at_ms: u64, step_ms: u64) -> String {
    if step_ms >= 1_000 {
        format!("{} s", at_ms / 1_000)
    } else if step_ms >= 100 && at_ms >= 1_000 {
        format!("{:.1} s", at_ms as f64 / 1_000.0)
    } else {
        format!("{at_ms} ms")
    }
}

fn draw_axis(out: &mut String, layout: &Layout) {
    let step = tick_step_ms(layout.domain_ms);
    let (top, bottom) = (AXIS_HEIGHT_PX - 6.0, layout.rows_bottom());
    let _ = writeln!(
        out,
        "<line x1=\"{:.1}\" y1=\"{top}\" x2=\"{:.1}\" y2=\"{top}\" stroke=\"#333\"/>",
        layout.x(0),
        layout.x(layout.domain_ms)
    );
    let mut at_ms = 0;
    while at_ms <= layout.domain_ms {
        let x = layout.x(at_ms);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{bottom:.1}\" stroke=\"#e4e4e4\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\" \
             fill=\"#333\">{}</text>",
            top - 22.0,
            tick_label(at_ms, step)
        );
        at_ms += step;
    }
    let _ = writeln!(
        out,
        "<text x=\"8\" y=\"{:.1}\" font-size=\"11\" fill=\"#333\">simulated time</text>",
        top - 22.0
    );
}

fn draw_row(out: &mut String, layout: &Layout, row: usize, actor: &kelpie_core::ActorId) {
    let top = layout.row_top(row);
    let _ = writeln!(
        out,
        "<g class=\"actor-row\" data-actor=\"{}\">",
        escape(actor.as_str())
    );
    let _ = writeln!(
        out,
        "<text x=\"8\" y=\"{:.1}\" font-size=\"13\" font-weight=\"600\">{}</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#666\" \
         text-anchor=\"end\">store</text>",
        top + 15.0,
        escape(actor.as_str()),
        LABEL_WIDTH_PX - 6.0,
        top + 15.0
    );
    let _ = writeln!(
        out,
        "<rect x=\"{:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{TRUTH_LANE_PX}\" \
         fill=\"#f7f7f7\"/>",
        layout.x(0),
        layout.plot_width_px
    );
    for tenure in layout.model.tenures.get(actor).into_iter().flatten() {
        draw_tenure(out, layout, top, actor, tenure);
    }
    for (lane, node) in layout.model.nodes.iter().enumerate() {
        let lane_top =
            top + TRUTH_LANE_PX + LANE_GAP_PX + lane as f64 * (BELIEF_LANE_PX + LANE_GAP_PX);
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#666\" \
             text-anchor=\"end\">{} believes</text>",
            LABEL_WIDTH_PX - 6.0,
            lane_top + 9.5,
            escape(node.as_str())
        );
        let key = (actor.clone(), node.clone());
        for span in layout.model.beliefs.get(&key).into_iter().flatten() {
            draw_belief(out, layout, lane_top, node, span);
        }
    }
    out.push_str("</g>\n");
}

fn draw_tenure(
    out: &mut String,
    layout: &Layout,
    top: f64,
    actor: &kelpie_core::ActorId,
    tenure: &Tenure,
) {
    let (x0, x1) = (layout.x(tenure.start_ms), layout.x(tenure.end_ms));
    let width = (x1 - x0).max(1.0);
    let _ = write!(
        out,
        "<rect x=\"{x0:.1}\" y=\"{top:.1}\" width=\"{width:.1}\" height=\"{TRUTH_LANE_PX}\" \
         fill=\"{}\" stroke=\"#ffffff\" stroke-width=\"0.5\"><title>{}: held by {} with token \
         {} from {} ms to {} ms</title></rect>",
        layout.colour(&tenure.holder),
        escape(actor.as_str()),
        escape(tenure.holder.as_str()),
        tenure.token,
        tenure.start_ms,
        tenure.end_ms
    );
    let label = if width >= LABEL_HOLDER_MIN_PX {
        format!("{} #{}", tenure.holder, tenure.token)
    } else if width >= LABEL_TOKEN_MIN_PX {
        format!("#{}", tenure.token)
    } else {
        String::new()
    };
    if !label.is_empty() {
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#ffffff\" \
             pointer-events=\"none\">{}</text>",
            x0 + 3.0,
            top + 15.0,
            escape(&label)
        );
    }
    out.push('\n');
}

fn draw_belief(out: &mut String, layout: &Layout, top: f64, node: &NodeId, span: &BeliefSpan) {
    let (x0, x1) = (layout.x(span.start_ms), layout.x(span.end_ms));
    let _ = write!(
        out,
        "<rect x=\"{x0:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{BELIEF_LANE_PX}\" \
         fill=\"{}\" fill-opacity=\"0.55\"><title>{} believes it holds token {} from {} ms to \
         {} ms</title></rect>",
        (x1 - x0).max(MARK_WIDTH_PX_MIN),
        layout.colour(node),
        escape(node.as_str()),
        span.token,
        span.start_ms,
        span.end_ms
    );
    for (start_ms, end_ms) in &span.unbacked {
        let (u0, u1) = (layout.x(*start_ms), layout.x(*end_ms));
        let _ = write!(
            out,
            "<rect x=\"{u0:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{BELIEF_LANE_PX}\" \
             fill=\"url(#unbacked)\" stroke=\"{VIOLATION_RED}\"><title>{} believes token {} \
             from {start_ms} ms to {end_ms} ms but the store does not back it</title></rect>",
            (u1 - u0).max(MARK_WIDTH_PX_MIN),
            escape(node.as_str()),
            span.token
        );
    }
    out.push('\n');
}

fn draw_fault_windows(out: &mut String, layout: &Layout) {
    let windows = layout
        .model
        .faults
        .iter()
        .filter_map(|f| f.end_ms.map(|end| (f, end)));
    let bottom = layout.rows_bottom();
    for (index, (fault, end_ms)) in windows.enumerate() {
        let (x0, x1) = (layout.x(fault.start_ms), layout.x(end_ms));
        // Staggered over three lines so that neighbouring windows' names do not overlap.
        let label_y = bottom + 11.0 + (index % 3) as f64 * 11.0;
        let _ = writeln!(
            out,
            "<rect x=\"{x0:.1}\" y=\"{AXIS_HEIGHT_PX}\" width=\"{:.1}\" height=\"{:.1}\" \
             fill=\"#f2a900\" fill-opacity=\"0.16\"><title>{} from {} ms to {end_ms} ms</title>\
             </rect><line x1=\"{x0:.1}\" y1=\"{bottom:.1}\" x2=\"{x0:.1}\" y2=\"{:.1}\" \
             stroke=\"#d9a400\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" \
             fill=\"#8a5f00\">{}</text>",
            (x1 - x0).max(1.0),
            layout.rows_height_px,
            escape(&fault.label),
            fault.start_ms,
            label_y - 8.0,
            x0 + 2.0,
            label_y,
            escape(&fault.label)
        );
    }
}

fn draw_point_faults(out: &mut String, layout: &Layout) {
    let y = AXIS_HEIGHT_PX - 6.0;
    for fault in layout.model.faults.iter().filter(|f| f.end_ms.is_none()) {
        let x = layout.x(fault.start_ms);
        let _ = writeln!(
            out,
            "<path d=\"M{x:.1} {y:.1} l-4 -7 h8 z\" fill=\"#f2a900\"><title>{} ms: {}</title>\
             </path>",
            fault.start_ms,
            escape(&fault.label)
        );
    }
}

fn draw_violations(out: &mut String, layout: &Layout) {
    let right_px = LABEL_WIDTH_PX + layout.plot_width_px;
    for violation in &layout.model.violations {
        let x = layout.x(violation.at_ms);
        let (label_x, anchor) = if x + VIOLATION_LABEL_PX > right_px {
            (x - 4.0, "end")
        } else {
            (x + 4.0, "start")
        };
        let _ = writeln!(
            out,
            "<g class=\"violation\"><line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" \
             stroke=\"{VIOLATION_RED}\" stroke-width=\"2\"/><text x=\"{label_x:.1}\" y=\"{:.1}\" \
             font-size=\"11\" font-weight=\"600\" fill=\"{VIOLATION_RED}\" \
             text-anchor=\"{anchor}\">\u{2716} {} at {} ms</text><title>{}</title></g>",
            AXIS_HEIGHT_PX - 14.0,
            layout.rows_bottom(),
            AXIS_HEIGHT_PX - 16.0,
            escape(&violation.invariant),
            violation.at_ms,
            escape(&violation.message)
        );
    }
}

fn draw_legend(out: &mut String, layout: &Layout) {
    let top = layout.rows_bottom() + FAULT_LABELS_PX + 12.0;
    let mut items: Vec<(&str, &str)> = layout
        .model
        .nodes
        .iter()
        .map(|node| (layout.colour(node), node.as_str()))
        .collect();
    items.push(("url(#unbacked)", "belief the store does not back"));
    items.push(("#f9e3b0", "fault window"));
    items.push((VIOLATION_RED, "violation"));
    let mut x = 8.0;
    for (fill, label) in items {
        let _ = write!(
            out,
            "<rect x=\"{x:.1}\" y=\"{top:.1}\" width=\"14\" height=\"12\" fill=\"{fill}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>",
            x + 18.0,
            top + 10.0,
            escape(label)
        );
        x += 30.0 + label.len() as f64 * 6.2;
    }
    let _ = writeln!(
        out,
        "<text x=\"8\" y=\"{:.1}\" font-size=\"11\" fill=\"#555\">store lane: bar per holder, \
         labelled with its fencing token (#n); belief lanes: what each node believed it held, \
         on the store's time axis</text>",
        top + 34.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_few() {
        assert_eq!(tick_step_ms(20_000), 2_000);
        assert_eq!(tick_step_ms(900), 100);
        assert_eq!(tick_step_ms(5), 1);
        assert_eq!(tick_label(4_000, 2_000), "4 s");
        assert_eq!(tick_label(1_500, 500), "1.5 s");
        assert_eq!(tick_label(300, 100), "300 ms");
    }
}
