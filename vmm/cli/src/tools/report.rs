//! The migration timeline report: where a live migration's time went, as a picture (SVG) or as
//! data (JSON).
//!
//! `query-migrate` only says how a migration ended. To understand it — why it needed five
//! passes, whether the bandwidth limit or the guest's dirtying rate decided its length, when
//! the guest was stopped and for how long — one needs its history. hopvm's migration thread
//! records one sample per 100 ms slot (bytes sent, bytes still pending, dirty pages found,
//! measured bandwidth and the completion threshold `max_size`), the start of every pass and
//! the stop / end of the final stage; the QMP extension `x-query-migration-timeline` returns
//! it. This module draws it with the `plotters` crate:
//!
//! * top: the bytes still to send (pending), the dirty bytes each slot's dirty syncs found
//!   (bars) and the completion threshold — the migration stops the guest once pending falls
//!   below it;
//! * bottom: the measured bandwidth;
//! * on both: every pass boundary as a dashed vertical line, and the downtime window (vCPUs
//!   stopped → migration complete) shaded red; a third panel zooms in on the switchover, so a
//!   20 ms downtime in a 10 s migration is visible at its true scale.
//!
//! plotters' SVG backend writes text as SVG `<text>` elements and estimates text extents
//! itself, so no font files or fontconfig are needed to produce the picture; the viewer draws
//! the text with its own sans-serif font. The JSON report is the same data: the timeline as
//! hopvm returned it plus the final `query-migrate` reply.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Errors producing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The timeline could not be fetched (a monitor without `x-query-migration-timeline`,
    /// such as QEMU's, or a broken connection).
    #[error("cannot fetch the migration timeline: {0}")]
    Timeline(#[source] qmp::client::QmpClientError),
    /// The timeline did not have the expected shape.
    #[error("unexpected migration timeline: {0}")]
    Shape(#[from] serde_json::Error),
    /// Drawing failed.
    #[error("cannot draw the timeline: {0}")]
    Draw(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// `--report` names a file of an unknown kind.
    #[error("invalid report file '{0}': it must end in .svg or .json")]
    BadTarget(String),
    /// The file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The report file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The migration thread's record, as `x-query-migration-timeline` returns it.
pub use migration::thread::{SlotRecord as Slot, Timeline};

/// Everything a report shows: the timeline and the final `query-migrate` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportData {
    /// The migration thread's timeline.
    pub timeline: Timeline,
    /// The final `query-migrate` reply.
    #[serde(rename = "query-migrate")]
    pub info: Value,
}

impl ReportData {
    /// Builds the report from the `x-query-migration-timeline` and `query-migrate` replies.
    pub fn from_qmp(timeline: &Value, info: &Value) -> Result<Self, ReportError> {
        Ok(Self {
            timeline: serde_json::from_value(timeline.clone())?,
            info: info.clone(),
        })
    }
}

/// The kind of report file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    /// A picture.
    Svg,
    /// The data.
    Json,
}

/// Where a report goes; the format follows the file name's extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportTarget {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: ReportFormat,
}

/// Parses `--report FILE.svg|FILE.json`.
pub fn parse_target(s: &str) -> Result<ReportTarget, ReportError> {
    let path = PathBuf::from(s);
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => ReportFormat::Svg,
        Some(e) if e.eq_ignore_ascii_case("json") => ReportFormat::Json,
        _ => return Err(ReportError::BadTarget(s.to_string())),
    };
    Ok(ReportTarget { path, format })
}

