//! Evaluation plots, each written as PNG and SVG with the same content:
//!
//! - [`plot_scenario`]: one scenario, CPU per packet against p99 latency (log x), one point per
//!   policy with 95% CI error bars both ways, the best policy ringed, the SLO as a dashed line
//!   (only where the scenario has latency-sensitive flows: bulk flows' latency is not held to
//!   it). A policy that violates the SLO (or drops more than 0.1%) is a hollow, crossed marker
//!   whose label gives its violation rate; a label that cannot sit next to its point is tied to
//!   it by a thin leader line.
//! - [`plot_summary`]: across scenarios, each policy's CPU per packet relative to a reference
//!   policy, as grouped bars; bars of violators are pale and hatched, the best bar is outlined and
//!   starred, and the reference line at 1.0 is drawn behind the bars.
//!
//! Text is rendered with DejaVu Sans embedded in the binary through plotters' `ab_glyph` font
//! backend, so no system font library is needed at run time (licence:
//! `agent/assets/fonts/LICENSE-DejaVuSans.txt`). A policy keeps its colour in every plot
//! ([`policy_color`]).

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One policy's aggregate on one scenario.
#[derive(Debug, Clone)]
pub struct PlotPoint {
    pub policy: String,
    /// Mean p99 latency, µs, and the 95% CI half-width over seeds.
    pub p99_us: f64,
    pub p99_ci: f64,
    /// Mean networking CPU per packet, µs, and its 95% CI half-width.
    pub cpu_us: f64,
    pub cpu_ci: f64,
    /// Whether this policy is marked best on the scenario.
    pub best: bool,
    /// Mean share of intervals over the SLO, and mean drop fraction.
    pub slo_violation_rate: f64,
    pub drop_rate: f64,
}

impl PlotPoint {
    /// Whether the policy misses the SLO: a violating interval, or drops above 0.1%.
    pub fn violates(&self) -> bool {
        !moderato_policies::best_static::Score {
            cpu_us_per_packet: self.cpu_us,
            slo_violation_rate: self.slo_violation_rate,
            drop_fraction: self.drop_rate,
        }
        .feasible()
    }

    /// What the miss is, for a label: `SLO ✗ 95%`, `drops 50%`.
    fn miss_note(&self) -> Option<String> {
        if !self.violates() {
            return None;
        }
        let mut parts = Vec::new();
        if self.slo_violation_rate > 0.0 {
            parts.push(format!("SLO ✗ {:.0}%", (100.0 * self.slo_violation_rate).max(1.0)));
        }
        if self.drop_rate > moderato_policies::best_static::MAX_DROP_FRACTION {
            parts.push(format!("drops {:.1}%", 100.0 * self.drop_rate));
        }
        Some(parts.join(", "))
    }
}

/// A plot that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot create plot directory {}: {err}", path.display())]
    CreateDir { path: PathBuf, err: std::io::Error },
    #[error("cannot draw plot {}: {message}", path.display())]
    Draw { path: PathBuf, message: String },
    #[error("the embedded plot font (DejaVu Sans) could not be loaded")]
    Font,
}

/// Size of every plot, pixels (the SVG uses the same user units).
pub const PLOT_SIZE: (u32, u32) = (1000, 700);

/// The font family name the embedded font is registered under. It is also plotters' default
/// family, so text plotters draws on its own (axis labels) uses it too.
const FAMILY: &str = "sans-serif";
static FONT_TTF: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

const TITLE_SIZE: f64 = 24.0;
const NOTE_SIZE: f64 = 14.0;
const TICK_SIZE: f64 = 15.0;
const AXIS_DESC_SIZE: f64 = 17.0;
const LABEL_SIZE: f64 = 15.0;
/// Height of the title block above the chart.
const HEADER_H: u32 = 62;

const INK: RGBColor = RGBColor(30, 30, 30);
const NOTE_INK: RGBColor = RGBColor(95, 95, 95);
const SLO_COLOR: RGBColor = RGBColor(200, 30, 30);
const GRID_BOLD: RGBColor = RGBColor(212, 212, 212);
const GRID_LIGHT: RGBColor = RGBColor(238, 238, 238);

/// Registers the embedded font with plotters, once per process.
fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT_TTF).is_ok());
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

// ---------------------------------------------------------------------------------------------
// Colours

/// Colours for the baselines the harness knows by name.
const FIXED_COLORS: &[(&str, RGBColor)] = &[
    ("per-packet", RGBColor(214, 39, 40)),
    ("dim", RGBColor(31, 119, 180)),
    ("itr", RGBColor(255, 127, 14)),
    ("best-static", RGBColor(44, 160, 44)),
    ("static:ixgbe", RGBColor(140, 86, 75)),
    ("static:mlx5", RGBColor(127, 127, 127)),
    ("static:moderate", RGBColor(188, 189, 34)),
    ("static:heavy", RGBColor(227, 119, 194)),
];

/// Other `static:*` settings: muted earth tones, picked by a hash of the name.
const STATIC_COLORS: &[RGBColor] = &[
    RGBColor(166, 118, 29),
    RGBColor(102, 102, 102),
    RGBColor(156, 158, 222),
    RGBColor(231, 186, 82),
    RGBColor(173, 73, 74),
    RGBColor(99, 121, 57),
    RGBColor(196, 156, 148),
    RGBColor(123, 65, 115),
];

/// Everything else (learned models): saturated colours distinct from the baselines.
const MODEL_COLORS: &[RGBColor] = &[
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
    RGBColor(197, 27, 125),
    RGBColor(57, 59, 121),
    RGBColor(0, 109, 44),
    RGBColor(217, 95, 2),
    RGBColor(102, 166, 30),
    RGBColor(230, 171, 2),
    RGBColor(27, 158, 119),
    RGBColor(117, 112, 179),
];

/// FNV-1a: a hash that is the same in every build and on every platform.
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The colour of a policy: the same name gets the same colour in every plot.
pub fn policy_color(policy: &str) -> RGBColor {
    if let Some((_, c)) = FIXED_COLORS.iter().find(|(n, _)| *n == policy) {
        return *c;
    }
    let palette = if policy.starts_with("static:") { STATIC_COLORS } else { MODEL_COLORS };
    palette[(stable_hash(policy) % palette.len() as u64) as usize]
}

/// A darker shade, for text in a policy's colour.
fn darker(c: RGBColor) -> RGBColor {
    let f = |v: u8| (f64::from(v) * 0.72) as u8;
    RGBColor(f(c.0), f(c.1), f(c.2))
}

