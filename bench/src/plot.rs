//! Drawing `oxccl perf` rows as an SVG chart (plotters): bus bandwidth against size, or for
//! sendrecv the latency percentiles against size; one line per run.

use std::path::Path;

use plotters::prelude::*;

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its name in the legend.
    pub name: String,
    /// (size in bytes, value) points, by size.
    pub points: Vec<(f64, f64)>,
}

/// A row of `oxccl perf --csv` output, as plotted.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvRow {
    /// The operation (all_reduce, sendrecv, ...).
    pub op: String,
    /// Bytes.
    pub bytes: f64,
    /// Bus bandwidth, GB/s.
    pub busbw: f64,
    /// p50, p99, p99.9 in microseconds (sendrecv rows).
    pub lat: Option<[f64; 3]>,
    /// The `api` column of `--api both` rows.
    pub api: Option<String>,
}

/// The rows of `oxccl perf --csv` output (lines may carry a launcher's `[rank] ` prefix;
/// other lines are skipped).
pub fn parse_csv(text: &str) -> Vec<CsvRow> {
    let mut header: Option<Vec<String>> = None;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split_once("] ").filter(|_| line.starts_with('[')).map_or(line, |(_, l)| l);
        let f: Vec<&str> = line.trim().split(',').collect();
        if f.first() == Some(&"op") {
            header = Some(f.iter().map(|s| s.to_string()).collect());
            continue;
        }
        let Some(h) = &header else { continue };
        if f.len() != h.len() {
            continue;
        }
        let col = |name: &str| h.iter().position(|c| c == name).map(|i| f[i]);
        let num = |name: &str| col(name).and_then(|v| v.parse::<f64>().ok());
        let (Some(bytes), Some(busbw)) = (num("size_bytes"), num("busbw_gbs")) else { continue };
        let lat = match (num("p50_us"), num("p99_us"), num("p999_us")) {
            (Some(a), Some(b), Some(c)) => Some([a, b, c]),
            _ => None,
        };
        out.push(CsvRow { op: f[0].to_string(), bytes, busbw, lat, api: col("api").map(str::to_string) });
    }
    out
}

/// Lines from runs of rows: bus bandwidth per run (and per api), or for sendrecv rows the
/// three percentiles per run.
pub fn series_of(runs: &[(String, Vec<CsvRow>)]) -> (Vec<Series>, bool) {
    let latency = runs.iter().flat_map(|(_, r)| r).all(|r| r.lat.is_some()) && runs.iter().any(|(_, r)| !r.is_empty());
    let mut out: Vec<Series> = Vec::new();
    let mut add = |name: String, x: f64, y: f64| match out.iter_mut().find(|s| s.name == name) {
        Some(s) => s.points.push((x, y)),
        None => out.push(Series { name, points: vec![(x, y)] }),
    };
    for (run, rows) in runs {
        for r in rows {
            let base = match &r.api {
                Some(api) => format!("{run} {api}"),
                None => run.clone(),
            };
            match r.lat {
                Some(l) if latency => {
                    for (q, v) in ["p50", "p99", "p99.9"].iter().zip(l) {
                        add(format!("{base} {q}"), r.bytes, v);
                    }
                }
                _ => add(base, r.bytes, r.busbw),
            }
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    (out, latency)
}

/// Draws `series` to the SVG file `path`: size on a log axis; latency (µs, log axis) when
/// `latency`, else bus bandwidth (GB/s).
pub fn draw(path: &Path, title: &str, series: &[Series], latency: bool) -> Result<(), String> {
    let pts = || series.iter().flat_map(|s| s.points.iter().copied());
    if pts().next().is_none() {
        return Err("nothing to plot: no rows".into());
    }
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let (xmin, xmax) = pts().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(x), b.max(x)));
    let (ymin, ymax) = pts().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| (a.min(y), b.max(y)));
    let xr = (xmin.max(1.0) / 1.5)..(xmax.max(1.0) * 1.5);
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 18)).margin(16).x_label_area_size(44).y_label_area_size(64);
    let fmt_size = |x: &f64| {
        let x = *x;
        match x {
            x if x >= (1u64 << 30) as f64 => format!("{:.0}G", x / (1u64 << 30) as f64),
            x if x >= (1 << 20) as f64 => format!("{:.0}M", x / (1 << 20) as f64),
            x if x >= 1024.0 => format!("{:.0}K", x / 1024.0),
            x => format!("{x:.0}"),
        }
    };
    let colors = |i: usize| Palette99::pick(i).stroke_width(2);
    macro_rules! lines {
        ($chart:expr, $ydesc:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("message size (bytes)")
                .y_desc($ydesc)
                .x_label_formatter(&fmt_size)
                .draw()
                .map_err(|e| err(&e))?;
            for (i, s) in series.iter().enumerate() {
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), colors(i)))
                    .map_err(|e| err(&e))?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colors(i)));
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, colors(i).filled())))
                    .map_err(|e| err(&e))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    if latency {
        let yr = (ymin.max(1e-3) / 1.5)..(ymax.max(1e-3) * 1.5);
        lines!(
            b.build_cartesian_2d(xr.log_scale(), yr.log_scale()).map_err(|e| err(&e))?,
            "latency per iteration (us)"
        );
    } else {
        let yr = 0.0..(ymax.max(1e-6) * 1.1);
        lines!(b.build_cartesian_2d(xr.log_scale(), yr).map_err(|e| err(&e))?, "bus bandwidth (GB/s)");
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "[0] op,ranks,size_bytes,count,type,redop,root,time_us,algbw_gbs,busbw_gbs,wrong\n\
                       [0] all_reduce,2,8,2,float,sum,-1,0.350,0.023,0.023,0\n\
                       [0] all_reduce,2,1048576,262144,float,sum,-1,150.0,6.99,6.99,0\n\
                       [1] noise\n";

    #[test]
    fn csv_rows_become_lines_and_a_chart() {
        let rows = parse_csv(CSV);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[1].bytes, rows[1].busbw, rows[1].lat), (1048576.0, 6.99, None));
        let sr = "op,ranks,size_bytes,count,type,redop,root,time_us,algbw_gbs,busbw_gbs,wrong,p50_us,p99_us,p999_us\n\
                  sendrecv,2,65536,16384,float,none,-1,7.0,9.0,9.0,0,6.9,8.0,20.0\n";
        let (lines, latency) = series_of(&[("a".into(), rows), ("b".into(), parse_csv(sr))]);
        // Mixed runs (one without percentiles) plot bandwidth.
        assert!(!latency);
        assert_eq!(lines.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let (lat, latency) = series_of(&[("b".into(), parse_csv(sr))]);
        assert!(latency);
        assert_eq!(lat.len(), 3);
        assert_eq!(lat[1].points, [(65536.0, 8.0)]);
        let path = std::env::temp_dir().join(format!("oxccl-plot-{}.svg", std::process::id()));
        draw(&path, "test", &lines, false).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        // Labels are text elements of their own line.
        assert!(svg.starts_with("<svg") && svg.contains("bus bandwidth") && svg.contains("\na\n"), "{}", &svg[..200]);
        assert!(draw(&path, "empty", &[], false).unwrap_err().contains("nothing to plot"));
    }
}