/// Writes the report (through a temporary file, so a reader never sees half of it).
pub fn write(data: &ReportData, target: &ReportTarget) -> Result<(), ReportError> {
    let text = match target.format {
        ReportFormat::Svg => render_svg(data)?,
        ReportFormat::Json => serde_json::to_string_pretty(data)? + "\n",
    };
    write_atomically(&target.path, text.as_bytes())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let err = |source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 800;
const MIB: f64 = 1048576.0;
const FONT: &str = "sans-serif";
/// Average width of a 13 px label character, for keeping pass labels apart.
const LABEL_CHAR_PX: f64 = 7.5;
/// The bottom of the logarithmic memory axis: 16 KiB (four pages), in MiB.
const LOG_FLOOR: f64 = 1.0 / 64.0;

const PENDING: RGBColor = RGBColor(31, 119, 180);
const DIRTY: RGBColor = RGBColor(255, 127, 14);
const THRESHOLD: RGBColor = RGBColor(44, 160, 44);
const BANDWIDTH: RGBColor = RGBColor(148, 103, 189);
const DOWNTIME: RGBColor = RGBColor(214, 39, 40);
const PASS: RGBColor = RGBColor(110, 110, 110);

fn draw_err<E: std::error::Error + Send + Sync + 'static>(
    e: DrawingAreaErrorKind<E>,
) -> ReportError {
    ReportError::Draw(Box::new(e))
}

/// A chart with a linear time axis and any y axis over f64.
type Chart<'a, DB, Y> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>;

/// What the panels share: the time range, the pass boundaries and the marked windows.
struct Marks<'a> {
    t: &'a Timeline,
    /// `(pass, seconds)`: every pass boundary, the final pass at the stop included.
    passes: Vec<(u64, f64)>,
    /// x range, seconds.
    x_max: f64,
    /// Whether the migration completed.
    completed: bool,
    /// The downtime `query-migrate` reported.
    downtime_ms: Option<u64>,
}

/// The label of the pass boundaries `first` to `last`: `3` or `5–8`.
fn pass_label(first: u64, last: u64) -> String {
    if first == last {
        format!("{first}")
    } else {
        format!("{first}–{last}")
    }
}

/// Pass labels that fit side by side: boundaries whose labels would overlap share one
/// (`5–8`). Each label is `(x, first, last, right_aligned)`.
fn pass_labels(passes: &[(u64, f64)], x_range: (f64, f64), px: f64) -> Vec<(f64, u64, u64, bool)> {
    let text_px = |first: u64, last: u64| {
        pass_label(first, last).chars().count() as f64 * LABEL_CHAR_PX + 8.0
    };
    // Extent in pixels of a label.
    let extent = |&(x, first, last, right): &(f64, u64, u64, bool)| {
        let at = (x - x_range.0) / px;
        let w = text_px(first, last);
        if right {
            (at - w, at)
        } else {
            (at, at + w)
        }
    };
    let mut labels: Vec<(f64, u64, u64, bool)> = Vec::new();
    for &(pass, x) in passes
        .iter()
        .filter(|p| p.1 >= x_range.0 && p.1 <= x_range.1)
    {
        labels.push((x, pass, pass, x > x_range.1 - 30.0 * px));
        // Merge into the previous label while the two overlap; a merged label is wider, so
        // check again.
        while labels.len() >= 2 {
            let n = labels.len();
            if extent(&labels[n - 2]).1 <= extent(&labels[n - 1]).0 {
                break;
            }
            let last = labels[n - 1].2;
            labels.pop();
            labels[n - 2].2 = last;
        }
    }
    labels
}

