//! Timeline reports of migration jobs.
//!
//! [`svg`] draws a job's samples over time in three panels — memory left to
//! send, transfer and dirty rates, vCPU throttle — with the job's actions
//! (throttle changes, downtime raises, post-copy, cancel, ...) as vertical
//! markers and the switchover downtime as a shaded band. [`html`] wraps the
//! chart and the job summary in one self-contained page. [`write()`] picks by
//! file extension.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use protocol::job::{JobRecord, JobStatus};
use types::units::mib;

const WIDTH: u32 = 1100;
const PANEL: u32 = 260;

#[derive(Debug, thiserror::Error)]
/// Why a report could not be written.
pub enum ReportError {
    #[error("cannot draw the chart: {0}")]
    /// The chart library failed.
    Draw(String),
    #[error("the job has no timeline samples to draw")]
    /// Nothing to draw.
    NoSamples,
    #[error("unknown report format {0:?}: use .svg or .html")]
    /// Neither .svg nor .html.
    Format(String),
    #[error("cannot write the report")]
    /// The file could not be written.
    Io(#[from] std::io::Error),
}

/// A line to draw: name, colour, points.
type Line<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);
/// A panel: its unit, its y range, its lines.
type Panel<'a> = (&'a str, f64, Vec<Line<'a>>);

fn draw_error<E: std::fmt::Debug>(e: E) -> ReportError {
    ReportError::Draw(format!("{e:?}"))
}

/// Series drawn, by name, for tests and legends.
pub const SERIES: [&str; 4] = [
    "remaining (MiB)",
    "transfer rate (MiB/s)",
    "dirty rate (MiB/s)",
    "throttle (%)",
];

/// Series drawn besides for a job that copied disks.
pub const DISK_SERIES: [&str; 2] = ["disks remaining (MiB)", "disks dirty rate (MiB/s)"];

/// The chart, as an SVG document.
///
/// # Errors
/// [`ReportError::NoSamples`] for a job without samples (e.g. one refused in
/// Begin), [`ReportError::Draw`] if plotting fails.
pub fn svg(record: &JobRecord) -> Result<String, ReportError> {
    let samples = &record.samples;
    if samples.is_empty() {
        return Err(ReportError::NoSamples);
    }
    let end_s = (record
        .total_time_ms
        .max(samples.last().map_or(0, |s| s.t_ms)) as f64
        / 1000.0)
        .max(1.0);
    let secs = |t_ms: u64| t_ms as f64 / 1000.0;
    let max_remaining = samples
        .iter()
        .map(|s| mib(s.remaining_bytes.max(s.disk_remaining_bytes.unwrap_or(0)) as f64))
        .fold(1.0, f64::max);
    let max_rate = samples
        .iter()
        .map(|s| {
            s.bandwidth_mib_s
                .max(s.dirty_rate_mib_s)
                .max(s.disk_dirty_rate_mib_s.unwrap_or(0.0))
        })
        .fold(1.0, f64::max);
    // A job that copied disks starts its timeline with their copy.
    let disk_remaining: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((secs(s.t_ms), mib(s.disk_remaining_bytes? as f64))))
        .collect();
    let disk_dirty: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((secs(s.t_ms), s.disk_dirty_rate_mib_s?)))
        .collect();

    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, PANEL * 3 + 40)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let (title, panels) = root.split_vertically(40);
        title
            .draw_text(
                &format!(
                    "Migration of '{}' to {} — {} in {:.1} s (convergence: {})",
                    record.domain,
                    record.destination,
                    record.status,
                    record.total_time_ms as f64 / 1000.0,
                    record.converge
                ),
                &("sans-serif", 18).into_font().color(&BLACK),
                (10, 10),
            )
            .map_err(draw_error)?;
        let areas = panels.split_evenly((3, 1));

        // The switchover: QEMU's downtime ends the migration (and the
        // timeline, which starts earlier than QEMU's clock when disks were
        // copied first).
        let downtime = record
            .downtime_ms
            .filter(|_| record.status == JobStatus::Completed)
            .map(|d| (end_s - d as f64 / 1000.0, end_s));

        let mut panels: [Panel; 3] = [
            (
                "MiB",
                max_remaining * 1.1,
                vec![(
                    SERIES[0],
                    BLUE,
                    samples
                        .iter()
                        .map(|s| (secs(s.t_ms), mib(s.remaining_bytes as f64)))
                        .collect(),
                )],
            ),
            (
                "MiB/s",
                max_rate * 1.1,
                vec![
                    (
                        SERIES[1],
                        GREEN,
                        samples
                            .iter()
                            .map(|s| (secs(s.t_ms), s.bandwidth_mib_s))
                            .collect(),
                    ),
                    (
                        SERIES[2],
                        MAGENTA,
                        samples
                            .iter()
                            .map(|s| (secs(s.t_ms), s.dirty_rate_mib_s))
                            .collect(),
                    ),
                ],
            ),
            (
                "%",
                100.0,
                vec![(
                    SERIES[3],
                    RED,
                    samples
                        .iter()
                        .map(|s| (secs(s.t_ms), s.throttle_pct))
                        .collect(),
                )],
            ),
        ];

        if !disk_remaining.is_empty() {
            panels[0].2.push((DISK_SERIES[0], CYAN, disk_remaining));
        }
        if !disk_dirty.is_empty() {
            panels[1]
                .2
                .push((DISK_SERIES[1], RGBColor(139, 69, 19), disk_dirty));
        }

        for (area, (unit, y_max, series)) in areas.iter().zip(panels) {
            let mut chart = ChartBuilder::on(area)
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..end_s, 0f64..y_max)
                .map_err(draw_error)?;
            chart
                .configure_mesh()
                .x_desc("seconds")
                .y_desc(unit)
                .draw()
                .map_err(draw_error)?;
            if let Some((from, to)) = downtime {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(from, 0.0), (to.max(from + end_s / 500.0), y_max)],
                        RGBColor(255, 165, 0).mix(0.4).filled(),
                    )))
                    .map_err(draw_error)?
                    .label("switchover downtime")
                    .legend(|(x, y)| {
                        Rectangle::new(
                            [(x, y - 5), (x + 16, y + 5)],
                            RGBColor(255, 165, 0).filled(),
                        )
                    });
            }
            chart
                .draw_series(record.actions.iter().map(|a| {
                    let t = secs(a.t_ms);
                    PathElement::new(vec![(t, 0.0), (t, y_max)], BLACK.mix(0.35))
                }))
                .map_err(draw_error)?;
            for (name, color, points) in series {
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))
                    .map_err(draw_error)?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(draw_error)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(out)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained HTML page: the chart, the summary, the actions.
