//! Figures: collected over several runs, printed as a table or as JSON lines.

use serde::Serialize;

/// One measured figure over several runs.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable name tools read, e.g. `bus.publish.fsync.c64`.
    pub figure: String,
    /// Unit of the values.
    pub unit: String,
    /// Median of the runs.
    pub median: f64,
    /// Smallest run.
    pub min: f64,
    /// Largest run.
    pub max: f64,
    /// Number of runs.
    pub runs: usize,
    /// What it is compared with in this run, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Figure {
    /// A figure from the values of each run.
    pub fn from_runs(name: &str, unit: &str, mut values: Vec<f64>) -> Figure {
        values.sort_by(|a, b| a.total_cmp(b));
        let n = values.len();
        let median = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Figure {
            figure: name.to_string(),
            unit: unit.to_string(),
            median,
            min: values.first().copied().unwrap_or(0.0),
            max: values.last().copied().unwrap_or(0.0),
            runs: n,
            note: None,
        }
    }

    /// Adds a note (e.g. the ratio to the raw peer).
    pub fn with_note(mut self, note: impl Into<String>) -> Figure {
        self.note = Some(note.into());
        self
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        let s = format!("{v:.0}");
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Prints figures as an aligned table.
pub fn print_table(figures: &[Figure]) {
    let rows: Vec<[String; 6]> = figures
        .iter()
        .map(|f| {
            [
                f.figure.clone(),
                fmt(f.median),
                format!("{}–{}", fmt(f.min), fmt(f.max)),
                f.unit.clone(),
                f.runs.to_string(),
                f.note.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let head = ["figure", "median", "range", "unit", "runs", "compared with"];
    let mut w = head.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        format!(
            "{:<w0$}  {:>w1$}  {:>w2$}  {:<w3$}  {:>w4$}  {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4]
        )
    };
    println!("{}", line(head));
    println!("{}", "-".repeat(w.iter().sum::<usize>() + 12));
    for r in &rows {
        println!("{}", line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]));
    }
}

/// Prints one JSON object per line per figure.
pub fn print_json(figures: &[Figure]) {
    for f in figures {
        match serde_json::to_string(f) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("cannot encode figure {}: {e}", f.figure),
        }
    }
}

/// Runs this benchmark program again with `args` (a hidden child subcommand) and returns
/// the peak RSS it printed on a line `RSS_KB <n>`: memory figures are measured in a fresh
/// process, so nothing the parent allocated counts.
pub async fn child_peak_rss_kb(
    args: &[&std::ffi::OsStr],
) -> Result<f64, Box<dyn std::error::Error + Send + Sync>> {
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "bench child {:?} failed: {}\n{}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("RSS_KB "))
        .ok_or("the bench child printed no RSS")?
        .trim()
        .parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let f = Figure::from_runs("x", "msg/s", vec![3.0, 1.0, 2.0]);
        assert_eq!((f.median, f.min, f.max, f.runs), (2.0, 1.0, 3.0, 3));
        let f = Figure::from_runs("x", "msg/s", vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!(f.median, 2.5);
        assert_eq!(fmt(1234567.0), "1,234,567");
    }
}
