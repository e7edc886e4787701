//! Progress of a transfer on stderr: on a terminal a bar per file and a total
//! (indicatif) with rate and ETA; otherwise a plain line every few seconds;
//! nothing at all when logging is quieter than `info` (`-q`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;

/// How often a plain progress line is printed when stderr is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// indicatif bars (stderr is a terminal).
    Bars,
    /// A log line every [`LINE_EVERY`].
    Lines,
    /// No progress output.
    Off,
}

impl Mode {
    /// Picks the mode from the terminal and the log level (`-q` turns it off).
    pub fn detect() -> Mode {
        if tracing::level_filters::LevelFilter::current() < tracing::Level::INFO {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            Mode::Bars
        } else {
            Mode::Lines
        }
    }
}

/// Progress of a whole `send`: a total bar plus one bar per file.
pub struct Progress {
    mode: Mode,
    multi: Option<MultiProgress>,
    total: Option<ProgressBar>,
}

impl Progress {
    /// Starts progress for `total_bytes` (unknown when a stream has no size).
    pub fn new(mode: Mode, total_bytes: Option<u64>) -> Progress {
        if mode != Mode::Bars {
            return Progress {
                mode,
                multi: None,
                total: None,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let total = multi.add(match total_bytes {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::no_length(),
        });
        total.set_style(style("total"));
        Progress {
            mode,
            multi: Some(multi),
            total: Some(total),
        }
    }

    /// Starts the bar (or line ticker) of one file, `already` bytes of `size` done.
    pub fn file(&self, name: &str, size: Option<u64>, already: u64) -> FileProgress {
        let bar = self.multi.as_ref().map(|m| {
            let b = m.insert_before(
                self.total.as_ref().expect("bars have a total"),
                match size {
                    Some(n) => ProgressBar::new(n),
                    None => ProgressBar::no_length(),
                },
            );
            b.set_style(style("file"));
            b.set_message(name.to_string());
            b.set_position(already);
            b
        });
        if let Some(t) = &self.total {
            t.inc(already);
        }
        FileProgress {
            lines: self.mode == Mode::Lines,
            bar,
            total: self.total.clone(),
            name: name.to_string(),
            size,
            done: already,
            base: already,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    /// Clears the total bar at the end.
    pub fn finish(&self) {
        if let Some(t) = &self.total {
            t.finish_and_clear();
        }
    }
}

fn style(kind: &str) -> ProgressStyle {
    let t = if kind == "total" {
        "{prefix:.bold}total {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}"
    } else {
        "{wide_msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}"
    };
    ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// Progress of one file.
pub struct FileProgress {
    lines: bool,
    bar: Option<ProgressBar>,
    total: Option<ProgressBar>,
    name: String,
    size: Option<u64>,
    done: u64,
    base: u64,
    started: Instant,
    last_line: Instant,
}

impl FileProgress {
    /// Records `n` more bytes sent.
    pub fn inc(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if let Some(t) = &self.total {
            t.inc(n);
        }
        if self.lines && self.last_line.elapsed() >= LINE_EVERY {
            self.last_line = Instant::now();
            let secs = self.started.elapsed().as_secs_f64();
            let of = match self.size {
                Some(s) if s > 0 => {
                    format!(" of {s} ({:.0}%)", self.done as f64 * 100.0 / s as f64)
                }
                _ => String::new(),
            };
            info!(
                "sending {}: {} bytes{of}, {:.1} MB/s",
                self.name,
                self.done,
                super::report::rate(self.done - self.base, secs)
            );
        }
    }

    /// Removes the bar.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