///
/// # Errors
/// As [`svg`].
pub fn html(record: &JobRecord) -> Result<String, ReportError> {
    let chart = svg(record)?;
    let mut page = String::new();
    let r = record;
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>livemig job {id}</title>\
         <style>body{{font-family:sans-serif;margin:24px;color:#222}}\
         table{{border-collapse:collapse;margin:12px 0}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}}\
         th{{background:#f4f4f4}}.failed{{color:#b00}}.completed{{color:#070}}\
         svg{{max-width:100%;height:auto}}</style></head><body>\
         <h1>Migration of '{domain}'</h1>",
        id = escape(&r.id),
        domain = escape(&r.domain),
    );
    let rows = [
        ("Job", r.id.clone()),
        ("Status", r.status.to_string()),
        ("From", r.source.clone()),
        ("To", r.destination.clone()),
        ("Convergence", r.converge.to_string()),
        ("Flags", r.flags.join(" ")),
        (
            "Total time",
            format!("{:.1} s", r.total_time_ms as f64 / 1000.0),
        ),
        (
            "Downtime",
            r.downtime_ms.map_or("-".into(), |d| format!("{d} ms")),
        ),
        (
            "Transferred",
            format!("{:.1} MiB", mib(r.transferred_bytes as f64)),
        ),
        ("Passes", r.iterations.to_string()),
        (
            "Max vCPU throttle",
            format!("{:.1} %", r.max_cpu_throttle_pct),
        ),
        ("Error", r.error.clone().unwrap_or_else(|| "-".into())),
        ("Recovery", r.recovery.clone().unwrap_or_else(|| "-".into())),
    ];
    page.push_str("<table>");
    for (k, v) in rows {
        let class = if k == "Status" {
            escape(&v)
        } else {
            String::new()
        };
        let _ = write!(
            page,
            "<tr><th>{k}</th><td class=\"{class}\">{}</td></tr>",
            escape(&v)
        );
    }
    page.push_str("</table>\n<div id=\"chart\">");
    // Inline the SVG without its XML declaration.
    let body = chart.find("<svg").map_or(chart.as_str(), |i| &chart[i..]);
    page.push_str(body);
    page.push_str("</div>\n<h2>Actions</h2><table><tr><th>t</th><th>action</th><th>value</th><th>why</th></tr>");
    for a in &r.actions {
        let _ = write!(
            page,
            "<tr><td>{:.3} s</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            a.t_ms as f64 / 1000.0,
            escape(a.action.name()),
            a.value.map_or(String::new(), |v| format!("{v:.1}")),
            escape(&a.detail)
        );
    }
    page.push_str("</table>\n</body></html>\n");
    Ok(page)
}

/// Writes `FILE.svg` or `FILE.html`.
///
/// # Errors
/// [`ReportError::Format`] for another extension, or as [`svg`] and I/O.
pub fn write(record: &JobRecord, path: &Path) -> Result<(), ReportError> {
    let text = match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => svg(record)?,
        Some("html") | Some("htm") => html(record)?,
        other => return Err(ReportError::Format(other.unwrap_or("").to_string())),
    };
    std::fs::write(path, text)?;
    Ok(())
}