// ---------------------------------------------------------------------------------------------
// Public entry points

/// Writes `<dir>/<stem>.png` and `<dir>/<stem>.svg`: CPU µs per packet (y) against p99 latency
/// µs (x, log scale), one point per policy with error bars both ways, labelled with the policy
/// name, the best marked (a ring and a star), violators hollow and crossed, and, when
/// `slo_applies` (the scenario has latency-sensitive flows), the SLO as a vertical line labelled
/// "SLO".
///
/// Points with a non-finite mean are skipped; a p99 of zero or less is drawn at the left edge
/// and labelled so; a non-finite or non-positive `slo_us` draws no SLO line.
pub fn plot_scenario(
    dir: &Path,
    stem: &str,
    title: &str,
    slo_us: f64,
    slo_applies: bool,
    points: &[PlotPoint],
) -> Result<(), PlotError> {
    write_figure(dir, stem, &ScenarioFigure { title, slo_us, slo_applies, points })
}

/// Writes `<dir>/<stem>.png` and `.svg`: across scenarios, each policy's mean CPU per packet
/// relative to a reference policy (`reference`, e.g. "dim"; 1.0 = same), as grouped bars (one
/// group per scenario, one bar per policy, a legend), with a horizontal line at 1.0. Scenarios
/// where the reference is missing (or has no positive finite CPU) are skipped. `rows` are
/// (scenario, points).
pub fn plot_summary(
    dir: &Path,
    stem: &str,
    reference: &str,
    rows: &[(String, Vec<PlotPoint>)],
) -> Result<(), PlotError> {
    write_figure(dir, stem, &SummaryFigure { reference, rows })
}

// ---------------------------------------------------------------------------------------------
// Plumbing shared by both figures

type DrawResult = Result<(), Box<dyn StdError>>;

/// Something drawable on any plotters backend.
trait Figure {
    fn draw<DB>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static;
}

fn write_figure(dir: &Path, stem: &str, fig: &impl Figure) -> Result<(), PlotError> {
    ensure_font()?;
    std::fs::create_dir_all(dir).map_err(|err| PlotError::CreateDir { path: dir.to_path_buf(), err })?;
    let draw_err = |path: &Path, e: Box<dyn StdError>| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };

    let png = dir.join(format!("{stem}.png"));
    {
        let root = BitMapBackend::new(&png, PLOT_SIZE).into_drawing_area();
        fig.draw(&root).and_then(|()| Ok(root.present()?)).map_err(|e| draw_err(&png, e))?;
    }
    let svg = dir.join(format!("{stem}.svg"));
    {
        let root = SVGBackend::new(&svg, PLOT_SIZE).into_drawing_area();
        fig.draw(&root).and_then(|()| Ok(root.present()?)).map_err(|e| draw_err(&svg, e))?;
    }
    Ok(())
}

fn font(size: f64) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&INK)
}

/// Title (centred) and a one-line note under it, in the top `HEADER_H` pixels.
fn draw_header<DB>(root: &DrawingArea<DB, Shift>, title: &str, note: &str) -> DrawResult
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let (w, _) = root.dim_in_pixel();
    let max_w = w.saturating_sub(40) as i32;
    let title_style = font(TITLE_SIZE).pos(Pos::new(HPos::Center, VPos::Top));
    let title = fit_text(root, title, &title_style, max_w)?;
    root.draw(&Text::new(title, (w as i32 / 2, 10), title_style))?;
    let note_style = font(NOTE_SIZE).color(&NOTE_INK).pos(Pos::new(HPos::Center, VPos::Top));
    let note = fit_text(root, note, &note_style, max_w)?;
    root.draw(&Text::new(note, (w as i32 / 2, 40), note_style))?;
    Ok(())
}

/// `text` shortened with an ellipsis in the middle (names that share a prefix usually differ at
/// the end) so that it is at most `max_w` pixels wide.
fn fit_text<DB>(
    root: &DrawingArea<DB, Shift>,
    text: &str,
    style: &TextStyle<'_>,
    max_w: i32,
) -> Result<String, Box<dyn StdError>>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    if root.estimate_text_size(text, style)?.0 as i32 <= max_w {
        return Ok(text.to_string());
    }
    let chars: Vec<char> = text.chars().collect();
    for keep in (1..chars.len()).rev() {
        let head = keep.div_ceil(2);
        let tail = keep - head;
        let s: String =
            chars[..head].iter().chain(['…'].iter()).chain(chars[chars.len() - tail..].iter()).collect();
        if root.estimate_text_size(&s, style)?.0 as i32 <= max_w {
            return Ok(s);
        }
    }
    Ok("…".to_string())
}

/// A CI half-width usable for drawing: non-finite becomes 0, negative its magnitude.
fn ci(v: f64) -> f64 {
    if v.is_finite() { v.abs() } else { 0.0 }
}

/// A tick label: plain decimals, trailing zeros trimmed; scientific when very large or small.
fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.0e}");
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_string() }
}

/// Decimals enough to tell apart ticks about `span / 5` apart.
fn decimals_for(span: f64) -> usize {
    if !(span.is_finite() && span > 0.0) {
        return 2;
    }
    (-(span / 5.0).log10()).ceil().clamp(0.0, 6.0) as usize
}

/// Tick values (bold) and minor grid values (light) for a log axis over `lo..hi` (lo > 0).
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let decades = (hi / lo).log10();
    let mantissas: &[f64] = if decades <= 1.3 {
        &[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    } else if decades <= 3.5 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0]
    };
    let first = lo.log10().floor() as i32 - 1;
    let last = hi.log10().ceil() as i32 + 1;
    let mut bold = Vec::new();
    let mut light = Vec::new();
    for e in first..=last {
        let base = 10f64.powi(e);
        for m in mantissas {
            let v = m * base;
            if v >= lo && v <= hi {
                bold.push(v);
            }
        }
        for m in 1..10 {
            let v = f64::from(m) * base;
            if v >= lo && v <= hi {
                light.push(v);
            }
        }
    }
    if bold.len() < 2 {
        // Narrower than the mantissas allow: evenly spaced ticks.
        let step = nice_step((hi - lo) / 4.0);
        let mut v = (lo / step).ceil() * step;
        bold.clear();
        while v <= hi {
            bold.push(v);
            v += step;
        }
        light = bold.clone();
    }
    (bold, light)
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * p).find(|s| *s >= raw).unwrap_or(10.0 * p)
}

