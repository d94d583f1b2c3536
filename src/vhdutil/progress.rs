//! Progress display for long operations (coalesce, fill, copy).
//!
//! Two styles:
//! - [`Style::Tty`]: qemu-img `-p` style, `    (42.00/100%)` redrawn with `\r`, written to
//!   stderr only when stderr is a terminal, so scripted use (stdout parsed by SM and
//!   xenmgr) stays byte-identical to blktap's;
//! - [`Style::Blktap`]: what blktap's `coalesce -p` prints on stdout (`\r%6.2f%%` per
//!   block, then `\r100.00%\n`), used only when asked for with `-p`.

use std::io::Write;

use super::Io;
use crate::image::vhd::ops::ProgressFn;
use crate::image::ImageError;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Nothing.
    Silent,
    /// qemu-img style on the given (terminal) stream.
    Tty,
    /// blktap `coalesce -p` style on stdout.
    Blktap,
}

/// A progress reporter over `total` units.
pub struct Progress {
    style: Style,
    total: u64,
    last_hundredths: Option<u64>,
}

impl Progress {
    pub fn new(style: Style, total: u64) -> Self {
        Progress {
            style,
            total,
            last_hundredths: None,
        }
    }

    /// Percentage (0..=100) of `done` units, as hundredths of a percent.
    fn hundredths(&self, done: u64) -> u64 {
        if self.total == 0 {
            return 10_000;
        }
        let done = done.min(self.total);
        // u128: done * 10000 can exceed u64 for huge totals.
        ((u128::from(done) * 10_000) / u128::from(self.total)) as u64
    }

    /// Report that `done` units are complete. `out` is stdout (Blktap) or the terminal
    /// stream (Tty). Redraws only when the shown value changes.
    pub fn update(&mut self, out: &mut dyn Write, done: u64) {
        let h = self.hundredths(done);
        match self.style {
            Style::Silent => {}
            Style::Blktap => {
                // blktap prints before every block, even if unchanged.
                let _ = write!(out, "\r{:6.2}%", h as f64 / 100.0);
                let _ = out.flush();
            }
            Style::Tty => {
                if self.last_hundredths != Some(h) {
                    let _ = write!(out, "    ({:.2}/100%)\r", h as f64 / 100.0);
                    let _ = out.flush();
                }
            }
        }
        self.last_hundredths = Some(h);
    }

    /// The operation completed: draw the final state.
    pub fn finish(&mut self, out: &mut dyn Write) {
        match self.style {
            Style::Silent => {}
            Style::Blktap => {
                let _ = writeln!(out, "\r100.00%");
            }
            Style::Tty => {
                let _ = writeln!(out, "    (100.00/100%)");
            }
        }
        let _ = out.flush();
    }
}

/// Progress reporting for the data commands: blktap style on stdout when asked (`-p`),
/// else qemu-img style on stderr when that is a terminal.
pub fn progress_style(io: &Io, blktap_flag: bool) -> Style {
    if blktap_flag {
        Style::Blktap
    } else if io.err_is_tty {
        Style::Tty
    } else {
        Style::Silent
    }
}

/// Draw progress on the stream its style uses.
fn draw(io: &mut Io, p: &mut Progress, style: Style, done: u64) {
    match style {
        Style::Blktap => p.update(io.out, done),
        _ => p.update(io.err, done),
    }
}

/// Finish progress on the stream its style uses.
fn finish(io: &mut Io, p: &mut Progress, style: Style) {
    match style {
        Style::Blktap => p.finish(io.out),
        _ => p.finish(io.err),
    }
}

/// Run `op` with a progress hook drawing in `style` (the [`Progress`] is sized by the
/// first report); on success the final state is drawn.
pub fn with_progress<T>(
    io: &mut Io,
    style: Style,
    op: impl FnOnce(ProgressFn<'_>) -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    let mut prog: Option<Progress> = None;
    let r = op(&mut |done, total| {
        let p = prog.get_or_insert_with(|| Progress::new(style, total));
        draw(io, p, style, done);
    });
    if r.is_ok() {
        let mut p = prog.unwrap_or_else(|| Progress::new(style, 0));
        finish(io, &mut p, style);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tty_style_redraws_only_on_change() {
        let mut p = Progress::new(Style::Tty, 200);
        let mut out = Vec::new();
        p.update(&mut out, 0);
        p.update(&mut out, 0);
        p.update(&mut out, 84);
        p.finish(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "    (0.00/100%)\r    (42.00/100%)\r    (100.00/100%)\n"
        );
    }

    #[test]
    fn blktap_style_matches_printf_format() {
        let mut p = Progress::new(Style::Blktap, 3);
        let mut out = Vec::new();
        p.update(&mut out, 0);
        p.update(&mut out, 1);
        p.finish(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\r  0.00%\r 33.33%\r100.00%\n"
        );
    }

    #[test]
    fn silent_writes_nothing_and_huge_totals_do_not_overflow() {
        let mut p = Progress::new(Style::Silent, u64::MAX);
        let mut out = Vec::new();
        p.update(&mut out, u64::MAX / 2);
        p.finish(&mut out);
        assert!(out.is_empty());
        assert_eq!(p.hundredths(u64::MAX / 2), 4999);
    }
}
