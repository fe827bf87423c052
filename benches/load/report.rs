//! The results of one run: a text table with each goal met or not, and a chart as a hand-written
//! SVG (a few rectangles and polylines; not worth a plotting crate and its build time).

use std::fmt::Write;

pub struct HitResult {
    pub system: String,
    /// Requests per second, one per round.
    pub rates: Vec<f64>,
}

pub struct MissResult {
    pub system: String,
    pub latencies_ms: Vec<f64>,
}

pub struct BurstResult {
    pub system: String,
    pub instances: usize,
    /// Upstream fetches, one per burst.
    pub fetches: Vec<u64>,
    /// Every answered request's wake-up, over all bursts.
    pub wake_ups_ms: Vec<f64>,
    /// Requests not answered 200 with the upstream's stamp.
    pub failed: usize,
}

pub struct MemoryResult {
    pub system: String,
    /// VmRSS before the followers came, bytes (the process and its children).
    pub before: u64,
    /// The highest VmRSS while they waited, bytes.
    pub peak: u64,
    pub error: Option<String>,
}

pub struct Report {
    pub hits: Vec<HitResult>,
    pub misses: Vec<MissResult>,
    pub bursts: Vec<BurstResult>,
    pub memory: Vec<MemoryResult>,
    pub seconds: u64,
    pub rounds: u64,
    pub connections: usize,
    pub burst: usize,
    pub followers: usize,
    pub miss_count: u64,
    pub miss_delay_ms: u64,
    pub burst_delay_ms: u64,
    /// /proc/loadavg when the run ended.
    pub load: String,
}

/// The `q` quantile (0..=1) of `values`, nearest rank; 0 for none.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

impl Report {
    /// The median over rounds of `system`'s rate over the baseline's in the same round: each
    /// round's pair ran back to back, so outside load that comes and goes cancels out better than
    /// in a ratio of medians.
    fn ratio(&self, system: &str) -> f64 {
        let (Some(baseline), Some(hit)) = (
            self.hits.iter().find(|h| h.system.starts_with("hyper")),
            self.hits.iter().find(|h| h.system.starts_with(system)),
        ) else {
            return 0.0;
        };
        let ratios: Vec<f64> = hit
            .rates
            .iter()
            .zip(&baseline.rates)
            .map(|(rate, base)| rate / base)
            .collect();
        quantile(&ratios, 0.5)
    }

    fn miss_p50(&self, system: &str) -> f64 {
        self.misses
            .iter()
            .find(|m| m.system.starts_with(system))
            .map_or(0.0, |m| quantile(&m.latencies_ms, 0.5))
    }

