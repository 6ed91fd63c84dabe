//! Hand-written SVG charts: a grouped bar chart with min–max whiskers and a latency CDF.

use std::fmt::Write;

/// A colour per series name, stable across charts.
pub fn colour(name: &str) -> &'static str {
    const PALETTE: [&str; 9] = [
        "#7f7f7f", "#1f77b4", "#17becf", "#9467bd", "#d62728", "#e377c2", "#8c564b", "#2ca02c", "#ff7f0e",
    ];
    let i = crate::proxies::ARM_NAMES
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| {
            name.bytes()
                .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
                % PALETTE.len()
        });
    PALETTE[i % PALETTE.len()]
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round axis maximum and tick step covering `max` with about five ticks.
pub fn nice_axis(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.2);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

/// `12345` → `12.3k`.
pub fn short_number(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        trim_zeros(format!("{:.2}", v / 1e6)) + "M"
    } else if a >= 1e3 {
        trim_zeros(format!("{:.1}", v / 1e3)) + "k"
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else {
        trim_zeros(format!("{v:.1}"))
    }
}

fn trim_zeros(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// One bar: its series (arm), median, and spread.
#[derive(Clone, Debug)]
pub struct Bar {
    /// Series name (legend and colour).
    pub series: String,
    /// Bar height.
    pub value: f64,
    /// Whisker bottom.
    pub min: f64,
    /// Whisker top.
    pub max: f64,
}

/// Groups of bars (e.g. one group per workload), with a y-axis label.
pub fn bar_chart(title: &str, y_label: &str, groups: &[(String, Vec<Bar>)]) -> String {
    let (w, h) = (960.0, 440.0);
    let (left, right, top, bottom) = (80.0, 20.0, 40.0, 110.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let top_value = groups
        .iter()
        .flat_map(|(_, b)| b.iter().map(|b| b.max.max(b.value)))
        .fold(0.0, f64::max);
    // Headroom for the value labels above the tallest bar.
    let (ymax, step) = nice_axis(top_value * 1.15);
    let y = |v: f64| top + ph - (v / ymax) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    let mut t = 0.0;
    while t <= ymax + step / 2.0 {
        let yy = y(t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0,
            short_number(t)
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        esc(y_label)
    );
    let n = groups.len().max(1) as f64;
    let gw = pw / n;
    let mut legend: Vec<String> = Vec::new();
    for (gi, (name, bars)) in groups.iter().enumerate() {
        let gx = left + gi as f64 * gw;
        let bw = (gw * 0.8) / bars.len().max(1) as f64;
        for (bi, b) in bars.iter().enumerate() {
            if !legend.contains(&b.series) {
                legend.push(b.series.clone());
            }
            let x = gx + gw * 0.1 + bi as f64 * bw;
            let c = colour(&b.series);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{c}"><title>{}: {} (min {}, max {})</title></rect>"#,
                y(b.value),
                bw * 0.9,
                (y(0.0) - y(b.value)).max(0.0),
                esc(&b.series),
                short_number(b.value),
                short_number(b.min),
                short_number(b.max)
            );
            // The value above the whisker; turned upright when the bar is too narrow for it.
            let (lx, ly) = (x + bw * 0.45, y(b.max.max(b.value)) - 4.0);
            let label = short_number(b.value);
            if bw * 0.9 >= 7.0 * label.len() as f64 {
                let _ = writeln!(
                    s,
                    r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle" font-size="10">{label}</text>"#
                );
            } else {
                let _ = writeln!(
                    s,
                    r#"<text transform="translate({:.1},{ly:.1}) rotate(-90)" font-size="10">{label}</text>"#,
                    lx + 3.5
                );
            }
            let cx = x + bw * 0.45;
            let _ = writeln!(
                s,
                r#"<path d="M{cx:.1} {:.1}V{:.1}M{:.1} {:.1}h{:.1}M{:.1} {:.1}h{:.1}" stroke="black" fill="none"/>"#,
                y(b.min),
                y(b.max),
                cx - bw * 0.15,
                y(b.min),
                bw * 0.3,
                cx - bw * 0.15,
                y(b.max),
                bw * 0.3
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + gw / 2.0,
            top + ph + 18.0,
            esc(name)
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{left}" x2="{left}" y1="{top}" y2="{}" stroke="black"/>"#,
        top + ph
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left}" x2="{}" y1="{y0}" y2="{y0}" stroke="black"/>"#,
        left + pw,
        y0 = top + ph
    );
    legend_row(&mut s, &legend, left, h - 40.0);
    s.push_str("</svg>\n");
    s
}

fn legend_row(s: &mut String, names: &[String], x0: f64, y: f64) {
    let mut x = x0;
    for name in names {
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{y:.1}">{}</text>"#,
            y - 10.0,
            colour(name),
            x + 16.0,
            esc(name)
        );
        x += 28.0 + 7.0 * name.len() as f64;
    }
}

/// One CDF line: (percentile 0-100, latency in µs) points in increasing percentile order.
#[derive(Clone, Debug)]
pub struct Line {
    /// Series name.
    pub series: String,
    /// The points.
    pub points: Vec<(f64, f64)>,
}

/// The percentiles at which to sample a CDF up to `max_nines` (4 = 99.99%), evenly spaced in "nines".
pub fn cdf_percentiles(max_nines: f64) -> Vec<f64> {
    let steps = (max_nines * 20.0).ceil() as usize;
    (0..=steps)
        .map(|i| 100.0 * (1.0 - 10f64.powf(-(i as f64) / 20.0)))
        .collect()
}

fn nines(p: f64) -> f64 {
    -(1.0 - (p / 100.0).min(0.999_999_9)).log10()
}

/// A latency CDF: x is the percentile on a "nines" scale (90%, 99%, 99.9% equally spaced), y is latency on a
/// log scale.
pub fn cdf_chart(title: &str, lines: &[Line]) -> String {
    let (w, h) = (960.0, 480.0);
    let (left, right, top, bottom) = (80.0, 40.0, 40.0, 90.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let all = lines.iter().flat_map(|l| l.points.iter());
    // (Less a hair, so that 99.999% computed in floating point is 5 nines, not a sixth.)
    let xmax = (all.clone().map(|p| nines(p.0)).fold(1.0, f64::max) - 1e-6).ceil();
    let vmin = all
        .clone()
        .map(|p| p.1)
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let vmax = all.map(|p| p.1).fold(0.0, f64::max);
    let (lo, hi) = if vmin.is_finite() && vmax > 0.0 {
        (
            10f64.powf(vmin.log10().floor()),
            10f64.powf(vmax.log10().ceil().max(vmin.log10().floor() + 1.0)),
        )
    } else {
        (1.0, 10.0)
    };
    let x = |p: f64| left + nines(p) / xmax * pw;
    let y = |v: f64| top + ph - (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10()) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    let mut decade = lo;
    while decade < hi * 1.001 {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v > hi * 1.001 {
                break;
            }
            let yy = y(v);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="{}"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + pw,
                if m == 1.0 { "#ccc" } else { "#eee" },
                left - 6.0,
                yy + 4.0,
                short_number(v)
            );
        }
        decade *= 10.0;
    }
    for k in 0..=(xmax as usize) {
        let p = 100.0 * (1.0 - 10f64.powi(-(k as i32)));
        let xx = left + k as f64 / xmax * pw;
        let label = if k == 0 {
            "0%".to_owned()
        } else {
            format!("{}%", trim_float(p))
        };
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{top}" y2="{}" stroke="#ddd"/><text x="{xx:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            top + ph,
            top + ph + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        left + pw / 2.0,
        top + ph + 40.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">latency (µs, log scale)</text>"#,
        top + ph / 2.0
    );
    let mut names = Vec::new();
    for l in lines {
        names.push(l.series.clone());
        let pts: Vec<String> = l
            .points
            .iter()
            .map(|&(p, v)| format!("{:.1},{:.1}", x(p), y(v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
            colour(&l.series),
            pts.join(" "),
            esc(&l.series)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    legend_row(&mut s, &names, left, h - 20.0);
    s.push_str("</svg>\n");
    s
}

fn trim_float(v: f64) -> String {
    trim_zeros(format!("{v:.4}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_and_numbers() {
        assert_eq!(nice_axis(47_000.0), (50_000.0, 10_000.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        assert_eq!(short_number(12_345.0), "12.3k");
        assert_eq!(short_number(20_000.0), "20k");
        assert_eq!(short_number(2_500_000.0), "2.5M");
        assert_eq!(short_number(7.25), "7.2");
        assert_eq!(trim_float(99.9), "99.9");
    }

    #[test]
    fn charts_are_well_formed() {
        let bars = vec![(
            "h1-c50".to_owned(),
            vec![Bar {
                series: "nginx".into(),
                value: 10.0,
                min: 9.0,
                max: 11.0,
            }],
        )];
        let svg = bar_chart("t <&>", "req/s", &bars);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n") && svg.contains("t &lt;&amp;&gt;"));
        let pts = cdf_percentiles(3.0);
        assert_eq!(pts.len(), 61);
        assert!((pts[20] - 90.0).abs() < 1e-9);
        let line = Line {
            series: "direct".into(),
            points: pts.iter().map(|p| (*p, 50.0 + p)).collect(),
        };
        let svg = cdf_chart("cdf", &[line]);
        assert!(svg.contains("<polyline") && svg.contains("99.9%"));
    }
}
