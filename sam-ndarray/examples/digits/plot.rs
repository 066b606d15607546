//! The SVG figures (plotters, SVG backend: no font or system dependency; the viewer renders
//! the text).

use std::path::Path;

use plotters::prelude::*;

/// One colour per optimizer, in `Kind::ALL` order (matplotlib's tab10, SGD in black).
pub const COLORS: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

/// A named curve.
pub struct Curve<'a> {
    /// Legend text.
    pub label: String,
    /// Colour.
    pub color: RGBColor,
    /// `(x, y)` points.
    pub points: &'a [(f64, f64)],
}

fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> String + '_ {
    move |e| format!("cannot draw {}: {e}", path.display())
}

/// `(lo, hi)` padded by 5 % (and a minimum span).
fn padded(lo: f64, hi: f64, min_span: f64) -> (f64, f64) {
    let span = (hi - lo).max(min_span);
    let mid = 0.5 * (lo + hi);
    (mid - 0.55 * span, mid + 0.55 * span)
}

/// The legend position (a corner or the middle of a side) that covers the fewest points.
fn legend_position(curves: &[Curve<'_>], x: (f64, f64), y: (f64, f64)) -> SeriesLabelPosition {
    use SeriesLabelPosition::*;
    // (position, x range, y range) in fractions of the plot, y up; the legend box of six
    // entries is about a fifth of the width and a third of the height.
    let boxes = [
        (LowerRight, (0.78, 1.0), (0.0, 0.36)),
        (UpperRight, (0.78, 1.0), (0.64, 1.0)),
        (MiddleRight, (0.78, 1.0), (0.32, 0.68)),
        (LowerLeft, (0.0, 0.22), (0.0, 0.36)),
        (UpperLeft, (0.0, 0.22), (0.64, 1.0)),
        (LowerMiddle, (0.39, 0.61), (0.0, 0.36)),
        (UpperMiddle, (0.39, 0.61), (0.64, 1.0)),
    ];
    let covered = |(bx, by): ((f64, f64), (f64, f64))| {
        curves
            .iter()
            .flat_map(|c| c.points.iter())
            .filter(|&&(px, py)| {
                let fx = (px - x.0) / (x.1 - x.0);
                let fy = (py.clamp(y.0, y.1) - y.0) / (y.1 - y.0);
                (bx.0..=bx.1).contains(&fx) && (by.0..=by.1).contains(&fy)
            })
            .count()
    };
    boxes
        .into_iter()
        .min_by_key(|&(_, bx, by)| covered((bx, by)))
        .map_or(LowerRight, |(p, _, _)| p)
}

/// Test accuracy (%) per epoch, one line per optimizer. The y axis covers the values from the
/// 10th percentile of the epochs on; earlier (lower) values are drawn at the bottom edge.
pub fn accuracy(
    path: &Path,
    title: &str,
    y_desc: &str,
    curves: &[Curve<'_>],
) -> Result<(), String> {
    let e = err(path);
    let epochs = curves
        .iter()
        .map(|c| c.points.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let from = epochs / 10;
    let shown = curves
        .iter()
        .flat_map(|c| c.points.iter().skip(from).map(|p| p.1));
    let (lo, hi) = shown.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        padded(lo, hi, 2.0)
    } else {
        (0.0, 100.0)
    };
    let (lo, hi) = (lo.max(0.0), hi.min(100.0));

    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(&e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(1..epochs as i32, lo..hi)
        .map_err(&e)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .x_labels(epochs.min(12))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(&e)?;
    for c in curves {
        let pts: Vec<(i32, f64)> = c
            .points
            .iter()
            .map(|&(x, y)| (x.round() as i32, y.clamp(lo, hi)))
            .collect();
        let color = c.color;
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(&e)?
            .label(c.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(legend_position(curves, (1.0, epochs as f64), (lo, hi)))
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.5))
        .draw()
        .map_err(&e)?;
    root.present().map_err(&e)?;
    Ok(())
}

/// Loss along a filter-normalised direction: two panels (training loss, test loss).
pub fn landscape(
    path: &Path,
    title: &str,
    panels: [(&str, &[Curve<'_>]); 2],
) -> Result<(), String> {
    let e = err(path);
    let root = SVGBackend::new(path, (1200, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(&e)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(&e)?;
    let areas = root.split_evenly((1, 2));
    for (area, (name, curves)) in areas.iter().zip(panels) {
        let xs = curves.iter().flat_map(|c| c.points.iter().map(|p| p.0));
        let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        let ys = curves.iter().flat_map(|c| c.points.iter().map(|p| p.1));
        let (y0, y1) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        if !(x0.is_finite() && y0.is_finite() && x1.is_finite() && y1.is_finite()) {
            return Err(format!("cannot draw {}: no finite points", path.display()));
        }
        let (y0, y1) = padded(y0, y1, 1e-3);
        let mut chart = ChartBuilder::on(area)
            .caption(name, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0.max(0.0)..y1)
            .map_err(&e)?;
        chart
            .configure_mesh()
            .x_desc("α (step along the direction, in units of the filter norms)")
            .y_desc("mean cross-entropy")
            .x_label_formatter(&|x| format!("{x:.1}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(&e)?;
        for c in curves {
            let color = c.color;
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(&e)?
                .label(c.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperMiddle)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.5))
            .draw()
            .map_err(&e)?;
    }
    root.present().map_err(&e)?;
    Ok(())
}