impl Marks<'_> {
    fn new<'a>(data: &'a ReportData) -> Marks<'a> {
        let t = &data.timeline;
        let mut passes: Vec<(u64, f64)> = t.passes.iter().map(|&(p, ms)| (p, ms / 1e3)).collect();
        // The final dirty sync runs while the vCPUs are stopped; it is not in the timeline's
        // list, but `dirty-sync-count` counts it.
        let last = passes.iter().map(|p| p.0).max().unwrap_or(0);
        if let (Some(count), Some(stop)) =
            (data.info["ram"]["dirty-sync-count"].as_u64(), t.stop_ms)
        {
            if count > last {
                passes.push((count, stop / 1e3));
            }
        }
        let last_ms = t
            .end_ms
            .into_iter()
            .chain(t.slots.last().map(|s| s.t_ms))
            .fold(0.0, f64::max);
        Marks {
            t,
            passes,
            x_max: (last_ms / 1e3).max(0.1),
            completed: data.info["status"] == "completed",
            downtime_ms: data.info["downtime"].as_u64(),
        }
    }

    /// When a completed migration ended, seconds.
    fn completed_at(&self) -> Option<f64> {
        self.t.end_ms.filter(|_| self.completed).map(|ms| ms / 1e3)
    }

    /// Shades the setup and downtime windows and draws the pass boundaries (with labels when
    /// `labels`) on `chart`, whose y axis runs from `floor` to `top`.
    fn draw<DB, Y>(
        &self,
        chart: &mut Chart<'_, DB, Y>,
        floor: f64,
        top: f64,
        x_range: (f64, f64),
        labels: bool,
    ) -> Result<(), ReportError>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
        Y: Ranged<ValueType = f64>,
    {
        // One pixel in x units, so that a window narrower than a pixel still shows.
        let width = chart.plotting_area().dim_in_pixel().0.max(1);
        let px = (x_range.1 - x_range.0) / f64::from(width);
        if let Some(setup) = self.t.setup_ms {
            let end = (setup / 1e3).max(x_range.0 + px);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x_range.0.min(end), floor), (end, top)],
                    PASS.mix(0.15).filled(),
                )))
                .map_err(draw_err)?;
        }
        chart
            .draw_series(
                self.passes
                    .iter()
                    .filter(|p| p.1 >= x_range.0 && p.1 <= x_range.1)
                    .map(|&(_, x)| {
                        DashedPathElement::new(
                            vec![(x, floor), (x, top)],
                            4,
                            3,
                            PASS.stroke_width(1),
                        )
                    }),
            )
            .map_err(draw_err)?
            .label("start of a pass over RAM (numbered at the top)")
            .legend(|(x, y)| {
                DashedPathElement::new(vec![(x, y), (x + 18, y)], 4, 3, PASS.stroke_width(1))
            });
        if let (Some(stop), Some(end)) = (self.t.stop_ms, self.t.end_ms) {
            let (a, b) = (stop / 1e3, (end / 1e3).max(stop / 1e3 + 2.0 * px));
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(a, floor), (b, top)],
                    DOWNTIME.mix(0.3).filled(),
                )))
                .map_err(draw_err)?
                .label(format!(
                    "downtime: {} ms (vCPUs stopped)",
                    self.downtime_ms.unwrap_or((end - stop).round() as u64)
                ))
                .legend(|(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 18, y + 5)], DOWNTIME.mix(0.3).filled())
                });
        }
        if labels {
            for (x, first, last, right) in pass_labels(&self.passes, x_range, px) {
                let text = pass_label(first, last);
                let (dx, anchor) = if right {
                    (-3.0 * px, HPos::Right)
                } else {
                    (3.0 * px, HPos::Left)
                };
                let style = (FONT, 13)
                    .into_font()
                    .color(&PASS)
                    .pos(Pos::new(anchor, VPos::Top));
                chart
                    .draw_series(std::iter::once(Text::new(text, (x + dx, top), style)))
                    .map_err(draw_err)?;
            }
        }
        Ok(())
    }
}

/// Axis labels without needless decimals: `250`, `1.5`, `0.25`, `0.016`.
fn axis_label(v: &f64) -> String {
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        String::from("0")
    } else {
        text.to_string()
    }
}

/// Upper bound for an axis: a little above the largest value, never zero.
fn headroom(max: f64) -> f64 {
    if max > 0.0 {
        max * 1.12
    } else {
        1.0
    }
}

/// The memory panel's series, in MiB, over `x_range`.
struct MemorySeries<'a> {
    slots: Vec<&'a Slot>,
    end: Option<f64>,
}