/// A pixel rectangle: left, top, right, bottom.
#[derive(Debug, Clone, Copy)]
struct Rect {
    l: i32,
    t: i32,
    r: i32,
    b: i32,
}

impl Rect {
    fn overlap(&self, o: &Rect) -> i64 {
        let w = (self.r.min(o.r) - self.l.max(o.l)).max(0);
        let h = (self.b.min(o.b) - self.t.max(o.t)).max(0);
        i64::from(w) * i64::from(h)
    }
    /// Area of `self` outside `bounds`.
    fn outside(&self, bounds: &Rect) -> i64 {
        let area = i64::from(self.r - self.l) * i64::from(self.b - self.t);
        area - self.overlap(bounds)
    }
}

/// Where to put a `w`×`h` label `g` pixels away from the point at `(ax, ay)`: the first of a
/// list of spots around it that stays inside `bounds` and clear of `taken`, else the least bad
/// one (clamped into `bounds`).
fn place_label(ax: i32, ay: i32, (w, h): (i32, i32), g: i32, bounds: &Rect, taken: &[Rect]) -> Rect {
    let mut spots = vec![
        (ax + g, ay - h / 2),
        (ax - g - w, ay - h / 2),
        (ax - w / 2, ay - g - h),
        (ax - w / 2, ay + g),
        (ax + g - 2, ay - g - h + 2),
        (ax + g - 2, ay + g - 2),
        (ax - g - w + 2, ay - g - h + 2),
        (ax - g - w + 2, ay + g - 2),
    ];
    for k in 1..=8 {
        let d = k * (h + 3);
        spots.extend([
            (ax + g, ay - h / 2 - d),
            (ax + g, ay - h / 2 + d),
            (ax - g - w, ay - h / 2 - d),
            (ax - g - w, ay - h / 2 + d),
            (ax - w / 2, ay - g - h - d),
            (ax - w / 2, ay + g + d),
        ]);
    }
    let mut best: Option<(i64, Rect)> = None;
    for (x, y) in spots {
        let r = Rect { l: x, t: y, r: x + w, b: y + h };
        let cost = r.outside(bounds) * 50 + taken.iter().map(|t| r.overlap(t)).sum::<i64>();
        if cost == 0 {
            return r;
        }
        if best.is_none_or(|(c, _)| cost < c) {
            best = Some((cost, r));
        }
    }
    let mut r = best.map(|(_, r)| r).unwrap_or(Rect { l: ax, t: ay, r: ax + w, b: ay + h });
    let dx = (bounds.l - r.l).max(0) - (r.r - bounds.r).max(0);
    let dy = (bounds.t - r.t).max(0) - (r.b - bounds.b).max(0);
    r = Rect { l: r.l + dx, t: r.t + dy, r: r.r + dx, b: r.b + dy };
    r
}

/// The smallest rectangle holding two pixel points, grown by `pad` on every side.
fn span_rect((x0, y0): (i32, i32), (x1, y1): (i32, i32), pad: i32) -> Rect {
    Rect { l: x0.min(x1) - pad, t: y0.min(y1) - pad, r: x0.max(x1) + pad, b: y0.max(y1) + pad }
}

/// Diagonal hatching (45°, every 6 pixels) inside the pixel rectangle `r`.
fn hatch<DB>(root: &DrawingArea<DB, Shift>, r: Rect, color: RGBColor) -> DrawResult
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let h = r.b - r.t;
    if h <= 1 || r.r - r.l <= 1 {
        return Ok(());
    }
    // Lines y = b − (x − x0): from (x0, b) up and to the right, clipped to [l, r].
    let mut x0 = r.l - h;
    while x0 < r.r {
        let (xa, xb) = (x0.max(r.l), (x0 + h).min(r.r));
        if xa < xb {
            root.draw(&PathElement::new(
                vec![(xa, r.b - (xa - x0)), (xb, r.b - (xb - x0))],
                color.stroke_width(1),
            ))?;
        }
        x0 += 6;
    }
    Ok(())
}

fn pixel_bounds<DB: DrawingBackend, CT: CoordTranslate>(area: &DrawingArea<DB, CT>) -> Rect {
    let (xr, yr) = area.get_pixel_range();
    Rect { l: xr.start, t: yr.start, r: xr.end, b: yr.end }
}

// ---------------------------------------------------------------------------------------------
// The per-scenario scatter

struct ScenarioFigure<'a> {
    title: &'a str,
    slo_us: f64,
    slo_applies: bool,
    points: &'a [PlotPoint],
}

/// A point ready to draw: positions clamped for the log axis.
#[derive(Debug)]
struct ScatterPoint {
    label: String,
    color: RGBColor,
    best: bool,
    violates: bool,
    x: f64,
    y: f64,
    /// Horizontal error bar ends; `*_cut` when cut at the edge of the axis (drawn without a cap).
    x_lo: f64,
    x_hi: f64,
    x_lo_cut: bool,
    x_hi_cut: bool,
    y_lo: f64,
    y_hi: f64,
}