    /// Each goal: what it asks, what was measured, and whether it holds.
    fn goals(&self) -> Vec<(String, String, bool)> {
        let l1 = self.ratio("corral (L1)");
        let store = self.ratio("corral (Redis");
        let overhead = self.miss_p50("corral") - self.miss_p50("upstream");
        let corral_burst = self.bursts.iter().find(|b| b.system.starts_with("corral"));
        let p99 = corral_burst.map_or(f64::INFINITY, |b| quantile(&b.wake_ups_ms, 0.99));
        let fetches =
            corral_burst.map_or(u64::MAX, |b| b.fetches.iter().copied().max().unwrap_or(0));
        let memory = self.memory.iter().find(|m| m.system == "corral");
        let extra = memory.map_or(f64::INFINITY, |m| mib(m.peak.saturating_sub(m.before)));
        let memory_ok = memory.is_some_and(|m| m.error.is_none()) && extra < 64.0;
        vec![
            (
                "L1 hit throughput >= 0.95 x baseline".into(),
                format!("{l1:.2} x"),
                l1 >= 0.95,
            ),
            (
                "store hit (L1 off) >= 0.5 x baseline".into(),
                format!("{store:.2} x"),
                store >= 0.5,
            ),
            (
                "miss overhead p50 < 1 ms".into(),
                format!("{overhead:.2} ms"),
                overhead < 1.0,
            ),
            (
                "follower wake-up p99 < 5 ms (3 replicas)".into(),
                format!("{p99:.2} ms"),
                p99 < 5.0,
            ),
            (
                format!("{} followers: < 64 MiB extra RSS", self.followers),
                format!("{extra:.1} MiB"),
                memory_ok,
            ),
            (
                format!("{}-request burst over 3 replicas: 1 fetch", self.burst),
                format!("{fetches} (most in one burst)"),
                fetches == 1,
            ),
        ]
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## Hit throughput\n");
        let _ = writeln!(
            out,
            "wrk -t1 -c{} -d{}s, 1 KiB body, {} rounds interleaved; req/s is the median of the \
             rounds, x baseline the median of each round's ratio to the baseline's run in that round.\n",
            self.connections, self.seconds, self.rounds
        );
        let _ = writeln!(out, "| system | req/s | x baseline | rounds |");
        let _ = writeln!(out, "|---|---:|---:|---|");
        for hit in &self.hits {
            let rate = quantile(&hit.rates, 0.5);
            let rounds: Vec<String> = hit.rates.iter().map(|r| format!("{r:.0}")).collect();
            let _ = writeln!(
                out,
                "| {} | {rate:.0} | {:.2} | {} |",
                hit.system,
                self.ratio(&hit.system),
                rounds.join(", ")
            );
        }
        let _ = writeln!(out, "\n## Miss path\n");
        let _ = writeln!(
            out,
            "{} sequential requests per system, each a new key and a new connection, upstream \
             latency {} ms, interleaved.\n",
            self.miss_count, self.miss_delay_ms
        );
        let _ = writeln!(out, "| system | p50 ms | p99 ms | p50 over direct ms |");
        let _ = writeln!(out, "|---|---:|---:|---:|");
        let direct = self.miss_p50("upstream");
        for miss in &self.misses {
            let p50 = quantile(&miss.latencies_ms, 0.5);
            let _ = writeln!(
                out,
                "| {} | {p50:.2} | {:.2} | {:.2} |",
                miss.system,
                quantile(&miss.latencies_ms, 0.99),
                p50 - direct
            );
        }
        let _ = writeln!(out, "\n## Burst on one key\n");
        let _ = writeln!(
            out,
            "{} requests released together, round-robin over the instances, upstream latency {} ms, \
             {} bursts. Wake-up: client receipt - upstream answer (one clock).\n",
            self.burst, self.burst_delay_ms, self.rounds
        );
        let _ = writeln!(
            out,
            "| system | fetches per burst | wake-up p50 ms | p99 ms | max ms | failed |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
        for burst in &self.bursts {
            let fetches: Vec<String> = burst.fetches.iter().map(u64::to_string).collect();
            let _ = writeln!(
                out,
                "| {} ({} instances) | {} | {:.2} | {:.2} | {:.2} | {} |",
                burst.system,
                burst.instances,
                fetches.join(", "),
                quantile(&burst.wake_ups_ms, 0.5),
                quantile(&burst.wake_ups_ms, 0.99),
                quantile(&burst.wake_ups_ms, 1.0),
                burst.failed
            );
        }
        let _ = writeln!(
            out,
            "\n## Memory under {} followers on one key\n",
            self.followers
        );
        let _ = writeln!(
            out,
            "One instance; VmRSS of the process and its children.\n"
        );
        let _ = writeln!(out, "| system | idle MiB | peak MiB | extra MiB | note |");
        let _ = writeln!(out, "|---|---:|---:|---:|---|");
        for memory in &self.memory {
            let _ = writeln!(
                out,
                "| {} | {:.1} | {:.1} | {:.1} | {} |",
                memory.system,
                mib(memory.before),
                mib(memory.peak),
                mib(memory.peak.saturating_sub(memory.before)),
                memory.error.as_deref().unwrap_or("")
            );
        }
        let _ = writeln!(out, "\n## Goals\n");
        let _ = writeln!(out, "| goal | measured | |");
        let _ = writeln!(out, "|---|---:|---|");
        for (goal, measured, met) in self.goals() {
            let _ = writeln!(out, "| {goal} | {measured} | {} |", verdict(met));
        }
        let _ = writeln!(
            out,
            "\nLoad average at the end of the run: {}",
            self.load.trim()
        );
        out
    }

    pub fn svg(&self) -> String {
        const WIDTH: f64 = 860.0;
        const LEFT: f64 = 190.0;
        const PLOT: f64 = 600.0;
        const BAR: f64 = 22.0;
        const COLORS: [&str; 5] = ["#888888", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"];
        let mut svg = String::new();
        let bars_top = 40.0;
        let bars_height = self.hits.len() as f64 * (BAR + 8.0);
        let cdf_top = bars_top + bars_height + 80.0;
        let cdf_height = 240.0;
        let height = cdf_top + cdf_height + 70.0;
        let _ = writeln!(
            svg,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
             font-family=\"sans-serif\" font-size=\"12\">"
        );
        let _ = writeln!(svg, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        let _ = writeln!(
            svg,
            "<text x=\"10\" y=\"24\" font-size=\"15\">Hit throughput, req/s (wrk, 1 KiB body, \
             median of {} rounds)</text>",
            self.rounds
        );
        let most = self
            .hits
            .iter()
            .map(|h| quantile(&h.rates, 0.5))
            .fold(1.0, f64::max);
        for (i, hit) in self.hits.iter().enumerate() {
            let rate = quantile(&hit.rates, 0.5);
            let y = bars_top + i as f64 * (BAR + 8.0);
            let width = PLOT * rate / most;
            let _ = writeln!(
                svg,
                "<text x=\"{x}\" y=\"{ty}\" text-anchor=\"end\">{name}</text>\
                 <rect x=\"{LEFT}\" y=\"{y}\" width=\"{width:.1}\" height=\"{BAR}\" fill=\"{color}\"/>\
                 <text x=\"{vx:.1}\" y=\"{ty}\">{rate:.0}</text>",
                x = LEFT - 8.0,
                ty = y + 15.0,
                name = escape(&hit.system),
                color = COLORS[i % COLORS.len()],
                vx = LEFT + width + 6.0,
            );
        }
        // Wake-up distributions: cumulative share of requests answered by t, t on a log axis.
        let _ = writeln!(
            svg,
            "<text x=\"10\" y=\"{}\" font-size=\"15\">Burst of {} on one key: share of requests \
             answered within t of the upstream's answer</text>",
            cdf_top - 30.0,
            self.burst
        );
        let (lo, hi) = (0.1f64.log10(), 2000f64.log10());
        let x_of = |ms: f64| LEFT + PLOT * (ms.max(0.1).log10() - lo) / (hi - lo);
        let y_of = |share: f64| cdf_top + cdf_height * (1.0 - share);
        let _ = writeln!(
            svg,
            "<rect x=\"{LEFT}\" y=\"{cdf_top}\" width=\"{PLOT}\" height=\"{cdf_height}\" \
             fill=\"none\" stroke=\"#ccc\"/>"
        );
        for ms in [0.1, 1.0, 10.0, 100.0, 1000.0] {
            let x = x_of(ms);
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{cdf_top}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#eee\"/>\
                 <text x=\"{x:.1}\" y=\"{ly}\" text-anchor=\"middle\">{ms} ms</text>",
                bottom = cdf_top + cdf_height,
                ly = cdf_top + cdf_height + 16.0,
            );
        }
        for share in [0.0, 0.5, 0.99] {
            let y = y_of(share);
            let _ = writeln!(
                svg,
                "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{right}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\
                 <text x=\"{lx}\" y=\"{ty:.1}\" text-anchor=\"end\">{pct}%</text>",
                right = LEFT + PLOT,
                lx = LEFT - 6.0,
                ty = y + 4.0,
                pct = share * 100.0,
            );
        }
        for (i, burst) in self.bursts.iter().enumerate() {
            let mut sorted = burst.wake_ups_ms.clone();
            sorted.sort_by(f64::total_cmp);
            let n = sorted.len().max(1) as f64;
            let points: Vec<String> = sorted
                .iter()
                .enumerate()
                .map(|(k, ms)| format!("{:.1},{:.1}", x_of(*ms), y_of((k + 1) as f64 / n)))
                .collect();
            let color = COLORS[(i + 1) % COLORS.len()];
            let _ = writeln!(
                svg,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
                points.join(" ")
            );
            let ly = cdf_top + cdf_height + 36.0 + 0.0 * i as f64;
            let lx = LEFT + i as f64 * 200.0;
            let _ = writeln!(
                svg,
                "<rect x=\"{lx}\" y=\"{ry}\" width=\"14\" height=\"4\" fill=\"{color}\"/>\
                 <text x=\"{tx}\" y=\"{ly}\">{name}: p99 {p99:.1} ms</text>",
                ry = ly - 6.0,
                tx = lx + 20.0,
                name = escape(&burst.system),
                p99 = quantile(&burst.wake_ups_ms, 0.99),
            );
        }
        let _ = writeln!(svg, "</svg>");
        svg
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