impl<'a> MemorySeries<'a> {
    fn new(marks: &Marks<'a>, x_range: (f64, f64)) -> Self {
        Self {
            slots: marks
                .t
                .slots
                .iter()
                .filter(|s| s.t_ms / 1e3 >= x_range.0 - 0.1 && s.t_ms / 1e3 <= x_range.1 + 0.1)
                .collect(),
            end: marks.completed_at(),
        }
    }

    fn max(&self) -> f64 {
        self.slots
            .iter()
            .map(|s| {
                (s.pending as f64)
                    .max(s.dirty_pages as f64 * 4096.0)
                    .max(s.max_size as f64)
            })
            .fold(0.0, f64::max)
            / MIB
    }

    /// Draws the dirty bars, the threshold and the remaining bytes; values below `floor` (the
    /// bottom of a logarithmic axis) are drawn at it.
    fn draw<DB, Y>(&self, chart: &mut Chart<'_, DB, Y>, floor: f64) -> Result<(), ReportError>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
        Y: Ranged<ValueType = f64>,
    {
        let at_least = |v: f64| v.max(floor);
        chart
            .draw_series(self.slots.iter().filter(|s| s.dirty_pages > 0).map(|s| {
                let x1 = s.t_ms / 1e3;
                Rectangle::new(
                    [
                        (x1 - 0.1, floor),
                        (x1, at_least(s.dirty_pages as f64 * 4096.0 / MIB)),
                    ],
                    DIRTY.mix(0.6).filled(),
                )
            }))
            .map_err(draw_err)?
            .label("dirty memory found by the dirty sync starting a pass")
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 18, y + 5)], DIRTY.mix(0.6).filled())
            });
        chart
            .draw_series(LineSeries::new(
                self.slots
                    .iter()
                    .map(|s| (s.t_ms / 1e3, at_least(s.max_size as f64 / MIB))),
                THRESHOLD.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label("completion threshold: bandwidth × downtime limit")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], THRESHOLD.stroke_width(2))
            });
        chart
            .draw_series(
                AreaSeries::new(
                    self.slots
                        .iter()
                        .map(|s| (s.t_ms / 1e3, at_least(s.pending as f64 / MIB)))
                        // A completed migration has nothing left at its end.
                        .chain(self.end.map(|end| (end, floor))),
                    floor,
                    PENDING.mix(0.12),
                )
                .border_style(PENDING.stroke_width(2)),
            )
            .map_err(draw_err)?
            .label("remaining: bytes still to send")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], PENDING.stroke_width(2)));
        Ok(())
    }
}

/// Draws a chart's mesh with the report's fonts.
fn mesh<DB, Y>(chart: &mut Chart<'_, DB, Y>, y_desc: &str) -> Result<(), ReportError>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("time since migrate (s)")
        .y_desc(y_desc)
        .y_label_formatter(&axis_label)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(draw_err)
}

/// Draws a chart's legend.
fn legend<'a, DB, Y>(
    chart: &mut Chart<'a, DB, Y>,
    position: SeriesLabelPosition,
) -> Result<(), ReportError>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(draw_err)
}

fn chart_builder<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
) -> ChartBuilder<'a, 'b, DB> {
    let mut b = ChartBuilder::on(area);
    b.caption(caption, (FONT, 17))
        .margin(8)
        .margin_right(20)
        .x_label_area_size(36)
        .y_label_area_size(64);
    b
}

/// The whole migration's memory, on a logarithmic axis: the geometric convergence of pre-copy
/// shows as a staircase, and megabytes and kilobytes are both readable.
fn memory_overview<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    marks: &Marks<'_>,
) -> Result<(), ReportError>
where
    DB::ErrorType: 'static,
{
    let x_range = (0.0, marks.x_max);
    let series = MemorySeries::new(marks, x_range);
    let top = headroom(series.max()).max(LOG_FLOOR * 10.0) * 2.0;
    let mut chart = chart_builder(
        area,
        "Memory still to send, dirty memory found, and the completion threshold",
    )
    .build_cartesian_2d(x_range.0..x_range.1, (LOG_FLOOR..top).log_scale())
    .map_err(draw_err)?;
    mesh(&mut chart, "MiB (logarithmic)")?;
    marks.draw(&mut chart, LOG_FLOOR, top, x_range, true)?;
    series.draw(&mut chart, LOG_FLOOR)?;
    legend(&mut chart, SeriesLabelPosition::LowerLeft)
}