impl Figure for ScenarioFigure<'_> {
    fn draw<DB>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let note = if self.slo_applies {
            "error bars: 95% CI over seeds  ·  ★ and ring: best  ·  hollow ✕: misses the SLO  ·  dashed: p99 SLO"
        } else {
            "bulk flows only: their p99 is not held to the SLO  ·  error bars: 95% CI  ·  ★ and ring: best  ·  hollow ✕: drops"
        };
        draw_header(root, self.title, note)?;

        let valid: Vec<&PlotPoint> =
            self.points.iter().filter(|p| p.p99_us.is_finite() && p.cpu_us.is_finite()).collect();
        let slo = (self.slo_applies && self.slo_us.is_finite() && self.slo_us > 0.0).then_some(self.slo_us);

        // x range (log): the p99s and the SLO, widened by error bars up to 4x beyond. A p99 more
        // than four decades below the largest value (zero included) cannot be shown to scale on
        // a useful axis: it is drawn at the left edge and its label says so.
        let top = valid.iter().map(|p| p.p99_us).chain(slo).fold(0.0, f64::max);
        let floor = top / 1e4;
        let on_scale = |v: f64| v > 0.0 && v >= floor;
        let core: Vec<f64> = valid.iter().map(|p| p.p99_us).filter(|v| on_scale(*v)).chain(slo).collect();
        let (core_lo, core_hi) = if core.is_empty() {
            (10.0, 1000.0)
        } else {
            (core.iter().copied().fold(f64::INFINITY, f64::min), core.iter().copied().fold(0.0, f64::max))
        };
        let (mut lo, mut hi) = (core_lo, core_hi);
        for p in &valid {
            let c = ci(p.p99_ci);
            if !on_scale(p.p99_us) {
                lo = lo.min(core_lo / 2.0);
                continue;
            }
            let l = p.p99_us - c;
            lo = lo.min(if l > 0.0 { l.max(core_lo / 4.0) } else { core_lo / 4.0 });
            hi = hi.max((p.p99_us + c).min(core_hi * 4.0));
        }
        if hi / lo < 3.0 {
            let mid = (lo * hi).sqrt();
            lo = mid / 3f64.sqrt();
            hi = mid * 3f64.sqrt();
        }
        let (x_min, x_max) = (lo / 1.3, hi * 1.3);

        let pts: Vec<ScatterPoint> = valid
            .iter()
            .map(|p| {
                let mut label = p.policy.clone();
                let (x, x_lo, x_hi) = if on_scale(p.p99_us) {
                    let c = ci(p.p99_ci);
                    (p.p99_us, p.p99_us - c, p.p99_us + c)
                } else {
                    label.push_str(if p.p99_us <= 0.0 { " (p99 = 0)" } else { " (p99 ≈ 0)" });
                    (lo, lo, lo)
                };
                if p.best {
                    label.push_str(" ★");
                }
                if let Some(m) = p.miss_note() {
                    label.push_str(&format!(" ({m})"));
                }
                let cy = ci(p.cpu_ci);
                ScatterPoint {
                    label,
                    color: policy_color(&p.policy),
                    best: p.best,
                    violates: p.violates(),
                    x,
                    y: p.cpu_us,
                    x_lo: x_lo.max(x_min),
                    x_hi: x_hi.min(x_max),
                    x_lo_cut: x_lo < x_min,
                    x_hi_cut: x_hi > x_max,
                    y_lo: p.cpu_us - cy,
                    y_hi: p.cpu_us + cy,
                }
            })
            .collect();

        // y range (linear), starting at 0 when everything is non-negative and close enough.
        let (mut y_min, mut y_max) =
            pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.y_lo), b.max(p.y_hi)));
        if pts.is_empty() {
            (y_min, y_max) = (0.0, 1.0);
        }
        let span = y_max - y_min;
        let pad = if span > 1e-12 { span * 0.1 } else { (y_max.abs() * 0.2).max(0.1) };
        let nonneg = y_min >= 0.0;
        y_min -= pad;
        y_max += pad * 1.5; // room above for labels and the SLO tag
        if nonneg && (y_min < 0.0 || y_min < 0.25 * y_max) {
            y_min = 0.0;
        }
        let y_dec = decimals_for(y_max - y_min);

        let body = root.margin(HEADER_H, 10, 10, 30);
        let (ticks, minor) = log_ticks(x_min, x_max);
        let mut chart =
            ChartBuilder::on(&body).x_label_area_size(58).y_label_area_size(88).build_cartesian_2d(
                (x_min..x_max).log_scale().with_key_points(ticks).with_light_points(minor),
                y_min..y_max,
            )?;
        let x_fmt = |v: &f64| fmt_tick(*v);
        let y_fmt = |v: &f64| format!("{v:.y_dec$}");
        chart
            .configure_mesh()
            .x_desc(if self.slo_applies {
                "p99 latency of the latency-sensitive flows (µs, log scale)"
            } else {
                "p99 latency of all flows (µs, log scale)"
            })
            .y_desc("CPU per packet (µs)")
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .y_labels(9)
            .label_style(font(TICK_SIZE))
            .axis_desc_style(font(AXIS_DESC_SIZE))
            .bold_line_style(GRID_BOLD)
            .light_line_style(GRID_LIGHT)
            .y_max_light_lines(1)
            .axis_style(INK.mix(0.8))
            .draw()?;

        let bounds = pixel_bounds(chart.plotting_area());
        let mut taken: Vec<Rect> = Vec::new();

        if let Some(slo) = slo {
            chart.draw_series(DashedLineSeries::new(
                [(slo, y_min), (slo, y_max)],
                10,
                6,
                SLO_COLOR.stroke_width(2),
            ))?;
            let style = font(LABEL_SIZE).color(&SLO_COLOR);
            let text = format!("SLO {} µs", fmt_tick(slo));
            let (w, h) = root.estimate_text_size(&text, &style)?;
            let (sx, _) = chart.backend_coord(&(slo, y_max));
            let (w, h) = (w as i32, h as i32);
            let left = if sx + 6 + w <= bounds.r - 4 { sx + 6 } else { sx - 6 - w };
            let r = Rect { l: left, t: bounds.t + 6, r: left + w, b: bounds.t + 6 + h };
            root.draw(&Text::new(text, (r.l, r.t), style))?;
            taken.push(r);
            taken.push(Rect { l: sx - 2, t: bounds.t, r: sx + 2, b: bounds.b });
        }

        // Error bars, then markers, so every marker sits on top of every bar.
        for p in &pts {
            let style = p.color.mix(0.85).stroke_width(2);
            let area = chart.plotting_area();
            area.draw(&PathElement::new(vec![(p.x_lo, p.y), (p.x_hi, p.y)], style))?;
            area.draw(&PathElement::new(vec![(p.x, p.y_lo), (p.x, p.y_hi)], style))?;
            let at = |c: (f64, f64)| chart.backend_coord(&c);
            taken.push(span_rect(at((p.x_lo, p.y)), at((p.x_hi, p.y)), 3));
            taken.push(span_rect(at((p.x, p.y_lo)), at((p.x, p.y_hi)), 3));
            let caps = [
                ((p.x_lo, p.y), true, p.x_lo < p.x && !p.x_lo_cut),
                ((p.x_hi, p.y), true, p.x_hi > p.x && !p.x_hi_cut),
                ((p.x, p.y_lo), false, p.y_lo < p.y),
                ((p.x, p.y_hi), false, p.y_hi > p.y),
            ];
            for (at, vertical, show) in caps {
                if show {
                    let seg = if vertical { vec![(0, -5), (0, 5)] } else { vec![(-5, 0), (5, 0)] };
                    area.draw(&(EmptyElement::at(at) + PathElement::new(seg, style)))?;
                }
            }
        }
        // Violators first, so a policy that meets the SLO is never hidden under one.
        let mut order: Vec<&ScatterPoint> = pts.iter().collect();
        order.sort_by_key(|p| (!p.violates, p.best));
        for p in order {
            let area = chart.plotting_area();
            if p.violates {
                // Hollow and crossed: reads as "misses the SLO" in colour and in grey print.
                area.draw(&Circle::new((p.x, p.y), 7, WHITE.filled()))?;
                area.draw(&Circle::new((p.x, p.y), 7, darker(p.color).stroke_width(2)))?;
                let cross = darker(p.color).stroke_width(2);
                area.draw(&(EmptyElement::at((p.x, p.y)) + PathElement::new(vec![(-5, -5), (5, 5)], cross)))?;
                area.draw(&(EmptyElement::at((p.x, p.y)) + PathElement::new(vec![(-5, 5), (5, -5)], cross)))?;
            } else {
                area.draw(&Circle::new((p.x, p.y), 6, p.color.filled()))?;
                area.draw(&Circle::new((p.x, p.y), 6, darker(p.color).stroke_width(1)))?;
            }
            if p.best {
                area.draw(&Circle::new((p.x, p.y), 12, INK.stroke_width(2)))?;
            }
            let (px, py) = chart.backend_coord(&(p.x, p.y));
            let r = if p.best { 13 } else { 7 };
            taken.push(Rect { l: px - r, t: py - r, r: px + r, b: py + r });
        }

        // Labels last, on a faint white box so grid and bars do not cross the letters.
        let style = font(LABEL_SIZE);
        let max_w = (bounds.r - bounds.l) / 2;
        for p in &pts {
            let ink = darker(p.color);
            let style = style.color(&ink);
            let text = fit_text(root, &p.label, &style, max_w)?;
            let (w, h) = root.estimate_text_size(&text, &style)?;
            let (px, py) = chart.backend_coord(&(p.x, p.y));
            let gap = if p.best { 17 } else { 11 };
            let r = place_label(px, py, (w as i32, h as i32), gap, &bounds, &taken);
            // A label pushed away from its point is tied to it.
            let (nx, ny) = (px.clamp(r.l, r.r), py.clamp(r.t, r.b));
            if (nx - px).pow(2) + (ny - py).pow(2) > (gap + 6).pow(2) {
                let d = f64::from(((nx - px).pow(2) + (ny - py).pow(2)) as u32).sqrt().max(1.0);
                let start = (
                    px + (f64::from(nx - px) * f64::from(gap - 3) / d) as i32,
                    py + (f64::from(ny - py) * f64::from(gap - 3) / d) as i32,
                );
                root.draw(&PathElement::new(vec![start, (nx, ny)], ink.mix(0.7).stroke_width(1)))?;
            }
            root.draw(&Rectangle::new([(r.l - 2, r.t - 1), (r.r + 2, r.b + 2)], WHITE.mix(0.75).filled()))?;
            root.draw(&Text::new(text, (r.l, r.t), style))?;
            taken.push(r);
        }

        if pts.is_empty() {
            let style = font(20.0).color(&NOTE_INK).pos(Pos::new(HPos::Center, VPos::Center));
            let c = ((bounds.l + bounds.r) / 2, (bounds.t + bounds.b) / 2);
            root.draw(&Text::new("no data", c, style))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The cross-scenario summary

struct SummaryFigure<'a> {
    reference: &'a str,
    rows: &'a [(String, Vec<PlotPoint>)],
}