/// The switchover at its own, linear scale.
fn memory_zoom<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    marks: &Marks<'_>,
    x_range: (f64, f64),
) -> Result<(), ReportError>
where
    DB::ErrorType: 'static,
{
    let series = MemorySeries::new(marks, x_range);
    let top = headroom(series.max());
    let caption = format!(
        "Switchover, zoomed in: the last {}",
        super::millis(((x_range.1 - x_range.0) * 1e3).round() as u64)
    );
    let mut chart = chart_builder(area, &caption)
        .build_cartesian_2d(x_range.0..x_range.1, 0.0..top)
        .map_err(draw_err)?;
    mesh(&mut chart, "MiB")?;
    marks.draw(&mut chart, 0.0, top, x_range, true)?;
    series.draw(&mut chart, 0.0)
}

/// The measured bandwidth.
fn bandwidth_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    marks: &Marks<'_>,
) -> Result<(), ReportError>
where
    DB::ErrorType: 'static,
{
    let x_range = (0.0, marks.x_max);
    let slots = &marks.t.slots;
    let top = headroom(slots.iter().map(|s| s.bandwidth / MIB).fold(0.0, f64::max));
    let mut chart = chart_builder(area, "Measured bandwidth")
        .build_cartesian_2d(x_range.0..x_range.1, 0.0..top)
        .map_err(draw_err)?;
    mesh(&mut chart, "MiB/s")?;
    marks.draw(&mut chart, 0.0, top, x_range, false)?;
    chart
        .draw_series(LineSeries::new(
            slots.iter().map(|s| (s.t_ms / 1e3, s.bandwidth / MIB)),
            BANDWIDTH.stroke_width(2),
        ))
        .map_err(draw_err)?
        .label("bytes sent per 100 ms slot, per second")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BANDWIDTH.stroke_width(2)));
    legend(&mut chart, SeriesLabelPosition::LowerLeft)
}

/// The one-line description under the title.
fn subtitle(data: &ReportData) -> String {
    let i = &data.info;
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let mut parts = vec![format!(
        "{}: {} sent in {}",
        i["status"].as_str().unwrap_or("unknown"),
        super::bytes(u(&i["ram"]["transferred"])),
        super::millis(u(&i["total-time"]))
    )];
    if let Some(d) = i["downtime"].as_u64() {
        parts.push(format!("downtime {}", super::millis(d)));
    }
    let passes = data
        .timeline
        .passes
        .iter()
        .map(|p| p.0)
        .chain(i["ram"]["dirty-sync-count"].as_u64())
        .max()
        .unwrap_or(0);
    parts.push(format!("{passes} passes"));
    parts.push(format!("guest RAM {}", super::bytes(u(&i["ram"]["total"]))));
    if i["xbzrle-cache"].is_object() {
        parts.push(String::from("XBZRLE on"));
    }
    parts.join(" · ")
}