/// One bar: CPU relative to the reference, and its CI half-width on the same scale.
#[derive(Debug, Clone, Copy)]
struct Bar {
    ratio: f64,
    ci: f64,
    best: bool,
    violates: bool,
}

impl Figure for SummaryFigure<'_> {
    fn draw<DB>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let reference = self.reference;

        // Scenarios that have the reference with a usable CPU figure, and the policies in order
        // of first appearance.
        let mut groups: Vec<(&str, Vec<(&str, Bar)>)> = Vec::new();
        let mut policies: Vec<&str> = Vec::new();
        for (scenario, points) in self.rows {
            let Some(ref_cpu) = points
                .iter()
                .find(|p| p.policy == reference)
                .map(|p| p.cpu_us)
                .filter(|c| c.is_finite() && *c > 0.0)
            else {
                continue;
            };
            let mut bars = Vec::new();
            for p in points {
                let ratio = p.cpu_us / ref_cpu;
                if !ratio.is_finite() {
                    continue;
                }
                if !policies.contains(&p.policy.as_str()) {
                    policies.push(&p.policy);
                }
                bars.push((
                    p.policy.as_str(),
                    Bar { ratio, ci: ci(p.cpu_ci) / ref_cpu, best: p.best, violates: p.violates() },
                ));
            }
            groups.push((scenario, bars));
        }

        draw_header(
            root,
            &format!("CPU per packet relative to {reference}, by scenario"),
            &format!(
                "dashed: {reference} = 1.0, lower is cheaper  ·  hatched: misses the SLO or drops > 0.1%  ·  ★ outlined: best  ·  95% CI"
            ),
        )?;

        // Legend column on the right, as wide as the longest name needs (within limits).
        let legend_style = font(LABEL_SIZE);
        let mut legend_w = 0;
        for p in &policies {
            legend_w = legend_w.max(root.estimate_text_size(p, &legend_style)?.0 as i32);
        }
        let legend_w = (legend_w + 50).clamp(140, 260);
        let (w, h) = root.dim_in_pixel();
        let body = root.margin(HEADER_H, 10, 10, 10);
        let (chart_area, legend_area) = body.split_horizontally(w as i32 - 20 - legend_w);

        let n_groups = groups.len().max(1);
        let top = groups
            .iter()
            .flat_map(|(_, bars)| bars.iter().map(|(_, b)| b.ratio.max(0.0) + b.ci))
            .fold(1.0f64, f64::max);
        let y_max = top * 1.12;
        let y_dec = decimals_for(y_max);
        let names: Vec<&str> = groups.iter().map(|(s, _)| *s).collect();

        // Scenario names under their groups, shrunk (then cut) when the groups are narrow.
        let group_px = (w as i32 - 20 - legend_w - 90) / n_groups as i32;
        let mut tick_size = TICK_SIZE;
        for name in &names {
            while tick_size > 10.0 && root.estimate_text_size(name, &font(tick_size))?.0 as i32 > group_px - 6
            {
                tick_size -= 1.0;
            }
        }
        let mut tick_names = Vec::new();
        for name in &names {
            tick_names.push(fit_text(root, name, &font(tick_size), group_px - 6)?);
        }

        let mut chart = ChartBuilder::on(&chart_area)
            .x_label_area_size(58)
            .y_label_area_size(88)
            .build_cartesian_2d(0.0..n_groups as f64, 0.0..y_max)?;
        let y_fmt = |v: &f64| format!("{v:.y_dec$}");
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("scenario")
            .y_desc(format!("CPU per packet relative to {reference}"))
            .x_labels(0)
            .y_label_formatter(&y_fmt)
            .y_labels(10)
            .label_style(font(TICK_SIZE))
            .axis_desc_style(font(AXIS_DESC_SIZE))
            .bold_line_style(GRID_BOLD)
            .light_line_style(GRID_LIGHT)
            .y_max_light_lines(1)
            .axis_style(INK.mix(0.8))
            .draw()?;

        // Scenario names under their groups (plotters' own x labels would sit on integer ticks).
        let name_style = font(tick_size).pos(Pos::new(HPos::Center, VPos::Top));
        for (i, name) in tick_names.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            root.draw(&Text::new(name.as_str(), (px, py + 8), name_style.clone()))?;
        }

        // Faint separators between groups.
        for i in 1..n_groups {
            chart.plotting_area().draw(&PathElement::new(
                vec![(i as f64, 0.0), (i as f64, y_max)],
                RGBColor(200, 200, 200).stroke_width(1),
            ))?;
        }

        // The reference line at 1.0 first, so that the bars (the best one too) are drawn over it.
        chart.draw_series(DashedLineSeries::new(
            [(0.0, 1.0), (n_groups as f64, 1.0)],
            10,
            6,
            INK.mix(0.6).stroke_width(2),
        ))?;
        let bounds = pixel_bounds(chart.plotting_area());

        let n_pol = policies.len().max(1);
        let bar_w = 0.8 / n_pol as f64;
        let mut stars = Vec::new();
        for (gi, (_, bars)) in groups.iter().enumerate() {
            for (policy, bar) in bars {
                let Some(pi) = policies.iter().position(|p| p == policy) else { continue };
                let x0 = gi as f64 + 0.1 + pi as f64 * bar_w;
                let (x1, xc) = (x0 + bar_w, x0 + bar_w / 2.0);
                let color = policy_color(policy);
                let y = bar.ratio.max(0.0);
                let area = chart.plotting_area();
                let corners = [(x0 + bar_w * 0.06, 0.0), (x1 - bar_w * 0.06, y)];
                if bar.violates {
                    // Pale and hatched in the policy's colour: present, but plainly not a contender.
                    area.draw(&Rectangle::new(corners, color.mix(0.25).filled()))?;
                    let (l, t) = chart.backend_coord(&(corners[0].0, y));
                    let (r, b) = chart.backend_coord(&(corners[1].0, 0.0));
                    hatch(root, Rect { l, t, r, b }, darker(color))?;
                } else {
                    area.draw(&Rectangle::new(corners, color.filled()))?;
                }
                let outline = if bar.best { INK.stroke_width(3) } else { darker(color).stroke_width(1) };
                area.draw(&Rectangle::new(corners, outline))?;
                if bar.ci > 0.0 {
                    let style = INK.stroke_width(1);
                    let (lo, hi) = ((y - bar.ci).max(0.0), y + bar.ci);
                    area.draw(&PathElement::new(vec![(xc, lo), (xc, hi)], style))?;
                    for end in [lo, hi] {
                        area.draw(
                            &(EmptyElement::at((xc, end)) + PathElement::new(vec![(-3, 0), (3, 0)], style)),
                        )?;
                    }
                }
                if bar.best {
                    stars.push(chart.backend_coord(&(xc, y + bar.ci)));
                }
            }
        }
        // Stars last, on a white disc, so that no line or bar crosses them.
        for (px, py) in stars {
            let style = font(16.0).pos(Pos::new(HPos::Center, VPos::Bottom));
            root.draw(&Circle::new((px, py - 11), 9, WHITE.mix(0.85).filled()))?;
            root.draw(&Text::new("★", (px, py - 3), style))?;
        }

        if groups.is_empty() {
            let style = font(18.0).color(&NOTE_INK).pos(Pos::new(HPos::Center, VPos::Center));
            let c = ((bounds.l + bounds.r) / 2, (bounds.t + bounds.b) / 2);
            root.draw(&Text::new(format!("no scenario has the reference policy {reference}"), c, style))?;
        }

        // Legend.
        let lx = legend_area.get_pixel_range().0.start + 12;
        let mut ly = bounds.t + 4;
        let name_w = legend_w - 40;
        if !policies.is_empty() {
            root.draw(&Text::new("policy", (lx, ly), font(AXIS_DESC_SIZE)))?;
            ly += 28;
        }
        for p in &policies {
            let color = policy_color(p);
            root.draw(&Rectangle::new([(lx, ly + 1), (lx + 16, ly + 15)], color.filled()))?;
            root.draw(&Rectangle::new([(lx, ly + 1), (lx + 16, ly + 15)], darker(color).stroke_width(1)))?;
            let text = fit_text(root, p, &legend_style, name_w)?;
            root.draw(&Text::new(text, (lx + 24, ly), legend_style.clone()))?;
            ly += 24;
            if ly > h as i32 - 110 {
                break;
            }
        }
        if !policies.is_empty() {
            ly += 10;
            let grey = RGBColor(150, 150, 150);
            root.draw(&Rectangle::new([(lx, ly + 1), (lx + 16, ly + 15)], grey.mix(0.25).filled()))?;
            hatch(root, Rect { l: lx, t: ly + 1, r: lx + 16, b: ly + 15 }, darker(grey))?;
            root.draw(&Rectangle::new([(lx, ly + 1), (lx + 16, ly + 15)], darker(grey).stroke_width(1)))?;
            root.draw(&Text::new(
                fit_text(root, "misses the SLO", &legend_style, name_w)?,
                (lx + 24, ly),
                legend_style.clone(),
            ))?;
            ly += 24;
            root.draw(&PathElement::new(
                vec![(lx, ly + 8), (lx + 16, ly + 8)],
                INK.mix(0.6).stroke_width(2),
            ))?;
            let tag = fit_text(root, &format!("{reference} = 1.0"), &legend_style, name_w)?;
            root.draw(&Text::new(tag, (lx + 24, ly), legend_style.clone()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

    /// (width, height) from a PNG's IHDR chunk, which must come first.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert!(bytes.len() > 33, "PNG too short");
        assert_eq!(&bytes[..8], PNG_MAGIC, "not a PNG");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk is not IHDR");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    fn pt(policy: &str, p99: f64, p99_ci: f64, cpu: f64, cpu_ci: f64) -> PlotPoint {
        PlotPoint {
            policy: policy.into(),
            p99_us: p99,
            p99_ci,
            cpu_us: cpu,
            cpu_ci,
            best: false,
            slo_violation_rate: if p99 > 200.0 { 0.6 } else { 0.0 },
            drop_rate: 0.0,
        }
    }

    /// Seven policies on three scenarios, in the ranges the simulator produces.
    fn realistic() -> Vec<(String, Vec<PlotPoint>)> {
        let mut rows = vec![
            (
                "steady-rpc".to_string(),
                vec![
                    pt("per-packet", 38.0, 2.5, 4.10, 0.12),
                    pt("static:ixgbe", 96.0, 7.0, 2.35, 0.08),
                    pt("static:heavy", 610.0, 45.0, 0.92, 0.05),
                    pt("dim", 142.0, 18.0, 2.02, 0.15),
                    pt("itr", 171.0, 22.0, 1.85, 0.11),
                    pt("best-static", 88.0, 6.0, 1.71, 0.06),
                    pt("ppo-v3", 81.0, 9.0, 1.48, 0.09),
                ],
            ),
            (
                "bursty-mixed".to_string(),
                vec![
                    pt("per-packet", 55.0, 6.0, 3.80, 0.20),
                    pt("static:ixgbe", 160.0, 25.0, 2.10, 0.10),
                    pt("static:heavy", 1450.0, 260.0, 0.85, 0.07),
                    pt("dim", 240.0, 60.0, 1.65, 0.22),
                    pt("itr", 205.0, 30.0, 1.70, 0.14),
                    pt("best-static", 150.0, 12.0, 1.90, 0.09),
                    pt("ppo-v3", 158.0, 20.0, 1.52, 0.12),
                ],
            ),
            (
                "bulk-stream".to_string(),
                vec![
                    pt("per-packet", 31.0, 1.0, 3.20, 0.04),
                    pt("static:ixgbe", 70.0, 3.0, 1.20, 0.03),
                    pt("static:heavy", 390.0, 12.0, 0.41, 0.02),
                    pt("dim", 95.0, 5.0, 0.95, 0.05),
                    pt("itr", 110.0, 4.0, 0.88, 0.04),
                    pt("best-static", 180.0, 8.0, 0.52, 0.02),
                    pt("ppo-v3", 175.0, 10.0, 0.49, 0.03),
                ],
            ),
        ];
        for (_, pts) in &mut rows {
            pts.last_mut().unwrap().best = true;
        }
        rows
    }

    fn check_pair(dir: &Path, stem: &str, must_contain: &[&str]) {
        let png = std::fs::read(dir.join(format!("{stem}.png"))).unwrap();
        assert_eq!(png_size(&png), PLOT_SIZE);
        let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "not an SVG");
        for s in must_contain {
            assert!(svg.contains(s), "{stem}.svg lacks {s:?}");
        }
    }

    /// Where the test plots go: a tempdir, or `$MODERATO_PLOT_DIR` to keep them for a look.
    fn out_dir() -> (Option<tempfile::TempDir>, PathBuf) {
        match std::env::var_os("MODERATO_PLOT_DIR") {
            Some(d) => (None, PathBuf::from(d)),
            None => {
                let t = tempfile::tempdir().unwrap();
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        }
    }

    #[test]
    fn plot_realistic_scenarios_and_summary() {
        let (_keep, dir) = out_dir();
        let rows = realistic();
        for (name, pts) in &rows {
            plot_scenario(&dir, name, &format!("{name}: CPU per packet vs p99 latency"), 200.0, true, pts)
                .unwrap();
            let names: Vec<&str> = pts.iter().map(|p| p.policy.as_str()).collect();
            check_pair(&dir, name, &[&names[..], &["SLO", "p99 latency", "CPU per packet"]].concat());
        }
        plot_summary(&dir, "summary", "dim", &rows).unwrap();
        let mut want: Vec<&str> = rows[0].1.iter().map(|p| p.policy.as_str()).collect();
        want.extend(rows.iter().map(|(s, _)| s.as_str()));
        check_pair(&dir, "summary", &want);
    }

    #[test]
    fn plot_degenerate_inputs() {
        let (_keep, dir) = out_dir();
        let nan = f64::NAN;
        let cases: Vec<(&str, f64, Vec<PlotPoint>)> = vec![
            ("deg-one", 200.0, vec![pt("dim", 120.0, 0.0, 1.5, 0.0)]),
            ("deg-equal", 200.0, vec![pt("dim", 50.0, 0.0, 1.0, 0.0), pt("itr", 50.0, 0.0, 1.0, 0.0)]),
            (
                "deg-zero-nan",
                200.0,
                vec![
                    pt("per-packet", 0.0, 0.0, 2.0, 0.1),
                    pt("dim", nan, 1.0, 1.0, 0.1),
                    pt("itr", 80.0, nan, nan, 0.0),
                    pt("best-static", 90.0, 200.0, 1.1, nan),
                    pt("static:16/16", 1e-9, 0.0, -0.0, 0.0),
                ],
            ),
            ("deg-empty", 200.0, vec![]),
            ("deg-bad-slo", nan, vec![pt("dim", 120.0, 3.0, 1.5, 0.1)]),
            ("deg-zero-slo", 0.0, vec![pt("dim", f64::INFINITY, 3.0, 1.5, 0.1)]),
        ];
        for (stem, slo, pts) in &cases {
            plot_scenario(&dir, stem, stem, *slo, true, pts).unwrap();
            check_pair(&dir, stem, &[]);
        }
        let rows = vec![
            ("no-ref".to_string(), vec![pt("itr", 50.0, 1.0, 1.0, 0.1)]),
            ("zero-ref".to_string(), vec![pt("dim", 50.0, 1.0, 0.0, 0.1), pt("itr", 50.0, 1.0, 1.0, 0.1)]),
        ];
        plot_summary(&dir, "deg-summary-empty", "dim", &rows).unwrap();
        check_pair(&dir, "deg-summary-empty", &["dim"]);
        let rows = vec![(
            "one".to_string(),
            vec![pt("dim", 50.0, 1.0, 1.0, nan), pt("itr", 50.0, 1.0, nan, 0.1), pt("x", 1.0, 0.0, 2.0, 0.0)],
        )];
        plot_summary(&dir, "deg-summary-one", "dim", &rows).unwrap();
        check_pair(&dir, "deg-summary-one", &["dim", "one"]);
    }

    /// Many policies with long names, many scenarios, crowded points: still drawn, names fitted.
    #[test]
    fn plot_crowded() {
        let (_keep, dir) = out_dir();
        let policies = [
            "per-packet",
            "static:ixgbe",
            "static:mlx5",
            "static:moderate",
            "static:heavy",
            "static:64/32",
            "dim",
            "itr",
            "best-static",
            "models/ppo-2025-06-01-reward-v2-long-run",
            "models/ppo-small",
            "sac-v1",
        ];
        let mut rows = Vec::new();
        for s in 0..8 {
            let pts: Vec<PlotPoint> = policies
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let f = (i as f64 + 1.0) * (1.0 + 0.1 * s as f64);
                    let mut pt = pt(p, 60.0 + 9.0 * f, 4.0 + f, 3.0 - 0.2 * f, 0.05 * f);
                    pt.best = i == 9;
                    pt
                })
                .collect();
            rows.push((format!("scenario-with-a-long-name-{s}"), pts));
        }
        plot_scenario(&dir, "crowded", "crowded: CPU per packet vs p99 latency", 150.0, true, &rows[0].1)
            .unwrap();
        check_pair(&dir, "crowded", &["SLO", "sac-v1"]);
        plot_summary(&dir, "crowded-summary", "dim", &rows).unwrap();
        check_pair(&dir, "crowded-summary", &["dim"]);
    }

    #[test]
    fn violators_are_marked_and_bulk_scenarios_have_no_slo_line() {
        let (_keep, dir) = out_dir();
        let mut pts =
            vec![pt("static:heavy", 900.0, 5.0, 3.0, 0.01), pt("best-static", 150.0, 3.0, 3.5, 0.02)];
        pts[1].best = true;
        plot_scenario(&dir, "viol", "viol", 200.0, true, &pts).unwrap();
        let svg = std::fs::read_to_string(dir.join("viol.svg")).unwrap();
        assert!(
            svg.contains("static:heavy (SLO ✗ 60%)") && svg.contains("SLO 200 µs"),
            "violator unlabelled"
        );
        assert!(!svg.contains("best-static ★ ("), "the best policy is not a violator");
        // Bulk only: the SLO is not drawn against latencies it does not cover.
        let mut bulk = pts.clone();
        bulk[0].slo_violation_rate = 0.0;
        bulk[0].drop_rate = 0.5;
        plot_scenario(&dir, "bulk", "bulk", 200.0, false, &bulk).unwrap();
        let svg = std::fs::read_to_string(dir.join("bulk.svg")).unwrap();
        assert!(!svg.contains("SLO 200"), "an SLO line on a bulk-only scenario");
        assert!(svg.contains("p99 latency of all flows") && svg.contains("drops 50.0%"), "bulk labels");
        // In the summary, violators are hatched: more line elements than without any violator.
        let count_paths = |rows: &[(String, Vec<PlotPoint>)], stem: &str| {
            plot_summary(&dir, stem, "best-static", rows).unwrap();
            std::fs::read_to_string(dir.join(format!("{stem}.svg"))).unwrap().matches("<polyline").count()
        };
        let with = count_paths(&[("s".to_string(), pts.clone())], "sum-viol");
        let mut clean = pts.clone();
        clean[0].slo_violation_rate = 0.0;
        let without = count_paths(&[("s".to_string(), clean)], "sum-clean");
        assert!(with > without + 3, "no hatching: {with} vs {without} lines");
    }

    #[test]
    fn hatching_stays_inside_its_rectangle() {
        let (_keep, dir) = out_dir();
        let path = dir.join("hatch.svg");
        {
            let root = SVGBackend::new(&path, (100, 100)).into_drawing_area();
            hatch(&root, Rect { l: 10, t: 20, r: 40, b: 80 }, INK).unwrap();
            root.present().unwrap();
        }
        let svg = std::fs::read_to_string(&path).unwrap();
        let mut n = 0;
        for line in svg.lines().filter(|l| l.contains("<polyline")) {
            let pts = line.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
            for xy in pts.split_whitespace() {
                let (x, y) = xy.split_once(',').unwrap();
                let (x, y): (i32, i32) = (x.parse().unwrap(), y.parse().unwrap());
                assert!((10..=40).contains(&x) && (20..=80).contains(&y), "({x}, {y}) outside");
                n += 1;
            }
        }
        assert!(n >= 10, "only {n} hatch points");
    }

    #[test]
    fn colours_are_stable_and_distinct_for_baselines() {
        assert_eq!(policy_color("dim"), policy_color("dim"));
        assert_eq!(policy_color("models/ppo-v3"), policy_color("models/ppo-v3"));
        let base = ["per-packet", "dim", "itr", "best-static", "static:ixgbe", "static:mlx5"];
        for (i, a) in base.iter().enumerate() {
            for b in &base[i + 1..] {
                assert_ne!(policy_color(a), policy_color(b), "{a} and {b}");
            }
        }
        // Hash-picked colours never reuse a fixed baseline colour.
        for c in STATIC_COLORS.iter().chain(MODEL_COLORS) {
            assert!(FIXED_COLORS.iter().all(|(_, f)| f != c));
        }
    }

    #[test]
    fn log_ticks_cover_narrow_and_wide_ranges() {
        let (b, _) = log_ticks(20.0, 2000.0);
        assert!(b.contains(&100.0) && b.contains(&50.0) && b.len() >= 4);
        let (b, _) = log_ticks(110.0, 150.0);
        assert!(b.len() >= 2, "{b:?}");
        let (b, _) = log_ticks(0.5, 1e6);
        assert!(b.len() >= 4);
        assert_eq!(fmt_tick(200.0), "200");
        assert_eq!(fmt_tick(0.25), "0.25");
    }

    #[test]
    fn error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let err = plot_scenario(&blocker.join("sub"), "s", "t", 100.0, true, &[]).unwrap_err();
        assert!(err.to_string().contains("file"), "{err}");
    }
}