/// Draws the timeline as an SVG document.
pub fn render_svg(data: &ReportData) -> Result<String, ReportError> {
    let t = &data.timeline;
    let marks = Marks::new(data);
    // The switchover at its own scale: the downtime and ten times as long before it.
    let zoom = match (t.stop_ms, t.end_ms) {
        (Some(stop), Some(end)) => {
            let downtime = (end - stop).max(0.0);
            (
                (stop - (10.0 * downtime).max(100.0)).max(0.0) / 1e3,
                (end + (0.5 * downtime).max(5.0)) / 1e3,
            )
        }
        _ => ((marks.x_max - 0.6).max(0.0), marks.x_max),
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (title, body) = root.split_vertically(64);
        title
            .draw(&Text::new(
                "hopvm live migration timeline",
                (20, 10),
                (FONT, 22).into_font().style(FontStyle::Bold),
            ))
            .map_err(draw_err)?;
        title
            .draw(&Text::new(subtitle(data), (20, 40), (FONT, 15)))
            .map_err(draw_err)?;
        let (top, bottom) = body.split_vertically((HEIGHT - 64) * 58 / 100);
        memory_overview(&top, &marks)?;
        let (bandwidth, zoomed) = bottom.split_horizontally(WIDTH * 62 / 100);
        bandwidth_panel(&bandwidth, &marks)?;
        memory_zoom(&zoomed, &marks, zoom)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> ReportData {
        let mut slots = Vec::new();
        let mut pending = 40.0 * MIB;
        for i in 1..=30u64 {
            pending = (pending - 3.0 * MIB).max(0.5 * MIB);
            let pass = 1 + i / 10;
            slots.push(Slot {
                t_ms: i as f64 * 100.0,
                bytes: 3 << 20,
                pending: pending as u64,
                dirty_pages: if i % 10 == 0 { 2048 } else { 0 },
                bandwidth: 30.0 * MIB,
                max_size: (0.9 * MIB) as u64,
                pass,
            });
        }
        let timeline = json!({
            "slots": slots,
            "passes": [[1, 2.0], [2, 1000.0], [3, 2000.0], [4, 3000.0]],
            "setup_ms": 2.0, "stop_ms": 3010.0, "end_ms": 3031.0,
        });
        let info = json!({"status": "completed", "total-time": 3031, "downtime": 21,
                          "ram": {"transferred": 94371840u64, "total": 268435456u64}});
        ReportData::from_qmp(&timeline, &info).unwrap()
    }

    #[test]
    fn report_targets_follow_the_extension() {
        assert_eq!(parse_target("a.svg").unwrap().format, ReportFormat::Svg);
        assert_eq!(
            parse_target("dir/a.JSON").unwrap().format,
            ReportFormat::Json
        );
        assert!(parse_target("a.png").is_err());
        assert!(parse_target("svg").is_err());
    }

    #[test]
    fn svg_shows_passes_downtime_and_series() {
        let svg = render_svg(&sample()).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        for want in [
            "hopvm live migration timeline",
            "completed: 90 MiB sent in 3.03 s · downtime 21 ms · 4 passes",
            "start of a pass over RAM",
            ">\n2\n</text>",
            ">\n4\n</text>",
            "downtime: 21 ms (vCPUs stopped)",
            "remaining: bytes still to send",
            "Switchover, zoomed in: the last 242 ms",
            "Measured bandwidth",
        ] {
            assert!(svg.contains(want), "{want:?} missing");
        }
        // The downtime window is shaded in the downtime colour on all three panels.
        assert!(svg.matches("opacity=\"0.3\" fill=\"#D62728\"").count() >= 3);
    }

    #[test]
    fn json_round_trips_and_writes_atomically() {
        let data = sample();
        let dir = std::env::temp_dir().join(format!("hopvm-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = parse_target(dir.join("t.json").to_str().unwrap()).unwrap();
        write(&data, &target).unwrap();
        let back: ReportData =
            serde_json::from_str(&std::fs::read_to_string(&target.path).unwrap()).unwrap();
        assert_eq!(back, data);
        assert!(!dir.join("t.json.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_empty_timeline_still_draws() {
        let data = ReportData::from_qmp(
            &json!({"slots": [], "passes": [], "setup_ms": null, "stop_ms": null, "end_ms": null}),
            &json!({"status": "failed"}),
        )
        .unwrap();
        assert!(render_svg(&data).unwrap().contains("failed"));
    }
}
